"""The memory model against published figures and vLLM's own accounting."""

from math import ceil

import pytest

from kvlab.errors import KvlabError
from kvlab.models import memory
from kvlab.models.arch import arch_from_config
from kvlab.models.cards import card

GiB = 1 << 30


def _bytes(name, kv_cache_dtype="auto", tp=1):
    return memory.kv_footprint(card(name).arch, kv_cache_dtype, tp).kv_bytes_per_token


def test_published_kv_bytes_per_token():
    assert _bytes("deepseek-v2-lite") == 31_104  # 27 layers x 576 latent x 2 B
    assert _bytes("deepseek-v2-lite", "fp8") == 15_552
    assert _bytes("llama-3.1-8b") == 131_072  # 32 x 2 x 8 x 128 x 2 B
    assert _bytes("qwen2.5-7b") == 57_344  # 28 x 2 x 4 x 128 x 2 B
    assert _bytes("llama-2-7b") == 524_288  # MHA: 32 x 2 x 32 x 128 x 2 B
    assert _bytes("qwen3-30b-a3b") == 98_304
    assert _bytes("deepseek-v3") == 61 * 576 * 2
    assert _bytes("deepseek-v3", "fp8_ds_mla") == 61 * 656


def _cfg(**kw):
    base = dict(model_type="llama", hidden_size=1024, intermediate_size=2048, num_hidden_layers=10,
                num_attention_heads=16, vocab_size=1000)
    base.update(kw)
    return arch_from_config(base)


