"""`--speculative-config`: which draft layers take KV cache, as vLLM 0.32 counts them.

vLLM registers a drafter's attention layers next to the target's and sizes them from the same pool
(`vllm/v1/worker/gpu_model_runner.py`: "we put the entire draft model on the last PP rank", and
`get_kv_cache_spec` walks every `AttentionLayerBase` of the vLLM config, the drafter's included;
`vllm/v1/core/kv_cache_utils.py` `get_kv_cache_groups` puts layers needing the same token slots in
one group, whose block is the sum of its layers' pages, `UniformTypeKVCacheSpecs`). So a draft
layer costs what a target layer of its geometry costs, per block:
- eagle / eagle3 / draft_model: the draft checkpoint's `num_hidden_layers` with its own KV heads and
  head size (`vllm/model_executor/models/llama_eagle.py` builds `layers.{target layers + i}` for i in
  range(num_hidden_layers), likewise `llama_eagle3.py`; speculators-format
  checkpoints keep the layer config under `transformer_layer_config`);
- mtp: the target's own `num_nextn_predict_layers` MLA layers (`vllm/config/speculative.py`
  `hf_config_override` turns deepseek_v3 into deepseek_mtp; `deepseek_mtp.py` builds that many);
- ngram, ngram_gpu, suffix: no model, no KV cache.
The draft runs in the target's dtype with the target's --kv-cache-dtype (unless the JSON gives its
own `kv_cache_dtype`) and `draft_tensor_parallel_size` 1 or the target's -tp (default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from kvlab.errors import KvlabError
from kvlab.models.arch import ModelArch, arch_from_config

# vLLM 0.32 SpeculativeConfig fields (`vllm/config/speculative.py`): the JSON may carry any of them.
SPECULATIVE_FIELDS = frozenset({
    "attention_backend", "code_revision", "disable_eagle_block_drop", "disable_padded_drafter_batch",
    "draft_load_config", "draft_sample_method", "draft_tensor_parallel_size", "dspark_draft_topk",
    "enable_adaptive_verification", "enforce_eager", "index_share_for_mtp_iteration", "kv_cache_dtype",
    "max_model_len", "method", "model", "moe_backend", "num_speculative_tokens",
    "num_speculative_tokens_per_batch_size", "parallel_drafting", "prompt_lookup_max", "prompt_lookup_min",
    "quantization", "rejection_sample_method", "revision", "suffix_decoding_max_cached_requests",
    "suffix_decoding_max_spec_factor", "suffix_decoding_max_tree_depth", "suffix_decoding_min_token_prob",
    "synthetic_acceptance_length", "synthetic_acceptance_rates", "tensor_parallel_size",
    "use_heterogeneous_vocab", "use_local_argmax_reduction",
})
NO_KV_METHODS = ("ngram", "ngram_gpu", "suffix")
DRAFT_MODEL_METHODS = ("eagle", "eagle3", "draft_model")
MTP_METHODS = ("mtp", "deepseek_mtp")  # vLLM 0.32 renames the per-model MTP names to "mtp"
MTP_MODEL_TYPES = ("deepseek_v3", "deepseek_v32")  # kvlab's model types vLLM turns into deepseek_mtp


@dataclass(frozen=True)
class SpeculativeDraft:
    """The KV-relevant part of one --speculative-config."""

    method: str
    num_speculative_tokens: int | None
    arch: ModelArch | None  # the draft's layers (None: no KV cache)
    draft_tensor_parallel_size: int | None = None  # None: the target's -tp
    kv_cache_dtype: str | None = None  # None: the target's --kv-cache-dtype
    model: str | None = None

    @property
    def num_layers(self) -> int:
        return self.arch.num_layers if self.arch is not None else 0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "model": self.model, "num_speculative_tokens": self.num_speculative_tokens,
                "draft_layers": self.num_layers}


def parse_speculative_json(text: str | dict[str, Any]) -> dict[str, Any]:
    """vLLM's --speculative-config value (JSON) as a dict; KvlabError on bad JSON or unknown keys."""
    if isinstance(text, dict):
        cfg = text
    else:
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            raise KvlabError(f"--speculative-config is not JSON: {e.msg} (at character {e.pos})") from None
    if not isinstance(cfg, dict):
        raise KvlabError("--speculative-config must be a JSON object, e.g. '{\"method\": \"ngram\", "
                         "\"num_speculative_tokens\": 4}'")
    unknown = sorted(set(cfg) - SPECULATIVE_FIELDS)
    if unknown:
        raise KvlabError(f"--speculative-config: unknown field {unknown[0]!r} (vLLM 0.32's SpeculativeConfig "
                         "has no such field)")
    return cfg


