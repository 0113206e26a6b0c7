"""`kvlab sim bench`: `vllm bench serve` on the simulated engine, in virtual time.

The requests (lengths, arrival times) are those `vllm bench serve` makes (`kvlab.replay.datasets`);
each is a one-turn session of the offline replay (`kvlab.replay.run.run_offline`), sent at its
arrival time, at most `--max-concurrency` at once (vLLM's client semaphore: a request waits for a
slot, and its TTFT and latency count from when it is sent, as vLLM's `start_time` does). The
results are computed from the per-request records with vLLM's definitions
(`calculate_metrics` and `benchmark` in `vllm/benchmarks/serve.py`, vllm-project/vllm main of late
2026, commit 009e6d4a):

- `duration`: from the start of the run (time 0; with a finite rate the first request is sent
  after the first gap, by the clients of vLLM 0.10.0 on, and at time 0 by those before, which the
  run's `--vllm-version` picks: `kvlab.replay.datasets`) until the last request is done;
- `completed`/`failed`; `total_input_tokens`/`total_output_tokens` over completed requests;
  `request_throughput`, `output_throughput`, `total_token_throughput` = those / duration;
- TTFT and E2EL over completed requests; TPOT = (latency - ttft) / (output tokens - 1) over
  completed requests with more than one output token; ITL over every gap between two tokens of
  every completed request; each as mean, median, std (numpy's, population) and p99 (numpy's
  linear percentile), in ms, 0 where there are none;
- `max_concurrent_requests`: the most requests in flight at once ([start, start + latency)
  intervals, an end before a start at the same instant); `max_output_tokens_per_s`: the most
  tokens in one whole second from the first start.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from typing import TYPE_CHECKING

import typer

from kvlab.clikit import emit_json, live_progress, throttled
from kvlab.errors import KvlabError
from kvlab.models.budget import DEFAULT_VLLM_VERSION
from kvlab.replay.datasets import DATASETS, NUM_PROMPTS, RANDOM_RANGE_RATIO, RESCALED_ARRIVALS_FROM
from kvlab.serve_config import HF_OVERRIDES_HELP, json_flag
from kvlab.sim.args import CHECKPOINT_WEIGHTS_HELP
from kvlab.sim.config import ASYNC_SCHEDULING_HELP, EXPERT_PARALLEL_HELP, RESERVE_FULL_ISL_HELP, SAMPLER_HELP
from kvlab.sim.timing import DEFAULT_TIMING, TIMING_HELP, VLLM_VERSION_HELP, vllm_release

if TYPE_CHECKING:  # numpy and the rest come when a bench runs: `kvlab --help` does not wait for them
    from kvlab.loadtest.plan import SessionPlan
    from kvlab.replay.datasets import BenchRequest
    from kvlab.schema.bench import BenchResult

HORIZON_S = 30 * 24 * 3600.0  # simulated time a bench may take; a request not done by then failed
PERCENTILE = 99  # vLLM's --metric-percentiles default


def timing_source(cfg) -> str:
    """What prices the simulated engine's steps: the cost model's `timing_source` label, else the
    roofline (`kvlab.sim.timing`)."""
    return str(getattr(cfg.cost, "timing_source", "roofline"))


def session_plans(requests: list[BenchRequest]) -> list[SessionPlan]:
    """One single-turn session per request; a shared prefix (--random-prefix-len) is one app's."""
    from kvlab.loadtest.plan import SessionPlan, TurnPlan

    return [SessionPlan(f"bench-{i}", "bench-prefix" if r.prefix_tokens else f"bench-{i}", r.prefix_tokens,
                        (TurnPlan(r.input_tokens, r.output_tokens, 0.0),), r.arrival_s)
            for i, r in enumerate(requests)]


def _stats(name: str, values: list[float]) -> dict[str, float]:
    """mean/median/std/p99 in ms as vLLM computes them (`np.mean(values or 0)`: 0 when empty)."""
    import numpy as np

    a = values or 0
    return {f"mean_{name}_ms": float(np.mean(a)) * 1000, f"median_{name}_ms": float(np.median(a)) * 1000,
            f"std_{name}_ms": float(np.std(a)) * 1000,
            f"p{PERCENTILE}_{name}_ms": float(np.percentile(a, PERCENTILE)) * 1000}


