"""A model's architecture, read from its Hugging Face `config.json`.

Only the fields that decide KV-cache geometry and parameter counts are kept, normalised across
model families (Llama, Mistral, Qwen2/3, their MoE variants, DeepSeek-V2/V3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import ceil
from typing import Any

from kvlab.errors import KvlabError

# model_type values whose parameter layout kvlab knows exactly (checked against transformers).
KNOWN_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v3",
)

MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")

# vLLM's Qwen2 and Qwen2-MoE attention take head_dim = hidden_size / num_attention_heads and ignore
# a head_dim field (vllm/model_executor/models/qwen2.py, qwen2_moe.py); KV sizing must do the same.
HEAD_DIM_FROM_HIDDEN = ("qwen2", "qwen2_moe")

_DTYPE_ALIASES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}


def normalize_dtype(name: str | None, default: str = "bfloat16") -> str:
    if name is None:
        return default
    key = str(name).removeprefix("torch.").lower()
    if key not in _DTYPE_ALIASES:
        raise KvlabError(f"unknown dtype {name!r}; use one of bfloat16, float16, float32")
    return _DTYPE_ALIASES[key]


@dataclass(frozen=True)
class MoE:
    """Mixture-of-experts feed-forward layers."""

    num_experts: int  # routed experts per MoE layer
    num_experts_per_tok: int
    moe_intermediate_size: int
    num_shared_experts: int = 0  # DeepSeek: shared experts of moe_intermediate_size each
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: one shared expert of this size
    shared_expert_gate: bool = False  # Qwen2-MoE: a sigmoid gate on the shared expert
    router_bias: bool = False  # DeepSeek-V3: e_score_correction_bias
    moe_layers: tuple[int, ...] = ()  # which layers are MoE (the others are dense)


@dataclass(frozen=True)
class MLA:
    """DeepSeek Multi-head Latent Attention dimensions."""

    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None

    @property
    def latent_dim(self) -> int:
        """Width of what vLLM caches per token and layer: the compressed KV plus the RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    dtype: str
    max_position_embeddings: int | None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    mla: MLA | None = None
    moe: MoE | None = None
    # Per layer "full_attention" or "sliding_attention" (with sliding_window tokens).
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    # Context: what vLLM derives from the config (`_get_and_verify_max_len`): max_position_embeddings
    # times a RoPE scaling factor (rope types that do not pre-scale it), or a larger model_max_length.
    rope_scaling_factor: float = 1.0
    model_max_length: int | None = None
    # The rotary embedding vLLM builds (`get_rope`): its type as vLLM runs it ("default", "llama3",
    # "yarn", "linear", "dynamic", ...; DeepSeek's scaled types as "deepseek_yarn"), the config's
    # factor, the pretraining context the scaled types start from, and the rotated width per head
    # (head_dim x partial_rotary_factor; MLA: qk_rope_head_dim). They size its cos/sin cache.
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_original_max_position: int | None = None
    rotary_dim: int = 0  # 0: the whole head (head_dim; MLA: qk_rope_head_dim)
    num_nextn_predict_layers: int = 0  # DeepSeek-V3's MTP layers (a speculative draft in vLLM)
    quantization_config: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def attention(self) -> str:
        """MLA, MHA, GQA or MQA (DeepSeek-V2 report, Table 1)."""
        if self.mla is not None:
            return "MLA"
        if self.num_key_value_heads == self.num_attention_heads:
            return "MHA"
        if self.num_key_value_heads == 1:
            return "MQA"
        return "GQA"

    @property
    def num_sliding_layers(self) -> int:
        return sum(1 for t in self.layer_types if t == "sliding_attention")

    @property
    def derived_max_model_len(self) -> float | None:
        """The longest --max-model-len vLLM accepts without VLLM_ALLOW_LONG_MAX_MODEL_LEN."""
        if self.max_position_embeddings is None:
            return None
        return self.max_position_embeddings * self.rope_scaling_factor

    @property
    def rotary_width(self) -> int:
        """Rotated dims per head: the width of a row of vLLM's cos/sin cache (cos and sin halves)."""
        if self.rotary_dim:
            return self.rotary_dim
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim

    @property
    def rope_cache_positions(self) -> int:
        """Rows of the cos/sin cache vLLM's rotary embedding registers at load (`cos_sin_cache`,
        vllm/model_executor/layers/rotary_embedding/): the model files pass max_position_embeddings
        (8192 without one); linear scaling caches max_position x factor positions; YaRN and
        DeepSeek's scaled rope original_max_position_embeddings x factor; llama3, dynamic NTK and the
        unscaled rope max_position_embeddings itself."""
        max_pos = self.max_position_embeddings or 8192
        if self.rope_type == "linear":
            return ceil(max_pos * self.rope_factor)
        if self.rope_type in ("yarn", "deepseek_yarn", "deepseek_llama_scaling"):
            return ceil((self.rope_original_max_position or max_pos) * self.rope_factor)
        return max_pos

    @property
    def rope_key(self) -> tuple:
        """What vLLM's `get_rope` tells rotary embeddings apart by (its `_ROPE_DICT` key: the head size it
        is called with, MLA's qk_rope_head_dim, and what sizes the cache): two of one key share one cache."""
        head = self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim
        return (head, self.rope_type, self.rope_factor, self.rope_original_max_position, self.rotary_width,
                self.rope_cache_positions)


