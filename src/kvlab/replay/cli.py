"""`kvlab sim run`: a workload's agent sessions played on the simulated engine in virtual time
(no HTTP), one run or a ladder of user counts."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from kvlab.clikit import emit_json, live_progress, throttled
from kvlab.errors import KvlabError
from kvlab.models.budget import DEFAULT_VLLM_VERSION
from kvlab.serve_config import HF_OVERRIDES_HELP, json_flag
from kvlab.sim.args import CHECKPOINT_WEIGHTS_HELP
from kvlab.sim.config import ASYNC_SCHEDULING_HELP, EXPERT_PARALLEL_HELP, RESERVE_FULL_ISL_HELP, SAMPLER_HELP
from kvlab.sim.timing import DEFAULT_TIMING, TIMING_HELP, VLLM_VERSION_HELP


def _users(spec: str) -> list[int]:
    try:
        users = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise KvlabError(f"--users takes a number or a comma-separated ladder (8,16,32), got {spec!r}") from None
    if not users or min(users) < 1:
        raise KvlabError(f"--users must be positive, got {spec!r}")
    return users


def run_cmd(
    model: str = typer.Argument(..., help="Card name, local folder / config.json, or Hugging Face id"),
    gpu: str = typer.Option(..., "--gpu", help="GPU preset to simulate (kvlab gpus)"),
    duration_s: float = typer.Option(600.0, "--duration-s", help="Simulated seconds per run"),
    users: str = typer.Option("16", "--users", help="Concurrent agent users; a comma list runs a ladder (8,16,32)"),
    workload: str = typer.Option("agent", "--workload", help="Workload profile in loadtest/ (agent, agent-smoke, ...) or a YAML path"),
    spawn_rate: Optional[float] = typer.Option(None, "--spawn-rate", "-r", help="Users started per second (default: the workload's, else all within a second)"),
    seed: int = typer.Option(0, "--seed", help="Workload seed (the sessions Locust plays with --seed)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default results/sim-run-<time>)"),
    scrape_interval_s: float = typer.Option(5.0, "--scrape-interval-s", help="Metric samples every this many simulated seconds"),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len"),
    max_num_seqs: Optional[int] = typer.Option(None, "--max-num-seqs"),
    max_num_batched_tokens: Optional[int] = typer.Option(None, "--max-num-batched-tokens"),
    kv_cache_dtype: str = typer.Option("auto", "--kv-cache-dtype"),
    quantization: Optional[str] = typer.Option(None, "--quantization", "-q"),
    dtype: Optional[str] = typer.Option(None, "--dtype"),
    block_size: Optional[int] = typer.Option(None, "--block-size"),
    gpu_memory_utilization: Optional[float] = typer.Option(None, "--gpu-memory-utilization"),
    kv_cache_memory_bytes: Optional[int] = typer.Option(None, "--kv-cache-memory-bytes"),
    num_gpu_blocks_override: Optional[int] = typer.Option(None, "--num-gpu-blocks-override"),
    enable_prefix_caching: bool = typer.Option(True, "--enable-prefix-caching/--no-enable-prefix-caching"),
    async_scheduling: Optional[bool] = typer.Option(None, "--async-scheduling/--no-async-scheduling",
                                                    help=ASYNC_SCHEDULING_HELP),
    scheduler_reserve_full_isl: Optional[bool] = typer.Option(
        None, "--scheduler-reserve-full-isl/--no-scheduler-reserve-full-isl", help=RESERVE_FULL_ISL_HELP),
    tp: int = typer.Option(1, "--tensor-parallel-size", "-tp"),
    pp: int = typer.Option(1, "--pipeline-parallel-size", "-pp"),
    api_server_count: Optional[int] = typer.Option(None, "--api-server-count", "-asc"),
    attention_backend: Optional[str] = typer.Option(None, "--attention-backend"),
    dp: int = typer.Option(1, "--data-parallel-size", "-dp", help="Sized by the memory model, not simulated"),
    ep: bool = typer.Option(False, "--enable-expert-parallel/--no-enable-expert-parallel", "-ep/ ",
                            help=EXPERT_PARALLEL_HELP),
    speculative_config: Optional[str] = typer.Option(None, "--speculative-config", "-sc",
                                                     help="Sized by the memory model, not simulated"),
    hf_overrides: Optional[str] = typer.Option(None, "--hf-overrides", help=HF_OVERRIDES_HELP),
    enforce_eager: Optional[bool] = typer.Option(None, "--enforce-eager/--no-enforce-eager",
                                       help="No CUDA graphs: sized by the memory model (no graph memory), "
                                            "step times not simulated (priced as under CUDA graphs)"),
    optimization_level: Optional[int] = typer.Option(None, "--optimization-level", "-O",
                                                     help="0: no CUDA graphs (sized as --enforce-eager); "
                                                          "compilation not simulated"),
    compilation_config: Optional[str] = typer.Option(None, "--compilation-config", "-cc",
                                                     help="vLLM's JSON; its cudagraph_mode NONE is sized as "
                                                          "--enforce-eager; compilation not simulated"),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object"),
    timing: str = typer.Option(DEFAULT_TIMING, "--timing", rich_help_panel="kvlab options", help=TIMING_HELP),
    vllm_version: str = typer.Option(DEFAULT_VLLM_VERSION, "--vllm-version", rich_help_panel="kvlab options",
                                     help=VLLM_VERSION_HELP),
    sampler: Optional[str] = typer.Option(None, "--sampler", rich_help_panel="kvlab options", help=SAMPLER_HELP,
                                          show_default=False),
    checkpoint_weights: Optional[str] = typer.Option(None, "--checkpoint-weights", metavar="FORMAT",
                                                     rich_help_panel="kvlab options", help=CHECKPOINT_WEIGHTS_HELP,
                                                     show_default=False),
) -> None:
    """Play a workload's agent sessions (the ones Locust plays) as closed-loop users on the simulated
    engine in virtual time (no HTTP); write per-request records, metric samples and results. A
    --users ladder shows where preemptions start. Like `kvlab load`, a run sends at most the
    workload's load.max_requests requests."""
    from kvlab.loadtest.workload import load_workload, resolve_profile
    from kvlab.replay.run import run_offline
    from kvlab.replay.sessions import predicted_max_users
    from kvlab.schema.replay import SimRunManifest
    from kvlab.serve_config import graph_value_args, options_config
    from kvlab.sim.args import checkpoint_fields, warn_not_simulated
    from kvlab.sim.config import build_config

    ladder = _users(users)
    wl = load_workload(workload)
    serve = options_config(model, weights=checkpoint_fields(checkpoint_weights, quantization), dtype=dtype,
                           max_model_len=max_model_len,
                           max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                           kv_cache_dtype=kv_cache_dtype, block_size=block_size,
                           gpu_memory_utilization=gpu_memory_utilization, kv_cache_memory_bytes=kv_cache_memory_bytes,
                           num_gpu_blocks_override=num_gpu_blocks_override, tensor_parallel_size=tp,
                           pipeline_parallel_size=pp, api_server_count=api_server_count,
                           attention_backend=attention_backend, data_parallel_size=dp, enable_expert_parallel=ep,
                           speculative_config=json_flag(speculative_config),
                           hf_overrides=json_flag(hf_overrides, "--hf-overrides"), enforce_eager=enforce_eager,
                           vllm_args=graph_value_args(optimization_level, compilation_config))
    warn_not_simulated(serve, "kvlab sim run")
    cfg = build_config(serve, gpu, enable_prefix_caching=enable_prefix_caching, timing=timing,
                       vllm_version=vllm_version, scheduler_reserve_full_isl=scheduler_reserve_full_isl,
                       async_scheduling=async_scheduling, sampler=sampler)
    root = out or Path("results") / f"sim-run-{time.strftime('%Y%m%d-%H%M%S')}"
    predicted = predicted_max_users(cfg.num_blocks, cfg.block_size, wl.sessions(seed))
    rows = []
    with live_progress(as_json, bar=True, count=False) as progress:
        for n in ladder:
            folder = root / f"users-{n}" if len(ladder) > 1 else root
            manifest = SimRunManifest(command=["kvlab", *sys.argv[1:]], seed=seed, users=n,
                                      workload={"source": str(resolve_profile(workload)), **wl.model_dump(mode="json")},
                                      spawn_rate=spawn_rate, duration_s=duration_s,
                                      predicted_max_users_without_preemption=predicted)
            task = progress.add_task(f"sim run: {n} users", total=duration_s)

            def show(sim_s: float, requests: int, n=n, task=task) -> None:
                progress.update(task, completed=min(sim_s, duration_s), description=(
                    f"sim run: {n} users, {min(sim_s, duration_s):,.0f}/{duration_s:,.0f} simulated s, "
                    f"{requests:,} requests ended"))

            res = run_offline(model, gpu, wl, duration_s, concurrency=n, seed=seed, spawn_rate=spawn_rate,
                              out_dir=folder, scrape_interval_s=scrape_interval_s, config=cfg, manifest=manifest,
                              max_requests=wl.load.max_requests, on_progress=throttled(show))
            progress.update(task, completed=duration_s)
            rows.append((n, folder, res.results))
    if as_json:
        emit_json({"runs": [{"users": n, "out": str(f), **r.to_data()} for n, f, r in rows]})
        return
    _print_ladder(cfg, rows, predicted)


