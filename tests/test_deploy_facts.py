"""Startup facts from real vLLM output (0.32 CPU build) and from the line variants of 0.10 .. 0.33."""

from pathlib import Path

import pytest

from kvlab.deploy.facts import StartupFacts, kv_size_logged, parse_cache_config_info, parse_log

FIXTURES = Path(__file__).parent / "fixtures"


def test_cpu_build_log_of_the_deepseek_twin():
    f = parse_log((FIXTURES / "vllm-0.32-cpu-deepseek-twin.server.log").read_text())
    assert f == StartupFacts(
        vllm_version="0.32.0", attention_backend="CPU_MLA", kv_cache_tokens=34_512, max_concurrency=8.43,
        max_model_len=4096, available_kv_memory_gib=1.0, cache_dtype="auto", enable_prefix_caching=False,
        kv_device="CPU")


def test_cache_config_info_of_the_deepseek_twin():
    f = parse_cache_config_info((FIXTURES / "vllm-0.32-cpu-deepseek-twin.metrics.txt").read_text())
    assert (f.block_size, f.num_gpu_blocks, f.kv_cache_tokens) == (16, 2157, 34_512)
    assert f.max_concurrency == 8.42578125 and f.kv_cache_memory_bytes == 1 << 30
    assert f.cache_dtype == "auto" and f.enable_prefix_caching is False


def test_metrics_win_over_the_rounded_log_figures():
    log = parse_log((FIXTURES / "vllm-0.32-cpu-deepseek-twin.server.log").read_text())
    merged = log.merged(parse_cache_config_info((FIXTURES / "vllm-0.32-cpu-deepseek-twin.metrics.txt").read_text()))
    assert merged.max_concurrency == 8.42578125 and merged.vllm_version == "0.32.0" and merged.num_gpu_blocks == 2157


def test_cache_config_info_missing_or_none_labels():
    assert parse_cache_config_info("# HELP x y\n# TYPE x gauge\nx 1.0\n") == StartupFacts()
    text = ('# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{block_size="16",num_gpu_blocks="None",'
            'kv_cache_memory_bytes="None",cache_dtype="fp8",enable_prefix_caching="True"} 1.0\n')
    f = parse_cache_config_info(text)
    assert (f.block_size, f.num_gpu_blocks, f.kv_cache_memory_bytes, f.cache_dtype, f.enable_prefix_caching) == (
        16, None, None, "fp8", True)


P = "(EngineCore_DP0 pid=2113) INFO 08-05 10:11:12 [kv_cache_utils.py:1013] "
W = "(VllmWorker pid=2200) INFO 08-05 10:11:10 [gpu_worker.py:276] "


@pytest.mark.parametrize("lines, tokens, concurrency, max_len, device", [
    # up to 0.27: two lines
    ([P + "GPU KV cache size: 410,128 tokens", P + "Maximum concurrency for 131,072 tokens per request: 3.13x"],
     410_128, 3.13, 131_072, "GPU"),
    # 0.28 - 0.29: one line joined with ", "
    ([P + "GPU KV cache size: 443,472 tokens, Maximum concurrency for 32,768 tokens per request: 13.53x"],
     443_472, 13.53, 32_768, "GPU"),
    # 0.30+: the device name as prefix (the CPU build), and a host-offload pool
    ([P + "CPU KV cache size: 233,008 tokens, Maximum concurrency for 256 tokens per request: 910.19x"],
     233_008, 910.19, 256, "CPU"),
    ([P + "GPU + host KV cache size: 1,000,000 tokens, Maximum concurrency for 8,192 tokens per request: 122.07x"],
     1_000_000, 122.07, 8192, "GPU"),
    # the V0-era INFO line without a process prefix
    (["INFO 07-01 09:00:00 kv_cache_utils.py:634] GPU KV cache size: 16 tokens",
      "INFO 07-01 09:00:00 kv_cache_utils.py:637] Maximum concurrency for 16 tokens per request: 1.00x"],
     16, 1.0, 16, "GPU"),
])
def test_kv_cache_size_line_variants(lines, tokens, concurrency, max_len, device):
    f = parse_log("\n".join(lines) + "\n")
    assert (f.kv_cache_tokens, f.max_concurrency, f.max_model_len, f.kv_device) == (tokens, concurrency, max_len, device)
    assert kv_size_logged("\n".join(lines))


