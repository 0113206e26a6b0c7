"""A speculative drafter's weights in the `--gpu` budget: vLLM loads the drafter inside the profiler
that logs "Model loading took" and keeps what it does not share with the target
(`kvlab.models.speculative.drafter_tensors`; read in vLLM 0.11.0-0.32.0). Figures counted by hand
from the modules vLLM builds (llama_eagle.py, llama_eagle3.py, deepseek_mtp.py)."""

from __future__ import annotations

from dataclasses import replace
from math import ceil

from kvlab.models import memory
from kvlab.models.cards import card
from kvlab.models.speculative import speculative_draft
from kvlab.models.weights import weight_bytes_by_role, weight_format
from test_memory_fidelity import EAGLE_LLAMA31_CONFIG, LLAMA32_1B_CONFIG

LLAMA = card("llama-3.1-8b").arch


def _draft(spec: dict, config: dict, target=LLAMA):
    return speculative_draft({**spec, "model": "draft"}, target, read_model_config=lambda _m: config)


def test_eagle_keeps_its_layer_and_fc_and_shares_the_embedding():
    """yuhuili/EAGLE-LLaMA3.1-Instruct-8B: one Llama layer without its input norm (q 4096x4096, k and v
    1024x4096, o 4096x4096, the MLP 3 x 14336x4096, the post-attention norm), fc 8192 -> 4096; the
    embedding and LM head are the target's. In the target's bf16: 503,324,672 B. Its own rope cache:
    the checkpoint's 2,048 positions up to 0.26, the target's --max-model-len from 0.27."""
    layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096 + 4096
    weights = 2 * (layer + 4096 * 8192)
    assert weights == 503_324_672
    draft = _draft({"method": "eagle", "num_speculative_tokens": 3}, EAGLE_LLAMA31_CONFIG)
    old = memory.capacity(LLAMA, gpu="h100", max_model_len=8192, speculative_config=draft, vllm_version="0.10.1")
    new = memory.capacity(LLAMA, gpu="h100", max_model_len=8192, speculative_config=draft)
    assert old.drafter_weight_bytes == weights + 2048 * 128 * 2
    assert new.drafter_weight_bytes == weights + 8192 * 128 * 2
    plain = memory.capacity(LLAMA, gpu="h100", max_model_len=8192)
    assert new.weight_bytes_per_gpu == plain.weight_bytes_per_gpu + new.drafter_weight_bytes
    # split over -tp like the target, fc on every rank
    tp2 = memory.capacity(LLAMA, gpu="h100", max_model_len=8192, speculative_config=draft, tensor_parallel_size=2)
    assert tp2.drafter_weight_bytes == 2 * layer // 2 + 2 * 4096 * 8192 + 8192 * 128 * 2  # half the bf16 layer


def test_eagle3_keeps_its_own_lm_head_of_the_draft_vocabulary():
    """EAGLE-3 (llama_eagle3.py): layer 0's q/k/v take 2 x hidden, a hidden_norm and the input norm, fc from
    3 x hidden, a final norm, an LM head of draft_vocab_size rows and the int64 draft-to-target id map."""
    config = {**EAGLE_LLAMA31_CONFIG, "draft_vocab_size": 32000}
    draft = _draft({"method": "eagle3", "num_speculative_tokens": 3}, config)
    assert (draft.draft_vocab_size, draft.fc_input_size) == (32000, 3 * 4096)
    layer = (4096 * 8192 + 2 * 1024 * 8192 + 4096 * 4096 + 3 * 14336 * 4096 + 3 * 4096)
    weights = 2 * (layer + 4096 * 12288 + 4096 + 32000 * 4096) + 8 * 32000
    r = memory.capacity(LLAMA, gpu="h100", max_model_len=8192, speculative_config=draft)
    assert r.drafter_weight_bytes == weights + 8192 * 128 * 2
    # the target's vocabulary: the LM head is the target's, and from 0.30 there is no id map
    same = _draft({"method": "eagle3", "num_speculative_tokens": 3}, EAGLE_LLAMA31_CONFIG)
    r = memory.capacity(LLAMA, gpu="h100", max_model_len=8192, speculative_config=same)
    assert r.drafter_weight_bytes == 2 * (layer + 4096 * 12288 + 4096) + 8192 * 128 * 2
    r29 = memory.capacity(LLAMA, gpu="h100", max_model_len=8192, speculative_config=same, vllm_version="0.29")
    assert r29.drafter_weight_bytes == r.drafter_weight_bytes + 8 * 128256