def test_deepseek_v2_report_table_1_formulas():
    """KV elements per token: MHA 2*n_h*d_h*l, GQA 2*n_g*d_h*l, MQA 2*d_h*l, MLA (d_c + d_h^R)*l."""
    n_h, d_h, l, n_g = 16, 64, 10, 4
    elements = lambda a: memory.kv_footprint(a, "float32").kv_bytes_per_token // 4  # noqa: E731
    mha = _cfg(num_key_value_heads=n_h)
    gqa = _cfg(num_key_value_heads=n_g)
    mqa = _cfg(num_key_value_heads=1)
    mla = arch_from_config(dict(model_type="deepseek_v2", hidden_size=1024, num_hidden_layers=l,
                                num_attention_heads=n_h, vocab_size=1000, kv_lora_rank=4 * d_h,
                                qk_rope_head_dim=d_h // 2, qk_nope_head_dim=d_h, v_head_dim=d_h))
    assert (mha.attention, gqa.attention, mqa.attention, mla.attention) == ("MHA", "GQA", "MQA", "MLA")
    assert elements(mha) == 2 * n_h * d_h * l
    assert elements(gqa) == 2 * n_g * d_h * l
    assert elements(mqa) == 2 * d_h * l
    assert elements(mla) == (4 * d_h + d_h // 2) * l
    assert elements(mla) == 4.5 * d_h * l  # the report's "about 4.5 d_h l"


def test_deepseek_v2_93_percent_kv_reduction_against_67b():
    """Report p.16: V2 with ~6-bit KV reduces the KV cache by 93.3 % against DeepSeek 67B (bf16)."""
    ds67b = _cfg(num_hidden_layers=95, num_attention_heads=64, hidden_size=8192, num_key_value_heads=8)
    bytes_67b = memory.kv_footprint(ds67b, "bfloat16").kv_bytes_per_token
    assert bytes_67b == 95 * 2 * 8 * 128 * 2
    v2 = card("deepseek-v2").arch
    elements_v2 = memory.kv_footprint(v2, "float32").kv_bytes_per_token // 4
    bytes_v2_6bit = elements_v2 * 6 / 8
    assert round(100 * (1 - bytes_v2_6bit / bytes_67b), 1) == 93.3


def test_cpu_build_tiny_mla_log_value():
    """vLLM CPU build: 'CPU KV cache size: 233,008 tokens' for the tiny MLA model in 1 GiB, float32."""
    tiny = arch_from_config(dict(model_type="deepseek_v2", hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, vocab_size=1000,
                                 kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=16, v_head_dim=16,
                                 q_lora_rank=None, n_routed_experts=4, n_shared_experts=1,
                                 num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128,
                                 max_position_embeddings=256, torch_dtype="float32"))
    r = memory.capacity(tiny, kv_budget_bytes=GiB, max_model_len=256, cpu=True)
    assert r.attention_backend == "CPU_MLA" and r.block_size == 16
    assert r.num_blocks == 14_563
    assert r.kv_cache_tokens == 233_008
    assert f"{r.max_concurrency:.2f}" == "910.19"


@pytest.mark.parametrize("name,dtype,tokens", [
    ("deepseek-v2-lite", "bfloat16", 34_512),
    ("llama-3.1-8b", "bfloat16", 8_192),
    ("deepseek-v2-lite", "float32", 17_248),
    ("llama-3.1-8b", "float32", 4_096),
])
def test_cpu_build_twin_values(name, dtype, tokens):
    """KV tokens the CPU build logged for the geometry twins in 1 GiB (reference/vllm-cpu.md)."""
    r = memory.capacity(card(name).arch, kv_budget_bytes=GiB, max_model_len=4096, dtype=dtype, cpu=True)
    assert r.num_blocks * r.block_size == tokens
    assert r.kv_cache_tokens == tokens


def test_num_blocks_floor_and_concurrency_formula():
    a = card("llama-3.1-8b").arch
    budget = 10 * GiB + 12345
    r = memory.capacity(a, kv_budget_bytes=budget, max_model_len=1000, block_size=16)
    page = 16 * 8 * (128 + 128) * 2
    assert r.page_size_bytes == page
    assert r.num_blocks == budget // (page * 32)
    # vLLM >= 0.21: tokens = int(num_blocks / cdiv(max_model_len, block_size) * max_model_len)
    assert r.max_concurrency == r.num_blocks / ceil(1000 / 16)
    assert r.kv_cache_tokens == int(r.num_blocks / 63 * 1000)
    assert r.kv_cache_tokens != r.num_blocks * 16  # max_model_len is not a multiple of the block


def test_tensor_parallel_splits_gqa_but_replicates_mla():
    assert _bytes("llama-3.1-8b", tp=2) == 65_536
    assert _bytes("llama-3.1-8b", tp=8) == 16_384
    assert _bytes("llama-3.1-8b", tp=16) == 16_384  # 8 KV heads replicated to 1 per rank
    assert _bytes("deepseek-v2-lite", tp=2) == 31_104  # the latent is replicated on every rank
    with pytest.raises(KvlabError, match="does not divide the 32 attention heads"):
        memory.kv_footprint(card("llama-3.1-8b").arch, "auto", 3)
    with pytest.raises(KvlabError, match="does not divide the 28 attention heads"):
        memory.kv_footprint(card("qwen2.5-7b").arch, "auto", 8)
    odd = _cfg(num_attention_heads=24, hidden_size=1536, num_key_value_heads=3)
    with pytest.raises(KvlabError, match="-tp 4 is not a multiple of the 3 KV heads"):
        memory.kv_footprint(odd, "auto", 4)
    wide = _cfg(num_attention_heads=32, hidden_size=2048, num_key_value_heads=16)
    with pytest.raises(KvlabError, match="-tp 20 is not a multiple of the 8 KV heads"):
        memory.kv_footprint(_cfg(num_attention_heads=40, hidden_size=2560, num_key_value_heads=8), "auto", 20)
    assert memory.kv_footprint(wide, "auto", 4).kv_bytes_per_token == 10 * 2 * 4 * 64 * 2


def test_pipeline_parallel_uses_the_largest_stage():
    a = card("deepseek-v2-lite").arch
    assert memory.pp_partition(27, 2) == [14, 13]
    assert memory.pp_partition(32, 3) == [11, 11, 10]
    assert memory.pp_partition(10, 4) == [2, 3, 3, 2]
    r = memory.capacity(a, kv_budget_bytes=GiB, max_model_len=4096, pipeline_parallel_size=2)
    assert r.bytes_per_block == 16 * 1152 * 14
    assert r.num_blocks == GiB // (16 * 1152 * 14)
    assert r.layers_per_stage == [14, 13]


def test_backend_block_sizes_and_fp8_support():
    a = card("deepseek-v2-lite").arch
    h100 = memory.capacity(a, gpu="h100", max_model_len=32768)
    assert (h100.attention_backend, h100.block_size) == ("FLASH_ATTN_MLA", 16)
    fp8 = memory.capacity(a, gpu="h100", max_model_len=32768, kv_cache_dtype="fp8")
    assert (fp8.attention_backend, fp8.block_size) == ("FLASHMLA", 64)  # FA-MLA has no fp8 KV
    b200 = memory.capacity(a, gpu="b200", max_model_len=32768)
    assert (b200.attention_backend, b200.block_size) == ("FLASHINFER_MLA", 32)
    with pytest.raises(KvlabError, match="not supported by the FLASH_ATTN_MLA backend"):
        memory.capacity(a, gpu="h100", kv_cache_dtype="fp8", attention_backend="FLASH_ATTN_MLA")
    with pytest.raises(KvlabError, match="MLA models only"):
        memory.capacity(card("llama-3.1-8b").arch, kv_budget_bytes=GiB, kv_cache_dtype="fp8_ds_mla")


def test_gpu_budget_is_an_itemised_estimate():
    a = card("llama-3.1-8b").arch
    r = memory.capacity(a, gpu="h100", gpu_memory_utilization=0.9, max_model_len=32768)
    m = r.memory
    assert r.kv_budget_source == "estimate"
    assert m.requested_bytes == ceil(m.total_bytes * 0.9)
    # 8,030,261,248 params x 2 B and the rope cache, 131,072 positions x 128 x 2 B (which vLLM loads with them)
    assert m.weight_bytes == 16_060_522_496 + 33_554_432 and r.rope_cache_bytes == 33_554_432
    assert m.kv_budget_bytes == (m.requested_bytes - m.weight_bytes - m.activation_bytes
                                 - m.non_torch_bytes - m.cudagraph_bytes - m.runner_buffer_bytes)
    assert r.num_blocks == m.kv_budget_bytes // (16 * 4096 * 32)


def test_weights_that_do_not_fit_say_by_how_much():
    with pytest.raises(KvlabError, match=r"do not fit h100 .* short by \d+\.\d\d GiB"):
        memory.capacity(card("deepseek-v3").arch, gpu="h100")
    # 8 x H200 hold DeepSeek-V3's FP8 weights
    r = memory.capacity(card("deepseek-v3").arch, gpu="h200", tensor_parallel_size=8, max_model_len=32768)
    assert r.quantization == "fp8-block" and r.num_blocks > 0


def test_sliding_window_changes_concurrency_not_blocks():
    full = _cfg(num_key_value_heads=4, max_position_embeddings=32768)
    sw = _cfg(num_key_value_heads=4, max_position_embeddings=32768, sliding_window=4096)
    assert sw.num_sliding_layers == 10
    kw = dict(kv_budget_bytes=GiB, max_model_len=32768, block_size=16, max_num_batched_tokens=2048)
    rf, rs = memory.capacity(full, **kw), memory.capacity(sw, **kw)
    assert rf.num_blocks == rs.num_blocks
    assert rs.max_concurrency == rs.num_blocks / (ceil((4096 - 1 + 2048) / 16) + 1)


def test_hybrid_groups_follow_vllm():
    """10 full + 20 sliding-window layers: 3 groups of 10 (vLLM's n:1 pattern rule)."""
    types = ["full_attention" if i % 3 == 0 else "sliding_attention" for i in range(30)]
    a = _cfg(num_hidden_layers=30, num_key_value_heads=4, sliding_window=512, layer_types=types)
    specs = memory.layer_specs(a, block_size=16)
    groups = memory.kv_groups(specs)
    assert sorted(g.num_layers for g in groups) == [10, 10, 10]
    r = memory.capacity(a, kv_budget_bytes=GiB, max_model_len=4096, block_size=16, max_num_batched_tokens=2048)
    assert r.num_kv_cache_groups == 3
    assert r.bytes_per_block == 10 * specs[0].page_size_bytes


def test_max_model_len_checks(monkeypatch):
    a = card("llama-2-7b").arch
    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    # vLLM's own reason (vllm/config/model.py, _get_and_verify_max_len)
    with pytest.raises(KvlabError, match=r"User-specified max_model_len \(8192\) is greater than the derived "
                                         r"max_model_len \(max_position_embeddings=4096.0 or model_max_length=None"):
        memory.capacity(a, kv_budget_bytes=GiB, max_model_len=8192)
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    r = memory.capacity(a, kv_budget_bytes=GiB, max_model_len=8192)
    assert r.max_model_len == 8192 and "VLLM_ALLOW_LONG_MAX_MODEL_LEN" in r.warnings[0]
    with pytest.raises(KvlabError, match="VLLM_ALLOW_LONG_MAX_MODEL_LEN=1"):
        memory.capacity(a, kv_budget_bytes=GiB, max_model_len=8192, allow_long_max_model_len=False)
    r = memory.capacity(a, kv_budget_bytes=GiB // 64, max_model_len=4096)
    assert r.warnings and "cannot hold one request" in r.warnings[0]


def test_qwen2_head_dim_comes_from_hidden_size_as_in_vllm():
    """vLLM's Qwen2 attention ignores a head_dim field (hidden_size / num_attention_heads)."""
    cfg = dict(model_type="qwen2", hidden_size=256, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, head_dim=128, vocab_size=1000)
    a = arch_from_config(cfg)
    assert a.head_dim == 9
    # what vLLM 0.32 (CPU build) logged for such a config in 1 GiB: 266,240 tokens (block 128)
    r = memory.capacity(a, kv_budget_bytes=GiB, max_model_len=4096, cpu=True)
    assert r.kv_cache_tokens == 266_240
    assert arch_from_config({**cfg, "model_type": "llama"}).head_dim == 128


def test_default_gpu_memory_utilization_is_vllm_0_20s():
    a = card("deepseek-v2-lite").arch
    assert memory.DEFAULT_GPU_MEMORY_UTILIZATION == 0.92
    r = memory.capacity(a, gpu="h100", max_model_len=32768)
    assert r.memory.gpu_memory_utilization == 0.92
    assert r.memory.requested_bytes == ceil(81090 * 2**20 * 0.92)
    # vLLM 0.32's own sampler on an H100, FlashInfer's; Model Runner V2's profiling run holds 2 B a logit of its
    # dummy run whichever sampler (V1's accounting at 0.22: 14 B, its second, PyTorch-native call's; the sort's 39 B
    # before 0.17: 1,024 x 102,400 logits x 25 B = 5,267 blocks of 497,664 B fewer than at 14 B)
    # (and V2's penalty state, counted from 0.27: 1,024 x 4 x (102,400 + 3,200) B, 869 blocks: 91,358 without it;
    # and the YaRN rope cache, 163,840 x 64 x 2 B, 43 blocks: 90,489 without it)
    assert r.memory.sampler == "flashinfer" and r.memory.model_runner == "v2"
    assert (r.num_blocks, r.kv_cache_tokens) == (90446, 1_447_136)
    pytorch = memory.capacity(a, gpu="h100", max_model_len=32768, sampler="pytorch")
    assert (pytorch.num_blocks, pytorch.kv_cache_tokens) == (90446, 1_447_136)
    v1 = memory.capacity(a, gpu="h100", max_model_len=32768, vllm_version="0.22")
    assert v1.memory.model_runner == "v1" and v1.num_blocks == 89851  # either sampler: the second call's 14 B
    sort, triton = (memory.capacity(a, gpu="h100", max_model_len=32768, sampler="pytorch", vllm_version=v,
                                    gpu_memory_utilization=0.92) for v in ("0.16", "0.18"))  # (no CUDA graphs: < 0.21)
    assert triton.num_blocks - sort.num_blocks == 5267
    from kvlab.sim.config import build_config

    assert build_config("deepseek-v2-lite", "h100").num_blocks == r.num_blocks  # the simulator's default too
