"""`kvlab explain LOG`: logged KV figures beside the memory model's, on the CPU-build logs the tests
keep and on published GPU logs (tests/fixtures/vllm-*-gpu-*.server.log, source in each header)."""

import json
from pathlib import Path

import pytest

from kvlab.deploy.facts import parse_log
from kvlab.errors import KvlabError
from kvlab.models import explain as explain_module

FIXTURES = Path(__file__).parent / "fixtures"
EAGLE_LOG = FIXTURES / "vllm-0.9.1-gpu-h100-llama-3.1-8b-eagle.server.log"


def explain(text, **kw):
    return explain_module.explain(text, parse_log=parse_log, **kw)


def read_log(text):
    return explain_module.read_log(text, parse_log)


def _rows(e):
    return {r.figure: r for r in e.rows}


@pytest.mark.parametrize("name, model, tokens", [
    ("vllm-0.32-cpu-llama-twin.server.log", "llama-3.1-8b", 8_192),
    ("vllm-0.32-cpu-deepseek-twin.server.log", "deepseek-v2-lite", 34_512),
])
def test_cpu_build_logs_agree_exactly(name, model, tokens):
    e = explain((FIXTURES / name).read_text())
    rows = _rows(e)
    assert e.model == model and e.kv_device == "CPU" and e.budget == "1.00 GiB, exact"
    assert rows["kv_cache_tokens"].verdict == "equal" and rows["kv_cache_tokens"].predicted == tokens
    assert rows["max_concurrency"].verdict == "equal"
    assert e.agrees


def test_vllm_0_10_gpu_log_agrees_within_the_rounding_band():
    """Jetson Thor, Llama-3.1-8B: 85.79 GiB logged to 0.01 GiB; 43,925 blocks x 16 = 702,800 tokens."""
    e = explain((FIXTURES / "vllm-0.10.2-gpu-jetson-thor-llama-3.1-8b.server.log").read_text())
    rows = _rows(e)
    assert (e.vllm_version, e.model) == ("0.10.2", "llama-3.1-8b")
    assert rows["num_blocks"].logged == 43_925 and rows["num_blocks"].verdict == "within rounding band"
    assert rows["num_blocks"].predicted_low <= 43_925 <= rows["num_blocks"].predicted_high
    # vLLM < 0.21 logs num_blocks x block_size tokens
    assert rows["kv_cache_tokens"].verdict == "within rounding band"
    assert rows["max_concurrency"].verdict == "equal" and e.agrees


def test_vllm_0_19_gpu_log_agrees_exactly():
    """A100-40GB, Qwen3-8B: 19.36 GiB / (36 layers x 64 KiB pages) = 8,810 blocks = 140,960 tokens."""
    e = explain((FIXTURES / "vllm-0.19.1-gpu-a100-qwen3-8b.server.log").read_text())
    rows = _rows(e)
    assert e.model == "qwen3-8b" and e.capacity["attention_backend"] == "FLASH_ATTN"
    assert rows["kv_cache_tokens"].logged == rows["kv_cache_tokens"].predicted == 140_960
    assert rows["max_concurrency"].verdict == "equal" and e.agrees
    # the profiling run's "Overriding num_gpu_blocks=0 with num_gpu_blocks_override=512" is not the cache
    assert read_log((FIXTURES / "vllm-0.19.1-gpu-a100-qwen3-8b.server.log").read_text()).num_blocks is None