@pytest.mark.parametrize("line, gib", [
    (W + "Available KV cache memory: 51.63 GiB", 51.63),
    (W + "Initial free memory 78.5 GiB, reserved 20.0 GiB memory for KV Cache as specified by "
         "kv_cache_memory_bytes config and skipped memory profiling.", 20.0),
    (W + "Explicitly set (1.0/10.46) GiB for KV cache on node 0.", 1.0),
    (W + "Auto set (6.5/31.2) GiB for KV cache on node 0, with 8 GiB requested memory for the worker.", 6.5),
])
def test_available_kv_memory_variants(line, gib):
    assert parse_log(line).available_kv_memory_gib == gib


@pytest.mark.parametrize("line, backend", [
    (W + "Using Flash Attention backend on V1 engine.", "FLASH_ATTN"),                     # 0.10
    (W + "Using FlashMLA backend on V1 engine.", "FLASHMLA"),                              # 0.10
    (W + "Using Triton MLA backend on V1 engine.", "TRITON_MLA"),
    (W + "Using FLASH_ATTN attention backend out of potential backends: ['FLASH_ATTN', 'FLASHINFER'].", "FLASH_ATTN"),
    (W + "Using FLASHINFER_MLA backend.", "FLASHINFER_MLA"),
    (W + "Using CPU_MLA backend.", "CPU_MLA"),
])
def test_attention_backend_variants(line, backend):
    moe = W + "Using CPU Unquantized MoE backend out of potential backends: ['CPU'].\n"
    prefill = W + "Using CPU_SDPA_MLA MLA prefill backend.\n"
    assert parse_log(moe + prefill + line).attention_backend == backend


@pytest.mark.parametrize("line, sampler", [
    # vLLM's official 0.9.1 image, then with VLLM_USE_FLASHINFER_SAMPLER=0 (flashinfer-ai/flashinfer#1180)
    ("INFO 06-26 00:11:32 [topk_topp_sampler.py:49] Using FlashInfer for top-p & top-k sampling.", "flashinfer"),
    ("WARNING 06-26 00:49:19 [topk_topp_sampler.py:52] FlashInfer is available, but it is not enabled. Falling back to "
     "the PyTorch-native implementation of top-p & top-k sampling. For the best performance, please set "
     "VLLM_USE_FLASHINFER_SAMPLER=1.", "pytorch"),
    # no FlashInfer installed (LMCache/LMCache#1384); a FlashInfer of 0.2.3 or later under 0.8.5 (its wheel's text)
    ("WARNING 06-26 07:04:55 [topk_topp_sampler.py:59] FlashInfer is not available. Falling back to the PyTorch-native "
     "implementation of top-p & top-k sampling. For the best performance, please install FlashInfer.", "pytorch"),
    ("INFO 05-03 20:21:10 [topk_topp_sampler.py:44] Currently, FlashInfer top-p & top-k sampling sampler is disabled "
     "because FlashInfer>=v0.2.3 is not backward compatible. Falling back to the PyTorch-native implementation of "
     "top-p & top-k sampling.", "pytorch"),
    # 0.9-0.11.0 with a FlashInfer older than 0.2.3; 0.32 opted out, and on a GPU it does not support (its wheel's text)
    (W + "FlashInfer version >= 0.2.3 required. Falling back to default sampling implementation.", "pytorch"),
    (W + "FlashInfer top-p/top-k sampling disabled via VLLM_USE_FLASHINFER_SAMPLER=0.", "pytorch"),
    (W + "FlashInfer top-p/top-k sampling unavailable: unsupported compute capability 7.5; falling back. "
     "Set VLLM_USE_FLASHINFER_SAMPLER=0 to silence.", "pytorch"),
    (W + "Using Flash Attention backend on V1 engine.", None),  # 0.11.1-0.20 say nothing (debug level)
])
def test_the_sampler_vllm_took(line, sampler):
    assert parse_log(line).sampler == sampler