def test_eagle3_as_speculators_converts_it_matches_a_published_load_line():
    """vLLM's log of Llama-3.1-8B with yuhuili's EAGLE-3 head converted by the speculators tool, vLLM
    0.10.1.dev2081 (vllm-project/speculators PR #166, 2025-10-30: "Model loading took 15.8114 GiB"). The
    converted head's transformer_layer_config has max_position_embeddings 131072 (speculators PR #53's
    config.json) and no rope_scaling: the Eagle3 converter forwarded rope_theta alone until speculators
    PR #574 (2026-06-04). So the drafter's rope is a different get_rope key from the target's llama3 one
    and brings a cache of its own, 131072 x 128 x 2 B = 32 MiB, beside the head's 0.79 GiB."""
    config = {**EAGLE_LLAMA31_CONFIG, "draft_vocab_size": 32000, "max_position_embeddings": 131072}
    draft = _draft({"method": "eagle3", "num_speculative_tokens": 3}, config)
    r = memory.capacity(LLAMA, gpu="h100", max_model_len=1024, speculative_config=draft, vllm_version="0.10.1")
    assert abs(r.weight_bytes_per_gpu / 2**30 - 15.8114) < 0.0002
    # with the target's rope scaling the two share one cache: 32 MiB less, and the log is missed by 0.031 GiB
    scaled = _draft({"method": "eagle3", "num_speculative_tokens": 3},
                    {**config, "rope_scaling": card("llama-3.1-8b").config["rope_scaling"]})
    s = memory.capacity(LLAMA, gpu="h100", max_model_len=1024, speculative_config=scaled, vllm_version="0.10.1")
    assert r.weight_bytes_per_gpu - s.weight_bytes_per_gpu == 131072 * 128 * 2


def test_a_draft_model_is_loaded_whole():
    """Llama-3.2-1B as draft_model: all of it (tied embedding), its own rope cache (head_dim 64)."""
    draft = _draft({"method": "draft_model", "num_speculative_tokens": 4}, LLAMA32_1B_CONFIG)
    r = memory.capacity(LLAMA, gpu="h100", max_model_len=8192, speculative_config=draft)
    whole = ceil(sum(weight_bytes_by_role(draft.arch, weight_format(None, draft.arch), "bfloat16").values()))
    assert r.drafter_weight_bytes == whole + 131072 * 64 * 2


def test_deepseek_v3s_mtp_layer_is_a_moe_layer_in_the_targets_format():
    """DeepSeek-V3's MTP module at -tp 8: one more MoE decoder layer in block FP8 (the target's 62nd), enorm,
    hnorm and the shared head's norm, eh_proj 14336 -> 7168 unquantized on every rank, and its MLA's 16-bit
    kv_b_proj copy (16 heads a GPU x 256 x 512 x 2 B); the shared head's LM head up to 0.15 (from 0.16 vLLM
    swaps in the target's); the embedding is the target's."""
    v3 = card("deepseek-v3").arch
    fmt = weight_format(None, v3)
    longer = replace(v3, num_layers=62, moe=replace(v3.moe, moe_layers=v3.moe.moe_layers + (61,)))
    roles_62, roles_61 = weight_bytes_by_role(longer, fmt), weight_bytes_by_role(v3, fmt)
    layer = {k: roles_62[k] - roles_61[k] for k in roles_61}
    assert layer["embedding"] == layer["lm_head"] == 0
    per_gpu = ceil((sum(layer.values()) - layer["expert"]) / 8 + layer["expert"] / 8)
    replicated = 2 * (3 * 7168 + 7168 * 14336)
    mtp = {"method": "mtp", "num_speculative_tokens": 1}
    r = memory.capacity(v3, gpu="h200", tensor_parallel_size=8, max_model_len=32768, speculative_config=mtp)
    assert r.drafter_weight_bytes == per_gpu + replicated + 16 * 256 * 512 * 2
    old = memory.capacity(v3, gpu="h200", tensor_parallel_size=8, max_model_len=32768, speculative_config=mtp,
                          vllm_version="0.15")
    assert old.drafter_weight_bytes == r.drafter_weight_bytes + ceil(2 * 129280 * 7168 / 8)
    # 1.54 GiB a GPU: 45,073 -> 42,903 blocks on 8 x H200 at 0.32
    plain = memory.capacity(v3, gpu="h200", tensor_parallel_size=8, max_model_len=32768)
    assert (plain.num_blocks, r.num_blocks) == (45_073, 42_903)


def test_ngram_has_no_drafter_weights():
    r = memory.capacity(LLAMA, gpu="h100", max_model_len=8192,
                        speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4})
    assert r.drafter_weight_bytes == 0
