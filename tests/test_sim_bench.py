"""`kvlab sim bench`: vLLM's bench-serve requests and result definitions on the simulated engine.

The definitions checked here are read from vLLM's source (vllm-project/vllm main, late 2026):
`vllm/benchmarks/serve.py` (commit 009e6d4a: `calculate_metrics`, `get_request`, `benchmark`) and
`vllm/benchmarks/datasets/random.py` (commit 237145ea: `RandomDataset.get_sampling_params`).
"""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from kvlab.models.cards import card
from kvlab.errors import KvlabError
from kvlab.replay import datasets
from kvlab.replay.bench import bench_metrics, run_bench, timing_source
from kvlab.schema.bench import BenchResult
from kvlab.sim.config import build_config

MODEL, GPU = "llama-3.1-8b", "h100"
FLAGS = {"max_model_len": 4096}


def _rec(start, ttft, itl, prompt, out, error=None):
    e2e = None if error else ttft + sum(itl)
    return {"start_ts": start, "ttft_s": None if error else ttft, "itl_s": None if error else itl, "e2e_s": e2e,
            "prompt_tokens": prompt, "completion_tokens": 0 if error else out, "error_kind": error}


def test_result_fields_on_a_hand_computed_case():
    # serve.py calculate_metrics: tpot = (latency - ttft) / (output_len - 1) for output_len > 1 only;
    # itls += every gap; ttfts/e2els over successful requests; np.std; np.percentile(…, 99);
    # throughputs = totals / duration; peak concurrency sweeps [start, start + latency).
    recs = [_rec(0.0, 0.100, [0.020, 0.030], 10, 3),   # ends 0.150
            _rec(0.05, 0.200, [], 5, 1),                # ends 0.250, one token: no TPOT
            _rec(0.30, 0, [], 7, 0, error="context_length")]
    m = bench_metrics(recs)
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["duration"] == pytest.approx(0.30)
    assert m["total_input_tokens"] == 15 and m["total_output_tokens"] == 4
    assert m["request_throughput"] == pytest.approx(2 / 0.30)
    assert m["output_throughput"] == pytest.approx(4 / 0.30)
    assert m["total_token_throughput"] == pytest.approx(19 / 0.30)
    assert m["mean_ttft_ms"] == pytest.approx(150.0) and m["median_ttft_ms"] == pytest.approx(150.0)
    assert m["std_ttft_ms"] == pytest.approx(50.0)
    assert m["p99_ttft_ms"] == pytest.approx(100 + 0.99 * 100)  # numpy's linear percentile
    assert m["mean_tpot_ms"] == pytest.approx(25.0) and m["std_tpot_ms"] == pytest.approx(0.0)
    assert m["mean_itl_ms"] == pytest.approx(25.0) and m["std_itl_ms"] == pytest.approx(5.0)
    assert m["p99_itl_ms"] == pytest.approx(20 + 0.99 * 10)
    assert m["mean_e2el_ms"] == pytest.approx(175.0)  # latencies 150 and 200 ms
    assert m["max_concurrent_requests"] == 2
    assert m["max_output_tokens_per_s"] == 4.0  # all four tokens in the first second
    # one request ending exactly when the next starts: not concurrent (ends sort first)
    assert bench_metrics([_rec(0.0, 0.1, [], 1, 1), _rec(0.1, 0.1, [], 1, 1)])["max_concurrent_requests"] == 1
    # no TPOT/ITL at all: vLLM's `np.mean(tpots or 0)` is 0
    assert bench_metrics([_rec(0.0, 0.1, [], 1, 1)])["mean_tpot_ms"] == 0.0