def test_the_sampler_is_compared_where_the_budget_was_estimated():
    """The estimated budget assumes a sampler (the release's own: FlashInfer's at 0.32 on an H100):
    the comparison puts it beside the one the log names; an exact budget assumes none."""
    from kvlab.deploy.compare import compare
    from kvlab.models import memory
    from kvlab.models.cards import card

    arch = card("llama-3.1-8b").arch
    est = memory.capacity(arch, gpu="h100", max_model_len=8192)
    logged = parse_log("INFO [topk_topp_sampler.py:124] Using FlashInfer for top-p & top-k sampling.")
    row = next(r for r in compare(est, logged) if r.quantity == "sampler")
    assert (row.predicted, row.reported, row.match) == ("flashinfer", "flashinfer", True)
    row = next(r for r in compare(est, parse_log(W + "FlashInfer top-p/top-k sampling disabled via "
                                                 "VLLM_USE_FLASHINFER_SAMPLER=0.")) if r.quantity == "sampler")
    assert row.match is False
    exact = memory.capacity(arch, kv_budget_bytes=2**30, max_model_len=8192)
    assert all(r.quantity != "sampler" for r in compare(exact, logged))


@pytest.mark.parametrize("text, runner", [
    # published startup logs (copied by a helper, 2026-12-06): Qwen3-8B at vLLM 0.27.1 on an RTX 4090 (a cold-start
    # study's notes), MiniCPM5-1B at 0.23.0 (a tutorial's log, V2's weights line without the "Using" line),
    # Qwen2.5-7B at 0.22.0 (a test file's docstring, V1)
    ("INFO 08-02 10:11:12 [gpu_worker.py:385] Using V2 Model Runner\n"
     "INFO 08-02 10:11:49 [model_runner.py:329] Model loading took 15.27 GiB and 36.382166 seconds", "v2"),
    ("(EngineCore pid=812) INFO 07-14 09:30:01 [model_runner.py:319] Model loading took 2.09 GiB and 2.14 seconds", "v2"),
    ("(EngineCore_DP0 pid=51) INFO 06-20 15:02:07 [gpu_model_runner.py:5132] Model loading took 14.29 GiB memory and "
     "4.660599 seconds", "v1"),
    (W + "Using Flash Attention backend on V1 engine.", None),
])
def test_the_model_runner_vllm_took(text, runner):
    assert parse_log(text).model_runner == runner


def test_the_model_runner_is_compared_where_the_budget_was_estimated():
    """The estimated budget mirrors the default model runner's profiling run (Model Runner V2 at 0.32); the
    comparison puts it beside the one the log shows, and kvlab's simulated server logs V2's lines."""
    from kvlab.deploy.compare import compare
    from kvlab.models import memory
    from kvlab.models.cards import card

    arch = card("llama-3.1-8b").arch
    row = next(r for r in compare(memory.capacity(arch, gpu="h100", max_model_len=8192),
                                  parse_log("INFO [gpu_worker.py:518] Using V2 Model Runner")) if r.quantity == "model_runner")
    assert (row.predicted, row.reported, row.match) == ("v2", "v2", True)
    old = memory.capacity(arch, gpu="h100", max_model_len=8192, vllm_version="0.21")
    row = next(r for r in compare(old, parse_log("INFO [gpu_worker.py:518] Using V2 Model Runner")) if r.quantity == "model_runner")
    assert (row.predicted, row.match) == ("v1", False)


