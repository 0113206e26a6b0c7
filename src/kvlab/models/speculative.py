"""`--speculative-config`: which draft layers take KV cache (and, `drafter_tensors`, which drafter weights stay
in GPU memory), as vLLM 0.32 counts them.

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
from kvlab.models.arch import ModelArch, _int, arch_from_config
from kvlab.models.params import EMBEDDING, LINEAR, LM_HEAD, OTHER, Tensor, _attention, _feed_forward, _norm, inventory

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
    draft_vocab_size: int | None = None  # eagle3: its own LM head's vocabulary (None: the config's vocab_size)
    fc_input_size: int | None = None  # eagle3: target_hidden_size x the auxiliary hidden states it takes

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
        extra: dict[str, Any] = {}
        if method == "eagle3":
            extra = dict(draft_vocab_size=_int(raw.get("draft_vocab_size") or arch.vocab_size, f"draft {model}",
                                               "draft_vocab_size", 1),
                         fc_input_size=_eagle3_fc_input(raw, arch, f"draft {model}"))
        return SpeculativeDraft(method, arch=arch, model=str(model), **common, **extra)
    raise KvlabError(f"--speculative-config method {method!r}: kvlab sizes {', '.join(DRAFT_MODEL_METHODS)}, mtp "
                     f"and {', '.join(NO_KV_METHODS)} (no KV cache)")


def _eagle3_fc_input(raw: dict[str, Any], arch: ModelArch, source: str) -> int:
    """EAGLE-3's fc input width as vLLM reads it (llama_eagle3.py): target_hidden_size (default the
    draft's hidden size) x num_aux_hidden_states (else the eagle_config's aux layer ids, else 3)."""
    eagle_config = raw.get("eagle_config") if isinstance(raw.get("eagle_config"), dict) else {}
    n_aux = raw.get("num_aux_hidden_states")
    if n_aux is None:
        ids = eagle_config.get("eagle_aux_hidden_state_layer_ids")
        n_aux = len(ids) if isinstance(ids, list) and ids else 3
    target_hidden = raw.get("target_hidden_size") or arch.hidden_size
    return _int(target_hidden, source, "target_hidden_size", 1) * _int(n_aux, source, "num_aux_hidden_states", 1)


# The drafter's weights (read in vLLM 0.11.0, 0.14.0-0.17.0, 0.20.0 and 0.22-0.32: vllm/v1/spec_decode/eagle.py,
# llm_base_proposer.py, llama_eagle.py, llama_eagle3.py, deepseek_mtp.py). The model runner loads the drafter
# inside the profiler that logs "Model loading took" (V1 and V2), so what stays allocated is in the budget's
# weights; a module the drafter gives up for the target's (`del` then the target's) is freed within it.
# - eagle: its decoder layers (layer 0 without input_layernorm) and fc (2 x hidden -> hidden, replicated);
#   the embedding is the target's (kvlab takes a checkpoint without its own or with the same one; a drafter
#   of another hidden size, or -pp > 1, keeps its own); no LM head, no final norm.
# - eagle3: the same layers, layer 0's q/k/v taking 2 x hidden and every layer a hidden_norm, fc
#   (fc_input_size -> hidden, replicated), a final norm, its own LM head of draft_vocab_size rows unless that
#   is the target's shape (then shared), and the int64 draft-to-target id map (up to 0.29 always, from 0.30
#   only when the vocabularies differ).
# - mtp: per MTP layer a decoder layer like the target's last (DeepSeek: MoE), enorm / hnorm / the shared
#   head's norm, eh_proj (2 x hidden -> hidden, an unquantized nn.Linear, replicated) and, before 0.16, the
#   shared head's own LM head (from 0.16 vLLM swaps in the target's: "Always share it explicitly"; read in
#   0.15.0 and 0.16.0); the embedding is the target's.
# - draft_model: the whole draft model.
# Split over -tp like the target; all of it on the last pipeline stage.
MTP_HEAD_SHARED_FROM = (0, 16)
EAGLE3_D2T_ONLY_IF_DIFFERENT_FROM = (0, 30)
EAGLE_RESIDENT_ROPE_FROM = (0, 27)  # `_maybe_override_draft_max_position_embeddings`: the target's max_model_len


def drafter_tensors(draft: SpeculativeDraft, target: ModelArch, version: tuple[int, int],
                    pipeline_parallel_size: int = 1) -> tuple[list[Tensor], list[Tensor], int]:
    """(tensors split over -tp, tensors every rank holds whole, bytes of int64 id maps on every rank) of the
    drafter's resident weights."""
    a = draft.arch
    if a is None:
        return [], [], 0
    h = a.hidden_size
    if draft.method == "draft_model":
        return inventory(a), [], 0
    if draft.method == "mtp":
        last = target.num_layers - 1
        moe = target.moe
        layer_arch = replace(a, moe=replace(moe, moe_layers=(0,)) if moe and last in moe.moe_layers else None)
        split: list[Tensor] = []
        replicated: list[Tensor] = []
        for k in range(draft.num_layers):
            p = f"model.layers.{target.num_layers + k}"
            split += [_norm(f"{p}.mtp_block.input_layernorm", h), _norm(f"{p}.mtp_block.post_attention_layernorm", h)]
            split += _attention(layer_arch, f"{p}.mtp_block.self_attn") + _feed_forward(layer_arch, 0, f"{p}.mtp_block.mlp")
            replicated += [_norm(f"{p}.enorm", h), _norm(f"{p}.hnorm", h), _norm(f"{p}.shared_head.norm", h),
                           Tensor(f"{p}.eh_proj.weight", (h, 2 * h), OTHER)]  # nn.Linear: not quantized
            if version < MTP_HEAD_SHARED_FROM:
                split.append(Tensor(f"{p}.shared_head.head.weight", (a.vocab_size, h), LM_HEAD))
        return split, replicated, 0
    # eagle, eagle3
    split = []
    for i in range(a.num_layers):
        p = f"model.layers.{i}"
        attention = _attention(a, f"{p}.self_attn")
        if draft.method == "eagle3" and i == 0:  # q, k and v take the embedding and the hidden state
            attention = [replace(t, shape=(t.shape[0], 2 * h)) if t.name.split(".")[-2] in ("q_proj", "k_proj", "v_proj")
                         and len(t.shape) == 2 else t for t in attention]
        norms = [_norm(f"{p}.post_attention_layernorm", h)]
        if draft.method == "eagle3":
            norms += [_norm(f"{p}.input_layernorm", h), _norm(f"{p}.hidden_norm", h)]
        elif i > 0:
            norms.append(_norm(f"{p}.input_layernorm", h))
        split += norms + attention + _feed_forward(a, i, f"{p}.mlp")
    if pipeline_parallel_size > 1 or h != target.hidden_size:
        split.append(Tensor("model.embed_tokens.weight", (a.vocab_size, h), EMBEDDING))
    fc_in = (draft.fc_input_size or 3 * h) if draft.method == "eagle3" else 2 * h
    replicated = [Tensor("model.fc.weight", (h, fc_in), LINEAR)]
    id_map = 0
    if draft.method == "eagle3":
        vocab = draft.draft_vocab_size or a.vocab_size
        split.append(_norm("model.norm", h))
        if (vocab, h) != (target.vocab_size, target.hidden_size):
            split.append(Tensor("lm_head.weight", (vocab, h), LM_HEAD))
        if version < EAGLE3_D2T_ONLY_IF_DIFFERENT_FROM or vocab != target.vocab_size:
            id_map = 8 * vocab  # draft_id_to_target_id, int64
    return split, replicated, id_map


def drafter_rope_arch(draft: SpeculativeDraft, target: ModelArch, version: tuple[int, int],
                      max_model_len: int) -> ModelArch | None:
    """The drafter's own rotary embedding as an arch to size its cache, or None where it shares the
    target's (`get_rope` returns the cached one for the same key: MTP, or a drafter whose rope is the
    target's)."""
    a = draft.arch
    if a is None or draft.method == "mtp":
        return None
    if draft.method in ("eagle", "eagle3") and version >= EAGLE_RESIDENT_ROPE_FROM:
        a = replace(a, max_position_embeddings=max(a.max_position_embeddings or 0, max_model_len))
    return None if a.rope_key == target.rope_key else a