def _print_ladder(cfg, rows, predicted: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    cap = cfg.capacity
    t = Table(title=f"{cfg.model} on {cfg.gpu.name} x{cap.num_gpus} — simulated agent runs")
    for col in ("users", "requests", "output tok/s", "TTFT p50 s", "TTFT p99 s", "TPOT p50 s", "preemptions",
                "KV usage max", "prefix hits", "wall s"):
        t.add_column(col, justify="right")
    nan = float("nan")
    for n, _, r in rows:
        ttft, tpot = r.ttft_s, r.tpot_s
        t.add_row(str(n), str(r.requests_completed), f"{r.output_tokens_per_s:,.0f}",
                  f"{ttft.p50 if ttft else nan:.3f}", f"{ttft.p99 if ttft else nan:.3f}",
                  f"{tpot.p50 if tpot else nan:.4f}", str(r.num_preemptions),
                  f"{r.kv_cache_usage_max:.1%}", f"{r.prefix_cache_hit_rate:.1%}", f"{r.wall_s:.1f}")
    console.print(t)
    console.print(f"[dim]KV cache: {cap.num_blocks:,} blocks x {cap.block_size} = {cap.num_blocks * cap.block_size:,} "
                  f"tokens (memory model). If the workload's first sessions all held their final contexts at once, "
                  f"preemptions would start above {predicted} users (predicted). All figures simulated.[/dim]")
    for n, folder, _ in rows:
        console.print(f"users {n}: {folder}")


def register(sim_app: typer.Typer) -> None:
    """`run` and `bench` under `kvlab sim` (the app puts them there: kvlab.sim knows nothing of the
    replay)."""
    from kvlab.replay.bench import BENCH_HELP, bench_cmd

    sim_app.command("run")(run_cmd)
    sim_app.command("bench", help=BENCH_HELP)(bench_cmd)