@pytest.mark.parametrize("version, runner", [("0.32.0", "v2"), ("0.21.0", "v1")])
def test_the_simulated_server_logs_its_model_runner(capsys, version, runner):
    from kvlab.sim import logs
    from kvlab.sim.args import parse_serve_args
    from kvlab.sim.config import build_config

    args = parse_serve_args(["llama-3.1-8b", "--gpu", "h100"])
    cfg = build_config(args.config, "h100", timing="roofline", vllm_version=version)
    logs.startup_lines(cfg, args.non_default, args.not_simulated)
    assert parse_log(capsys.readouterr().out).model_runner == runner == cfg.capacity.memory.model_runner


# Published startup logs: vLLM 0.31.0's official image serving Llama-3.1-8B-Instruct at every default on one
# A100 80GB (a public notes file found in the search index, its repository address not recorded; 2026-12-07),
# and vLLM 0.10.2 serving Qwen3-235B-A22B-Instruct-2507-FP8 over 8 x L40S (tests/fixtures/gpu_budget_logs.yaml,
# ai-platform-l40s-tp8-qwen3-235b-a22b-fp8).
USAGE_031 = ("(EngineCore pid=326) INFO 10-06 17:00:41 [gpu_worker.py:955] Free memory on device (78.84/79.25 GiB) on "
             "startup. Desired GPU memory utilization is (0.92, 72.91 GiB). Actual usage is 15.26 GiB for consumed "
             "memory (weights + non-torch), 1.44 GiB for peak activation, and 0.23 GiB for CUDAGraph memory.\n"
             "(EngineCore pid=326) INFO 10-06 17:00:11 [model_runner.py:407] Model loading took 15.0 GiB memory and "
             "5.420225 seconds\n")
USAGE_0102 = ("Actual usage is 27.72 GiB for weight, 1.4 GiB for peak activation, 0.21 GiB for non-torch memory, "
              "and 3.45 GiB for CUDAGraph memory.")


def test_the_profiling_runs_split_in_both_wordings():
    f = parse_log(USAGE_031)
    assert (f.consumed_memory_gib, f.peak_activation_gib, f.cudagraph_memory_gib, f.non_torch_memory_gib) == (
        15.26, 1.44, 0.23, None)
    f = parse_log(USAGE_0102)
    assert (f.consumed_memory_gib, f.peak_activation_gib, f.non_torch_memory_gib, f.cudagraph_memory_gib) == (
        None, 1.4, 0.21, 3.45)
    assert parse_log("Actual usage is 14.99 GiB for weight, 4.76 GiB for peak activation, 0.13 GiB for non-torch "
                     "memory, and -0.45 GiB for CUDAGraph memory.").cudagraph_memory_gib == -0.45


def test_the_estimated_terms_are_compared_in_the_logs_own_terms():
    """From 0.27 the log's consumed memory is the weights, non-torch memory and V2's request state, and its
    peak activation holds the CUDA-graph estimate: the comparison adds kvlab's terms up the same way."""
    from kvlab.deploy.compare import compare
    from kvlab.models import memory
    from kvlab.models.cards import card
    from kvlab.units import GiB

    est = memory.capacity(card("llama-3.1-8b").arch, gpu="a100-80gb", vllm_version="0.31.0")
    m = est.memory
    rows = {r.quantity: r for r in compare(est, parse_log(USAGE_031))}
    assert rows["consumed_memory_gib"].predicted == round((m.weight_bytes + m.non_torch_bytes
                                                           + m.runner_buffer_bytes) / GiB, 2) == 15.25
    assert rows["consumed_memory_gib"].reported == 15.26 and rows["consumed_memory_gib"].match is False
    assert rows["peak_activation_gib"].predicted == round((m.activation_bytes + m.cudagraph_bytes) / GiB, 2) == 0.77
    # the rope cache in the weights: 14.96 -> 14.99; the log's 15.0 holds >= 6 MiB more, not found
    assert (rows["model_weights_gib"].predicted, rows["model_weights_gib"].reported) == (14.99, 15.0)
    assert "non_torch_memory_gib" not in rows
    old = {r.quantity: r for r in compare(est, parse_log(USAGE_0102))}
    assert old["peak_activation_gib"].predicted == round(m.activation_bytes / GiB, 2)
    assert old["non_torch_memory_gib"].reported == 0.21 and "consumed_memory_gib" not in old


