"""The validation harness (bench/sim_validation.py): a published run mapped to a `kvlab sim bench`
run end to end, the host-time fit reads train rows only, and `--timing` on every simulator command."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import published_runs  # noqa: E402
import sim_validation as v  # noqa: E402

from kvlab.errors import KvlabError  # noqa: E402


@pytest.fixture(scope="module")
def pub():
    return published_runs.load()


@pytest.fixture(autouse=True)
def _fit_cache_apart(monkeypatch, tmp_path):
    """`main(["--fit"])` keeps grid points' errors in a file: here in the test's own folder, never the real
    bench/fit_cache.jsonl (these fits simulate with fakes the cache's keys cannot see)."""
    monkeypatch.setattr(v, "FIT_CACHE_PATH", tmp_path / "fit_cache.jsonl")


def test_a_published_row_maps_to_a_bench_run_and_runs(pub):
    run = pub.by_id()["mushfiqrahman-mistral7b-rtx4090-c4"]
    bench = v.map_run(run)
    assert isinstance(bench, v.BenchRun)
    assert (bench.model, bench.gpu) == ("mistral-7b", "rtx-4090")
    assert bench.workload == {"dataset": "random", "num_prompts": 300, "request_rate": float("inf"),
                              "max_concurrency": 4, "input_len": 256, "output_len": 128}
    # the headline figures: one throughput, one TTFT (no TPOT stated)
    assert bench.figures == {"output_throughput": ("output_throughput", 210), "mean_ttft_ms": ("mean_ttft_ms", 63)}
    small = dataclasses.replace(bench, workload={**bench.workload, "num_prompts": 12})
    sim, source = v.simulate(small, "auto")
    assert set(sim) == set(bench.figures) | set(bench.secondary) and all(x > 0 for x in sim.values())
    assert source.startswith("roofline (no kernel data: no vLLM kernel tables for GPU rtx-4090")


def test_a_stated_no_prefix_caching_or_no_chunked_prefill_reaches_the_simulated_engine(pub, monkeypatch):
    # adithyaJRunpod's vLLM 0.18.0 sweep: `vllm serve ... --no-enable-chunked-prefill` / `--no-enable-prefix-caching`
    runs = pub.by_id()
    off = v.map_run(runs["adithyajrunpod-q8-h100-rate35-no-chunked-prefill"])
    assert off.engine == {"enable_chunked_prefill": False} and "--no-enable-chunked-prefill" in off.note
    assert v.map_run(runs["adithyajrunpod-q8-h100-rate35-no-prefix-caching"]).engine == {"enable_prefix_caching": False}
    assert v.map_run(runs["adithyajrunpod-q8-h100-rate35-baseline"]).engine == {}
    seen = {}
    real = v.build_config

    def spy(*args, **kwargs):
        cfg = real(*args, **kwargs)
        seen.update(prefix=cfg.enable_prefix_caching, chunked=cfg.enable_chunked_prefill)
        return cfg

    monkeypatch.setattr(v, "build_config", spy)
    v.run_simulated(dataclasses.replace(off, workload={**off.workload, "num_prompts": 4, "total_input_tokens": None,
                                                       "total_output_tokens": None}), "roofline")
    assert seen == {"prefix": True, "chunked": False}


def test_a_stated_length_spread_is_the_bench_clients_range_ratio(pub):
    # the vLLM blog's FP8 KV runs: "~20k input tokens and ~2k output tokens (±15% variance)"
    run = pub.by_id()["vllm-blog-kv-llama31-8b-h100-bf16kv"]
    assert run.random_range_ratio == 0.15 and "±15 %" in run.workload()
    bench = v.map_run(run)
    assert bench.workload["random_range_ratio"] == 0.15 and "--random-range-ratio 0.15" in bench.note
    # a row that states no spread keeps the client's default (fixed lengths)
    assert "random_range_ratio" not in v.map_run(pub.by_id()["mushfiqrahman-mistral7b-rtx4090-c4"]).workload


def test_the_old_clients_range_ratio_keeps_its_interval(pub):
    # InferenceMAX's client (kimbochen/bench_serving, the old benchmark_serving.py): --random-range-ratio 0.8 draws
    # lengths on [int(0.8 L), L]; kvlab's ratio is about a mean, [floor(L'(1 - r')), ceil(L'(1 + r'))]
    from kvlab.replay.datasets import random_length_range

    for length, (low, high) in ((1024, (818, 1024)), (8192, (6552, 8192))):
        mean = v.legacy_mean_len(length, 0.8)
        assert random_length_range(mean, (1 - 0.8) / (1 + 0.8)) == (low, high)  # the top as the source's, the bottom 1 below
    run = pub.by_id()["inferencemax-llama33-70b-fp8-h100-tp2-8k1k-c16"]
    assert run.random_range_ratio_legacy == 0.8 and run.random_range_ratio is None and run.async_scheduling is True
    bench = v.map_run(run)
    assert (bench.workload["input_len"], bench.workload["output_len"]) == (7372, 921)
    assert bench.workload["random_range_ratio"] == pytest.approx(1 / 9)
    assert bench.engine == {"enable_prefix_caching": False, "async_scheduling": True}
    assert bench.serve["quantization"] == "fp8" and bench.serve["kv_cache_dtype"] == "fp8"  # ModelOpt FP8: -q fp8's GEMMs
    with pytest.raises(ValueError, match="in place of random_range_ratio"):
        published_runs.Run.model_validate({**run.model_dump(), "random_range_ratio": 0.1})


def test_figures_per_gpu_and_in_seconds_are_the_simulated_runs_divided(pub):
    # InferenceMAX's rows: its process_result.py divides the client's throughputs by TP and its _ms figures by 1,000
    run = pub.by_id()["inferencemax-llama33-70b-fp8-h100-tp2-8k1k-c16"]
    assert set(v.headline(run)) == {"total_token_throughput_per_gpu", "mean_ttft_s", "mean_tpot_s"}
    data = {"total_token_throughput": 3000.0, "output_throughput": 400.0, "mean_ttft_ms": 250.0, "p99_itl_ms": 80.0}
    out = v.in_source_units(data, 2)
    assert out["total_token_throughput_per_gpu"] == 1500.0 and out["output_throughput_per_gpu"] == 200.0
    assert out["mean_ttft_s"] == 0.25 and out["p99_itl_s"] == 0.08 and "mean_tpot_s" not in out
    assert v.FIGURE_KIND["total_token_throughput_per_gpu"] == "throughput" and v.FIGURE_KIND["mean_tpot_s"] == "tpot"


def test_nvfp4_rows_stay_with_their_reason(pub):
    run = pub.by_id()["inferencemax-llama33-70b-fp4-b200-tp4-1k1k-c32"]
    assert v.map_run(run).startswith("NVFP4 weights")


def test_a_stated_generated_total_is_what_the_replies_come_to(pub):
    # gpustack's Qwen3-235B on 8 x A100 at 32,000 input tokens: "Total generated tokens" 8,191 of 100 x 100
    run = pub.by_id()["gpustack-q235-a100-bf16-tp8-random-32k"]
    assert (run.total_input_tokens, run.total_output_tokens) == (3200000, 8191)
    assert run.workload() == "random 32000/100, n=100, rate inf, 3200000 in / 8191 generated"
    bench = v.map_run(run)
    assert bench.workload["total_output_tokens"] == 8191 and "8,191 of the 10,000 tokens asked for" in bench.note
    full = v.map_run(pub.by_id()["gpustack-q14-h100-random-2k"])  # 50,000 of 50,000: nothing to say
    assert full.workload["total_output_tokens"] == 50000 and "EOS" not in full.note
    sharegpt = v.map_run(pub.by_id()["gpustack-q14-h100-sharegpt"])
    assert (sharegpt.workload["total_input_tokens"], sharegpt.workload["total_output_tokens"]) == (217393, 201648)
    assert "217,393 prompt and 201,648 generated tokens" in sharegpt.note
    assert "total_output_tokens" not in v.map_run(pub.by_id()["mushfiqrahman-mistral7b-rtx4090-c4"]).workload


def test_a_stated_client_seed_is_the_simulated_one(pub):
    # IOG's run_benchmark.sh passes --seed 42 to every run; a row that states none keeps the default
    assert v.map_run(pub.by_id()["iog-r1-distill-llama-8b-1xrtx4090-1qps"]).workload["seed"] == 42
    assert "seed" not in v.map_run(pub.by_id()["gpustack-q14-h100-sharegpt"]).workload


def test_rows_kvlab_cannot_model_keep_their_reason(pub):
    by_id = pub.by_id()
    assert "V0 engine" in v.map_run(by_id["lambda-v054-llama3-8b-h100-mml2048-np10"])
    # modelled since the presets came: the H100 PCIe and NVL runs, and expert parallelism
    assert v.map_run(by_id["iog-llama3-8b-h100-pcie-1qps"]).gpu == "h100-pcie"
    tp2 = v.map_run(by_id["cssnoeasy-tpbase-q25-7b-a100-pcie-tp2-ssl-c8-r2"])  # two A100 PCIe cards, no NVLink
    assert tp2.gpu == "a100-pcie" and tp2.serve["tensor_parallel_size"] == 2
    # a source's stated Docker image (or its log) decides the profiling run's sampler; absent, the release's
    iog = v.map_run(by_id["iog-llama3-70b-2xh100-pcie-16qps"])
    assert iog.sampler == "flashinfer" and "the flashinfer top-k/top-p sampler" in iog.note
    assert tp2.sampler is None
    assert v.map_run(by_id["vllm-issue-17788-qwen3-32b-h100-nvl"]).serve["max_num_seqs"] == 32
    assert v.map_run(by_id["gpustack-q235-a100-fp8-tp4-ep"]).serve["enable_expert_parallel"] is True
    # modelled since kvlab sizes 8-bit GPTQ: `-q gptq` on an 8-bit checkpoint, the legacy path at 0.9.2
    int8 = v.map_run(by_id["gpustack-q8-rtx4090-gptq-int8"])
    assert int8.model == "qwen3-8b-gptq-int8" and int8.serve["quantization"] == "gptq"
    assert "an 8-bit GPTQ checkpoint" in int8.note
    assert "bit width not stated" in v.map_run(by_id["gpustack-q8-rtx4090-gptq-marlin"])
    fp8 = v.map_run(by_id["vllm-issue-25915-qwen3-8b-h100-fp8-v0102"])
    assert fp8.serve["quantization"] == "fp8_per_block" and fp8.workload["num_prompts"] == v.OFFLINE_NUM_PROMPTS


FITS = {  # a fit, a small grid of it, and a figure factor that depends on the constants it fits
    "host": (lambda: v.fit_host, ((0.0, 0.0), (0.0005, 0.0), (0.002, 0.00002)),
             lambda t: v.sim_timing.STEP_OVERHEAD_S * 1000 + v.sim_timing.PER_SEQ_OVERHEAD_S * 1e5),
    "front end": (lambda: v.fit_frontend, ((0.0, 0.0, 0.0), (0.0005, 0.0, 0.0), (0.0, 2e-6, 1e-5)),
                  lambda t: (t.FRONTEND_PER_REQUEST_S * 1000 + t.FRONTEND_PER_PROMPT_TOKEN_S * 3e5
                             + t.FRONTEND_PER_OUTPUT_S * 2e4)),
    "latency": (lambda: v.fit_latency, (0.0, 0.01, 0.05), lambda t: t.FRONTEND_LATENCY_S * 50),
    "roofline per request": (lambda: v.fit_roofline_per_seq, (0.0, 0.00002, 0.0001), lambda t: t.ROOFLINE_PER_SEQ_S * 2.5e4),
}


@pytest.mark.parametrize("fit", sorted(FITS))
def test_the_fits_read_train_rows_only(pub, monkeypatch, fit):
    """Changing a test row's published figures does not move the fit; no test row is even run."""
    ran = []
    fit_fn, grid, factor = FITS[fit]

    def fake_simulate(bench, timing):  # a figure that depends on the constants being fitted
        ran.append(bench)
        t = factor(v.sim_timing)
        return {name: value * (0.5 + t) for name, (_, value) in bench.figures.items()}, "fake"

    monkeypatch.setattr(v, "simulate", fake_simulate)
    before = fit_fn()(pub, grid=grid, report=lambda _: None)
    assert before[0] == grid[1]  # the fake's figures are right at the second point
    assert ran and all(b.figures for b in ran)
    train_figures = {json.dumps(b.figures, sort_keys=True) for b in ran}
    test_runs = [r for r in pub.runs if r.split == "test"]
    assert test_runs
    changed = pub.model_copy(update={"runs": [
        r.model_copy(update={"measured": r.measured.model_copy(update={
            k: x * 7 for k, x in r.measured.figures().items()})}) if r.split == "test" else r
        for r in pub.runs]})
    ran.clear()
    after = fit_fn()(changed, grid=grid, report=lambda _: None)
    assert after == before
    assert {json.dumps(b.figures, sort_keys=True) for b in ran} == train_figures
    test_figures = {json.dumps(v.headline(r), sort_keys=True) for r in test_runs}
    assert not (train_figures & test_figures)


def test_the_host_fit_per_generation_splits_the_train_runs_at_the_first_measured_release(pub, monkeypatch):
    """`--fit-host-by-generation`: the train runs before the earliest measured release and the rest,
    each fitted apart; no test row is run."""
    ran = []
    fit_fn, grid, factor = FITS["host"]

    def fake_simulate(bench, timing):
        ran.append(bench)
        return {name: value * (0.5 + factor(v.sim_timing)) for name, (_, value) in bench.figures.items()}, "fake"

    monkeypatch.setattr(v, "simulate", fake_simulate)
    out = v.fit_host_by_generation(pub, grid=grid, report=lambda _: None)
    assert list(out) == ["vLLM before 0.11.0", "vLLM 0.11.0 on"]
    assert all(point == grid[1] for point, _ in out.values())  # the fake's figures are right there
    releases = {v.sim_timing.vllm_patch_release(b.vllm_version or v.DEFAULT_VLLM_VERSION) for b in ran}
    assert min(releases) < (0, 11, 0) <= max(releases)
    test_figures = {json.dumps(v.headline(r), sort_keys=True) for r in pub.runs if r.split == "test"}
    assert not ({json.dumps(b.figures, sort_keys=True) for b in ran} & test_figures)


def test_the_host_stage_gives_each_generation_its_own_pick_and_keeps_the_measurement_where_right(pub, monkeypatch):
    """`--fit`'s host stage (fit_host_stage): each vLLM generation's train runs pick their own point of
    HOST_GRID (HOST_FITTED a generation); a generation whose runs the measurement prices as well keeps
    it (None); forked grid workers (`--jobs 2`) give what one process gives."""
    t = v.sim_timing
    grid = ((0.0005, 0.0001), (0.001, 0.0), (0.002, 0.0))
    right = {(0, 0, 0): grid[0], (0, 11, 0): grid[1]}

    def fake_simulate(bench, timing):
        release = t.vllm_patch_release(bench.vllm_version or v.DEFAULT_VLLM_VERSION)
        generation = (0, 11, 0) if release >= (0, 11, 0) else (0, 0, 0)
        step_s, per_seq_s, measured_at = t.host_time(bench.vllm_version)
        ok = (step_s, per_seq_s) == right[generation] and measured_at is None
        return {name: value * (1.0 if ok else 1.3) for name, (_, value) in bench.figures.items()}, "fake"

    monkeypatch.setattr(v, "simulate", fake_simulate)
    split = {(0, 0, 0): grid[0]}  # the older generation's -tp > 1 runs fitted apart (executor_sets), the same here
    # ... and each executor set's async-scheduling runs apart (scheduling_sets), the same here too, but for
    # the -tp 1 sets no stats line can check (session 35's condition (2)): those keep their current value
    asynced = {((0, 0, 0), 2): grid[0]}
    assert v.fit_host_stage(pub, grid=grid, report=lambda _: None) == (right, split, asynced)
    monkeypatch.setattr(v, "JOBS", 2)
    assert v.fit_host_stage(pub, grid=grid, report=lambda _: None) == (right, split, asynced)
    with v.host_fitted(right):
        assert t.host_time("0.8.4") == (*grid[0], None) and t.host_time("0.32") == (*grid[1], None)
        assert (t.STEP_OVERHEAD_S, t.PER_SEQ_OVERHEAD_S) == grid[1]  # the default release's
    right[(0, 0, 0)] = (0.0, 0.0)  # not on the grid: nothing beats the measurement on the older runs ...
    monkeypatch.setattr(t, "HOST_MEASURED", {(0, 11, 0): (0.0, 0.0)})
    monkeypatch.setattr(v, "simulate", lambda bench, timing: (
        fake_simulate(bench, timing) if t.HOST_FITTED else
        ({n: x * (1.0 if t.vllm_patch_release(bench.vllm_version or v.DEFAULT_VLLM_VERSION) < (0, 11, 0) else 1.3)
          for n, (_, x) in bench.figures.items()}, "fake")))
    out = v.fit_host_stage(pub, grid=grid, report=lambda _: None)
    assert out[:2] == ({(0, 0, 0): None, (0, 11, 0): grid[1]}, {(0, 0, 0): None})  # ... so they keep it


def test_the_host_stage_fits_each_executor_and_scheduling_mode_apart_where_a_set_has_runs_of_both(pub, monkeypatch):
    """Declared in session 43 (MIN_EXECUTOR_RUNS): a generation's -tp 1 and -tp > 1 train runs pick their own
    host times (HOST_FITTED, HOST_FITTED_MULTIPROC), which kvlab.sim.timing then gives each run by its -tp;
    a generation without enough runs of one executor (0.11.0 on: all one-GPU) fits one value, as before.
    Declared in session 46: within an executor set, the runs served with async scheduling (InferenceMAX's
    --async-scheduling at 0.10.2; the release's default from 0.14) pick their own (HOST_FITTED_ASYNC)."""
    t = v.sim_timing
    grid = ((0.0005, 0.0001), (0.001, 0.00005), (0.004, 0.00005), (0.001, 0.0), (0.0005, 0.00002))
    want = {((0, 0, 0), False, False): grid[1], ((0, 0, 0), False, True): grid[0],
            ((0, 0, 0), True, False): grid[2], ((0, 0, 0), True, True): grid[4],
            ((0, 11, 0), False, False): grid[0], ((0, 11, 0), False, True): grid[4]}

    def fake_simulate(bench, timing):
        release = t.vllm_patch_release(bench.vllm_version or v.DEFAULT_VLLM_VERSION)
        generation = (0, 11, 0) if release >= (0, 11, 0) else (0, 0, 0)
        tp = bench.serve["tensor_parallel_size"]
        mode = v.scheduler_behaviour(bench.vllm_version, None, bench.engine.get("async_scheduling")).async_scheduling
        ok = t.host_time(bench.vllm_version, tp, mode)[:2] == want[(generation, tp > 1, mode)]
        return {name: value * (1.0 if ok else 1.3) for name, (_, value) in bench.figures.items()}, "fake"

    monkeypatch.setattr(v, "simulate", fake_simulate)
    generations = v.generation_sets(pub)
    assert v.executor_sets(generations[(0, 11, 0)]) is None
    executors = v.executor_sets(generations[(0, 0, 0)])
    assert {tp: len(x.runs) for tp, x in executors.items()} == {1: 59, 2: 95}
    modes = {tp: {m: len(x.runs) for m, x in v.scheduling_sets(cell).items()} for tp, cell in executors.items()}
    assert modes == {1: {False: 44, True: 15}, 2: {False: 35, True: 60}}  # the async runs: InferenceMAX's
    assert {m: len(x.runs) for m, x in v.scheduling_sets(generations[(0, 11, 0)]).items()} == {False: 15, True: 15}
    said = []
    fitted, multiproc, asynced = v.fit_host_stage(pub, grid=grid, report=said.append)
    # the -tp 1 sets no stats line of their generation and scheduling mode checks (bench/published_steps.yaml:
    # vLLM 0.10 servers without async scheduling only) are no candidates: their current values stay (0.11.0 on:
    # HOST_FITTED's 1.0 ms + 0; the older generation's async -tp 1 runs: the executor set's, so no entry)
    assert v.stats_lines((0, 0, 0), False) > 0 == v.stats_lines((0, 0, 0), True) == v.stats_lines((0, 11, 0))
    assert sum("not a candidate" in x for x in said) == 3
    assert fitted == {(0, 0, 0): grid[1], (0, 11, 0): grid[3]} and multiproc == {(0, 0, 0): grid[2]}
    assert asynced == {((0, 0, 0), 2): grid[4]}
    with v.host_fitted(fitted, multiproc):
        assert t.host_time("0.8.4", 8) == (*grid[2], None) and t.host_time("0.8.4") == (*grid[1], None)
        assert t.host_time("0.10.2", 8, True) == (*grid[2], None)  # no async value: the executor set's
        assert t.host_time("0.32", 8) == t.host_time("0.32") == (*grid[3], None)
        assert t.host_label("0.8.4", 8).startswith("host time fitted on the train rows at vLLM before 0.11.0 at -tp > 1 "
                                                   "(4.00 ms per step + 50.0 us per scheduled request)")
        assert "at -tp" not in t.host_label("0.32", 8)
        assert t.host_fitted_words().startswith("vLLM before 0.11.0: -tp 1 1.00 ms per step + 50.0 us per scheduled "
                                                "request, -tp > 1 4.00 ms per step + 50.0 us")
    with v.host_fitted(fitted, multiproc, {((0, 0, 0), 2): grid[4]}):
        assert t.host_time("0.10.2", 8, True) == (*grid[4], None) and t.host_time("0.10.2", 8) == (*grid[2], None)
        assert t.host_time("0.10.2", 1, True) == (*grid[1], None)  # -tp 1 has no async value: HOST_FITTED's
        assert t.host_label("0.10.2", 8, True).startswith(
            "host time fitted on the train rows at vLLM before 0.11.0 at -tp > 1 with async scheduling "
            "(0.50 ms per step + 20.0 us per scheduled request)")
        assert "without async scheduling (4.00 ms" in t.host_label("0.10.2", 8)
        assert "async" not in t.host_label("0.10.2", 1, True) and "async" not in t.host_label("0.32", 1, True)
        assert ", -tp > 1 4.00 ms per step + 50.0 us per scheduled request (async scheduling 0.50 ms per step + 20.0 us " \
            "per scheduled request)" in t.host_fitted_words()
    with v.host_fitted(fitted, multiproc, {((0, 0, 0), 2): None}):  # None: the measurement kept for those runs
        assert t.host_time("0.10.2", 8, True) == t.host_time("0.10.2", 8, True)[:2] + ("0.11.0",)
        assert t.host_time("0.10.2", 8, True)[:2] == t.HOST_MEASURED[(0, 11, 0)]
        assert t.host_label("0.10.2", 8, True).startswith("host time measured on vLLM 0.11.0's engine core (kept by the "
                                                          "train rows at vLLM before 0.11.0 at -tp > 1 with async scheduling)")


def test_the_joint_roofline_fit_reads_train_rows_only_and_moves_all_three(pub, monkeypatch):
    """`--fit-joint`: the fallback rows answer to the roofline's time per request and efficiencies, the
    others to neither; the best point is where they are right, and a test row's figures never move it
    (nor are run)."""
    ran = []

    def fake_simulate(bench, timing):
        ran.append(bench)
        t = v.sim_timing
        fallback = bench.gpu != "h100"  # most train rows: the median then answers to the roofline
        k = t.ROOFLINE_PER_SEQ_S * 1e4 * (2 * t.MATMUL_EFFICIENCY - 1) if fallback else 0.5
        return ({name: value * (0.5 + k) for name, (_, value) in bench.figures.items()},
                "roofline fallback: fake" if fallback else "kernel tables: fake")

    monkeypatch.setattr(v, "simulate", fake_simulate)
    per_seq, roof = (0.00002, 0.00005), ((0.8, 0.8), (1.0, 0.8))
    best, err = v.fit_per_seq_roofline(pub, per_seq, roof, report=lambda _: None)
    assert best == (0.00005, 1.0, 0.8) and err == pytest.approx(0.0, abs=1e-12)
    assert {b.gpu for b in ran} >= {"rtx-4090", "h100"}
    train_figures = {json.dumps(b.figures, sort_keys=True) for b in ran}
    changed = pub.model_copy(update={"runs": [
        r.model_copy(update={"measured": r.measured.model_copy(update={
            k: x * 7 for k, x in r.measured.figures().items()})}) if r.split == "test" else r
        for r in pub.runs]})
    ran.clear()
    assert v.fit_per_seq_roofline(changed, per_seq, roof, report=lambda _: None) == (best, err)
    assert {json.dumps(b.figures, sort_keys=True) for b in ran} == train_figures
    assert not train_figures & {json.dumps(v.headline(r), sort_keys=True) for r in pub.runs if r.split == "test"}


def test_timing_option_on_sim_bench(kvlab):
    base = ("sim", "bench", "llama-3.1-8b", "--gpu", "rtx-4090", "--input-len", "64", "--output-len", "4",
            "--num-prompts", "3", "--max-model-len", "4096", "--json")
    r = kvlab(*base, "--timing", "roofline")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["timing_source"] == "roofline"
    r = kvlab(*base, "--timing", "auto")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["timing_source"].startswith("roofline (no kernel data: no vLLM kernel tables")
    r = kvlab(*base, "--timing", "kernels")
    assert r.returncode == 2 and "no measured kernel data" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = kvlab(*base, "--timing", "guess")
    assert r.returncode == 2 and "unknown timing source 'guess'" in r.stderr


def test_timing_option_on_sim_run(kvlab, tmp_path):
    r = kvlab("sim", "run", "llama-3.1-8b", "--gpu", "rtx-4090", "--users", "1", "--duration-s", "5",
              "--workload", "agent-smoke", "--max-model-len", "4096", "--timing", "kernels",
              "--out", str(tmp_path / "run"), "--json")
    assert r.returncode == 2 and "no measured kernel data" in r.stderr
    r = kvlab("sim", "run", "llama-3.1-8b", "--gpu", "rtx-4090", "--users", "1", "--duration-s", "5",
              "--workload", "agent-smoke", "--max-model-len", "4096", "--timing", "roofline",
              "--out", str(tmp_path / "run"), "--json")
    assert r.returncode == 0, r.stderr


def test_timing_option_on_sim_serve_and_its_startup_line(capsys):
    from kvlab.sim import logs
    from kvlab.sim.args import parse_serve_args
    from kvlab.sim.config import build_config
    from kvlab.sim.timing import DEFAULT_TIMING

    assert parse_serve_args(["llama-3.1-8b", "--gpu", "h100"]).timing == DEFAULT_TIMING
    assert "timing" in parse_serve_args(["llama-3.1-8b", "--gpu", "h100", "--timing", "roofline"]).non_default
    args = parse_serve_args(["llama-3.1-8b", "--gpu", "rtx-4090", "--max-model-len", "4096", "--timing", "auto"])
    assert args.timing == "auto"
    cfg = build_config(args.config, args.gpu, timing=args.timing)
    logs.startup_lines(cfg, args.non_default, args.not_simulated, stop_before_kv=True)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "step timing source:" in ln]
    assert len(lines) == 1 and "roofline (no kernel data: no vLLM kernel tables for GPU rtx-4090" in lines[0]
    with pytest.raises(KvlabError, match="invalid choice"):
        parse_serve_args(["llama-3.1-8b", "--gpu", "h100", "--timing", "fast"])


