"""Parameter inventory derived from a config: every weight tensor with its shape and role.

Counts equal the model's own (tests build tiny models with transformers and compare), and the same
inventory gives the weight bytes for each quantization format (`kvlab.models.weights`).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from kvlab.models.arch import KNOWN_MODEL_TYPES, ModelArch

# Roles: what a quantization method touches. Linear layers and experts are quantized; embeddings,
# the LM head, norms, biases and MoE routers stay in the model dtype (as vLLM does).
LINEAR = "linear"
EXPERT = "expert"  # routed-expert linear weights: only top-k of them run per token
EMBEDDING = "embedding"
LM_HEAD = "lm_head"
OTHER = "other"  # norms, biases, routers


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # (out_features, in_features) for linear weights
    role: str
    count: int = 1  # identical tensors (e.g. experts of one layer)

    @property
    def numel(self) -> int:
        return prod(self.shape) * self.count


def _linear(name: str, out_f: int, in_f: int, bias: bool = False, role: str = LINEAR, count: int = 1) -> list[Tensor]:
    tensors = [Tensor(f"{name}.weight", (out_f, in_f), role, count)]
    if bias:
        tensors.append(Tensor(f"{name}.bias", (out_f,), OTHER, count))
    return tensors


def _norm(name: str, size: int) -> Tensor:
    return Tensor(f"{name}.weight", (size,), OTHER)


def _attention(a: ModelArch, p: str) -> list[Tensor]:
    h = a.hidden_size
    if a.mla is not None:
        m = a.mla
        t: list[Tensor] = []
        if m.q_lora_rank is None:
            t += _linear(f"{p}.q_proj", a.num_attention_heads * m.qk_head_dim, h)
        else:
            t += _linear(f"{p}.q_a_proj", m.q_lora_rank, h, a.qkv_bias)
            t.append(_norm(f"{p}.q_a_layernorm", m.q_lora_rank))
            t += _linear(f"{p}.q_b_proj", a.num_attention_heads * m.qk_head_dim, m.q_lora_rank)
        t += _linear(f"{p}.kv_a_proj_with_mqa", m.kv_lora_rank + m.qk_rope_head_dim, h, a.qkv_bias)
        t.append(_norm(f"{p}.kv_a_layernorm", m.kv_lora_rank))
        t += _linear(f"{p}.kv_b_proj", a.num_attention_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)
        t += _linear(f"{p}.o_proj", h, a.num_attention_heads * m.v_head_dim, a.o_bias)
        return t
    q = a.num_attention_heads * a.head_dim
    kv = a.num_key_value_heads * a.head_dim
    t = (
        _linear(f"{p}.q_proj", q, h, a.qkv_bias)
        + _linear(f"{p}.k_proj", kv, h, a.qkv_bias)
        + _linear(f"{p}.v_proj", kv, h, a.qkv_bias)
        + _linear(f"{p}.o_proj", h, q, a.o_bias)
    )
    if a.qk_norm:
        t += [_norm(f"{p}.q_norm", a.head_dim), _norm(f"{p}.k_norm", a.head_dim)]
    return t


def _mlp(p: str, hidden: int, inter: int, bias: bool = False, role: str = LINEAR, count: int = 1) -> list[Tensor]:
    return (
        _linear(f"{p}.gate_proj", inter, hidden, bias, role, count)
        + _linear(f"{p}.up_proj", inter, hidden, bias, role, count)
        + _linear(f"{p}.down_proj", hidden, inter, bias, role, count)
    )


def _feed_forward(a: ModelArch, i: int, p: str) -> list[Tensor]:
    h = a.hidden_size
    moe = a.moe
    if moe is None or i not in moe.moe_layers:
        return _mlp(p, h, a.intermediate_size, a.mlp_bias)
    t = [Tensor(f"{p}.gate.weight", (moe.num_experts, h), OTHER)]
    if moe.router_bias:
        t.append(Tensor(f"{p}.gate.e_score_correction_bias", (moe.num_experts,), OTHER))
    t += _mlp(f"{p}.experts", h, moe.moe_intermediate_size, role=EXPERT, count=moe.num_experts)
    if moe.num_shared_experts:
        t += _mlp(f"{p}.shared_experts", h, moe.moe_intermediate_size * moe.num_shared_experts)
    if moe.shared_expert_intermediate_size:
        t += _mlp(f"{p}.shared_expert", h, moe.shared_expert_intermediate_size)
    if moe.shared_expert_gate:
        t += _linear(f"{p}.shared_expert_gate", 1, h, role=OTHER)
    return t


def inventory(a: ModelArch) -> list[Tensor]:
    """All weight tensors of the causal LM, as the Hugging Face implementation holds them."""
    h = a.hidden_size
    tensors = [Tensor("model.embed_tokens.weight", (a.vocab_size, h), EMBEDDING)]
    for i in range(a.num_layers):
        p = f"model.layers.{i}"
        tensors.append(_norm(f"{p}.input_layernorm", h))
        tensors += _attention(a, f"{p}.self_attn")
        tensors.append(_norm(f"{p}.post_attention_layernorm", h))
        tensors += _feed_forward(a, i, f"{p}.mlp")
    tensors.append(_norm("model.norm", h))
    if not a.tie_word_embeddings:
        tensors.append(Tensor("lm_head.weight", (a.vocab_size, h), LM_HEAD))
    return tensors


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int  # per token: routed experts count top-k only; embeddings and LM head included
    embedding: int  # input embedding plus an untied LM head
    exact: bool  # False when the model family is not one kvlab knows layer by layer

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


def param_counts(a: ModelArch) -> ParamCounts:
    tensors = inventory(a)
    total = sum(t.numel for t in tensors)
    inactive = 0
    if a.moe is not None and a.moe.moe_layers:
        # One expert's weights (gate, up, down) in one MoE layer.
        per_expert = sum(prod(t.shape) for t in tensors if t.role == EXPERT) // len(a.moe.moe_layers)
        inactive = len(a.moe.moe_layers) * (a.moe.num_experts - a.moe.num_experts_per_tok) * per_expert
    embedding = sum(t.numel for t in tensors if t.role in (EMBEDDING, LM_HEAD))
    return ParamCounts(total=total, active=total - inactive, embedding=embedding,
                       exact=a.model_type in KNOWN_MODEL_TYPES)