def _get(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if n in cfg and cfg[n] is not None:
            return cfg[n]
    return default


def _require(cfg: dict[str, Any], source: str, *names: str) -> Any:
    value = _get(cfg, *names)
    if value is None:
        raise KvlabError(f"{source}: config is missing {' / '.join(names)}")
    return value


MAX_LAYERS = 10_000  # far above any model: a larger count is a broken config (and per-layer tuples)
MAX_DIM = 1 << 31  # far above any width, vocabulary or context: the products stay exact numbers


def _int(value: Any, source: str, name: str, minimum: int | None = None) -> int:
    """A config number as an int (a whole float or a digit string too); else an error naming it."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        n = int(value.strip()) if isinstance(value, str) else int(value)
        if isinstance(value, float) and value != n:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise KvlabError(f"{source}: {name} must be a whole number, got {value!r}") from None
    if minimum is not None and n < minimum:
        raise KvlabError(f"{source}: {name} must be {'positive' if minimum == 1 else f'at least {minimum}'}, got {n}")
    if n > MAX_DIM:
        raise KvlabError(f"{source}: {name} {n:,} is not a model's (at most {MAX_DIM:,})")
    return n


def arch_from_config(cfg: dict[str, Any], source: str = "config") -> ModelArch:
    """Build a ModelArch from a Hugging Face config dict (as in config.json)."""
    if not isinstance(cfg, dict):
        raise KvlabError(f"{source}: config must be a JSON object")
    # Multimodal wrappers keep the language model under text_config.
    if "text_config" in cfg and "num_hidden_layers" not in cfg:
        if not isinstance(cfg["text_config"], dict):
            raise KvlabError(f"{source}: text_config must be a JSON object")
        inner = dict(cfg["text_config"])
        for key in ("quantization_config", "use_sliding_window"):
            if key in cfg:
                inner.setdefault(key, cfg[key])
        cfg = inner
    model_type = str(_get(cfg, "model_type", default="unknown"))
    archs = cfg.get("architectures") or []
    architecture = str(archs[0]) if isinstance(archs, list) and archs else model_type

    num_layers = _int(_require(cfg, source, "num_hidden_layers", "n_layer", "num_layers"), source, "num_hidden_layers", 1)
    if num_layers > MAX_LAYERS:
        raise KvlabError(f"{source}: num_hidden_layers {num_layers:,} is not a model's (at most {MAX_LAYERS:,})")
    hidden = _int(_require(cfg, source, "hidden_size", "n_embd", "d_model"), source, "hidden_size", 1)
    heads = _int(_require(cfg, source, "num_attention_heads", "n_head"), source, "num_attention_heads", 1)
    kv_heads = _int(_get(cfg, "num_key_value_heads", "n_head_kv", default=heads), source, "num_key_value_heads", 1)
    head_dim = _int(_get(cfg, "head_dim", default=0) or hidden // heads, source, "head_dim", 1)
    if model_type in HEAD_DIM_FROM_HIDDEN:
        head_dim = _int(hidden // heads, source, "hidden_size / num_attention_heads", 1)
    vocab = _int(_require(cfg, source, "vocab_size"), source, "vocab_size", 1)
    intermediate = _int(_get(cfg, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden), source,
                        "intermediate_size", 0)
    if heads % kv_heads:
        raise KvlabError(
            f"{source}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
        )
    try:
        dtype = normalize_dtype(_get(cfg, "dtype", "torch_dtype"), default="bfloat16")
    except KvlabError as e:
        raise KvlabError(f"{source}: torch_dtype: {e}") from None

    mla = None
    if _get(cfg, "kv_lora_rank") is not None:
        mla = MLA(
            kv_lora_rank=_int(cfg["kv_lora_rank"], source, "kv_lora_rank", 1),
            qk_rope_head_dim=_int(_require(cfg, source, "qk_rope_head_dim"), source, "qk_rope_head_dim", 0),
            qk_nope_head_dim=_int(_require(cfg, source, "qk_nope_head_dim"), source, "qk_nope_head_dim", 0),
            v_head_dim=_int(_require(cfg, source, "v_head_dim"), source, "v_head_dim", 1),
            q_lora_rank=(None if _get(cfg, "q_lora_rank") is None
                         else _int(cfg["q_lora_rank"], source, "q_lora_rank", 1)),
        )
    elif model_type in MLA_MODEL_TYPES:
        raise KvlabError(f"{source}: a {model_type} config needs kv_lora_rank for MLA")

    moe = _moe_from_config(cfg, model_type, num_layers, source)
    if isinstance(cfg.get("quantization_config"), (str, int, float, list)):
        raise KvlabError(f"{source}: quantization_config must be a JSON object")

    attention_bias = bool(_get(cfg, "attention_bias", default=False))
    qkv_bias = attention_bias or model_type in ("qwen2", "qwen2_moe")
    o_bias = attention_bias and model_type not in ("qwen2", "qwen2_moe")
    if model_type in ("qwen3", "qwen3_moe"):
        qkv_bias = o_bias = attention_bias

    layer_types, sliding_window = _layer_types(cfg, model_type, num_layers, source)

    return ModelArch(
        model_type=model_type,
        architecture=architecture,
        num_layers=num_layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        vocab_size=vocab,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=bool(_get(cfg, "tie_word_embeddings", default=False)),
        dtype=dtype,
        max_position_embeddings=(None if _get(cfg, "max_position_embeddings") is None else
                                 _int(cfg["max_position_embeddings"], source, "max_position_embeddings", 1)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(_get(cfg, "mlp_bias", default=False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        mla=mla,
        moe=moe,
        layer_types=layer_types,
        sliding_window=sliding_window,
        rope_scaling_factor=_rope_scaling_factor(cfg, model_type, source),
        **_rope(cfg, mla is not None, head_dim, source),
        model_max_length=(None if _get(cfg, "model_max_length") is None else
                          _int(cfg["model_max_length"], source, "model_max_length", 1)),
        num_nextn_predict_layers=_int(_get(cfg, "num_nextn_predict_layers", default=0), source,
                                      "num_nextn_predict_layers", 0),
        quantization_config=cfg.get("quantization_config"),
    )


# RoPE types whose max_position_embeddings is already the scaled context: vLLM does not apply
# their `factor` again (vllm/config/model.py, `_get_and_verify_max_len`).
_PRESCALED_ROPE_TYPES = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def _rope_params(cfg: dict[str, Any], source: str) -> dict[str, Any] | None:
    """The config's rope_parameters / rope_scaling mapping (the first layer type's, if nested)."""
    rope = _get(cfg, "rope_parameters", "rope_scaling")
    if isinstance(rope, dict) and rope and all(isinstance(v, dict) for v in rope.values()):
        rope = next(iter(rope.values()))  # per layer type: vLLM assumes one factor for all
    if rope is not None and not isinstance(rope, dict):  # vLLM's patch_rope_parameters reads it as a mapping
        raise KvlabError(f"{source}: rope_scaling must be a JSON object (rope_type, factor, ...), got {rope!r}")
    return rope


def _rope_type(rope: dict[str, Any]) -> str:
    """The rope mapping's type, as transformers standardizes it (rope_type, else the legacy type)."""
    return str(rope.get("rope_type", rope.get("type", "default")))


