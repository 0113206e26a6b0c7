"""Does kvlab's simulated scheduler schedule what vLLM's own scheduler schedules? Step by step.

Random scenarios (seeded): 10-60 requests arriving over time, prompts of 1-300 tokens, 60 % of them
behind one of three shared prefixes (prefix-cache hits), 1-120 output tokens each, on a KV cache of
30-120 blocks of 16 tokens (preemptions under pressure), with max_num_seqs, max_num_batched_tokens,
chunked prefill (off in a quarter of them), max_model_len and prefix caching drawn per scenario.
vLLM's V1 `Scheduler` runs each one through bench/vllm_scheduler_trace.py, under the Python of any
vLLM install
(`--vllm-python`); kvlab's engine (`kvlab.sim.engine.Engine`, simulating that release:
`--vllm-version`, default the one installed there) runs the same requests. A scenario conforms when
every step schedules the same requests with the same token counts and preempts the same requests.
Exits 1 if any scenario differs, printing its first differing step. `--vllm-async` runs vLLM's
AsyncScheduler instead (the default on GPUs from vLLM 0.14) against kvlab's async scheduling, and
compares the steps that schedule work (an async engine core's empty steps, which take the previous
step's outputs, are not steps of kvlab's).

`--burst N` runs one scenario at a published burst's scale instead (`burst_scenario`: N ShareGPT-shaped
prompts at once on the KV cache of gpustack's Qwen3-32B A100 run, where hundreds of requests are
preempted after their first token).

Run: `python bench/scheduler_conformance.py [--vllm-python PATH] [--scenarios N] [--seed S]
[--burst N] [--vllm-async [--kvlab-sync]]`.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
BLOCK_SIZE = 16


def scenario(seed: int) -> dict:
    """One scenario for bench/vllm_scheduler_trace.py's `trace` (and `kvlab_trace`)."""
    rng = random.Random(seed)
    prefixes = [[1000 + k] * rng.randint(0, 120) for k in range(3)]
    max_model_len = rng.choice([512, 1024, 4096])
    requests, step = [], 0
    for i in range(rng.randint(10, 60)):
        prefix = rng.choice(prefixes) if rng.random() < 0.6 else []
        prompt = (prefix + [i + 1] * rng.randint(1, 300))[:max_model_len - 1]  # vLLM refuses longer ones up front
        step += rng.choice([0, 0, 0, 1, 2, 5, 10])
        requests.append([str(i), prompt, rng.randint(1, 120), step])
    max_num_seqs = rng.choice([4, 8, 16, 32])
    s = {"requests": requests, "num_blocks": rng.randint(30, 120), "max_num_seqs": max_num_seqs,
         "max_num_batched_tokens": max(rng.choice([64, 128, 256, 512, 2048]), max_num_seqs),
         "max_model_len": max_model_len, "enable_prefix_caching": rng.random() < 0.8, "block_size": BLOCK_SIZE}
    # a quarter without chunked prefill (vLLM then needs max_num_batched_tokens >= max_model_len)
    s["enable_chunked_prefill"] = rng.random() >= 0.25
    if not s["enable_chunked_prefill"]:
        s["max_num_batched_tokens"] = max(s["max_num_batched_tokens"], max_model_len)
    return s


def burst_scenario(num_prompts: int = 1000) -> dict:
    """A burst at the scale of gpustack's Qwen3-32B ShareGPT run on one A100 (bench/published_runs.yaml,
    gpustack-q32-a100-bf16-sharegpt, vLLM 0.11.0): `num_prompts` requests at once with kvlab's ShareGPT
    lengths scaled to that run's printed totals (217,393 prompt, 201,396 generated tokens for 1,000), on the
    KV cache kvlab's memory model gives that run (2,217 blocks of 16), at the A100's defaults for the API
    server (max_num_seqs 256, max_num_batched_tokens 2,048), prefix caching and chunked prefill on: the
    KV cache holds about a tenth of the burst, so requests are preempted, hundreds after their first token."""
    import math

    from kvlab.replay.datasets import bench_requests

    scale = num_prompts / 1000
    reqs = bench_requests("sharegpt", num_prompts, None, None, math.inf, 0, total_input_tokens=round(217_393 * scale),
                          total_output_tokens=round(201_396 * scale))
    requests = [[str(i), [10 + (i * 7 + j) % 5000 for j in range(r.prompt_tokens)], r.output_tokens, 0]
                for i, r in enumerate(reqs)]
    return {"requests": requests, "num_blocks": 2217, "max_num_seqs": 256, "max_num_batched_tokens": 2048,
            "max_model_len": 32768, "enable_prefix_caching": True, "block_size": BLOCK_SIZE,
            "enable_chunked_prefill": True}