def test_chat_replies_have_one_gap_a_token_the_first_at_the_role_chunk():
    # endpoint_request_func.py, async_request_openai_chat_completions: the TTFT at the first chunk with choices
    # (the role chunk, sent with the first token's), an ITL at each later one: n gaps for n tokens
    recs = [_rec(0.0, 0.100, [0.020, 0.030], 10, 3), _rec(0.05, 0.200, [], 5, 1)]
    chat, completions = bench_metrics(recs, chat=True), bench_metrics(recs)
    assert chat["mean_itl_ms"] == pytest.approx(50 / 4) and completions["mean_itl_ms"] == pytest.approx(25.0)
    assert chat["median_itl_ms"] == pytest.approx(10.0)
    assert chat["mean_tpot_ms"] == completions["mean_tpot_ms"] == pytest.approx(25.0)
    assert {k: v for k, v in chat.items() if "itl" not in k} == {k: v for k, v in completions.items() if "itl" not in k}
    r = run_bench(MODEL, GPU, input_len=100, output_len=20, num_prompts=1, endpoint_type="openai-chat", **FLAGS)
    assert r.mean_itl_ms == pytest.approx(r.mean_tpot_ms * 19 / 20)


def test_one_request_end_to_end():
    r = run_bench(MODEL, GPU, input_len=100, output_len=20, num_prompts=1, **FLAGS)
    assert (r.completed, r.failed, r.total_input_tokens, r.total_output_tokens) == (1, 0, 100, 20)
    assert r.duration * 1000 == pytest.approx(r.mean_e2el_ms)  # sent at 0, done at the end
    assert r.mean_tpot_ms == pytest.approx((r.mean_e2el_ms - r.mean_ttft_ms) / 19)
    assert r.mean_itl_ms == pytest.approx(r.mean_tpot_ms)  # one request: 19 gaps summing to latency - ttft
    assert r.max_concurrent_requests == 1 and r.request_throughput == pytest.approx(1 / r.duration)
    assert r.timing_source == timing_source(build_config(MODEL, GPU, **FLAGS))
    assert r.timing_source.startswith("aiconfigurator-core ")  # the default timing, auto: measured tables


def test_timing_source_is_read_from_the_cost_model():
    class Cost:
        timing_source = "measured kernels (test)"

    class Cfg:
        cost = Cost()

    assert timing_source(Cfg()) == "measured kernels (test)"


@pytest.mark.parametrize("length,ratio,expected", [(1024, 0.0, (1024, 1024)), (1024, 0.25, (768, 1280)),
                                                   (100, 0.33, (67, 133)), (3, 0.5, (1, 5))])
def test_random_length_range_is_vllms_formula(length, ratio, expected):
    # random.py get_sampling_params: low = floor(L (1 - r)), high = ceil(L (1 + r))
    assert datasets.random_length_range(length, ratio) == expected
    assert expected == (math.floor(length * (1 - ratio)), math.ceil(length * (1 + ratio)))


def test_random_lengths_are_vllms_draws():
    inputs, outputs = datasets.random_lengths(500, 1000, 10, 0.5, 0, seed=7)
    rng = np.random.default_rng(7)  # RandomDataset: inputs, then outputs, from default_rng(seed)
    assert (inputs == rng.integers(500, 1501, size=500)).all()
    assert (outputs == rng.integers(5, 16, size=500)).all()
    assert inputs.min() >= 500 and inputs.max() <= 1500 and outputs.min() >= 5 and outputs.max() <= 15
    assert datasets.random_length_range(1, 0.9, at_least_one=True) == (1, 2)  # outputs: at least 1
    same, _ = datasets.random_lengths(50, 1024, 128, datasets.RANDOM_RANGE_RATIO, 0, seed=0)
    assert (same == 1024).all()  # vLLM's default range ratio is 0: every prompt as long as asked