def _rope(cfg: dict[str, Any], mla: bool, head_dim: int, source: str) -> dict[str, Any]:
    """ModelArch's rope fields as vLLM reads the config: transformers' `standardize_rope_params` (the
    type from rope_type or type; a yarn/llama3 rope without original_max_position_embeddings takes
    the config's top-level one, else max_position_embeddings), DeepSeek-V2/V3's attention renaming any
    scaled type "deepseek_yarn" (vllm/model_executor/models/deepseek_v2.py), and `get_rope`'s rotary
    width (rope_dim, else head_dim x partial_rotary_factor)."""
    rope = _rope_params(cfg, source) or {}
    rope_type = _rope_type(rope)
    if mla and rope_type != "default":
        rope_type = "deepseek_yarn"
    factor = _rope_factor(rope, source) or 1.0
    original = _get(rope, "original_max_position_embeddings") or _get(cfg, "original_max_position_embeddings")
    original = None if original is None else _int(original, source, "original_max_position_embeddings", 1)
    width = 0
    if rope.get("rope_dim") is not None:
        width = _int(rope["rope_dim"], source, "rope_dim", 1)
    else:
        partial = _get(rope, "partial_rotary_factor") or _get(cfg, "partial_rotary_factor", "rotary_pct")
        if partial is not None:
            if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
                raise KvlabError(f"{source}: partial_rotary_factor must be in (0, 1], got {partial!r}")
            width = int(head_dim * partial) if not mla else 0
    return {"rope_type": rope_type, "rope_factor": factor, "rope_original_max_position": original,
            "rotary_dim": width}