def test_the_kernel_path_fits_read_train_rows_only(pub, monkeypatch):
    """The Marlin and dequantize constants are fitted on train ratio rows alone: a test row's figures
    changed leave the fit unchanged, and no test row is run."""
    ran = []

    def fake_simulate(bench, timing):
        ran.append(bench)
        k = v.sim_timing.MARLIN_EFFICIENCY * v.sim_timing.DEQUANT_EFFICIENCY / (1 + v.sim_timing.LEGACY_GEMM_REPEAT_COST)
        q = bench.serve.get("quantization")
        label = {"awq": "roofline (legacy dequantize)", "awq_marlin": "roofline (Marlin)"}.get(q, "kernel tables")
        return {name: value * (k if q else 1.0) for name, (_, value) in bench.figures.items()}, label

    monkeypatch.setattr(v, "simulate", fake_simulate)
    changed = pub.model_copy(update={"runs": [
        r.model_copy(update={"measured": r.measured.model_copy(update={
            k: x * 7 for k, x in r.measured.figures().items()})}) if r.split == "test" else r
        for r in pub.runs]})
    for path in v.PATH_FITS:
        ran.clear()
        before = v.fit_path(pub, path, report=lambda _: None)
        assert ran and {b.model for b in ran}
        assert v.fit_path(changed, path, report=lambda _: None) == before
        test_ids = {r.id for r in pub.runs if r.split == "test"}
        assert not any(v.map_run(r) in ran for r in pub.runs if r.id in test_ids)


