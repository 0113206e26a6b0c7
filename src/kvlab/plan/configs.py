"""The configs a plan compares: a model at a quantization level (a serve profile) on a GPU preset.

A config holds the level's serve configuration (`kvlab.serve_config.ServeConfig`, as `kvlab serve
--engine sim` takes it), checked against what the simulated vLLM accepts and resolved by
`kvlab.sim.config.build_config`. It is described by three factors, the ones whose savings a plan
separates: the model (which fixes the attention type), the KV-cache dtype and the weight format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from kvlab import hardware
from kvlab.errors import KvlabError
from kvlab.models.arch import normalize_dtype
from kvlab.models.cards import resolve_model, with_hf_overrides
from kvlab.models.memory import DEFAULT_VLLM_VERSION
from kvlab.serve_config import ServeConfig

# The order in which `nearest_working` tries other quantization levels: the smallest change first.
NEAREST_QUANTS = ("fp8-kv", "fp8", "fp8+fp8-kv", "awq", "gptq")
TP_SIZES = (1, 2, 4, 8)
_KV_ALIASES = {"fp8_e4m3": "fp8"}
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# What the simulation does not depend on: the name, and whether a checkpoint or a flag gives the weights.
_NOT_SIMULATED = {"level", "checkpoint", "weights_from_checkpoint"}


@dataclass(frozen=True)
class PlanConfig:
    serve: ServeConfig  # the model at a level (or "kv=..,weights=.." for a config made to attribute savings)
    gpu: str  # GPU preset
    kv_cache_dtype: str  # bf16 (fp16, fp32) when the KV cache takes the model dtype, else fp8, ...
    weights: str  # bf16 (fp16, fp32) when unquantized, else the weight format: fp8, awq, ...
    attention: str  # MLA, GQA, MHA, MQA
    serve_args: tuple[str, ...] = ()  # the spec's `vllm serve` flags, on top of the level's (already in `serve`)
    vllm_version: str = DEFAULT_VLLM_VERSION  # the vLLM release simulated (kvlab's --vllm-version)

    @property
    def model(self) -> str:  # card name
        return self.serve.model

    @property
    def quant(self) -> str:
        return self.serve.label

    @property
    def tp(self) -> int:
        return self.serve.tensor_parallel_size

    @property
    def label(self) -> str:
        return f"{self.model}/{self.quant}" + (f" -tp {self.tp}" if self.tp > 1 else "")

    @property
    def factors(self) -> dict[str, str]:
        """What savings are attributed to: the model (its attention), the KV dtype, the weights."""
        return {"model": self.model, "kv_cache_dtype": self.kv_cache_dtype, "weights": self.weights}

    @property
    def simulated(self) -> str:
        """The serve configuration as the simulator sees it (one JSON string: a key for caches)."""
        return json.dumps({**self.serve.model_dump(mode="json", exclude=_NOT_SIMULATED),
                           "vllm_version": self.vllm_version}, sort_keys=True)

    def sim_config(self):
        """The simulated engine's config (KvlabError with vLLM's message if vLLM would not start)."""
        from kvlab.sim.config import build_config

        return build_config(self.serve, self.gpu, vllm_version=self.vllm_version)

    def sim_run_flags(self) -> list[str]:
        """The `kvlab sim run` flags that give this config."""
        from kvlab.serve_config import graph_argv

        serve = self.serve.model_copy(update={"vllm_args": tuple(graph_argv(self.serve.vllm_args))})
        argv = serve.to_argv(name_checkpoint_weights=True)
        return argv + (["--vllm-version", self.vllm_version] if self.vllm_version != DEFAULT_VLLM_VERSION else [])

    def at(self, quant: str | None = None, tp: int | None = None) -> "PlanConfig":
        """The same model, GPU, context length, serve flags and vLLM release at another level or -tp."""
        return resolve_config(self.model, quant or self.quant, self.gpu, tp or self.tp, self.serve.max_model_len,
                              self.serve_args, self.vllm_version)


def _kv_factor(kv: str, model_dtype: str) -> str:
    """The KV dtype as a factor: `auto` and the model dtype's own name are one value (bf16, ...)."""
    kv = _KV_ALIASES.get(kv, kv)
    if kv == "auto":
        return DTYPE_SHORT[model_dtype]
    return DTYPE_SHORT.get(normalize_dtype(kv), kv) if kv in ("bfloat16", "float16", "float32", "half", "float") else kv