def test_total_output_tokens_cuts_every_reply_by_one_share():
    # gpustack's Qwen3-235B at 32,000 input tokens: 100 requests of 100 asked, 8,191 generated
    reqs = datasets.bench_requests("random", 100, 32000, 100, math.inf, 0, total_output_tokens=8191)
    out = [r.output_tokens for r in reqs]
    assert sum(out) == 8191 and set(out) == {81, 82} and out.count(82) == 91  # floor 81 each, 91 remainders
    assert all(r.input_tokens == 32000 for r in reqs)  # prompts as drawn
    lengths = np.array([1, 2, 10, 100, 1000])
    scaled = datasets.scale_to_total(lengths, 556)
    assert scaled.sum() == 556 and scaled.min() >= 1 and list(scaled) == [1, 1, 5, 50, 499]
    assert (np.diff(scaled) >= 0).all()  # the order of the lengths is kept
    assert list(datasets.scale_to_total(np.array([1, 1, 98]), 5)) == [1, 1, 3]  # short ones keep 1 token
    sharegpt = datasets.bench_requests("sharegpt", 200, None, None, math.inf, 0)
    more = datasets.bench_requests("sharegpt", 200, None, None, math.inf, 0,
                                   total_output_tokens=sum(r.output_tokens for r in sharegpt) + 50)
    assert sum(r.output_tokens for r in more) == sum(r.output_tokens for r in sharegpt) + 50  # a length model
    # prompts: the client's "Total input tokens" (gpustack's first 100 ShareGPT prompts: 23,260)
    hundred = datasets.bench_requests("sharegpt", 100, None, None, math.inf, 0, total_input_tokens=23260)
    assert sum(r.prompt_tokens for r in hundred) == 23260
    prefixed = datasets.bench_requests("random", 10, 100, 4, math.inf, 0, prefix_len=50, total_input_tokens=1000)
    assert all(r.prefix_tokens == 50 and r.input_tokens == 50 for r in prefixed)  # the prefix stays
    with pytest.raises(KvlabError, match="--total-input-tokens 505 leaves fewer than one token of its own"):
        datasets.bench_requests("random", 10, 100, 4, math.inf, 0, prefix_len=50, total_input_tokens=505)