def token_times(record: dict):
    """When each of a replay record's output tokens reached the client (seconds from the run's start):
    its first token at start + TTFT, then one inter-token latency after the other."""
    import numpy as np

    return record["start_ts"] + record["ttft_s"] + np.concatenate(([0.0], np.cumsum(record["itl_s"] or [])))


def tpots(records: list[dict]) -> list[float]:
    """vLLM's time per output token of each record with more than one: (e2e - TTFT) / (tokens - 1)."""
    return [(r["e2e_s"] - r["ttft_s"]) / (r["completion_tokens"] - 1) for r in records if r["completion_tokens"] > 1]


def _peaks(done: list[dict]) -> tuple[float, int]:
    """vLLM's max_output_tokens_per_s (tokens per whole second from the first start) and
    max_concurrent_requests (sweep over [start, start + latency), ends first on ties)."""
    import numpy as np

    if not done:
        return 0.0, 0
    first = min(r["start_ts"] for r in done)
    last = max(r["start_ts"] + r["e2e_s"] for r in done)
    seconds = int(np.ceil(last - first)) + 1
    tokens = np.zeros(seconds)
    for r in done:
        buckets = (token_times(r) - first).astype(np.int64)
        buckets = buckets[(buckets >= 0) & (buckets < seconds)]
        np.add.at(tokens, buckets, 1)
    events = sorted([(r["start_ts"], 1) for r in done] + [(r["start_ts"] + r["e2e_s"], -1) for r in done])
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return float(tokens.max()), peak


def bench_metrics(records: list[dict], chat: bool = False) -> dict:
    """vLLM's result fields from the replay's per-request records (start_ts, ttft_s, itl_s, e2e_s,
    prompt_tokens, completion_tokens, error_kind), times in seconds from the start of the run.
    `chat`: the requests went to /v1/chat/completions, whose stream opens with a chunk of the assistant's
    role and no content, sent with the first token's chunk (`vllm/entrypoints/openai/serving_chat.py`,
    `first_iteration`); vLLM's bench client takes the TTFT at that chunk and an inter-token latency at
    every later chunk with choices (`async_request_openai_chat_completions` in
    `vllm/benchmarks/lib/endpoint_request_func.py`, 0.11 and 0.32 alike), so a chat reply of n tokens has n
    gaps, the first about 0, where a completion's has n - 1 (TPOT is unchanged: (latency - TTFT) / (n - 1))."""
    done = [r for r in records if r["error_kind"] is None]
    ends = [r["start_ts"] + (r["e2e_s"] or 0.0) for r in records]
    duration = max(ends) if ends else 0.0
    if duration <= 0:
        errors = Counter(r["error_kind"] for r in records if r["error_kind"])
        why = {"context_length": "the prompt is longer than --max-model-len",
               "max_tokens": "--output-len (max_tokens) is greater than --max-model-len"}
        if errors and not done:
            kinds = "; ".join(f"{n} {why.get(k, k)}" for k, n in errors.most_common())
            raise KvlabError(f"all {len(records)} requests failed, as vLLM would refuse them ({kinds})")
        raise KvlabError("the benchmark took no simulated time: no request was served")
    total_in = sum(r["prompt_tokens"] for r in done)
    total_out = sum(r["completion_tokens"] for r in done)
    opening = [0.0] if chat else []  # the role chunk to the first token's chunk: one message after the other
    itls = [gap for r in done if r["completion_tokens"] for gap in opening + list(r["itl_s"] or [])]
    peak_tokens, peak_requests = _peaks(done)
    return {
        "duration": duration, "completed": len(done), "failed": len(records) - len(done),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(done) / duration, "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "max_output_tokens_per_s": peak_tokens, "max_concurrent_requests": peak_requests,
        **_stats("ttft", [r["ttft_s"] for r in done]), **_stats("tpot", tpots(done)), **_stats("itl", itls),
        **_stats("e2el", [r["e2e_s"] for r in done]),
    }


WARM_GAP_S = 1.0  # idle simulated time between two runs of a --warm-runs bench
MAX_WARM_RUNS = 10
# vllm bench serve's --endpoint-type values kvlab simulates: /v1/completions (openai, and vllm, its
# older name for the same client) and /v1/chat/completions (openai-chat)
ENDPOINT_TYPES = ("openai", "vllm", "openai-chat")


