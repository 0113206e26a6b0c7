"""How fast does `kvlab sim run` sweep? Target: 50 configs x 10 simulated minutes in under 60 s on
2 cores.

The sweep: 5 models x 2 KV dtypes x 5 user counts, on an H100, each config 600 simulated seconds of
closed-loop agents (8 turns over a 2,000-token shared system prompt, 400 tokens in and 200 out per
turn, 2 s think time, +-30 % jitter), with every record and metric sample written to disk (Parquet,
like `kvlab sim run`). Two worker processes, one per core. Prints one JSON object: wall seconds for
the sweep, CPU seconds per config, simulated engine steps and requests, and a CPU-speed probe
(10M-iteration Python loop) so that runs on differently loaded machines can be compared.

Run: `python bench/sim_speed.py [--configs N] [--duration-s S] [--workers W]`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

MODELS = ("deepseek-v2-lite", "llama-3.1-8b", "qwen2.5-7b", "qwen3-8b", "mistral-7b")
KV_DTYPES = ("auto", "fp8")
USERS = (16, 32, 64, 96, 128)


def _spread(x: float) -> dict:
    return {"dist": "uniform", "low": 0.7 * x, "high": 1.3 * x}


# The workload model Locust plays (kvlab.loadtest.workload), sized as described above.
WORKLOAD = {
    "name": "sim-speed", "apps": {"count": 1, "system_tokens": 2000},
    "session": {"turns": 8, "task_tokens": _spread(400), "tool_result_tokens": _spread(400),
                "max_tokens": _spread(200), "think_time_s": _spread(2.0)},
    "limits": {"max_context_tokens": 32000},
}


def one(job: tuple) -> dict:
    from kvlab.loadtest.workload import Workload
    from kvlab.sim.config import build_config
    from kvlab.replay.run import run_offline

    model, kv, users, duration_s, out = job
    cpu0, wall0 = time.process_time(), time.perf_counter()
    cfg = build_config(model, "h100", kv_cache_dtype=kv, max_model_len=32768)
    res = run_offline(model, "h100", Workload.model_validate(WORKLOAD), duration_s, concurrency=users, config=cfg,
                      out_dir=Path(out) / f"{model}-{kv}-{users}")
    r = res.results
    return {"model": model, "kv_cache_dtype": kv, "users": users, "cpu_s": time.process_time() - cpu0,
            "wall_s": time.perf_counter() - wall0, "engine_steps": r.engine_steps,
            "requests": r.requests_completed, "output_tokens_per_s": r.output_tokens_per_s,
            "num_preemptions": r.num_preemptions, "timing_source": r.timing_source}


def cpu_probe_s() -> float:
    t = time.process_time()
    x = 0
    for i in range(10_000_000):
        x += i
    return time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", type=int, default=50)
    ap.add_argument("--duration-s", type=float, default=600.0)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    grid = list(itertools.product(MODELS, KV_DTYPES, USERS))[:a.configs]
    probe = cpu_probe_s()
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        # the largest user counts first (they cost the most), so the sweep does not end with one
        # worker running a large config alone; rows are reported in the grid's order
        order = sorted(range(len(grid)), key=lambda i: -grid[i][2])
        with Pool(a.workers) as pool:
            done = pool.map(one, [(*grid[i], a.duration_s, out) for i in order], chunksize=1)
        rows = [r for _, r in sorted(zip(order, done))]
        wall = time.perf_counter() - t0
    cpu = [r["cpu_s"] for r in rows]
    print(json.dumps({
        "configs": len(rows), "simulated_s_each": a.duration_s, "workers": a.workers, "sweep_wall_s": round(wall, 1),
        "cpu_s_per_config_mean": round(sum(cpu) / len(cpu), 2), "cpu_s_per_config_max": round(max(cpu), 2),
        "engine_steps_total": sum(r["engine_steps"] for r in rows),
        "requests_total": sum(r["requests"] for r in rows),
        "cpu_probe_10M_loop_s": round(probe, 2),
        "timing_sources": sorted({r["timing_source"] for r in rows}), "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