def _method(cfg: dict[str, Any]) -> str:
    """vLLM's method inference (`SpeculativeConfig.__post_init__`) for what kvlab sizes."""
    method, model = cfg.get("method"), cfg.get("model")
    if method is None:
        if model in ("ngram", "[ngram]"):
            return "ngram"
        name = str(model or "").lower()
        if "eagle3" in name:
            return "eagle3"
        if "eagle-" in name:
            return "eagle"
        return "draft_model"
    method = str(method)
    if method.endswith("_mtp"):
        return "mtp"
    return "ngram" if method == "[ngram]" else method


def _draft_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A draft checkpoint's layer config (speculators format nests it)."""
    inner = cfg.get("transformer_layer_config")
    return dict(inner) if isinstance(inner, dict) else cfg


def draft_model_config(model: str) -> dict[str, Any]:
    """A draft checkpoint's config.json: a local folder (or file), a card, or a Hugging Face id
    (the local HF cache first, then the Hub)."""
    from pathlib import Path

    from kvlab.models import cards

    path = Path(model).expanduser()
    if path.exists():
        cfg_path = path / "config.json" if path.is_dir() else path
        if not cfg_path.is_file():
            raise KvlabError(f"--speculative-config model {model}: no config.json in this folder")
        return cards._read_config(cfg_path, f"draft {model}")
    builtin = cards.builtin_cards()
    if model in builtin:
        return dict(builtin[model].config)
    if cards._looks_like_hf_id(model):
        snap = cards.cached_snapshot(model)
        if snap is not None:
            return cards._read_config(snap / "config.json", model)
        return cards._from_hub(model)
    raise KvlabError(f"--speculative-config model {model!r}: not a folder with config.json, a card or a "
                     "Hugging Face id")


def speculative_draft(spec: str | dict[str, Any], target: ModelArch, *,
                      read_model_config=None) -> SpeculativeDraft:
    """The draft of a --speculative-config for `target`; read_model_config(model) -> config dict reads
    a draft checkpoint's config.json (a local folder, a card or a Hugging Face id)."""
    cfg = parse_speculative_json(spec)
    method = _method(cfg)
    n_tokens = cfg.get("num_speculative_tokens")
    if n_tokens is not None and (isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1):
        raise KvlabError(f"--speculative-config: num_speculative_tokens must be a positive whole number, got {n_tokens!r}")
    dtp = cfg.get("draft_tensor_parallel_size", cfg.get("tensor_parallel_size"))
    kv_dtype = cfg.get("kv_cache_dtype")
    common = dict(num_speculative_tokens=n_tokens, draft_tensor_parallel_size=dtp,
                  kv_cache_dtype=None if kv_dtype in (None, "auto") else str(kv_dtype))
    if method in NO_KV_METHODS:
        return SpeculativeDraft(method, arch=None, model=cfg.get("model"), **common)
    if method in MTP_METHODS:
        if target.model_type not in MTP_MODEL_TYPES:
            raise KvlabError(f"--speculative-config method mtp: kvlab sizes MTP drafts of {', '.join(MTP_MODEL_TYPES)} "
                             f"models; {target.architecture} is {target.model_type}")
        if target.num_nextn_predict_layers < 1:
            raise KvlabError(f"--speculative-config method mtp: {target.architecture}'s config has no MTP layers "
                             "(num_nextn_predict_layers)")
        if n_tokens is None:
            raise KvlabError("--speculative-config: num_speculative_tokens was provided but without speculative "
                             "model; give num_speculative_tokens for method mtp")
        draft = replace(target, num_layers=target.num_nextn_predict_layers,
                        layer_types=("full_attention",) * target.num_nextn_predict_layers, sliding_window=None)
        return SpeculativeDraft("mtp", arch=draft, model=cfg.get("model"), **common)
    if method in DRAFT_MODEL_METHODS:
        model = cfg.get("model")
        if not model:
            raise KvlabError(f"--speculative-config method {method} needs \"model\": the draft checkpoint "
                             "(a local folder with config.json, or a Hugging Face id)")
        raw = _draft_config((read_model_config or draft_model_config)(str(model)))
        arch = arch_from_config(raw, f"draft {model}")
        return SpeculativeDraft(method, arch=arch, model=str(model), **common)
    raise KvlabError(f"--speculative-config method {method!r}: kvlab sizes {', '.join(DRAFT_MODEL_METHODS)}, mtp "
                     f"and {', '.join(NO_KV_METHODS)} (no KV cache)")