def _shifted(plans: list[SessionPlan], by_s: float) -> list[SessionPlan]:
    import dataclasses

    return [dataclasses.replace(p, start_offset_s=p.start_offset_s + by_s) for p in plans]


def _warm_offset(model: str, gpu: str, cfg, plans: list[SessionPlan], warm_runs: int,
                 max_concurrency: int | None, chat: bool = False) -> tuple[list[SessionPlan], float]:
    """The bench's requests after `warm_runs` earlier runs of the same requests on the same engine,
    each sent WARM_GAP_S after the one before has ended (the engine and its prefix cache kept, as on
    a server not restarted between `vllm bench serve` runs); the sessions and when the last run starts.
    Each earlier run's end is simulated, not guessed: the runs before it are replayed with it."""
    from kvlab.replay.run import run_offline

    played: list[SessionPlan] = []
    start = 0.0
    for _ in range(warm_runs):
        played += _shifted(plans, start)
        res = run_offline(model, gpu, played, HORIZON_S, config=cfg, scrape_interval_s=HORIZON_S,
                          max_in_flight=max_concurrency, chat=chat)
        ends = [r["start_ts"] + (r["e2e_s"] or 0.0) for r in res.records]
        start = max(ends) + WARM_GAP_S
    return played + _shifted(plans, start), start


def run_bench(model: str, gpu: str, *, dataset: str = "random", input_len: int | None = None,
              output_len: int | None = None, num_prompts: int = NUM_PROMPTS, request_rate: float = math.inf,
              max_concurrency: int | None = None, seed: int = 0, burstiness: float = 1.0,
              random_range_ratio: float = RANDOM_RANGE_RATIO, random_prefix_len: int = 0,
              warm_runs: int = 0, config=None, on_progress=None, endpoint_type: str = "openai",
              total_input_tokens: int | None = None, total_output_tokens: int | None = None,
              **engine_args) -> BenchResult:
    """`vllm bench serve` against MODEL served by the simulated vLLM on GPU preset `gpu`
    (`engine_args`: vLLM's serve flags as `build_config` keywords, or a built `config`);
    on_progress(simulated s, requests ended) as each request ends. `warm_runs` N: the results of
    the (N+1)-th run of the same requests on a server not restarted in between (vLLM's datasets
    draw the same prompts for one --seed, so the earlier runs leave them in the prefix cache); N = 0
    is a freshly started server. `endpoint_type`: openai or vllm (/v1/completions), or openai-chat
    (/v1/chat/completions), as vLLM's --endpoint-type. `total_output_tokens` / `total_input_tokens`:
    the replies / prompts scaled to that total (a published run's printed totals: its replies ended
    at EOS; `kvlab.replay.datasets`)."""
    from kvlab.replay.datasets import bench_requests
    from kvlab.replay.run import run_offline
    from kvlab.schema.bench import BenchResult
    from kvlab.sim.config import build_config

    if max_concurrency is not None and max_concurrency <= 0:
        raise KvlabError("--max-concurrency must be greater than 0")  # vLLM's message
    if endpoint_type not in ENDPOINT_TYPES:
        raise KvlabError(f"--endpoint-type must be one of {', '.join(ENDPOINT_TYPES)}, got {endpoint_type!r}")
    if not 0 <= warm_runs <= MAX_WARM_RUNS:
        raise KvlabError(f"--warm-runs must be 0 to {MAX_WARM_RUNS}, got {warm_runs}")
    cfg = config or build_config(model, gpu, **engine_args)
    requests = bench_requests(dataset, num_prompts, input_len, output_len, request_rate, seed,
                              range_ratio=random_range_ratio, prefix_len=random_prefix_len, burstiness=burstiness,
                              total_input_tokens=total_input_tokens, total_output_tokens=total_output_tokens,
                              rescaled_arrivals=vllm_release(cfg.vllm_version) >= RESCALED_ARRIVALS_FROM)
    chat = endpoint_type == "openai-chat"
    endpoint_type = "openai-chat" if chat else "openai"
    plans, start = session_plans(requests), 0.0
    if warm_runs:
        plans, start = _warm_offset(model, gpu, cfg, plans, warm_runs, max_concurrency, chat)
    res = run_offline(model, gpu, plans, HORIZON_S, config=cfg, scrape_interval_s=HORIZON_S,
                      max_in_flight=max_concurrency, on_progress=on_progress, chat=chat)
    records = res.records
    if warm_runs:  # the last run's requests, on its own clock (each is sent at or after its start)
        records = [{**r, "start_ts": r["start_ts"] - start} for r in records if r["start_ts"] >= start]
    preemptions = (sum(r["num_preemptions"] for r in records) if warm_runs
                   else res.results.num_preemptions)
    cap = cfg.capacity
    return BenchResult(
        model_id=model, gpu=cfg.gpu.name, timing_source=timing_source(cfg), host_source=cfg.host_source(),
        dataset_name=dataset,
        num_prompts=num_prompts, request_rate="inf" if math.isinf(request_rate) else request_rate,
        burstiness=burstiness, max_concurrency=max_concurrency, seed=seed,
        tensor_parallel_size=cfg.tensor_parallel_size, enable_expert_parallel=cfg.expert_parallel,
        dtype=cfg.dtype, quantization=cap.quantization,
        kv_cache_dtype=cfg.kv_cache_dtype, max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens, num_gpu_blocks=cap.num_blocks,
        block_size=cap.block_size, vllm_version=cfg.vllm_version, sampler=cfg.sampler,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        api_server_count=cfg.api_server_count, enable_prefix_caching=cfg.enable_prefix_caching,
        scheduler_reserve_full_isl=cfg.scheduler_reserve_full_isl, async_scheduling=cfg.async_scheduling,
        enforce_eager=bool(cfg.serve is not None and cfg.serve.enforce_eager),
        warm_runs=warm_runs, endpoint_type=endpoint_type, prompts_total=total_input_tokens,
        replies_total=total_output_tokens,
        num_preemptions=preemptions,
        **bench_metrics(records, chat),
    )


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise KvlabError(f"--request-rate takes requests per second or inf, got {text!r}") from None
    if not rate > 0:
        raise KvlabError(f"--request-rate must be positive or inf, got {text!r}")
    return rate


