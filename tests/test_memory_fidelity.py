"""The memory model's wider fidelity to vLLM 0.32: speculative-decoding drafts in the KV pool,
per-stage budgets, use_sliding_window, --max-model-len beyond the config, experts over DP.

Where vLLM (the CPU build in the venv) is importable, its own `get_kv_cache_configs` and
`get_kv_cache_capacity` (vllm/v1/core/kv_cache_utils.py) size the same layer specs and the figures
must agree exactly; the arithmetic is also spelled out from vLLM's source without it."""

import json
from math import ceil

import pytest

from kvlab.errors import KvlabError
from kvlab.models import memory
from kvlab.models.arch import arch_from_config
from kvlab.models.cards import card
from kvlab.models.weights import weight_bytes_by_role, weight_format
from kvlab.serve_config import parse_serve_config

GiB = 1 << 30
LLAMA_PAGE = 16 * 8 * (128 + 128) * 2  # one layer's page: 16 tokens x 8 KV heads x (K + V) x 128 x bf16

# yuhuili/EAGLE-LLaMA3.1-Instruct-8B config.json (one Llama decoder layer, the target's geometry)
EAGLE_LLAMA31_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "bias": False, "bos_token_id": 128000, "eos_token_id": 128001,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 1,
    "num_key_value_heads": 8, "pad_token_id": 0, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "float16", "vocab_size": 128256,
}
# meta-llama/Llama-3.2-1B config.json (a draft_model of another geometry: 16 layers, head_dim 64)
LLAMA32_1B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
    "num_key_value_heads": 8, "head_dim": 64, "rope_scaling": {"factor": 32.0, "rope_type": "llama3",
    "high_freq_factor": 4.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256,
}
# Qwen/Qwen2-VL-7B-Instruct config.json (language model fields; vision_config left out)
QWEN2_VL_7B_CONFIG = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "hidden_size": 3584, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2_vl",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "vocab_size": 152064,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}


