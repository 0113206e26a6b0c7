"""The protocol every engine follows (`Engine`), with the official vLLM's behaviour as the default."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

from kvlab.deploy import host
from kvlab.deploy.commands import Command
from kvlab.deploy.host import CpuFeatures, VllmInstall
from kvlab.errors import KvlabError
from kvlab.models import memory
from kvlab.models.arch import ModelArch
from kvlab.models.cards import ResolvedModel
from kvlab.serve_config import ServeConfig
from kvlab.units import GiB


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
    launched_by_kvlab: ClassVar[bool] = True  # False: a server kvlab did not start (external)
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

    def served_arch(self, resolved: ResolvedModel, hf_overrides: str | None = None) -> ModelArch:
        """The architecture of what the engine loads, under vLLM's --hf-overrides (`hf_overrides`, the
        flag's JSON; `resolved` has them applied already)."""
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
            return memory.default_gpu_memory_utilization(v or memory.DEFAULT_VLLM_VERSION)
        except KvlabError:  # a version string kvlab cannot read: kvlab's default release
            return memory.DEFAULT_GPU_MEMORY_UTILIZATION

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

    @classmethod
    def open_server(cls, spec: Any, endpoint: Any = None) -> Any:
        """The server object for a ServeSpec (not started): kvlab launches it; an endpoint is refused."""
        from kvlab import deploy

        if endpoint is not None:
            raise KvlabError(f"engine {cls.name} starts its own server: an endpoint ({endpoint.url}) is for "
                             "engine external")
        return deploy.Server(spec)

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


def preset_for_gpu_name(name: str) -> str | None:
    """The kvlab GPU preset for an nvidia-smi name ("NVIDIA H100 80GB HBM3" -> h100)."""
    s = name.lower()
    for key, preset in (("h200", "h200"), ("h100 nvl", "h100-nvl"), ("h100 pcie", "h100-pcie"), ("h100", "h100"),
                        ("b200", "b200"), ("l40s", "l40s"), ("4090", "rtx-4090"), ("mi300x", "mi300x")):
        if key in s:
            return preset
    if "a100" in s:
        if "40gb" in s.replace(" ", ""):
            return "a100-40gb"
        return "a100-pcie" if "pcie" in s else "a100-80gb"
    if " l4" in f" {s}" and "l40" not in s:
        return "l4"
    return None



def _served_names(config: ServeConfig) -> list[str]:
    return ["--served-model-name", *config.served_model_names] if config.served_model_names else []


def _api_key_env(launch: Launch) -> dict[str, str]:
    # Through the environment, not --api-key: vLLM logs its non-default args, and argv shows in `ps`.
    return {"VLLM_API_KEY": launch.api_key} if launch.api_key else {}