BENCH_HELP = (
    "Run `vllm bench serve` against MODEL on the simulated vLLM on --gpu, in virtual time (seconds, not "
    "minutes): vLLM's requests (random dataset lengths and Poisson arrivals as vLLM draws them from --seed), "
    "its --max-concurrency semaphore and its result names, plus the timing source of the simulated steps. "
    "--dataset sharegpt is a LENGTH DISTRIBUTION fitted to published ShareGPT figures, not the dataset "
    "(see kvlab.replay.datasets). All results are simulated.")


def bench_cmd(
    model: str = typer.Argument(..., help="Card name, local folder / config.json, or Hugging Face id"),
    gpu: str = typer.Option(..., "--gpu", help="GPU preset to simulate (kvlab gpus)"),
    dataset: str = typer.Option("random", "--dataset", "--dataset-name",
                                help="random (vLLM's), or sharegpt: the dataset's own prompt and reply lengths (not its text)"),
    input_len: Optional[int] = typer.Option(None, "--input-len", "--random-input-len",
                                            help="random: prompt tokens (default 1024)"),
    output_len: Optional[int] = typer.Option(None, "--output-len", "--random-output-len",
                                             help="Output tokens (random default 128; sharegpt: its own lengths)"),
    num_prompts: int = typer.Option(NUM_PROMPTS, "--num-prompts"),
    request_rate: str = typer.Option("inf", "--request-rate", help="Requests/s (Poisson), or inf: all at once"),
    max_concurrency: Optional[int] = typer.Option(None, "--max-concurrency", help="Requests in flight at most"),
    seed: int = typer.Option(0, "--seed"),
    burstiness: float = typer.Option(1.0, "--burstiness", help="Gamma shape of the arrival gaps (1: Poisson)"),
    random_range_ratio: float = typer.Option(RANDOM_RANGE_RATIO, "--random-range-ratio"),
    random_prefix_len: int = typer.Option(0, "--random-prefix-len", help="random: tokens every prompt shares"),
    endpoint_type: str = typer.Option("openai", "--endpoint-type", "--backend", help=(
        "openai or vllm (/v1/completions), or openai-chat (/v1/chat/completions: vLLM 0.11.0 and releases before 0.9.2 "
        "parse the model's chat template on every chat request, on the API server)")),
    dtype: Optional[str] = typer.Option(None, "--dtype"),
    quantization: Optional[str] = typer.Option(None, "--quantization", "-q"),
    kv_cache_dtype: str = typer.Option("auto", "--kv-cache-dtype"),
    tp: int = typer.Option(1, "--tensor-parallel-size", "-tp"),
    expert_parallel: bool = typer.Option(False, "--enable-expert-parallel/--no-enable-expert-parallel", "-ep/ ",
                                         help=EXPERT_PARALLEL_HELP),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len"),
    max_num_seqs: Optional[int] = typer.Option(None, "--max-num-seqs"),
    max_num_batched_tokens: Optional[int] = typer.Option(None, "--max-num-batched-tokens"),
    gpu_memory_utilization: Optional[float] = typer.Option(None, "--gpu-memory-utilization"),
    api_server_count: Optional[int] = typer.Option(None, "--api-server-count", "-asc"),
    enable_prefix_caching: bool = typer.Option(True, "--enable-prefix-caching/--no-enable-prefix-caching"),
    async_scheduling: Optional[bool] = typer.Option(None, "--async-scheduling/--no-async-scheduling",
                                                    help=ASYNC_SCHEDULING_HELP),
    scheduler_reserve_full_isl: Optional[bool] = typer.Option(
        None, "--scheduler-reserve-full-isl/--no-scheduler-reserve-full-isl", help=RESERVE_FULL_ISL_HELP),
    hf_overrides: Optional[str] = typer.Option(None, "--hf-overrides", help=HF_OVERRIDES_HELP),
    enforce_eager: Optional[bool] = typer.Option(None, "--enforce-eager/--no-enforce-eager",
                                                 help="No CUDA graphs: sized by the memory model (no graph memory), "
                                                      "step times not simulated (priced as under CUDA graphs)"),
    warm_runs: int = typer.Option(0, "--warm-runs", rich_help_panel="kvlab options", help=(
        "Results of the run after N earlier runs of the same benchmark on a server not restarted in between: "
        "vLLM's datasets draw the same prompts for one --seed, so those runs leave them in the prefix cache "
        "(0: a freshly started server)")),
    total_output_tokens: Optional[int] = typer.Option(None, "--total-output-tokens", rich_help_panel="kvlab options",
                                                      help=(
        "Replies end early so that they total N tokens, each cut by the same share: replays a published run whose "
        "replies stopped at EOS (no ignore_eos: vLLM 0.11.0's client on random, where 0.32's sets it; any on "
        "sharegpt) from its 'Total generated tokens'. The simulated model never emits EOS")),
    total_input_tokens: Optional[int] = typer.Option(None, "--total-input-tokens", rich_help_panel="kvlab options",
                                                     help=(
        "Prompts scaled by one share (after --random-prefix-len) so that they total N tokens: replays a published "
        "run's 'Total input tokens' (sharegpt here draws the dataset's lengths, not the very prompts vLLM's seed picks)")),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the result record (JSON) here"),
    as_json: bool = typer.Option(False, "--json", help="Print the result record as one JSON object"),
    timing: str = typer.Option(DEFAULT_TIMING, "--timing", rich_help_panel="kvlab options", help=TIMING_HELP),
    vllm_version: str = typer.Option(DEFAULT_VLLM_VERSION, "--vllm-version", rich_help_panel="kvlab options",
                                     help=VLLM_VERSION_HELP + "; and its bench client's Poisson schedule (before 0.10: "
                                     "the first request at time 0, the gaps not rescaled to N / rate)"),
    sampler: Optional[str] = typer.Option(None, "--sampler", rich_help_panel="kvlab options", help=SAMPLER_HELP,
                                          show_default=False),
    checkpoint_weights: Optional[str] = typer.Option(None, "--checkpoint-weights", metavar="FORMAT",
                                                     rich_help_panel="kvlab options", help=CHECKPOINT_WEIGHTS_HELP,
                                                     show_default=False),
    data_parallel_size: int = typer.Option(1, "--data-parallel-size", "-dp",
                                           help="Not simulated: above 1 refused (simulate one rank)"),
) -> None:
    from kvlab.serve_config import options_config
    from kvlab.sim.args import checkpoint_fields, warn_not_simulated
    from kvlab.sim.config import build_config

    if dataset not in DATASETS:
        raise KvlabError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if data_parallel_size > 1:
        # one engine would take every rank's requests: its figures would not be the server's
        raise KvlabError(f"-dp {data_parallel_size}: data parallelism is not simulated (vLLM's load balancer "
                         "across engines is not modelled); simulate one rank with its share of the load "
                         f"(--num-prompts and --max-concurrency or --request-rate divided by {data_parallel_size})")
    wall0 = time.perf_counter()
    config = build_config(options_config(
        model, weights=checkpoint_fields(checkpoint_weights, quantization), dtype=dtype,
        kv_cache_dtype=kv_cache_dtype, tensor_parallel_size=tp,
        enable_expert_parallel=expert_parallel,
        max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
        gpu_memory_utilization=gpu_memory_utilization, api_server_count=api_server_count, enforce_eager=enforce_eager,
        hf_overrides=json_flag(hf_overrides, "--hf-overrides")),
        gpu, timing=timing, vllm_version=vllm_version, enable_prefix_caching=enable_prefix_caching,
        scheduler_reserve_full_isl=scheduler_reserve_full_isl, async_scheduling=async_scheduling, sampler=sampler)
    warn_not_simulated(config.serve, "kvlab sim bench")
    with live_progress(as_json, bar=True) as progress:
        task = progress.add_task("sim bench: requests ended", total=num_prompts * (warm_runs + 1))

        def show(sim_s: float, requests: int) -> None:
            progress.update(task, completed=requests,
                            description=f"sim bench: {sim_s:,.1f} simulated s, requests ended")

        result = run_bench(model, gpu, dataset=dataset, input_len=input_len, output_len=output_len,
                           num_prompts=num_prompts, request_rate=_rate(request_rate), max_concurrency=max_concurrency,
                           seed=seed, burstiness=burstiness, random_range_ratio=random_range_ratio,
                           random_prefix_len=random_prefix_len, warm_runs=warm_runs, config=config,
                           endpoint_type=endpoint_type, total_input_tokens=total_input_tokens,
                           total_output_tokens=total_output_tokens,
                           on_progress=throttled(show))
    if out is not None:
        result.write(out)
    if as_json:
        emit_json(result.to_data())
        return
    _print_result(result, time.perf_counter() - wall0)