def test_weight_kernel_paths_follow_vllm():
    """vLLM's GEMM path per format, GPU and release (read from the wheels' sources, kvlab.sim.timing
    MACHETE_FIRST / LEGACY_LAST): Machete for gptq_marlin / compressed-tensors W4A16 on compute
    capability 9.0, and for AWQ there from 0.19 (choose_mp_linear_kernel); Marlin elsewhere, for MoE
    experts and for FP8 without FP8 tensor cores; the legacy dequantize + cuBLAS path for an explicit
    `-q awq` up to 0.23 and `-q gptq` up to 0.21, from 256 / 51 tokens a step."""
    from kvlab.serve_config import options_config
    from kvlab.sim.config import build_config
    from kvlab.sim.timing import StepWork

    def cost(q, gpu="h100", version="0.9.2", model="qwen3-8b"):
        return build_config(options_config(model, quantization=q), gpu, timing="roofline", vllm_version=version).cost

    assert (cost(None).weight_kernel, cost(None).timing_source) == ("native", "roofline")
    assert cost("awq_marlin").weight_kernel == "marlin" and cost("gptq_marlin").weight_kernel == "machete"
    assert cost("awq_marlin", version="0.18.1").weight_kernel == "marlin"
    assert cost("awq_marlin", version="0.19.0").weight_kernel == "machete"
    assert cost("gptq_marlin", "a100-80gb").weight_kernel == cost("gptq_marlin", "b200").weight_kernel == "marlin"
    assert cost("awq_marlin", "h200", "0.32").weight_kernel == "machete"
    assert cost("awq_marlin", version="0.32", model="qwen3-30b-a3b").weight_kernel == "marlin"  # MoE experts
    assert cost("fp8", "a100-80gb").weight_kernel == "marlin" and cost("fp8").weight_kernel == "native"
    assert [cost("awq", version=v).weight_kernel for v in ("0.23.0", "0.24.0")] == ["dequant", "machete"]
    assert [cost("gptq", version=v).weight_kernel for v in ("0.21.0", "0.22.0")] == ["dequant", "machete"]
    assert cost("awq", "a100-80gb", "0.32").weight_kernel == "marlin"
    machete = cost("gptq_marlin")
    assert ("Machete GEMM path (Hopper) at 1.00 of the BF16 GEMM rate, published: Machete matches FP16's "
            "compute-bound rate") in machete.timing_source
    assert machete.flops_per_s == cost(None).flops_per_s
    legacy = cost("awq")
    assert legacy.weight_kernel == "dequant" and "legacy dequantize" in legacy.timing_source
    assert legacy.dequant_min_tokens == 256
    below, at = StepWork(255, 255, 255, 0, 0, 0, 0), StepWork(256, 256, 256, 0, 0, 0, 0)
    assert legacy.dequant_s(255) == 0 and legacy.dequant_s(256) > 0
    marlin = cost("awq_marlin")
    # the legacy path costs the dequantize kernels from 256 tokens on; Marlin never does
    assert legacy.step_time_s(at) - marlin.step_time_s(at) > legacy.step_time_s(below) - marlin.step_time_s(below)