def test_total_output_tokens_on_the_engine(kvlab):
    kw = dict(input_len=256, output_len=40, num_prompts=20, max_concurrency=4)
    full = run_bench(MODEL, GPU, **kw)
    cut = run_bench(MODEL, GPU, total_output_tokens=500, **kw)
    assert (full.total_output_tokens, cut.total_output_tokens) == (800, 500)
    assert (full.replies_total, cut.replies_total) == (None, 500)  # the record says the replies were cut
    assert run_bench(MODEL, GPU, total_input_tokens=4000, **kw).total_input_tokens == 4000
    assert cut.total_input_tokens == full.total_input_tokens and cut.duration < full.duration
    r = kvlab("sim", "bench", MODEL, "--gpu", GPU, "--num-prompts", "20", "--input-len", "256", "--output-len", "40",
              "--max-concurrency", "4", "--total-output-tokens", "500", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total_output_tokens"] == 500
    r = kvlab("sim", "bench", MODEL, "--gpu", GPU, "--num-prompts", "20", "--input-len", "256", "--output-len", "40",
              "--total-output-tokens", "500")
    assert r.returncode == 0 and "replies scaled to 500 tokens (--total-output-tokens)" in r.stdout, r.stderr


def test_arrivals_are_vllms_poisson_process():
    assert (datasets.arrival_times_s(5, math.inf, 1.0, 0) == 0).all()
    t = datasets.arrival_times_s(1000, 4.0, 1.0, seed=3)
    state = np.random.RandomState(3)  # np.random.seed(seed); np.random.gamma(shape=1, scale=1/rate)
    gaps = np.cumsum([state.gamma(shape=1.0, scale=0.25) for _ in range(1000)])
    assert t == pytest.approx(gaps * (1000 / 4.0) / gaps[-1])  # rescaled: the last one at N / rate
    assert t[-1] == pytest.approx(250.0) and (np.diff(t) >= 0).all()


def test_sharegpt_lengths_are_the_datasets_drawn_and_filtered_as_vllm_does():
    table = datasets.sharegpt_table()
    assert table.shape == (17_400, 2)  # the two-turn entries of the copy's first 17,671
    assert tuple(table[0]) == (35, 245)  # the file's first entry, QWJhYvA_0, with Llama-3.1's BOS on each
    p, o = datasets.sharegpt_lengths(1_000_000, None, seed=0)  # every valid pair, then vLLM's oversampling
    valid = datasets._sharegpt_valid(table[:, 0], table[:, 1], False)
    assert valid.sum() == 15_822
    assert p[:15_822].mean() == pytest.approx(221.1, abs=0.05) and o[:15_822].mean() == pytest.approx(198.9, abs=0.05)
    # vllm-project/vllm PR #18566: 1,000 ShareGPT prompts, Llama-3.1-8B's tokenizer, 229,711 in / 203,068 out
    assert p[:15_822].mean() == pytest.approx(datasets.SHAREGPT_MEAN_INPUT, rel=0.04)
    assert o[:15_822].mean() == pytest.approx(datasets.SHAREGPT_MEAN_OUTPUT, rel=0.03)
    assert p.min() >= 4 and p.max() <= 1024 and o.min() >= 4 and (p + o).max() <= 2048  # vLLM's filter
    assert len(p) == 1_000_000 and set(map(tuple, np.stack([p, o], 1)[15_822:][:1000])) <= set(
        map(tuple, np.stack([p, o], 1)[:15_822]))  # oversampled from the valid pairs
    assert (o <= 32).mean() == pytest.approx(0.29, abs=0.01)  # the dataset's short replies
    again, _ = datasets.sharegpt_lengths(1000, None, seed=0)
    assert (again == p[:1000]).all()
    fp, fixed = datasets.sharegpt_lengths(100, 1500, seed=1)
    assert (fixed == 1500).all() and fp.max() <= 548  # with --sharegpt-output-len: prompt + reply <= 2,048
    with pytest.raises(KvlabError, match="leaves no ShareGPT prompt"):
        datasets.sharegpt_lengths(10, 2046, seed=1)


def test_sharegpt_table_builder_reads_a_copy_cut_mid_entry():
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import sharegpt_lengths

    whole = '[{"id": "a", "conversations": []}, {"id": "b", "conversations": [{"value": "x"}]}]'
    assert [e["id"] for e in sharegpt_lengths.whole_entries(whole)] == ["a", "b"]
    assert [e["id"] for e in sharegpt_lengths.whole_entries(whole[:-10])] == ["a"]


def test_clients_before_0_10_send_the_first_request_at_0_and_do_not_rescale():
    # vLLM 0.9.2's get_request (and IOG's copy of benchmark_serving.py): yield, then draw a gap and sleep
    t = datasets.arrival_times_s(200, 1.0, 1.0, 42, rescaled=False)
    state = np.random.RandomState(42)
    gaps = [state.gamma(shape=1.0, scale=1.0) for _ in range(200)]
    assert t[0] == 0 and t == pytest.approx(np.concatenate(([0.0], np.cumsum(gaps[:-1]))))
    assert t[-1] == pytest.approx(187.58, abs=0.01)  # IOG's 200 prompts at 1 req/s, --seed 42: 190-192 s runs
    assert datasets.arrival_times_s(200, 1.0, 1.0, 42)[-1] == pytest.approx(200.0)  # 0.10.0 on: rescaled
    # kvlab sim bench uses the client of the release it simulates
    kw = dict(num_prompts=20, input_len=64, output_len=4, request_rate=4.0, seed=42)
    last_old = datasets.arrival_times_s(20, 4.0, 1.0, 42, rescaled=False)[-1]
    old, new = (run_bench(MODEL, GPU, vllm_version=v, **kw) for v in ("0.9.2", "0.10"))
    assert last_old < old.duration < last_old + 1.0 and 5.0 < new.duration < 6.0


def test_request_rate_inf_sends_all_at_once_and_a_finite_rate_spreads_them():
    burst = run_bench(MODEL, GPU, input_len=64, output_len=8, num_prompts=12, **FLAGS)
    paced = run_bench(MODEL, GPU, input_len=64, output_len=8, num_prompts=12, request_rate=2.0, **FLAGS)
    assert burst.max_concurrent_requests == 12 and burst.request_rate == "inf"
    assert paced.duration >= 12 / 2.0  # the last request is sent at N / rate
    assert paced.max_concurrent_requests < 12 and paced.request_throughput < burst.request_throughput
    assert paced.mean_ttft_ms < burst.mean_ttft_ms


def test_max_concurrency_caps_requests_in_flight():
    capped = run_bench(MODEL, GPU, input_len=256, output_len=32, num_prompts=40, max_concurrency=4, **FLAGS)
    free = run_bench(MODEL, GPU, input_len=256, output_len=32, num_prompts=40, **FLAGS)
    assert capped.completed == free.completed == 40
    assert capped.max_concurrent_requests == 4 and free.max_concurrent_requests == 40
    assert capped.mean_ttft_ms < free.mean_ttft_ms  # a held request's clock starts when it is sent
    assert capped.duration > free.duration


def test_warm_runs_leave_the_prompts_in_the_prefix_cache():
    """--warm-runs N: the run after N earlier runs of the same requests on one engine (vLLM's
    datasets draw the same prompts for one --seed). Every prompt then finds all its full blocks but
    the one holding its last token cached (vLLM computes at least the last prompt token), the clock
    starts at that run's first send, and the results are that run's alone."""
    from kvlab.replay.bench import WARM_GAP_S, _warm_offset, session_plans
    from kvlab.replay.run import run_offline

    kw = dict(input_len=200, output_len=16, num_prompts=24, max_concurrency=6, **FLAGS)
    cold, warm, warmer = (run_bench(MODEL, GPU, warm_runs=n, **kw) for n in (0, 1, 2))
    assert (warm.warm_runs, cold.warm_runs) == (1, 0)
    assert warm.completed == cold.completed == 24 and warm.total_input_tokens == cold.total_input_tokens
    assert warm.mean_ttft_ms < cold.mean_ttft_ms and warm.duration < cold.duration
    # the engine's part of the TTFT (no front end, no request latency: what the cache can shorten)
    engine_only = dataclasses.replace(build_config(MODEL, GPU, **FLAGS), frontend_per_request_s=0.0,
                                      frontend_per_prompt_token_s=0.0, frontend_latency_s=0.0)
    kw_engine = {k: v for k, v in kw.items() if k not in FLAGS}
    e_cold, e_warm = (run_bench(MODEL, GPU, warm_runs=n, config=engine_only, **kw_engine) for n in (0, 1))
    assert e_warm.mean_ttft_ms < 0.6 * e_cold.mean_ttft_ms
    a, b = warmer.model_dump(exclude={"warm_runs"}), warm.model_dump(exclude={"warm_runs"})
    assert a.keys() == b.keys()  # the cache is as full (the clocks differ only in float rounding)
    assert all(a[k] == (pytest.approx(b[k], rel=1e-9) if isinstance(b[k], float) else b[k]) for k in a)
    cfg = build_config(MODEL, GPU, **FLAGS)
    reqs = datasets.bench_requests("random", 24, 200, 16, math.inf, 0)
    plans, start = _warm_offset(MODEL, GPU, cfg, session_plans(reqs), 1, 6)
    recs = run_offline(MODEL, GPU, plans, 10_000.0, config=cfg, max_in_flight=6).records
    first = [r for r in recs if r["start_ts"] < start]
    last = [r for r in recs if r["start_ts"] >= start]
    assert len(first) == len(last) == 24 and start == max(r["start_ts"] + r["e2e_s"] for r in first) + WARM_GAP_S
    assert all(r["cached_tokens"] == 0 for r in first)
    block = cfg.block_size
    assert all(r["cached_tokens"] == (r["prompt_tokens"] - 1) // block * block for r in last)


def test_prefix_len_is_shared_and_plain_requests_share_nothing():
    from kvlab.replay.bench import session_plans

    reqs = datasets.bench_requests("random", 3, 32, 4, math.inf, 0, prefix_len=16)
    plans = session_plans(reqs)
    assert {p.app_id for p in plans} == {"bench-prefix"} and all(p.system_tokens == 16 for p in plans)
    assert len({p.app_id for p in session_plans(datasets.bench_requests("random", 3, 32, 4, math.inf, 0))}) == 3


def test_cli_json_has_every_field_and_writes_the_record(kvlab, tmp_path):
    out = tmp_path / "bench.json"
    r = kvlab("sim", "bench", MODEL, "--gpu", GPU, "--input-len", "128", "--output-len", "16", "--num-prompts", "20",
              "--max-concurrency", "4", "--max-model-len", "4096", "--kv-cache-dtype", "fp8", "--out", str(out),
              "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(BenchResult.model_fields) <= set(data)
    for name in ("completed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
                 "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "mean_itl_ms",
                 "p99_itl_ms", "total_input_tokens", "total_output_tokens", "max_concurrent_requests"):
        assert isinstance(data[name], (int, float)), name
    assert data["timing_source"].startswith("aiconfigurator-core ") and data["kv_cache_dtype"] == "fp8"
    assert data["completed"] == 20 and data["max_concurrent_requests"] == 4
    assert BenchResult.read(out).model_dump() == BenchResult.from_data(data).model_dump()
    text = kvlab("sim", "bench", MODEL, "--gpu", GPU, "--num-prompts", "4", "--output-len", "4",
                 "--max-model-len", "4096")
    assert text.returncode == 0 and "Serving Benchmark Result (simulated)" in text.stdout


@pytest.mark.parametrize("args,message", [
    (["--request-rate", "0"], "--request-rate must be positive"),
    (["--request-rate", "fast"], "--request-rate takes requests per second"),
    (["--max-concurrency", "0"], "--max-concurrency must be greater than 0"),
    (["--num-prompts", "0"], "--num-prompts must be at least 1"),
    (["--dataset", "sonnet"], "--dataset must be one of random, sharegpt"),
    (["--random-range-ratio", "1.0"], "--random-range-ratio must be in [0, 1)"),
    (["--input-len", "0"], "--input-len must be at least 1"),
    (["--dataset", "sharegpt", "--input-len", "100"], "apply to --dataset random"),
    (["-q", "no-such-method"], "--quantization no-such-method"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be at least 1, got 0"),
    (["--max-num-batched-tokens", "-3"], "--max-num-batched-tokens must be at least 1, got -3"),
    (["--vllm-version", "latest"], "vLLM version 'latest' is not a version"),
    (["--warm-runs", "-1"], "--warm-runs must be 0 to 10, got -1"),
    (["--output-len", "8", "--total-output-tokens", "17"],
     "--total-output-tokens 17 is more than the 16 tokens the random requests ask for"),
    (["--total-output-tokens", "1"], "--total-output-tokens 1 is fewer than one token for each of the 2 requests"),
    (["--max-model-len", "200", "--input-len", "300", "--output-len", "8"],
     "all 2 requests failed, as vLLM would refuse them (2 the prompt is longer than --max-model-len)"),
])
def test_bad_input_is_one_line_exit_2(kvlab, args, message):
    r = kvlab("sim", "bench", MODEL, "--gpu", GPU, "--num-prompts", "2", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_vllm_version_picks_the_weight_kernel_a_release_runs(kvlab):
    """`-q awq` on an H100: vLLM 0.9.2 kept the legacy dequantize kernel; the default release (0.32)
    maps -q awq to AutoAWQ, whose layers run Machete on Hopper; the source says which."""
    def source(*version):
        r = kvlab("sim", "bench", "qwen3-8b", "--gpu", "h100", "-q", "awq", "--num-prompts", "4", "--output-len", "4",
                  "--max-model-len", "4096", "--json", *version)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["timing_source"]

    assert "legacy dequantize" in source("--vllm-version", "0.9.2")
    assert "Machete GEMM path (Hopper)" in source()


def test_vllm_version_sizes_memory_as_that_release(kvlab, tmp_path):
    """The release simulated sizes the KV cache as its profiling does: vLLM 0.11's default utilization
    is 0.9 and it takes no CUDA-graph estimate from the budget; a release before 0.10 is sized as
    0.10; the record says which release and utilization it ran."""
    from kvlab.models.memory import capacity
    from kvlab.sim.config import build_config, memory_release

    a = card("qwen3-8b").arch

    def blocks(**kw):
        return capacity(a, model_name="qwen3-8b", gpu="h100", max_model_len=4096, max_num_batched_tokens=8192,
                        max_num_seqs=1024, **kw).num_blocks

    def run(*version):
        r = kvlab("sim", "bench", "qwen3-8b", "--gpu", "h100", "--num-prompts", "2", "--output-len", "2",
                  "--max-model-len", "4096", "--json", *version)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    old, new = run("--vllm-version", "0.11.0"), run()
    assert (old["vllm_version"], old["gpu_memory_utilization"]) == ("0.11.0", 0.9)
    assert (new["vllm_version"], new["gpu_memory_utilization"]) == ("0.32", 0.92)
    assert old["num_gpu_blocks"] == blocks(vllm_version="0.11", gpu_memory_utilization=0.9)
    assert new["num_gpu_blocks"] == blocks() and new["num_gpu_blocks"] > old["num_gpu_blocks"]
    assert memory_release("0.9.2") == "0.10" and memory_release("0.32") == "0.32"
    cfg = build_config("qwen3-8b", "h100", max_model_len=4096, vllm_version="0.8.5")
    assert cfg.num_blocks == blocks(vllm_version="0.10") and cfg.gpu_memory_utilization == 0.9
    # `kvlab sim run` takes the same flag: the same KV cache as `sim bench` at that release, named in its results
    r = kvlab("sim", "run", "qwen3-8b", "--gpu", "h100", "--users", "2", "--duration-s", "5", "--max-model-len", "4096",
              "--max-num-batched-tokens", "8192", "--max-num-seqs", "1024", "--vllm-version", "0.11.0", "--json",
              "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["runs"][0]
    assert res["vllm_version"] == "0.11.0" and res["capacity"]["num_gpu_blocks"] == old["num_gpu_blocks"]
    r = kvlab("sim", "run", "qwen3-8b", "--gpu", "h100", "--vllm-version", "banana")
    assert r.returncode == 2 and r.stderr.strip() == ("kvlab: error: vLLM version 'banana' is not a version; "
                                                      "give X.Y, e.g. 0.32 or 0.9.2")


def test_run_offline_stops_at_max_requests():
    from kvlab.replay.run import run_offline

    res = run_offline("deepseek-v2-lite", GPU, "agent-smoke", 600.0, concurrency=4, max_model_len=4096,
                      max_requests=7, scrape_interval_s=60)
    assert len(res.records) == 7
    with pytest.raises(KvlabError, match="max_requests must be at least 1"):
        run_offline("deepseek-v2-lite", GPU, "agent-smoke", 10.0, concurrency=1, max_requests=0, max_model_len=4096)


def test_sim_run_cli_honours_the_workloads_max_requests(kvlab, tmp_path):
    wl = yaml.safe_load(open("loadtest/agent-smoke.yaml"))
    wl["load"]["max_requests"] = 5
    path = tmp_path / "five.yaml"
    path.write_text(yaml.safe_dump(wl))
    r = kvlab("sim", "run", "deepseek-v2-lite", "--gpu", GPU, "--users", "3", "--duration-s", "300",
              "--workload", str(path), "--max-model-len", "4096", "--out", str(tmp_path / "run"), "--json")
    assert r.returncode == 0, r.stderr
    (run,) = json.loads(r.stdout)["runs"]
    assert run["requests_completed"] == 5


def test_prefix_caching_and_eager_flags_on_sim_bench(kvlab):
    """--no-enable-prefix-caching: earlier runs leave nothing to hit (a warm run is a cold one);
    --enforce-eager: the record says so and the KV cache is larger by the CUDA-graph estimate
    (vLLM 0.32), with a warning that steps stay priced as under graphs."""
    kw = dict(input_len=200, output_len=16, num_prompts=24, max_concurrency=6, **FLAGS)
    cold = run_bench(MODEL, GPU, **kw)
    warm_off = run_bench(MODEL, GPU, warm_runs=1, enable_prefix_caching=False, **kw)
    assert warm_off.mean_ttft_ms == pytest.approx(cold.mean_ttft_ms, rel=1e-9)
    flags = ["--num-prompts", "4", "--output-len", "4", "--max-model-len", "4096", "--json"]
    graphs = json.loads(kvlab("sim", "bench", MODEL, "--gpu", GPU, *flags).stdout)
    r = kvlab("sim", "bench", MODEL, "--gpu", GPU, *flags, "--enforce-eager", "--no-enable-prefix-caching")
    eager = json.loads(r.stdout)
    assert (eager["enforce_eager"], eager["enable_prefix_caching"], graphs["enforce_eager"]) == (True, False, False)
    assert eager["num_gpu_blocks"] > graphs["num_gpu_blocks"]
    assert "--enforce-eager is accepted but not simulated" in r.stderr


def test_expert_parallel_on_sim_bench(kvlab):
    """-ep (vLLM's --enable-expert-parallel) on an MoE model over -tp 2: simulated, not warned about;
    the record says so and the experts come from the kernel tables' moe_ep rows."""
    flags = ["qwen3-30b-a3b", "--gpu", "h100", "-tp", "2", "--num-prompts", "8", "--input-len", "512",
             "--output-len", "8", "--max-model-len", "4096", "--json"]
    tp = json.loads(kvlab("sim", "bench", *flags).stdout)
    r = kvlab("sim", "bench", *flags, "-ep")
    ep = json.loads(r.stdout)
    assert (ep["enable_expert_parallel"], tp["enable_expert_parallel"]) == (True, False)
    assert "moe_ep 2 rows" in ep["timing_source"] and "moe_ep" not in tp["timing_source"]
    assert ep["num_gpu_blocks"] == tp["num_gpu_blocks"]  # the same weights per GPU, the same KV cache
    assert "not simulated" not in r.stderr


def test_sampler_sizes_the_simulated_kv_cache_as_kvlab_capacity_does(kvlab):
    """--sampler pytorch|flashinfer (vLLM's FlashInfer top-k/top-p, 10 bytes a logit in the profiling
    run's dummy sampler pass against PyTorch's 14 from 0.17; default: the simulated release's own, FlashInfer's
    at 0.32 on an H100, PyTorch's at 0.20): the simulated KV cache is `kvlab capacity --sampler`'s,
    and the record says which; an unknown sampler is one line and exit 2. (At 0.20: V1's profiling run, one
    sampler call; from 0.21 V1's second, PyTorch-native call and from 0.29 Model Runner V2's greedy dummy run
    make the sampler's choice moot for the budget.)"""
    flags = ["llama-3.1-8b", "--gpu", "h100", "--num-prompts", "4", "--output-len", "4", "--json", "--vllm-version", "0.20"]
    fi = json.loads(kvlab("sim", "bench", *flags, "--sampler", "flashinfer").stdout)
    pt = json.loads(kvlab("sim", "bench", *flags).stdout)  # 0.20's own
    new = json.loads(kvlab("sim", "bench", *flags[:-2]).stdout)  # 0.32
    cap = json.loads(kvlab("capacity", "llama-3.1-8b", "--gpu", "h100", "--vllm-version", "0.20", "--sampler", "flashinfer",
                           "--json").stdout)
    assert (fi["sampler"], pt["sampler"], new["sampler"]) == ("flashinfer", "pytorch", "flashinfer")
    assert fi["num_gpu_blocks"] == cap["num_blocks"] > pt["num_gpu_blocks"]
    assert cap["memory"]["sampler"] == "flashinfer"
    r = kvlab("sim", "bench", *flags, "--sampler", "bogus")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--sampler" in r.stderr
    from kvlab.sim.args import parse_serve_args
    assert parse_serve_args(["--gpu", "h100", "llama-3.1-8b", "--sampler", "flashinfer"]).sampler == "flashinfer"
    assert parse_serve_args(["--gpu", "h100", "llama-3.1-8b"]).sampler is None  # build_config: the release's


def test_data_parallel_is_refused_with_what_to_run_instead(kvlab):
    """`-dp N` (vLLM's flag) is not simulated by `kvlab sim bench`: one engine would take every rank's
    requests, so it is refused in one line that says to simulate one rank with its share of the load;
    `-dp 1` is vLLM's default and runs."""
    r = kvlab("sim", "bench", "llama-3.1-8b", "--gpu", "h100", "--num-prompts", "8", "-dp", "2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "data parallelism is not simulated" in r.stderr and "divided by 2" in r.stderr
    one = kvlab("sim", "bench", "llama-3.1-8b", "--gpu", "h100", "--num-prompts", "8", "-dp", "1", "--json")
    assert one.returncode == 0 and json.loads(one.stdout)["completed"] == 8