def _print_result(r: BenchResult, wall_s: float) -> None:
    """vLLM's result block, labelled simulated."""
    line = "{:<40} {:<10}".format
    num = "{:<40} {:<10.2f}".format
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result (simulated) ", n=50, c="="))
    print(line("Successful requests:", r.completed))
    print(line("Failed requests:", r.failed))
    if r.max_concurrency is not None:
        print(line("Maximum request concurrency:", r.max_concurrency))
    if r.request_rate != "inf":
        print(num("Request rate configured (RPS):", r.request_rate))
    print(num("Benchmark duration (s):", r.duration))
    print(line("Total input tokens:", r.total_input_tokens))
    print(line("Total generated tokens:", r.total_output_tokens))
    print(num("Request throughput (req/s):", r.request_throughput))
    print(num("Output token throughput (tok/s):", r.output_throughput))
    print(num("Peak output token throughput (tok/s):", r.max_output_tokens_per_s))
    print(num("Peak concurrent requests:", r.max_concurrent_requests))
    print(num("Total token throughput (tok/s):", r.total_token_throughput))
    for key, name, header in (("ttft", "TTFT", "Time to First Token"),
                              ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
                              ("itl", "ITL", "Inter-token Latency")):
        print("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        print(num(f"Mean {name} (ms):", getattr(r, f"mean_{key}_ms")))
        print(num(f"Median {name} (ms):", getattr(r, f"median_{key}_ms")))
        print(num(f"P{PERCENTILE} {name} (ms):", getattr(r, f"p{PERCENTILE}_{key}_ms")))
    print("=" * 50)
    warm = f"after {r.warm_runs} earlier run{'s' if r.warm_runs > 1 else ''} of it on the same server; " if r.warm_runs else ""
    scaled = " and ".join(f"{what} scaled to {n:,} tokens (--total-{flag}-tokens)" for what, flag, n in
                          (("prompts", "input", r.prompts_total), ("replies", "output", r.replies_total)) if n)
    print(f"simulated: {r.model_id} on {r.gpu} x{r.tensor_parallel_size}, step times: {r.timing_source}; "
          + (f"outside the steps: {r.host_source}; " if r.host_source else "")
          + f"{warm}{scaled + '; ' if scaled else ''}{r.num_preemptions} preemptions; {wall_s:.1f} s wall")