def _rope_scaling_factor(cfg: dict[str, Any], model_type: str, source: str) -> float:
    """The factor vLLM multiplies max_position_embeddings by (1.0 for most models)."""
    rope = _rope_params(cfg, source)
    if rope is None or "gemma3" in model_type:
        return 1.0
    if _rope_type(rope) in _PRESCALED_ROPE_TYPES:
        return 1.0
    return _rope_factor(rope, source) or 1.0


def _rope_factor(rope: dict[str, Any], source: str) -> float | None:
    """The rope mapping's `factor` (None without one), checked."""
    if rope.get("factor") is None:
        return None
    try:
        factor = float(rope["factor"])
    except (TypeError, ValueError):
        raise KvlabError(f"{source}: rope_scaling factor must be a number, got {rope['factor']!r}") from None
    if not 0 < factor <= 1024:
        raise KvlabError(f"{source}: rope_scaling factor {factor} is not a model's")
    return factor


def _moe_from_config(cfg: dict[str, Any], model_type: str, num_layers: int, source: str) -> MoE | None:
    if model_type in MLA_MODEL_TYPES:
        n_routed = _get(cfg, "n_routed_experts")
        if not n_routed:
            return None
        first_dense = _int(_get(cfg, "first_k_dense_replace", default=0), source, "first_k_dense_replace", 0)
        freq = _int(_get(cfg, "moe_layer_freq", default=1), source, "moe_layer_freq", 1)
        layers = tuple(i for i in range(num_layers) if i >= first_dense and i % freq == 0)
        return MoE(
            num_experts=_int(n_routed, source, "n_routed_experts", 1),
            num_experts_per_tok=_int(_require(cfg, source, "num_experts_per_tok"), source, "num_experts_per_tok", 1),
            moe_intermediate_size=_int(_require(cfg, source, "moe_intermediate_size"), source, "moe_intermediate_size", 1),
            num_shared_experts=_int(_get(cfg, "n_shared_experts", default=0), source, "n_shared_experts", 0),
            router_bias=model_type == "deepseek_v3",
            moe_layers=layers,
        )
    if model_type in ("qwen2_moe", "qwen3_moe"):
        n_experts = _int(_get(cfg, "num_experts", default=0), source, "num_experts", 0)
        if not n_experts:
            return None
        step = _int(_get(cfg, "decoder_sparse_step", default=1), source, "decoder_sparse_step", 0)
        mlp_only = _get(cfg, "mlp_only_layers", default=[]) or []
        if not isinstance(mlp_only, list) or not all(isinstance(i, int) for i in mlp_only):
            raise KvlabError(f"{source}: mlp_only_layers must be a list of layer numbers, got {mlp_only!r}")
        mlp_only = set(mlp_only)
        layers = tuple(
            i for i in range(num_layers) if i not in mlp_only and step > 0 and (i + 1) % step == 0
        )
        shared = (_int(_get(cfg, "shared_expert_intermediate_size", default=0), source,
                       "shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0)
        return MoE(
            num_experts=n_experts,
            num_experts_per_tok=_int(_require(cfg, source, "num_experts_per_tok"), source, "num_experts_per_tok", 1),
            moe_intermediate_size=_int(_require(cfg, source, "moe_intermediate_size"), source, "moe_intermediate_size", 1),
            shared_expert_intermediate_size=shared,
            shared_expert_gate=shared > 0,
            moe_layers=layers,
        )
    return None


def _layer_types(cfg: dict[str, Any], model_type: str, num_layers: int,
                 source: str = "config") -> tuple[tuple[str, ...], int | None]:
    """Which layers use sliding-window attention, as the config declares it."""
    window = _get(cfg, "sliding_window")
    if window is not None and window is not False:
        window = _int(window, source, "sliding_window", 0)
    declared = cfg.get("layer_types")
    if isinstance(declared, list) and len(declared) == num_layers:
        types = tuple("sliding_attention" if "sliding" in str(t) else "full_attention" for t in declared)
        return types, (int(window) if window and "sliding_attention" in types else None)
    if "use_sliding_window" in cfg or model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        # Qwen-style configs (Qwen2/3, their MoE and VL variants, ...) declare a window but use it
        # only with use_sliding_window, from max_window_layers on: transformers sets sliding_window to
        # None without it, and vLLM reads that config.
        if not cfg.get("use_sliding_window") or not window:
            return ("full_attention",) * num_layers, None
        first = _int(_get(cfg, "max_window_layers", default=num_layers), source, "max_window_layers", 0)
        types = tuple("sliding_attention" if i >= first else "full_attention" for i in range(num_layers))
        return types, (int(window) if "sliding_attention" in types else None)
    if window and model_type not in MLA_MODEL_TYPES:
        return ("sliding_attention",) * num_layers, int(window)
    return ("full_attention",) * num_layers, None