def test_marlin_and_dequantize_rates_are_the_measured_ones_where_published():
    """Marlin's compute-bound rate is the kernel benchmark's per GPU (vLLM 0.18 `marlin_gemm` vs
    torch FP16 matmul, 8,192 x 8,192, channelwise, M 1,024-16,384: A800 222-227 vs 241-258 TFLOP/s,
    H100 406-413 vs 649-699), times the fitted cost of group scales where the weights have them; the
    fitted fraction on GPUs without a measurement; the legacy `awq_dequantize` kernel on an H100 runs
    at its measured 0.56 TB/s. Each says which in the timing source."""
    from kvlab.hardware import gpu
    from kvlab.models.cards import card
    from kvlab.models.params import LINEAR, param_counts
    from kvlab.models.weights import WEIGHT_FORMATS, weight_bytes_by_role
    from kvlab.serve_config import options_config
    from kvlab.sim import timing
    from kvlab.sim.config import build_config

    awq, fp8, block = WEIGHT_FORMATS["awq"], WEIGHT_FORMATS["fp8"], WEIGHT_FORMATS["fp8-block"]
    g = timing.MARLIN_GROUPED_SCALES  # group-128 AWQ/GPTQ and 128 x 128 block FP8: the fitted cost of their scales
    assert g == 0.8  # refitted 2026-12-07 (kvlab.sim.timing)
    # per-tensor FP8 on an A100 (FP8 Marlin, W8A16) has no group scales: the measured rate alone
    assert timing.marlin_efficiency(gpu("a100-80gb"), fp8) == (0.806, timing.MARLIN_MEASURED_SOURCE)
    eff, source = timing.marlin_efficiency(gpu("a100-80gb"), awq)
    assert eff == pytest.approx(0.891 * g) and source == (
        f"{timing.MARLIN_MEASURED_SOURCE} (channelwise) x 0.80 for group-128 scales, fitted")
    assert timing.marlin_efficiency(gpu("a100-80gb"), block)[0] == pytest.approx(0.806 * g)
    assert timing.marlin_efficiency(gpu("h100"), awq)[0] == pytest.approx(0.612 * g)
    assert timing.marlin_efficiency(gpu("rtx-4090"), awq)[0] == pytest.approx(1.075 * g)
    assert timing.marlin_efficiency(gpu("l40s"), awq) == (timing.MARLIN_EFFICIENCY, "fitted")
    arch = card("qwen3-8b").arch
    a100 = timing.cost_model(arch, awq, "bfloat16", "auto", gpu("a100-80gb"), 1, "marlin")
    bf16 = timing.cost_model(arch, WEIGHT_FORMATS["auto"], "bfloat16", "auto", gpu("a100-80gb"), 1)
    assert a100.flops_per_s == pytest.approx(bf16.flops_per_s * 0.891 * g, rel=1e-12)

    def source(q, g):  # vLLM 0.9.2: AWQ-Marlin on an H100 is still Marlin, `-q awq` still the legacy kernel
        return build_config(options_config("qwen3-8b", quantization=q), g, timing="roofline",
                            vllm_version="0.9.2").cost.timing_source

    assert ("Marlin GEMM path at 0.49 of the BF16 GEMM rate, measured: vLLM 0.18 Marlin kernel benchmark (channelwise) "
            "x 0.80 for group-128 scales, fitted") in source("awq_marlin", "h100")
    assert "Marlin GEMM path at 0.80 of the BF16 GEMM rate, fitted" in source("awq_marlin", "l40s")
    h100 = build_config(options_config("qwen3-8b", quantization="awq"), "h100", timing="roofline",
                        vllm_version="0.9.2").cost
    assert "dequantize at 0.56 TB/s, measured: vLLM awq_dequantize kernel benchmark" in h100.timing_source
    # the dequantize pass: the packed weights read and 2 bytes per weight written, at 0.56 TB/s
    moved = weight_bytes_by_role(arch, awq, "bfloat16")[LINEAR] + 2.0 * (param_counts(arch).active - param_counts(arch).embedding)
    assert h100.dequant_s(256) == pytest.approx(moved / 0.56e12, rel=1e-12)
    assert "dequantize at 1.00 of the roofline's HBM rate, fitted" in source("awq", "rtx-4090")