def kvlab_trace(s: dict, vllm_version: str) -> list:
    """The steps kvlab's simulated engine runs for scenario `s`, in vllm_scheduler_trace's form."""
    from kvlab.sim.config import build_config
    from kvlab.sim.engine import Engine
    from kvlab.sim.sequence import Sequence

    cfg = build_config("llama-3.1-8b", "h100", num_gpu_blocks_override=s["num_blocks"],
                       max_num_seqs=s["max_num_seqs"], max_num_batched_tokens=s["max_num_batched_tokens"],
                       max_model_len=s["max_model_len"], enable_prefix_caching=s["enable_prefix_caching"],
                       enable_chunked_prefill=s["enable_chunked_prefill"], vllm_version=vllm_version,
                       async_scheduling=s.get("async_scheduling", False))
    assert cfg.block_size == s["block_size"], cfg.block_size
    eng = Engine(cfg)
    pending = sorted(s["requests"], key=lambda r: r[3])
    steps: list = []
    step, t = 0, 0.0
    while pending or eng.has_work:
        while pending and pending[0][3] <= step:
            rid, prompt, max_tokens, _ = pending.pop(0)
            eng.add_request(Sequence(rid, list(prompt), max_tokens, t))
        step += 1
        plan = eng.schedule(t)
        if plan is None:
            steps.append([{}, []])
            if not pending:
                break  # nothing left, or nothing schedulable ever again (where vLLM's trace ends too)
            continue
        scheduled = {seq.seq_id: 1 for seq in eng.scheduler.decoding()}
        scheduled.update((seq.seq_id, n) for seq, n in plan.out.chunks)
        steps.append([scheduled, sorted(seq.seq_id for seq in plan.out.preempted)])
        t += 0.01
        eng.complete(plan, t)
    while steps and not steps[-1][0]:
        steps.pop()
    return steps


def first_difference(vllm_steps: list, kvlab_steps: list) -> int | None:
    """The first step where the two differ (None: identical)."""
    for i, (a, b) in enumerate(zip(vllm_steps, kvlab_steps)):
        if [a[0], sorted(a[1])] != [b[0], sorted(b[1])]:
            return i
    return None if len(vllm_steps) == len(kvlab_steps) else min(len(vllm_steps), len(kvlab_steps))


def busy_steps(steps: list) -> list:
    """The steps that schedule work, each with the preemptions of the empty steps just before it."""
    out, carried = [], []
    for scheduled, preempted in steps:
        if scheduled:
            out.append([scheduled, sorted(carried + list(preempted))])
            carried = []
        else:
            carried += preempted
    return out


def compare(scenarios: list[dict], vllm_traces: list, vllm_version: str, busy_only: bool = False) -> list[dict]:
    """Per scenario: steps, preemptions (vLLM's) and the first differing step (None where identical);
    `busy_only`: the steps that schedule work only (an async engine's idle steps mean something else),
    with kvlab's step count beside vLLM's."""
    rows = []
    for s, v in zip(scenarios, vllm_traces):
        k = kvlab_trace(s, vllm_version)
        if busy_only:
            v, k = busy_steps(v), busy_steps(k)
        i = first_difference(v, k)
        rows.append({"steps": len(v), "kvlab_steps": len(k), "preemptions": sum(len(p) for _, p in v),
                     "first_difference": i,
                     "vllm": v[i] if i is not None and i < len(v) else None,
                     "kvlab": k[i] if i is not None and i < len(k) else None})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vllm-python", default=sys.executable,
                    help="the Python of the vLLM install to check against (default: this one)")
    ap.add_argument("--vllm-version", default=None, help="the release kvlab simulates (default: the installed one's)")
    ap.add_argument("--scenarios", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0, help="the first scenario's seed")
    ap.add_argument("--vllm-async", action="store_true", help=(
        "run vLLM's AsyncScheduler (--async-scheduling, the default on GPUs from 0.14) and kvlab's async "
        "scheduling, and compare the steps that schedule work"))
    ap.add_argument("--burst", type=int, default=None, metavar="N", help=(
        "one scenario instead: N ShareGPT-shaped prompts at once on the KV cache of gpustack's Qwen3-32B A100 run "
        "(burst_scenario; 1000: that run's scale)"))
    ap.add_argument("--kvlab-sync", action="store_true", help=(
        "with --vllm-async: kvlab schedules synchronously (what --no-async-scheduling runs), to measure the difference"))
    a = ap.parse_args()
    if a.burst is not None and a.burst < 1:
        ap.error(f"--burst {a.burst}: give a number of prompts, 1 or more")
    scenarios = [burst_scenario(a.burst)] if a.burst else [scenario(a.seed + i) for i in range(a.scenarios)]
    if a.vllm_async:
        scenarios = [{**s, "async_scheduling": True} for s in scenarios]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "scenarios.json", Path(tmp) / "traces.json"
        src.write_text(json.dumps(scenarios))
        proc = subprocess.run([a.vllm_python, str(BENCH / "vllm_scheduler_trace.py"), str(src), str(dst)],
                              capture_output=True, text=True)
        if proc.returncode or not dst.exists():
            sys.exit(f"error: {a.vllm_python} bench/vllm_scheduler_trace.py failed: "
                     f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
        got = json.loads(dst.read_text())
    version = a.vllm_version or got["vllm_version"]
    kvlab_side = [{**s, "async_scheduling": False} for s in scenarios] if a.kvlab_sync else scenarios
    rows = compare(kvlab_side, got["traces"], version, busy_only=a.vllm_async)
    differing = [(a.seed + i, r) for i, r in enumerate(rows) if r["first_difference"] is not None]
    for seed, r in differing:
        print(f"scenario {seed}: first difference at step {r['first_difference']} of {r['steps']}: "
              f"vLLM {r['vllm']}, kvlab {r['kvlab']}")
    print(json.dumps({"vllm": got["vllm_version"] + (" (AsyncScheduler)" if a.vllm_async else ""),
                      "kvlab_simulates": version + (" (synchronous)" if a.kvlab_sync else ""), "scenarios": len(rows),
                      "identical": len(rows) - len(differing),
                      "steps": sum(r["steps"] for r in rows),
                      "kvlab_steps": sum(r["kvlab_steps"] for r in rows),
                      "preemptions": sum(r["preemptions"] for r in rows)}))
    sys.exit(1 if differing else 0)


if __name__ == "__main__":
    main()