def resolve_config(model: str, quant: str, gpu: str, tp: int, max_model_len: int, serve_args: tuple[str, ...] = (),
                   vllm_version: str = DEFAULT_VLLM_VERSION) -> PlanConfig:
    """MODEL at serve profile QUANT, as `kvlab serve --engine sim` would serve it with `serve_args` (a
    spec's `vllm serve` flags) on top, at -tp and a context length, on vLLM release `vllm_version`."""
    from kvlab.deploy.profiles import profile
    from kvlab.sim.args import check_config

    resolved = resolve_model(model)
    if resolved.card is None:
        raise KvlabError(f"--models: {model!r} is not a built-in card (kvlab cards): the planner uses the cards' "
                         "serve profiles")
    preset = hardware.gpu(gpu)
    name = resolved.card.name
    serve = profile(name, quant).serve_config(name).with_flags(serve_args).model_copy(
        update={"tensor_parallel_size": tp, "max_model_len": max_model_len})
    try:
        check_config(serve)
    except KvlabError as e:
        raise KvlabError(f"{name}/{quant}: the simulator cannot serve this profile ({e})") from None
    return _make(serve, preset.name, tuple(serve_args), vllm_version)


def _make(serve: ServeConfig, gpu: str, serve_args: tuple[str, ...], vllm_version: str) -> PlanConfig:
    from kvlab.models.weights import weight_format

    arch = with_hf_overrides(resolve_model(serve.model), serve.hf_overrides).arch
    dtype = normalize_dtype(serve.dtype or arch.dtype)
    weights = weight_format(serve.weights, arch).key
    weights = DTYPE_SHORT[dtype] if weights == "auto" else weights
    kv = _kv_factor(serve.kv_cache_dtype, dtype)
    return PlanConfig(serve, gpu, kv, weights, arch.attention, serve_args, vllm_version)


def with_factors(base: PlanConfig, model: str, kv_cache_dtype: str, weights: str, quant_names: dict) -> PlanConfig:
    """`base`'s GPU, -tp and context length with another model, KV dtype or weight format: the
    configs between a baseline and a config, one factor changed at a time. Named after the serve
    profile that has these flags where one does (`quant_names`: (model, kv, weights) -> level)."""
    dtype = DTYPE_SHORT[normalize_dtype(resolve_model(model).arch.dtype)]
    unquantized = weights in DTYPE_SHORT.values()
    name = quant_names.get((model, kv_cache_dtype, weights)) or f"kv={kv_cache_dtype},weights={weights}"
    serve = base.serve.model_copy(update={
        "model": model, "level": name, "checkpoint": None, "weights": None if unquantized else weights,
        "weights_from_checkpoint": False, "quantization_method": None,
        "kv_cache_dtype": "auto" if kv_cache_dtype == dtype else _dtype_flag(kv_cache_dtype)})
    return _make(serve, base.gpu, base.serve_args, base.vllm_version)


def _dtype_flag(kv: str) -> str:
    """A KV factor value as a --kv-cache-dtype value."""
    return {v: k for k, v in DTYPE_SHORT.items()}.get(kv, kv)


def nearest_working(cfg: PlanConfig, levels: list[str]) -> tuple[PlanConfig, str] | None:
    """The closest config the GPU can start (weights and one max-length request fit), changing
    one thing: another quantization level of the model, more tensor-parallel GPUs, or a GPU preset
    with more memory. None when nothing of that kind fits."""
    tries: list[tuple[str, Any]] = [(f"--quant {q}", lambda q=q: cfg.at(quant=q))
                                    for q in NEAREST_QUANTS if q in levels and q != cfg.quant]
    tries += [(f"-tp {tp}", lambda tp=tp: cfg.at(tp=tp)) for tp in TP_SIZES if tp > cfg.tp]
    here = hardware.gpu(cfg.gpu).memory_bytes
    bigger = sorted((g for g in hardware.PRESETS if g.memory_bytes > here), key=lambda g: g.memory_bytes)
    tries += [(f"--gpu {g.name}", lambda g=g: replace(cfg, gpu=g.name)) for g in bigger]
    for change, make in tries:
        try:
            alt = make()
            alt.sim_config()
        except KvlabError:
            continue
        return alt, change
    return None