def test_eagle_log_differs_by_a_draft_layer_until_the_draft_is_named(tmp_path):
    """vLLM issue 19996: 51.63 GiB gave 410,128 tokens, not 422,944: 33 layers share each block."""
    e = explain(EAGLE_LOG.read_text(), model="llama-3.1-8b")
    rows = _rows(e)
    assert rows["kv_cache_tokens"].verdict == "differs" and rows["kv_cache_tokens"].predicted == 422_944
    assert "1 draft layer(s)" in rows["kv_cache_tokens"].reason and not e.agrees
    draft = tmp_path / "EAGLE-LLaMA3.1-Instruct-8B"
    draft.mkdir()
    (draft / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": 32,
        "num_hidden_layers": 1, "num_key_value_heads": 8, "torch_dtype": "float16", "vocab_size": 128256}))
    spec = json.dumps({"method": "eagle", "model": str(draft), "num_speculative_tokens": 3})
    named = explain(EAGLE_LOG.read_text(), model="llama-3.1-8b", speculative_config=spec)
    assert named.agrees and _rows(named)["kv_cache_tokens"].verdict in ("equal", "within rounding band")
    assert named.capacity["num_draft_layers"] == 1


def test_pipeline_stages_each_size_their_own_pool():
    """Synthetic log in vLLM 0.32's line formats: two stages, each worker names its PP rank."""
    log = "\n".join([
        "(APIServer pid=1) INFO 01-01 00:00:00 [api_utils.py:286] non-default args: {'model': "
        "'meta-llama/Llama-3.1-8B-Instruct', 'max_model_len': 8192, 'pipeline_parallel_size': 2}",
        "(EngineCore pid=2) INFO 01-01 00:00:01 [core.py:133] Initializing a V1 LLM engine (v0.32.0) with config: "
        "model='meta-llama/Llama-3.1-8B-Instruct', speculative_config=None, dtype=torch.bfloat16, max_seq_len=8192, "
        "tensor_parallel_size=1, pipeline_parallel_size=2, data_parallel_size=1, quantization=None, kv_cache_dtype=auto",
        "(Worker_PP0 pid=3) INFO 01-01 00:00:02 [gpu_worker.py:436] Available KV cache memory: 20.00 GiB",
        "(Worker_PP1 pid=4) INFO 01-01 00:00:02 [gpu_worker.py:436] Available KV cache memory: 18.00 GiB",
        "(EngineCore pid=2) INFO 01-01 00:00:03 [kv_cache_utils.py:2327] GPU KV cache size: 294,912 tokens, "
        "Maximum concurrency for 8,192 tokens per request: 36.00x",
    ])
    e = explain(log)
    # stage 1 (16 layers of 64 KiB pages) fits 18 GiB / 1 MiB = 18,432 blocks: 294,912 tokens
    assert e.capacity["num_blocks_per_stage"] == [20_480, 18_432] and e.capacity["limiting_stage"] == 1
    assert _rows(e)["kv_cache_tokens"].verdict == "equal" and e.agrees


def test_mtp_draft_named_in_the_engine_config_line_is_sized():
    """Synthetic log in vLLM 0.32's formats (SpeculativeConfig.__repr__): DeepSeek-V3 with its MTP
    layer, -tp 8: 61 + 1 MLA layers x 16 x 1,152 B per block; 20 GiB -> 18,791 blocks."""
    log = "\n".join([
        "(EngineCore pid=2) INFO 01-01 00:00:01 [core.py:133] Initializing a V1 LLM engine (v0.32.0) with config: "
        "model='deepseek-ai/DeepSeek-V3', speculative_config=SpeculativeConfig(method='mtp', "
        "model='deepseek-ai/DeepSeek-V3', num_spec_tokens=1), tokenizer='deepseek-ai/DeepSeek-V3', "
        "dtype=torch.bfloat16, max_seq_len=32768, tensor_parallel_size=8, pipeline_parallel_size=1, "
        "data_parallel_size=1, quantization=fp8, kv_cache_dtype=auto, device_config=cuda",
        "(Worker_TP0 pid=3) INFO 01-01 00:00:02 [cuda.py:334] Using FLASH_ATTN_MLA attention backend out of "
        "potential backends: ['FLASH_ATTN_MLA', 'FLASHMLA', 'FLASHINFER_MLA', 'TRITON_MLA'].",
        "(Worker_TP0 pid=3) INFO 01-01 00:00:05 [gpu_worker.py:436] Available KV cache memory: 20.00 GiB",
        "(EngineCore pid=2) INFO 01-01 00:00:06 [kv_cache_utils.py:2327] GPU KV cache size: 300,656 tokens, "
        "Maximum concurrency for 32,768 tokens per request: 9.18x",
    ])
    e = explain(log)
    assert e.capacity["num_draft_layers"] == 1 and e.capacity["num_blocks"] == 18_791
    assert e.agrees, e.rows
    plain = explain(log.replace("speculative_config=SpeculativeConfig(method='mtp', model='deepseek-ai/DeepSeek-V3', "
                                "num_spec_tokens=1)", "speculative_config=None"))
    assert "1 draft layer(s)" in _rows(plain)["kv_cache_tokens"].reason