def test_versions_and_weights():
    assert parse_log("INFO 07-01 api_server.py:1 vLLM API server version 0.10.1.1\n").vllm_version == "0.10.1.1"
    assert parse_log(W + "Model loading took 14.99 GiB memory and 3.2 seconds").model_weights_gib == 14.99
    assert parse_log(W + "Model loading took 29.26 GiB and 9.87 seconds").model_weights_gib == 29.26
    assert parse_log("INFO model_runner.py:1 Loading model weights took 14.9661 GB").model_weights_gib == 14.9661
    assert parse_log(W + "# GPU blocks: 27,180, # CPU blocks: 2048").num_gpu_blocks == 27_180


def test_nothing_logged_yet():
    assert parse_log("Triton is installed, but doesn't include CPU backend.\n") == StartupFacts()
    assert not kv_size_logged("INFO starting\n")


def test_error_after_the_kv_sizing():
    from kvlab.deploy.facts import error_after_kv_size

    before = W + "Starting to load model\n(Worker pid=1) ERROR [x.py:1] ValueError: too early\n"
    sized = P + "CPU KV cache size: 16,384 tokens, Maximum concurrency for 4,096 tokens per request: 4.00x\n"
    after = ("(Worker pid=14354) ERROR 11-28 19:01:23 [multiproc_executor.py:1063] NotImplementedError: FP8 KV "
             "cache on CPU requires x86 with AVX-512 or AMX.\n")
    assert error_after_kv_size(before + sized + after) == "NotImplementedError: FP8 KV cache on CPU requires x86 with AVX-512 or AMX."
    assert error_after_kv_size(before + sized) is None
    assert error_after_kv_size(before) is None


def test_the_simulators_timing_source_from_its_log_line_or_metrics():
    """kvlab's simulator says what prices its steps: the log line "timing source: <label>" and the
    kvlab:sim_timing_info series (what the experiment records carry); vLLM says neither."""
    from prometheus_client import CollectorRegistry, generate_latest

    from kvlab.sim.config import build_config
    from kvlab.sim.metrics import EngineMetrics

    label = "roofline (no kernel data: no vLLM table for dense int4 (awq) GEMMs)"
    log = f"(APIServer pid=1) INFO 12-02 18:00:00 [kvlab_sim] timing source: {label}\n"
    assert parse_log(log).timing_source == label
    real = (FIXTURES / "vllm-0.32-cpu-deepseek-twin.server.log").read_text()
    assert parse_log(real).timing_source is None
    assert parse_cache_config_info((FIXTURES / "vllm-0.32-cpu-deepseek-twin.metrics.txt").read_text()).timing_source is None

    cfg = build_config("llama-3.1-8b", "h100", max_model_len=4096)
    m = EngineMetrics("llama-3.1-8b", 4096, cfg.cache_config_labels())
    m.timing = cfg.cost
    registry = CollectorRegistry()
    registry.register(m)
    facts = parse_cache_config_info(generate_latest(registry).decode())
    assert facts.timing_source == cfg.cost.timing_source and facts.num_gpu_blocks == cfg.num_blocks
    assert parse_log(log).merged(facts).timing_source == cfg.cost.timing_source
    # and what prices its time outside the steps: the log line and the same series' host_source label
    assert facts.host_source is None
    m.host_source = cfg.host_source()
    assert parse_cache_config_info(generate_latest(registry).decode()).host_source == cfg.host_source()
    host_log = f"(APIServer pid=1) INFO 12-02 18:00:00 [kvlab_sim] time outside the steps: {cfg.host_source()}\n"
    said = parse_log(log + host_log)
    assert (said.timing_source, said.host_source) == (label, cfg.host_source())
    assert parse_log(real).host_source is None