def _draft_dir(tmp_path, cfg, name="EAGLE-LLaMA3.1-Instruct-8B"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


# -- vLLM's own sizing, where the CPU build is importable -------------------------------------


def _vllm_capacity(stage_specs: list[list[memory.KVCacheSpec]], budgets: list[int], max_model_len: int):
    """num_blocks, kv_cache_tokens, max_concurrency as vLLM 0.32's kv_cache_utils computes them for
    one worker per pipeline stage (kvlab's specs turned into vLLM's)."""
    torch = pytest.importorskip("torch")
    kvi = pytest.importorskip("vllm.v1.kv_cache_interface")
    u = pytest.importorskip("vllm.v1.core.kv_cache_utils")
    from types import SimpleNamespace as NS

    dtypes = {1: torch.float8_e4m3fn, 2: torch.bfloat16, 4: torch.float32}

    def vllm_spec(s: memory.KVCacheSpec):
        if s.attention == "mla":
            return kvi.MLAAttentionSpec(block_size=s.block_size, num_kv_heads=1, head_size=s.head_size,
                                        dtype=dtypes[s.dtype_bytes])
        assert s.attention == "full"
        return kvi.FullAttentionSpec(block_size=s.block_size, num_kv_heads=s.num_kv_heads, head_size=s.head_size,
                                     dtype=dtypes[s.dtype_bytes])

    workers, n = [], 0
    for specs in stage_specs:
        workers.append({f"layers.{n + i}.attn": vllm_spec(s) for i, s in enumerate(specs)})
        n += len(specs)
    cfg = NS(
        cache_config=NS(num_gpu_blocks_override=None, prefix_cache_retention_interval=None,
                        get_resolved_kv_cache_layout=lambda: kvi.KVCacheLayout.LBHNC),
        model_config=NS(max_model_len=max_model_len, original_max_model_len=max_model_len),
        scheduler_config=NS(disable_hybrid_kv_cache_manager=False, max_num_batched_tokens=8192),
        parallel_config=NS(tensor_parallel_size=1, decode_context_parallel_size=1,
                           pipeline_parallel_size=len(stage_specs)),
        attention_config=NS(hisparse_config=None), speculative_config=None, num_prefill_lookahead_tokens=0,
        device_config=NS(device_type="cuda"),
    )
    configs = u.get_kv_cache_configs(cfg, workers, budgets)
    scheduler = u.generate_scheduler_kv_cache_config(configs)
    tokens, concurrency = u.get_kv_cache_capacity(cfg, scheduler)
    return scheduler.num_blocks, tokens, concurrency


def _stage_specs(r: memory.CapacityResult, arch, draft_arch=None, kv_cache_dtype="auto"):
    specs = memory.layer_specs(arch, kv_cache_dtype, r.block_size, r.tensor_parallel_size)
    draft = memory.layer_specs(draft_arch, kv_cache_dtype, r.block_size, r.tensor_parallel_size,
                               dtype=arch.dtype) if draft_arch else []
    out, start = [], 0
    for n in r.layers_per_stage:
        out.append(specs[start:start + n])
        start += n
    out[-1] = out[-1] + draft
    return out


def _agrees_with_vllm(r, stage_specs, budgets):
    assert (r.num_blocks, r.kv_cache_tokens, r.max_concurrency) == _vllm_capacity(stage_specs, budgets, r.max_model_len)


# -- speculative decoding -----------------------------------------------------------------------


def test_eagle_draft_layer_takes_a_share_of_every_block(tmp_path):
    a = card("llama-3.1-8b").arch
    draft = _draft_dir(tmp_path, EAGLE_LLAMA31_CONFIG)
    spec = json.dumps({"method": "eagle", "model": str(draft), "num_speculative_tokens": 3})
    budget = 20 * GiB
    plain = memory.capacity(a, kv_budget_bytes=budget, max_model_len=131072)
    r = memory.capacity(a, kv_budget_bytes=budget, max_model_len=131072, speculative_config=spec)
    assert r.num_draft_layers == 1 and r.num_kv_cache_groups == 1
    assert r.bytes_per_block == 33 * LLAMA_PAGE  # 32 target layers + the draft's, one group
    assert r.num_blocks == budget // (33 * LLAMA_PAGE) == 9929
    assert r.max_concurrency == 9929 / ceil(131072 / 16)
    assert r.kv_cache_tokens == int(9929 / 8192 * 131072) == 158_864
    assert plain.num_blocks == budget // (32 * LLAMA_PAGE) == 10_240  # 3 % more without the draft
    _agrees_with_vllm(r, _stage_specs(r, a, arch_from_config(EAGLE_LLAMA31_CONFIG)), [budget])


def test_eagle3_speculators_format_and_method_inferred_from_the_name(tmp_path):
    a = card("llama-3.1-8b").arch
    wrapped = {"speculators_model_type": "eagle3", "architectures": ["Eagle3Speculator"],
               "transformer_layer_config": {**EAGLE_LLAMA31_CONFIG, "architectures": ["LlamaForCausalLMEagle3"]}}
    draft = _draft_dir(tmp_path, wrapped, "Llama-3.1-8B-Instruct-speculator.eagle3")
    r = memory.capacity(a, kv_budget_bytes=20 * GiB, max_model_len=8192,
                        speculative_config={"model": str(draft), "num_speculative_tokens": 3})
    assert r.speculative["method"] == "eagle3" and r.num_draft_layers == 1
    assert r.bytes_per_block == 33 * LLAMA_PAGE


def test_draft_model_of_another_geometry_is_one_group_of_summed_pages(tmp_path):
    a = card("llama-3.1-8b").arch
    draft = _draft_dir(tmp_path, LLAMA32_1B_CONFIG, "Llama-3.2-1B")
    budget = 30 * GiB
    r = memory.capacity(a, kv_budget_bytes=budget, max_model_len=32768,
                        speculative_config={"method": "draft_model", "model": str(draft), "num_speculative_tokens": 4})
    draft_page = 16 * 8 * (64 + 64) * 2
    assert r.num_draft_layers == 16 and r.num_kv_cache_groups == 1
    assert r.bytes_per_block == 32 * LLAMA_PAGE + 16 * draft_page
    assert r.num_blocks == budget // r.bytes_per_block
    _agrees_with_vllm(r, _stage_specs(r, a, arch_from_config(LLAMA32_1B_CONFIG)), [budget])


def test_deepseek_v3_mtp_layer_is_one_more_mla_layer():
    a = card("deepseek-v3").arch
    assert a.num_nextn_predict_layers == 1
    budget = 20 * GiB
    r = memory.capacity(a, kv_budget_bytes=budget, max_model_len=32768, tensor_parallel_size=8,
                        speculative_config='{"method": "mtp", "num_speculative_tokens": 1}')
    page = 16 * 576 * 2  # FLASH_ATTN_MLA on Hopper: 16-token blocks of the 512 + 64 latent in bf16
    assert r.num_draft_layers == 1
    assert r.bytes_per_block == 62 * page
    assert r.num_blocks == budget // (62 * page) == 18_791
    assert r.kv_cache_tokens == int(18_791 / 2048 * 32768)
    _agrees_with_vllm(r, _stage_specs(r, a, memory.speculative_draft(
        {"method": "mtp", "num_speculative_tokens": 1}, a).arch), [budget])
    # the old per-model name is the same method in vLLM 0.32; fp8_ds_mla sizes the draft too
    fp8 = memory.capacity(a, kv_budget_bytes=budget, max_model_len=32768, kv_cache_dtype="fp8_ds_mla",
                          speculative_config='{"method": "deepseek_mtp", "num_speculative_tokens": 1}')
    assert fp8.bytes_per_block == 62 * fp8.block_size * 656


def test_ngram_and_suffix_take_no_kv_cache():
    a = card("llama-3.1-8b").arch
    plain = memory.capacity(a, kv_budget_bytes=20 * GiB, max_model_len=8192)
    for spec in ('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}',
                 '{"model": "[ngram]", "num_speculative_tokens": 4}', '{"method": "suffix"}'):
        r = memory.capacity(a, kv_budget_bytes=20 * GiB, max_model_len=8192, speculative_config=spec)
        assert (r.num_blocks, r.kv_cache_tokens, r.num_draft_layers) == (plain.num_blocks, plain.kv_cache_tokens, 0)


@pytest.mark.parametrize("spec, message", [
    ("{not json", "--speculative-config is not JSON"),
    ('["eagle"]', "must be a JSON object"),
    ('{"method": "eagle", "modle": "x"}', "unknown field 'modle'"),
    ('{"method": "eagle", "num_speculative_tokens": 3}', "needs \"model\""),
    ('{"method": "mtp", "num_speculative_tokens": 0}', "positive whole number"),
    ('{"method": "medusa", "model": "x"}', "kvlab sizes eagle"),
])
def test_bad_speculative_configs_are_one_line_errors(spec, message):
    with pytest.raises(KvlabError, match=message):
        memory.capacity(card("deepseek-v3").arch, kv_budget_bytes=GiB, max_model_len=4096, speculative_config=spec)


def test_mtp_needs_an_mtp_model():
    with pytest.raises(KvlabError, match="kvlab sizes MTP drafts of deepseek_v3"):
        memory.capacity(card("llama-3.1-8b").arch, kv_budget_bytes=GiB, max_model_len=4096,
                        speculative_config='{"method": "mtp", "num_speculative_tokens": 1}')
    no_mtp = arch_from_config({**card("deepseek-v3").config, "num_nextn_predict_layers": 0})
    with pytest.raises(KvlabError, match="no MTP layers"):
        memory.capacity(no_mtp, kv_budget_bytes=GiB, max_model_len=4096,
                        speculative_config='{"method": "mtp", "num_speculative_tokens": 1}')


# -- pipeline stages -----------------------------------------------------------------------------


def test_per_stage_budgets_keep_the_smallest_block_count(tmp_path):
    a = card("llama-3.1-8b").arch
    draft = _draft_dir(tmp_path, EAGLE_LLAMA31_CONFIG)
    budgets = [10 * GiB, 10 * GiB + GiB // 4]
    r = memory.capacity(a, kv_budget_bytes=budgets, max_model_len=32768, pipeline_parallel_size=2,
                        speculative_config={"method": "eagle", "model": str(draft), "num_speculative_tokens": 3})
    # stage 0: 16 layers; stage 1: 16 layers + the draft's (the drafter runs on the last stage)
    assert r.num_blocks_per_stage == [budgets[0] // (16 * LLAMA_PAGE), budgets[1] // (17 * LLAMA_PAGE)]
    assert r.limiting_stage == 1 and r.num_blocks == min(r.num_blocks_per_stage)
    assert r.kv_budget_bytes == budgets[1] and r.bytes_per_block == 17 * LLAMA_PAGE
    _agrees_with_vllm(r, _stage_specs(r, a, arch_from_config(EAGLE_LLAMA31_CONFIG)), budgets)
    with pytest.raises(KvlabError, match="one per pipeline stage"):
        memory.capacity(a, kv_budget_bytes=[GiB, GiB, GiB], max_model_len=4096, pipeline_parallel_size=2)


# -- sliding window, context, experts ------------------------------------------------------------


def test_qwen2_vl_without_use_sliding_window_has_full_attention_concurrency():
    a = arch_from_config(QWEN2_VL_7B_CONFIG, "Qwen2-VL-7B-Instruct")
    assert a.num_sliding_layers == 0 and a.sliding_window is None
    r = memory.capacity(a, kv_budget_bytes=10 * GiB, max_model_len=32768, max_num_batched_tokens=8192)
    assert r.max_concurrency == r.num_blocks / (32768 // 16)  # not / 2049: vLLM ignores the window
    _agrees_with_vllm(r, _stage_specs(r, a), [10 * GiB])
    # the same config under text_config (transformers 5 layout), use_sliding_window at the top
    nested = {"model_type": "qwen2_vl", "use_sliding_window": False,
              "text_config": {k: v for k, v in QWEN2_VL_7B_CONFIG.items() if k != "use_sliding_window"}}
    assert arch_from_config(nested).num_sliding_layers == 0
    on = arch_from_config({**QWEN2_VL_7B_CONFIG, "use_sliding_window": True, "max_window_layers": 0})
    assert on.num_sliding_layers == 28


def test_rope_scaling_factor_raises_the_context_vllm_accepts(monkeypatch):
    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    base = dict(model_type="llama", hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                num_attention_heads=8, vocab_size=1000, max_position_embeddings=4096)
    linear = arch_from_config({**base, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert linear.derived_max_model_len == 16384.0
    assert memory.capacity(linear, kv_budget_bytes=GiB).max_model_len == 16384  # vLLM's default: the derived
    memory.capacity(linear, kv_budget_bytes=GiB, max_model_len=16384)
    with pytest.raises(KvlabError, match=r"max_position_embeddings=16384.0"):
        memory.capacity(linear, kv_budget_bytes=GiB, max_model_len=16385)
    # YaRN and llama3 rope leave max_position_embeddings already scaled: no factor on top
    yarn = arch_from_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 1024}})
    assert yarn.derived_max_model_len == 4096
    # a larger model_max_length in the config is accepted as is
    assert memory.capacity(arch_from_config({**base, "model_max_length": 8192}), kv_budget_bytes=GiB,
                           max_model_len=8192).max_model_len == 8192


def test_the_simulator_takes_the_context_vllm_accepts(monkeypatch, tmp_path):
    """`kvlab sim` checks --max-model-len as the memory model (vLLM) does: the RoPE scaling factor raises
    the limit, and VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 lifts it (it had compared max_position_embeddings alone)."""
    import json

    from kvlab.sim.config import build_config

    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    (tmp_path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=1024, intermediate_size=2048,
        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, vocab_size=1000,
        max_position_embeddings=4096, torch_dtype="bfloat16", rope_scaling={"type": "linear", "factor": 4.0})))
    assert build_config(str(tmp_path), "h100", max_model_len=16384).max_model_len == 16384
    with pytest.raises(KvlabError, match=r"max_position_embeddings=16384.0 .* VLLM_ALLOW_LONG_MAX_MODEL_LEN=1\. "
                                         r"VLLM_ALLOW_LONG_MAX_MODEL_LEN must be used with extreme caution\."):
        build_config(str(tmp_path), "h100", max_model_len=16385)
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    assert build_config(str(tmp_path), "h100", max_model_len=32768).max_model_len == 32768


def test_hf_overrides_apply_to_the_config_as_vllm_applies_them(monkeypatch):
    """vLLM's --hf-overrides (vllm/config/model.py, ModelConfig): a flat value is set, a dict value set
    whole (rope_scaling), except into a nested config (text_config), which it merges into; kvlab's
    capacity and simulator read the overridden config (`with_hf_overrides`)."""
    from kvlab.models.cards import apply_hf_overrides, resolve_model, with_hf_overrides
    from kvlab.sim.config import build_config

    cfg = {"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "linear", "factor": 2.0, "x": 1},
           "text_config": {"model_type": "t", "hidden_size": 64, "num_hidden_layers": 2}}
    out = apply_hf_overrides(cfg, {"max_position_embeddings": 8192, "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
                                   "text_config": {"num_hidden_layers": 4}})
    assert out["max_position_embeddings"] == 8192 and out["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0}
    assert out["text_config"] == {"model_type": "t", "hidden_size": 64, "num_hidden_layers": 4} and cfg["text_config"]["num_hidden_layers"] == 2

    monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    yarn = ('{"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, '
            '"max_position_embeddings": 131072}')
    qwen = with_hf_overrides(resolve_model("qwen2.5-7b"), yarn)
    assert qwen.arch.max_position_embeddings == 131072 and resolve_model("qwen2.5-7b").arch.max_position_embeddings == 32768
    assert memory.capacity(qwen.arch, gpu="h100", max_model_len=131072).max_model_len == 131072
    with pytest.raises(KvlabError, match="max_position_embeddings=32768.0"):
        build_config("qwen2.5-7b", "h100", max_model_len=131072)
    from kvlab.serve_config import options_config

    assert build_config(options_config("qwen2.5-7b", max_model_len=131072, hf_overrides=yarn),
                        "h100").max_model_len == 131072
    # without --max-model-len: vLLM's default, the overridden config's length (not the card's 32,768)
    assert build_config(options_config("qwen2.5-7b", hf_overrides=yarn), "h100").max_model_len == 131072


def test_experts_split_over_data_parallel_gpus():
    a = card("deepseek-v3").arch
    roles = weight_bytes_by_role(a, weight_format(None, a), "bfloat16")
    expert, rest = roles["expert"], sum(roles.values()) - roles["expert"]
    tp8 = memory.capacity(a, gpu="h200", tensor_parallel_size=8, max_model_len=32768)
    rope = 163_840 * 64 * 2  # every rank holds the whole rope cache
    copy = 61 * 128 * 256 * 512 * 2  # MLA's bf16 kv_b_proj beside the FP8 one, its heads split over -tp
    assert tp8.weight_bytes_per_gpu == ceil(rest / 8 + expert / 8) + rope + copy // 8
    ep = memory.capacity(a, gpu="h200", tensor_parallel_size=1, data_parallel_size=8, enable_expert_parallel=True,
                         max_model_len=32768)
    assert ep.weight_bytes_per_gpu == ceil(rest + expert / 8) + rope + copy and ep.num_gpus == 8 and ep.enable_expert_parallel
    with pytest.raises(KvlabError, match="do not fit h200"):
        memory.capacity(a, gpu="h200", tensor_parallel_size=1, max_model_len=32768)  # all experts on one GPU


def test_mla_keeps_a_16_bit_kv_b_proj_copy_beside_a_quantized_one():
    """vLLM's MLA has no quantized batched matmul for the absorbed up-projections: it dequantizes kv_b_proj
    once at load and keeps W_UK_T and W_UV as views of that copy (unquantized: views of kv_b_proj itself,
    no copy; tests/test_vllm_module_bytes.py counts the CPU build's storages). DeepSeek-V2-Lite with online
    FP8: 27 layers x 16 heads x (128 + 128) x 512 x 2 B."""
    a = card("deepseek-v2-lite").arch
    fp8 = memory.capacity(a, gpu="h100", max_model_len=32768, quantization="fp8")
    assert fp8.mla_dequant_bytes == 27 * 16 * 256 * 512 * 2 == 113_246_208
    assert memory.capacity(a, gpu="h100", max_model_len=32768).mla_dequant_bytes == 0
    assert memory.capacity(card("llama-3.1-8b").arch, gpu="h100", quantization="fp8").mla_dequant_bytes == 0
    tp2 = memory.capacity(a, gpu="h100", max_model_len=32768, quantization="fp8", tensor_parallel_size=2)
    assert tp2.mla_dequant_bytes == 113_246_208 // 2


# -- the flags, as vLLM spells them ---------------------------------------------------------------


def test_serve_flags_type_speculative_dp_and_ep():
    c = parse_serve_config("deepseek-v3", ["-dp", "8", "--enable-expert-parallel", "--speculative-config",
                                           '{"method": "mtp", "num_speculative_tokens": 1}'])
    assert (c.data_parallel_size, c.enable_expert_parallel) == (8, True)
    assert c.speculative_config == '{"method":"mtp","num_speculative_tokens":1}'
    argv = c.to_argv()
    assert argv[argv.index("--speculative-config") + 1] == c.speculative_config
    assert "--enable-expert-parallel" in argv and argv[argv.index("--data-parallel-size") + 1] == "8"
    assert parse_serve_config("deepseek-v3", argv).model_dump() == c.model_dump()
    kw = c.capacity_kwargs()
    assert kw["speculative_config"] == c.speculative_config and kw["data_parallel_size"] == 8
    assert not parse_serve_config("m", ["-ep", "--no-enable-expert-parallel"]).enable_expert_parallel
    with pytest.raises(KvlabError, match="argument --speculative-config/-sc: not JSON"):
        parse_serve_config("m", ["-sc", "{eagle"])


def test_capacity_command_takes_the_new_flags(kvlab, tmp_path):
    draft = _draft_dir(tmp_path, EAGLE_LLAMA31_CONFIG)
    spec = json.dumps({"method": "eagle", "model": str(draft), "num_speculative_tokens": 3})
    r = kvlab("capacity", "llama-3.1-8b", "--kv-memory-gib", "20", "--max-model-len", "131072",
              "--speculative-config", spec, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["num_blocks"], d["kv_cache_tokens"], d["num_draft_layers"]) == (9929, 158_864, 1)
    r = kvlab("capacity", "llama-3.1-8b", "--kv-memory-gib", "10,10.25", "-pp", "2", "--json")
    d = json.loads(r.stdout)
    assert d["num_blocks_per_stage"] == [10 * GiB // (16 * LLAMA_PAGE), int(10.25 * GiB) // (16 * LLAMA_PAGE)]
    r = kvlab("capacity", "llama-3.1-8b", "--kv-memory-gib", "10,x")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "--kv-memory-gib" in r.stderr


def test_simulator_still_warns_that_it_does_not_simulate_them():
    from kvlab.sim.args import parse_serve_args

    args = parse_serve_args(["--gpu", "h100", "llama-3.1-8b", "-dp", "2", "--enable-expert-parallel",
                             "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}'])
    assert {"data-parallel-size", "speculative-config"} <= set(args.not_simulated)
    # expert parallelism is simulated: its experts priced from the kernel tables' moe_ep rows
    assert "enable-expert-parallel" not in args.not_simulated and args.config.enable_expert_parallel
    assert args.config.data_parallel_size == 2
    assert parse_serve_args(["--gpu", "h100", "llama-3.1-8b"]).not_simulated == ()
    # --cpu-offload-gb moves weights to host memory (more KV cache, slower steps): neither is modelled,
    # so it is warned about, not taken as a flag without effect; 0 is vLLM's default
    assert parse_serve_args(["--gpu", "h100", "llama-3.1-8b", "--cpu-offload-gb", "10"]).not_simulated == ("cpu-offload-gb",)
    assert parse_serve_args(["--gpu", "h100", "llama-3.1-8b", "--cpu-offload-gb", "0"]).not_simulated == ()


def test_block_fp8_experts_that_do_not_split_into_whole_blocks_refuse_to_start(kvlab):
    """vLLM's `validate_fp8_block_shape_moe`: a block-FP8 MoE's experts split over -tp must keep whole
    128-wide scale blocks. Qwen3-30B-A3B's 768 columns over 4 GPUs are 192 (vLLM refuses, with this
    message); over 2 they are 384; with --enable-expert-parallel the experts stay whole."""
    arch = card("qwen3-30b-a3b").arch
    with pytest.raises(KvlabError, match=r"^The output_size of gate's and up's weight = 192 is not divisible by "
                                         r"weight quantization block_n = 128\. \(vLLM refuses to start"):
        memory.capacity(arch, quantization="fp8-block", tensor_parallel_size=4, gpu="h100")
    for kw in ({"tensor_parallel_size": 2}, {"tensor_parallel_size": 4, "enable_expert_parallel": True},
               {"tensor_parallel_size": 4, "quantization": "fp8"}):
        assert memory.capacity(arch, **{"quantization": "fp8-block", "gpu": "h100", **kw}).num_blocks > 0
    # -dp without EP flattens the experts' split over tp x dp GPUs, as vLLM's FusedMoE does
    with pytest.raises(KvlabError, match="-tp 2 x -dp 2 splits each routed expert's 768 columns 4 ways"):
        memory.capacity(arch, quantization="fp8-block", tensor_parallel_size=2, data_parallel_size=2, gpu="h100")
    r = kvlab("capacity", "qwen3-30b-a3b", "--gpu", "h100", "-tp", "4", "-q", "fp8-block")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--enable-expert-parallel" in r.stderr