def test_v0_engine_log_lines():
    """Synthetic log in vLLM 0.6's V0 formats: the budget is "the rest of the memory reserved for KV
    Cache", the cache "# GPU blocks"; 56.34 GiB / (32 layers x 64 KiB) = 28,846 blocks."""
    log = "\n".join([
        "INFO 10-18 09:59:51 llm_engine.py:237] Initializing an LLM engine (v0.6.3) with config: "
        "model='meta-llama/Llama-3.1-8B-Instruct', speculative_config=None, dtype=torch.bfloat16, "
        "max_seq_len=8192, tensor_parallel_size=1, pipeline_parallel_size=1, quantization=None, kv_cache_dtype=auto",
        "INFO 10-18 09:59:52 selector.py:135] Using Flash Attention backend.",
        "INFO 10-18 10:00:10 worker.py:232] Memory profiling results: total_gpu_memory=79.10GiB "
        "initial_memory_usage=15.43GiB peak_torch_memory=16.20GiB memory_usage_post_profile=15.60GiB "
        "non_torch_memory=0.16GiB kv_cache_size=56.34GiB gpu_memory_utilization=0.90. "
        "the rest of the memory reserved for KV Cache is 56.34GiB.",
        "INFO 10-18 10:00:10 gpu_executor.py:122] # GPU blocks: 28846, # CPU blocks: 2048",
        "INFO 10-18 10:00:10 gpu_executor.py:126] Maximum concurrency for 8192 tokens per request: 56.34x",
    ])
    e = explain(log)
    rows = _rows(e)
    assert rows["num_blocks"].logged == 28_846 and rows["num_blocks"].verdict in ("equal", "within rounding band")
    assert rows["max_concurrency"].verdict == "equal" and e.agrees


@pytest.mark.parametrize("text, message", [
    ("hello world\n", "not a vLLM server log"),
    ("INFO 01-01 Available KV cache memory: 1.00 GiB\n", "not a vLLM server log"),
    ("INFO GPU KV cache size: 8,192 tokens\n", "names no model"),
])
def test_foreign_or_partial_logs_are_one_line_errors(text, message):
    with pytest.raises(KvlabError, match=message):
        explain(text)


def test_explain_command(kvlab, tmp_path):
    r = kvlab("explain", str(FIXTURES / "vllm-0.19.1-gpu-a100-qwen3-8b.server.log"), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["agrees"] and d["model"] == "qwen3-8b"
    assert {row["figure"] for row in d["rows"]} == {"num_blocks", "kv_cache_tokens", "max_concurrency"}
    r = kvlab("explain", str(EAGLE_LOG), "--model", "llama-3.1-8b")
    assert r.returncode == 0 and "draft layer" in r.stdout
    foreign = tmp_path / "other.log"
    foreign.write_text("Starting nginx\n")
    for args in ((str(foreign),), (str(tmp_path / "missing.log"),)):
        r = kvlab("explain", *args)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    binary = tmp_path / "core.bin"
    binary.write_bytes(b"\x7fELF\x00\x00")
    r = kvlab("explain", str(binary))
    assert r.returncode != 0 and "binary" in r.stderr