def test_marlin_reads_its_weights_slower_than_cublas_at_a_few_rows():
    """At a few rows Marlin streams its packed weights at a fraction of cuBLAS's HBM rate, measured per
    GPU by the same kernel benchmark (mean over 1-16 rows of bits/16 x torch's time / Marlin's: A800
    0.620 at int4, 0.837 at 8 bits; H100 0.537; RTX 4090 0.899), the fitted fraction elsewhere: the
    linear weights' reads cost their bytes / fraction, the LM head's and the KV cache's do not, and a
    compute-bound step is unchanged."""
    from kvlab.hardware import gpu
    from kvlab.models.cards import card
    from kvlab.models.params import LINEAR
    from kvlab.models.weights import WEIGHT_FORMATS, weight_bytes_by_role
    from kvlab.sim import timing
    from kvlab.sim.timing import StepWork

    awq, fp8 = WEIGHT_FORMATS["awq"], WEIGHT_FORMATS["fp8"]
    src = timing.MARLIN_BANDWIDTH_SOURCE
    assert timing.marlin_bandwidth(gpu("a100-80gb"), awq) == (0.620, src)
    assert timing.marlin_bandwidth(gpu("a100-80gb"), fp8) == (0.837, src)  # FP8 Marlin (W8A16) on an A100
    assert timing.marlin_bandwidth(gpu("h100"), awq) == (0.537, src)
    assert timing.marlin_bandwidth(gpu("rtx-4090"), awq) == (0.899, src)
    assert timing.marlin_bandwidth(gpu("l40s"), awq) == (timing.MARLIN_BANDWIDTH, "fitted")
    arch = card("qwen3-8b").arch
    a100 = gpu("a100-80gb")
    marlin = timing.cost_model(arch, awq, "bfloat16", "auto", a100, 1, "marlin")
    native = timing.cost_model(arch, awq, "bfloat16", "auto", a100, 1, "native")  # the same bytes at cuBLAS's rate
    linear = weight_bytes_by_role(arch, awq, "bfloat16")[LINEAR]
    assert marlin.marlin_extra_bytes == pytest.approx(linear * (1 / 0.620 - 1), rel=1e-12)
    one = StepWork(1, 1, 1, 1024, 1024, 0, 0)  # one decode over 1,024 tokens of context: HBM-bound
    assert marlin.memory_s(one) - native.memory_s(one) == pytest.approx(linear * (1 / 0.620 - 1) / marlin.bytes_per_s)
    assert marlin.gpu_s(one) == marlin.memory_s(one) and native.gpu_s(one) == native.memory_s(one)
    # Qwen3-8B AWQ on an A100: the step 1.44x as long as at cuBLAS's rate (the BF16 LM head and KV reads unchanged)
    assert marlin.gpu_s(one) / native.gpu_s(one) == pytest.approx(1.44, abs=0.01)
    big = StepWork(8192, 1, 1, 8192, 0, 8192 * 8192 // 2, 0)  # an 8,192-token prefill: compute-bound either way
    assert marlin.compute_s(big) > marlin.memory_s(big)
    assert marlin.gpu_s(big) == pytest.approx(
        timing.dataclasses.replace(marlin, marlin_extra_bytes=0.0).gpu_s(big), rel=1e-12)
    # tensor parallel: each rank reads its share
    tp2 = timing.cost_model(arch, awq, "bfloat16", "auto", a100, 2, "marlin")
    assert tp2.memory_s(one) < marlin.memory_s(one)
    label = timing.step_timing(arch, awq, "bfloat16", "auto", a100, 1, source="roofline", kernel="marlin").timing_source
    assert "at a few rows its weights read at 0.62 of cuBLAS's HBM rate, measured: vLLM 0.18 Marlin kernel" in label


def test_an_awq_checkpoint_served_without_q_runs_awq_marlin():
    """gpustack's Qwen3-14B/32B AWQ pages serve the checkpoint without -q: vLLM's
    AWQMarlinConfig.override_quantization_method picks awq_marlin (user_quant None), not the legacy
    kernel an explicit -q awq keeps."""
    from kvlab.serve_config import options_config
    from kvlab.sim.config import build_config

    runs = {r.id: r for r in published_runs.load().runs}
    for rid in ("gpustack-q14-a100-awq-sharegpt", "gpustack-q32-a100-awq-sharegpt"):
        bench = v.map_run(runs[rid])
        assert bench.serve["quantization"] == "awq_marlin" and "awq_marlin" in bench.note
    explicit = v.map_run(runs["gpustack-q8-a100-awq"])  # the quantization page names -q awq
    assert explicit.serve["quantization"] == "awq"
    marlin = build_config(options_config("qwen3-8b", quantization="awq_marlin"), "a100-80gb", timing="roofline")
    assert marlin.cost.weight_kernel == "marlin"


@pytest.mark.parametrize("q, rows", [("awq", 16), ("gptq", 8)])
def test_legacy_kernels_pass_over_the_weights_once_per_block_of_rows(monkeypatch, q, rows):
    """Below the dequantize threshold, `-q awq` (awq_gemm: 16-row blocks) and `-q gptq` (exllama: 8)
    read the packed weights from HBM once and pass over them again for each further block of rows, at
    LEGACY_GEMM_REPEAT_COST of a read each: the memory term grows by that, to the byte; at and above
    the threshold the cuBLAS path is unchanged."""
    from kvlab.models.params import LINEAR
    from kvlab.models.weights import WEIGHT_FORMATS, weight_bytes_by_role
    from kvlab.models.cards import card
    from kvlab.hardware import gpu
    from kvlab.sim import timing

    arch, fmt = card("qwen3-8b").arch, WEIGHT_FORMATS[q]
    packed = weight_bytes_by_role(arch, fmt, "bfloat16")[LINEAR]
    free = timing.cost_model(arch, fmt, "bfloat16", "auto", gpu("h100"), 1, "dequant")
    monkeypatch.setattr(timing, "LEGACY_GEMM_REPEAT_COST", 0.25)
    paid = timing.cost_model(arch, fmt, "bfloat16", "auto", gpu("h100"), 1, "dequant")
    assert paid.legacy_rows == rows
    for tokens in (1, rows, rows + 1, 5 * rows, 200 if q == "awq" else 50):
        extra = (paid._memory_s(tokens, 0) - free._memory_s(tokens, 0)) * paid.bytes_per_s
        assert extra == pytest.approx((-(-tokens // rows) - 1) * 0.25 * packed, rel=1e-9)
    top = timing.DEQUANT_MIN_TOKENS[q]
    assert paid._memory_s(top, 0) == free._memory_s(top, 0)


def test_the_summary_carries_the_ratio_rows_by_factor_and_gpu(pub):
    """bench/sim_validation_summary.json's ratio rows (what reports cite beside quantized figures):
    each same-GPU pair the simulator ran, classed by what its quantized run differs by: int4 weights
    (AWQ/GPTQ, Marlin or legacy), fp8 weights, fp8 KV cache; pairs it could not run are left out."""
    runs = {r.id: r for r in pub.runs}
    results = []
    for q in pub.ratios:
        for rid, value in ((q.a, 2.0), (q.b, 1.6)):
            bench = v.map_run(runs[rid])
            row = v.RowResult(runs[rid], bench if not isinstance(bench, str) else None,
                              bench if isinstance(bench, str) else None)
            if row.bench is not None:  # the published figures, scaled: the ratio simulated is 1.25
                row.sim["auto"] = {n: value / 2.0 * x for n, x in runs[rid].measured.figures().items()}
            results.append(row)
    checks = {c.id: c for c in v.ratio_checks(pub, results, "auto")}
    assert checks["ratio-a100-awq-marlin-vs-bf16"].factor == "int4 weights"
    assert checks["ratio-h100-awq-vs-bf16"].factor == "int4 weights"
    assert checks["ratio-a100-q14-awq-vs-bf16"].factor == "int4 weights"
    assert checks["ratio-h100-qwen3-8b-fp8-vs-bf16-v085"].factor == "fp8 weights"
    assert checks["ratio-a100-q32-fp8-vs-bf16"].factor == "fp8 weights"  # FP8 Marlin on an A100
    assert checks["ratio-h100-kv-fp8-vs-bf16"].factor == "fp8 KV cache"
    assert checks["ratio-a100-awq-marlin-vs-bf16"].gpu == "a100-80gb" and checks["ratio-h100-awq-vs-bf16"].split == "test"
    # expert parallelism is simulated: the FP8 run's -tp 8 --enable-expert-parallel against BF16's -tp 8
    assert checks["ratio-h100-q235-fp8-vs-bf16"].factor == "fp8 weights"
    assert "ratio-h100-dsv2-lite-mla-vs-mha-cache" not in checks
    a = checks["ratio-h100-awq-vs-bf16"]
    assert a.simulated == pytest.approx(a.published * 1.25, rel=1e-12)


def test_the_summary_breaks_the_test_figures_down_by_gpu_and_kind(pub):
    """The per-GPU and per-kind shares the band cites: every test figure counted once in each
    breakdown, train rows left out, the median of |simulated / published - 1| per group."""
    runs = {r.id: r for r in pub.runs}
    picked = ["gpustack-q8-h100-bf16", "gpustack-q8-a100-bf16", "iog-r1-distill-llama-8b-1xrtx4090-1qps",
              "gpustack-q14-a100-bf16-sharegpt"]  # the last a train row
    results = []
    for i, rid in enumerate(picked):
        bench = v.map_run(runs[rid])
        row = v.RowResult(runs[rid], bench, None)
        # every published figure simulated 10 % high, but the H100 run's first figure 40 % high
        row.sim["auto"] = {n: x * (1.4 if (i == 0 and j == 0) else 1.1)
                           for j, (n, (_, x)) in enumerate(bench.figures.items())}
        results.append(row)
    by_gpu = v.shares_by(results, "auto", "test", lambda r, n: r.bench.gpu)
    assert {k: (g.within, g.of) for k, g in by_gpu.items()} == {"a100-80gb": (3, 3), "h100": (2, 3), "rtx-4090": (2, 2)}
    assert by_gpu["h100"].median_abs_error == pytest.approx(0.1)
    by_kind = v.shares_by(results, "auto", "test", lambda r, n: v.FIGURE_KIND[n])
    assert {k: (g.within, g.of) for k, g in by_kind.items()} == {"throughput": (2, 3), "ttft": (3, 3), "tpot": (2, 2)}
    assert sum(g.of for g in by_gpu.values()) == sum(g.of for g in by_kind.values()) == v.share_within(
        results, "auto", "test")[1]


def test_secondary_figures_are_the_stated_latency_statistics_beside_the_headline_printed_not_scored(pub):
    runs = {r.id: r for r in pub.runs}
    run = runs["gpustack-dsr1-h200-sharegpt"]  # states mean, median and p99 of TTFT, TPOT and ITL, and its peak
    bench = v.map_run(run)
    assert set(bench.figures) == {"output_throughput", "mean_ttft_ms", "mean_tpot_ms"}
    assert bench.secondary == {n: run.measured.figures()[n] for n in (
        "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
        "max_output_tokens_per_s")}
    assert bench.secondary["max_output_tokens_per_s"] == 7451.0  # the page's "Peak output token throughput (tok/s)"
    # states a mean TTFT (headline), its median and p99, and no TPOT
    assert v.map_run(runs["mushfiqrahman-mistral7b-rtx4090-c4"]).secondary == {"median_ttft_ms": 53, "p99_ttft_ms": 157}
    row = v.RowResult(run, bench, None)
    row.sim["auto"] = {n: x * 0.45 for n, (_, x) in bench.figures.items()}  # its TPOT 55 % short
    row.secondary["auto"] = {n: x * (1.03 if n == "median_itl_ms" else 0.5) for n, x in bench.secondary.items()}
    table = "\n".join(v.secondary_table([row], "auto"))
    assert "| median_itl_ms | 1 of 1 | +3 % | — | — |" in table and "| p99_tpot_ms | 0 of 1 | -50 % |" in table
    assert "mean_tpot_ms" not in table  # the headline figure: scored above, not here
    assert "while their median ITL is within it (1): gpustack-dsr1-h200-sharegpt" in table
    assert v.share_within([row], "auto", "test") == (0, 3)  # the secondary figures are not in the shares


def test_runs_are_grouped_by_their_publisher(pub):
    runs = pub.by_id()
    assert v.source_of(runs["adithyajrunpod-q8-h100-rate35-baseline"]) == "adithyaJRunpod/vllm_bench"
    assert v.source_of(runs["gpustack-q8-h100-bf16"]) == "gpustack/gpustack"
    assert all(v.source_of(r) for r in pub.runs)


def test_a_figure_off_by_more_than_2x_shows_its_stated_cause_or_is_counted_without_one(pub):
    """The issue's "no figure off by more than 2x without a stated cause", checked by the table: a
    figure off by more than 2x either way prints the cause its run's `misses` names, or is counted
    without one; a named figure now within 2x is listed beside its cause (to be dropped)."""
    runs = {r.id: r for r in pub.runs}
    stated = runs["gpustack-q8-a100-bf16"]  # test; names causes for its TTFT and TPOT
    assert stated.misses == {"mean_ttft_ms": "gpustack-quant-page-burst", "mean_tpot_ms": "gpustack-quant-page-burst"}
    plain = runs["gpustack-q8-h100-bf16"]  # test; names none
    results = []
    for run, scale in ((stated, {"mean_ttft_ms": 4.74, "mean_tpot_ms": 1.2}),  # TTFT off, TPOT within 2x
                       (plain, {"mean_ttft_ms": 0.49, "mean_tpot_ms": 2.0})):  # 2.04x short; exactly 2x is not off
        bench = v.map_run(run)
        row = v.RowResult(run, bench, None)
        row.sim["auto"] = {n: x * scale.get(n, 1.0) for n, (_, x) in bench.figures.items()}
        results.append(row)
    caused, uncaused = v.misses(results, "auto", "test")
    assert caused == [("gpustack-q8-a100-bf16", "mean_ttft_ms")]
    assert uncaused == [("gpustack-q8-h100-bf16", "mean_ttft_ms")]
    assert v.misses(results, "auto", "train") == ([], [])
    assert v.miss_note(results[0], "mean_ttft_ms", "auto") == "off by >2x: cause gpustack-quant-page-burst"
    assert v.miss_note(results[0], "mean_tpot_ms", "auto") == ""
    assert v.miss_note(results[1], "mean_ttft_ms", "auto") == "off by >2x: NO STATED CAUSE"
    table = v.causes_table(pub, results, "auto")
    row = next(line for line in table if line.startswith("| gpustack-quant-page-burst |"))
    assert "| 1 / 0 |" in row and "gpustack-q8-a100-bf16 mean_tpot_ms" in row
    assert len(table) == 2 + len(pub.miss_causes)


@pytest.mark.slow  # every test run of the table simulated: ~40 s on 2 cores
def test_no_test_figure_is_off_by_more_than_2x_without_a_stated_cause(pub):
    """Issue 14's third done-when clause, on the table as it runs now (every test run simulated under
    the default timing, about 40 s): each test figure off by more than 2x names a stated cause
    (bench/published_runs.yaml `misses` / `miss_causes`). A change that puts another figure beyond 2x
    fails here until its cause is found and stated, or the figure comes back."""
    results = v.rows(pub, (v.sim_timing.DEFAULT_TIMING,), "test")
    caused, uncaused = v.misses(results, v.sim_timing.DEFAULT_TIMING, "test")
    assert caused and not uncaused, f"off by more than 2x without a stated cause: {uncaused}"
    # and, from the same simulations, the busiest second of each of the lab's 45 test runs that print it
    # (a secondary figure: simulated beside the published one, not scored)
    peaks = [r.secondary[v.sim_timing.DEFAULT_TIMING]["max_output_tokens_per_s"] for r in results
             if "max_output_tokens_per_s" in r.secondary.get(v.sim_timing.DEFAULT_TIMING, {})]
    assert len(peaks) == 45 and all(p > 0 for p in peaks)


def test_a_fit_keeps_the_current_value_within_the_tolerance():
    """`--fit`'s convergence rule: the grid's best point replaces the constant's current value only
    when it beats it by more than FIT_TOLERANCE of median |log error|."""
    import contextlib

    errors = {0: 0.1608, 1: 0.1565, 2: 0.1571, 3: 0.20}
    seen = []

    def search(current, errs=errors):
        state = {}

        @contextlib.contextmanager
        def setting(p):
            state["p"] = p
            yield

        return v._grid_search(list(errs), setting, lambda: errs[state["p"]], lambda p, e: f"  point {p}: {e}",
                              seen.append, current=current)

    assert search(current=0) == (0, 0.1608)  # 0.0043 better: kept
    assert any("kept" in line for line in seen)
    assert search(current=None) == (1, 0.1565)
    assert search(current=3) == (1, 0.1565)  # 0.0435 better: changed
    assert search(current=0, errs={0: 0.170, 1: 0.160}) == (1, 0.160)  # 0.010 better: changed


def test_a_closed_loop_window_is_measured_as_the_load_tester_measures_it(pub):
    """One user on a TechBroMoho L40S server, simulated over its source's window: the requests that
    completed in the window and the tokens that reached the client in it, as the source counts them
    (a request of 256 tokens every e2e seconds), and the window's start after ramp + warmup."""
    run = pub.by_id()["techbromoho-l40s-qwen3-8b-bf16-closedloop-c1"]
    bench = v.map_run(run)
    assert bench.workload == {"closed_loop": (1, 0.0, 15.0, 120.0), "input_len": 512, "output_len": 256}
    assert set(bench.figures) == {"output_throughput", "median_ttft_ms", "median_tpot_ms"}
    res, _ = v.run_simulated(bench, "auto")
    d = res.to_data()
    e2e_s = (d["median_ttft_ms"] + 255 * d["median_tpot_ms"]) / 1000  # one user: every request alike
    assert d["request_throughput"] * 120 == pytest.approx(120 // e2e_s, abs=1)
    assert d["output_throughput"] == pytest.approx(256 / e2e_s, rel=0.02)  # tokens by arrival, not by request
    assert res.timing_source.startswith("aiconfigurator-core") and "l40s" in res.timing_source


def test_the_memory_model_against_the_kv_cache_vllm_logged_on_an_l40s():
    """TechBroMoho's server logs (vLLM 0.10.2, one L40S, --max-model-len 1024, 0.90 of the GPU):
    the memory model's KV tokens, to the token, within 4 % of what vLLM logged for each checkpoint."""
    rows = v.gpu_log_rows()
    assert [r[1] for r in rows] == ["170,944", "245,312", "240,736"]
    assert [r[2] for r in rows] == ["176,976", "246,672", "246,672"]
    assert all(abs(float(r[3].split()[0])) < 4 for r in rows)


@pytest.mark.parametrize("measured_right", [True, False])
def test_fit_checks_the_measured_front_end_and_fits_the_latency_at_what_it_keeps(monkeypatch, capsys, measured_right):
    """`--fit`'s front-end stage: the API server's streaming measured per release is checked against
    FRONTEND_GRID's best (one per-output cost at every release) by the rule for measured terms; the
    request latency is then fitted at the measured streaming where it is kept, at the grid's best
    where it is rejected."""
    import functools

    measured = v.sim_timing.FRONTEND_STREAMING_MEASURED
    seen = []  # (request latency, streaming at the measured pair) of each simulated run

    def fake_simulate(bench, timing):
        t = v.sim_timing
        at_measured = t.FRONTEND_STREAMING_MEASURED is measured
        seen.append((t.FRONTEND_LATENCY_S, at_measured))
        right = at_measured if measured_right else t.FRONTEND_STREAMING_MEASURED == {(0, 0, 0): (1e-5, 0.0)}
        return {name: value * (1.0 if right else 1.5) for name, (_, value) in bench.figures.items()}, "fake"

    monkeypatch.setattr(v, "simulate", fake_simulate)
    for name, grid in (("fit_host_stage", ((0.0, 0.0),)), ("fit_roofline_per_seq", (v.sim_timing.ROOFLINE_PER_SEQ_S,)),
                       ("fit_frontend", ((0.0025, 2e-6, 0.0), (0.0025, 2e-6, 1e-5))), ("fit_latency", (0.02, 0.03)),
                       ("fit_roofline", ((1.0, 0.8),))):
        monkeypatch.setattr(v, name, functools.partial(getattr(v, name), grid=grid))
    assert v.main(["--fit"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("grid's best: FRONTEND_PER_REQUEST_S"))
    assert line.endswith("kept" if measured_right else "REJECTED")
    assert "streaming measured per release vLLM 0.11.0 68 us per streamed output + 0.47 ms per step" in line
    at_latency_point = {m for lat, m in seen if lat == 0.03}  # runs of the latency fit's second point
    assert at_latency_point == {measured_right}


@pytest.mark.parametrize("measured_right", [True, False])
def test_fit_checks_the_measured_host_time_and_fits_the_rest_at_what_it_keeps(monkeypatch, capsys, measured_right):
    """`--fit`'s host-time stage: the engine core's host time measured per release is checked against
    HOST_GRID's best on each vLLM generation's train runs apart by the rule for measured terms; the stages after
    it run at the measurement where it is kept, at the grid's best where it is rejected."""
    import functools

    measured = v.sim_timing.HOST_MEASURED
    seen = []  # (stage's constant in force, host time at the measured pairs) of each simulated run

    def fake_simulate(bench, timing):
        t = v.sim_timing
        at_measured = t.HOST_MEASURED is measured and t.HOST_FITTED is None
        seen.append((t.FRONTEND_LATENCY_S, at_measured))
        right = at_measured if measured_right else t.host_time(bench.vllm_version) == (0.001, 0.0, None)
        return {name: value * (1.0 if right else 1.5) for name, (_, value) in bench.figures.items()}, "fake"

    monkeypatch.setattr(v, "simulate", fake_simulate)
    # the measurement in force to begin with: the -tp 1 sets no stats line checks keep it (their current value)
    monkeypatch.setattr(v.sim_timing, "HOST_FITTED", None)
    monkeypatch.setattr(v.sim_timing, "HOST_FITTED_MULTIPROC", None)
    for name, grid in (("fit_host_stage", ((0.001, 0.0), (0.002, 0.0))), ("fit_roofline_per_seq", (v.sim_timing.ROOFLINE_PER_SEQ_S,)),
                       ("fit_frontend", ((0.0025, 2e-6, 0.0),)), ("fit_latency", (0.02, 0.03)),
                       ("fit_roofline", ((1.0, 0.8),))):
        monkeypatch.setattr(v, name, functools.partial(getattr(v, name), grid=grid))
    assert v.main(["--fit"]) == 0
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.strip().startswith("grid's best: 1.00 ms + 0 us")]
    # one a vLLM generation (kvlab.sim.timing.HOST_GENERATIONS), each checked apart, the older one's -tp 1 and
    # -tp > 1 runs apart (executor_sets), and each of those sets' runs with and without async scheduling
    # apart (scheduling_sets)
    sets = [x for x in out.splitlines() if x.startswith(" train runs at")]
    assert len(lines) == 6 and sum("at -tp" in x for x in sets) == 4 and sum(" with async scheduling" in x for x in sets) == 3
    assert all(("kept" in line) == measured_right and ("REJECTED" in line) != measured_right for line in lines)
    at_latency_point = {m for lat, m in seen if lat == 0.03}  # runs of the latency fit's second point
    assert at_latency_point == {measured_right}


def test_a_fit_killed_half_way_resumes_from_the_points_it_kept(pub, monkeypatch, tmp_path):
    """`--fit` keeps each grid point's error in FIT_CACHE as it ends (a whole pass outlasts a working session):
    the same search again reads every point back without simulating; a point under other constants (one the
    setting does not set, left in force by an earlier stage) or other rows is simulated again; a line cut short
    by a kill is ignored; forked workers keep what one process keeps."""
    calls = []

    def fake_simulate(bench, timing):
        calls.append(bench)
        t = v.sim_timing
        return {name: value * (1 + 10 * t.FRONTEND_LATENCY_S + t.ROOFLINE_PER_SEQ_S * 1000)
                for name, (_, value) in bench.figures.items()}, "fake"

    monkeypatch.setattr(v, "simulate", fake_simulate)
    monkeypatch.setattr(v, "FIT_CACHE", tmp_path / "fit_cache.jsonl")
    train = v._train(pub).model_copy(update={"runs": v._train(pub).runs[:6]})
    grid = (0.0, 0.01, 0.02)
    first = v.fit_latency(train, grid=grid, report=lambda _: None)
    n = len(calls) // 3  # the runs kvlab can model (a train run it cannot is not simulated)
    assert n >= 4 and len(calls) == 3 * n and len(v.FIT_CACHE.read_text().splitlines()) == 3
    calls.clear()
    assert v.fit_latency(train, grid=grid, report=lambda _: None) == first and not calls  # all read back
    with open(v.FIT_CACHE, "a") as f:
        f.write('{"key": "abc", "err')  # cut short
    with v.constants(ROOFLINE_PER_SEQ_S=0.0001):  # another stage's constant in force: other keys
        again = v.fit_latency(train, grid=grid, report=lambda _: None)
    assert len(calls) == 3 * n and again[0] == first[0] and again[1] != first[1]
    calls.clear()
    fewer = train.model_copy(update={"runs": train.runs[:5]})
    monkeypatch.setattr(v, "JOBS", 2)
    v.fit_latency(fewer, grid=grid, report=lambda _: None)  # other rows: simulated again, in two processes
    assert len(v.FIT_CACHE.read_text().splitlines()) == 3 + 1 + 3 + 3
    assert v.fit_latency(fewer, grid=grid, report=lambda _: None) == v.fit_latency(fewer, grid=grid, report=lambda _: None)
    monkeypatch.setattr(v, "FIT_CACHE", None)  # the default: nothing kept
    monkeypatch.setattr(v, "JOBS", 1)
    calls.clear()
    assert v.fit_latency(train, grid=grid, report=lambda _: None) == first and len(calls) == 3 * n
