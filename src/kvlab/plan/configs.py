"""The configs a plan compares: a model at a quantization level (a serve profile) on a GPU preset.

A config resolves to the simulated engine exactly as `kvlab serve --engine sim` starts it: the
profile's `vllm serve` flags (and its checkpoint's weight format) read by `kvlab sim serve`'s own
parser, then `kvlab.sim.config.build_config`. It is described by three factors, the ones whose
savings a plan separates: the model (which fixes the attention type), the KV-cache dtype and the
weight format.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from kvlab import hardware
from kvlab.errors import KvlabError
from kvlab.models.arch import normalize_dtype
from kvlab.models.cards import resolve_model

# The order in which `nearest_working` tries other quantization levels: the smallest change first.
NEAREST_QUANTS = ("fp8-kv", "fp8", "fp8+fp8-kv", "awq", "gptq")
TP_SIZES = (1, 2, 4, 8)
_KV_ALIASES = {"fp8_e4m3": "fp8"}
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# The memory model's weight formats as `vllm serve --quantization` names (kvlab sim run takes those).
VLLM_QUANTIZATION = {"fp8-block": "fp8_per_block", "int8": "compressed-tensors"}


@dataclass(frozen=True)
class PlanConfig:
    model: str  # card name
    quant: str  # serve profile level; for a config made to attribute savings, "kv=..,weights=.."
    gpu: str  # GPU preset
    tp: int
    engine: tuple[tuple[str, Any], ...]  # build_config keywords (vllm serve flags), sorted
    kv_cache_dtype: str  # bf16 (fp16, fp32) when the KV cache takes the model dtype, else fp8, ...
    weights: str  # bf16 (fp16, fp32) when unquantized, else the weight format: fp8, awq, ...
    attention: str  # MLA, GQA, MHA, MQA

    @property
    def label(self) -> str:
        return f"{self.model}/{self.quant}" + (f" -tp {self.tp}" if self.tp > 1 else "")

    @property
    def factors(self) -> dict[str, str]:
        """What savings are attributed to: the model (its attention), the KV dtype, the weights."""
        return {"model": self.model, "kv_cache_dtype": self.kv_cache_dtype, "weights": self.weights}

    def engine_args(self) -> dict[str, Any]:
        return dict(self.engine)

    def sim_config(self):
        """The simulated engine's config (KvlabError with vLLM's message if vLLM would not start)."""
        from kvlab.sim.config import build_config

        return build_config(self.model, self.gpu, **self.engine_args())

    def sim_run_flags(self) -> list[str]:
        """The `kvlab sim run` flags that give this config."""
        e = self.engine_args()
        flags = ["--max-model-len", str(e["max_model_len"])]
        if e.get("kv_cache_dtype", "auto") != "auto":
            flags += ["--kv-cache-dtype", e["kv_cache_dtype"]]
        if e.get("quantization"):
            flags += ["--quantization", VLLM_QUANTIZATION.get(e["quantization"], e["quantization"])]
        if self.tp > 1:
            flags += ["-tp", str(self.tp)]
        return flags


def _kv_factor(kv: str, model_dtype: str) -> str:
    """The KV dtype as a factor: `auto` and the model dtype's own name are one value (bf16, ...)."""
    kv = _KV_ALIASES.get(kv, kv)
    if kv == "auto":
        return DTYPE_SHORT[model_dtype]
    return DTYPE_SHORT.get(normalize_dtype(kv), kv) if kv in ("bfloat16", "float16", "float32", "half", "float") else kv


def resolve_config(model: str, quant: str, gpu: str, tp: int, max_model_len: int) -> PlanConfig:
    """MODEL at serve profile QUANT, with the flags `kvlab serve --engine sim` would pass."""
    from kvlab.deploy.profiles import profile
    from kvlab.sim.args import parse_serve_args

    resolved = resolve_model(model)
    if resolved.card is None:
        raise KvlabError(f"--models: {model!r} is not a built-in card (kvlab cards): the planner uses the cards' "
                         "serve profiles")
    preset = hardware.gpu(gpu)
    prof = profile(resolved.card.name, quant)
    argv = [resolved.card.name, "--gpu", preset.name, *prof.args, "-tp", str(tp), "--max-model-len", str(max_model_len)]
    if prof.weights and not {"--quantization", "-q"} & set(prof.args):
        argv += ["--quantization", prof.weights]  # a pre-quantized checkpoint: its weight format
    try:
        engine = parse_serve_args(argv).engine
    except KvlabError as e:
        raise KvlabError(f"{resolved.card.name}/{quant}: the simulator cannot serve this profile ({e})") from None
    return _make(resolved.card.name, quant, preset.name, tp, engine)


def _make(model: str, quant: str, gpu: str, tp: int, engine: dict[str, Any]) -> PlanConfig:
    from kvlab.models.weights import weight_format

    arch = resolve_model(model).arch
    engine = {k: v for k, v in engine.items() if v is not None}
    dtype = normalize_dtype(engine.get("dtype") or arch.dtype)
    weights = weight_format(engine.get("quantization"), arch).name
    weights = DTYPE_SHORT[dtype] if weights == "auto" else weights
    kv = _kv_factor(engine.get("kv_cache_dtype", "auto"), dtype)
    return PlanConfig(model, quant, gpu, tp, tuple(sorted(engine.items())), kv, weights, arch.attention)


def with_factors(base: PlanConfig, model: str, kv_cache_dtype: str, weights: str, quant_names: dict) -> PlanConfig:
    """`base`'s GPU, -tp and context length with another model, KV dtype or weight format: the
    configs between a baseline and a config, one factor changed at a time. Named after the serve
    profile that has these flags where one does (`quant_names`: (model, kv, weights) -> level)."""
    engine = base.engine_args()
    dtype = DTYPE_SHORT[normalize_dtype(resolve_model(model).arch.dtype)]
    unquantized = weights in DTYPE_SHORT.values()
    engine["kv_cache_dtype"] = "auto" if kv_cache_dtype == dtype else _dtype_flag(kv_cache_dtype)
    engine["quantization"] = None if unquantized else weights
    name = quant_names.get((model, kv_cache_dtype, weights)) or f"kv={kv_cache_dtype},weights={weights}"
    return _make(model, name, base.gpu, base.tp, engine)


def _dtype_flag(kv: str) -> str:
    """A KV factor value as a --kv-cache-dtype value."""
    return {v: k for k, v in DTYPE_SHORT.items()}.get(kv, kv)


def nearest_working(cfg: PlanConfig, levels: list[str]) -> tuple[PlanConfig, str] | None:
    """The closest config the GPU can start (weights and one max-length request fit), changing
    one thing: another quantization level of the model, more tensor-parallel GPUs, or a GPU preset
    with more memory. None when nothing of that kind fits."""
    mml = cfg.engine_args()["max_model_len"]
    tries: list[tuple[str, Any]] = [(f"--quant {q}", lambda q=q: resolve_config(cfg.model, q, cfg.gpu, cfg.tp, mml))
                                    for q in NEAREST_QUANTS if q in levels and q != cfg.quant]
    tries += [(f"-tp {tp}", lambda tp=tp: resolve_config(cfg.model, cfg.quant, cfg.gpu, tp, mml))
              for tp in TP_SIZES if tp > cfg.tp]
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
