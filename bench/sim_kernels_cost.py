"""What do measured kernel-table step times cost the simulator, and what do they change?

1. The estimator's per-call cost (aiconfigurator-core's AicEngine), inside and outside its
   measured grid, and KernelTiming's per-step cost once memoised, against the roofline's.
2. One simulated run (bench/sim_speed.py's agent workload, one config) with each backend: wall
   seconds, engine steps, memo hit rate (steps priced from the memo alone) and size, steps per provenance.
3. Llama-3.1-8B on an H100 (bf16) at 1,024 tokens in / 128 out, 16 concurrent requests: a
   prefill step, a decode step and a mixed step, and a closed-loop run's TTFT and TPOT, from the
   kernel tables vs the roofline.

Run: `python bench/sim_kernels_cost.py [--model M] [--users N] [--duration-s S]`. Prints JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvlab import hardware  # noqa: E402
from kvlab.models.cards import card  # noqa: E402
from kvlab.models.weights import weight_format  # noqa: E402
from kvlab.sim import kernels  # noqa: E402
from kvlab.sim.timing import StepWork, step_timing  # noqa: E402


def _us(fn, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return round((time.perf_counter() - t) / n * 1e6, 2)


def decode(n: int, kv: int) -> StepWork:
    return StepWork(n, n, n, kv, kv, 0, 0, n, ())


def prefill(new: int, cached: int = 0, decodes: int = 0, decode_kv: int = 0) -> StepWork:
    return StepWork(new + decodes, 1 + decodes, 1 + decodes, new + cached + decode_kv, decode_kv,
                    new * cached + new * (new + 1) // 2, cached, decodes, ((new, cached),))


def timings(model: str, source: str):
    arch = card(model).arch
    return step_timing(arch, weight_format(None, arch), "bfloat16", "auto", hardware.gpu("h100"), 1, source)


def call_costs(kt) -> dict:
    e = kt._eng
    gen, ctx_other, ctx_attn = kt._gen_attn, kt._ctx_other, kt._ctx_attn
    roof = kt.roofline
    return {
        "estimator_us": {
            "generation_attention_in_grid": _us(lambda i: e.evaluate_generation_ops(gen, 16, 1000 + i, 1.0, 0, None), 2000),
            "generation_attention_beyond_grid": _us(lambda i: e.evaluate_generation_ops(gen, 256, 20000 + i, 1.0, 0, None), 200),
            "non_attention_ops": _us(lambda i: e.evaluate_context_ops(ctx_other, 1, 100 + i, 0, 1.0, None), 1000),
            "context_attention_in_grid": _us(lambda i: e.evaluate_context_ops(ctx_attn, 1, 100 + i, 0, 1.0, None), 1000),
            "context_attention_beyond_grid": _us(lambda i: e.evaluate_context_ops(ctx_attn, 1, 512, 30000 + i, 1.0, None), 200),
            "decode_step_latency": _us(lambda i: e.decode_step_latency(16, 1000 + i, 2, 1.0), 1000),
        },
        "memoised_us": {  # warm: the same shapes as a long run revisits
            "kernels_decode_step_s": _us(lambda i: kt.decode_step_s(16, 16 * 1000 + i % 4096), 200_000),
            "kernels_step_time_s": _us(lambda i: kt.step_time_s(prefill(512, 2048 * (i % 8), 15, 15 * 900)), 100_000),
            "roofline_decode_step_s": _us(lambda i: roof.decode_step_s(16, 16 * 1000 + i % 4096), 200_000),
            "roofline_step_time_s": _us(lambda i: roof.step_time_s(prefill(512, 2048 * (i % 8), 15, 15 * 900)), 100_000),
        },
    }


def simulated_run(model: str, users: int, duration_s: float, source: str) -> dict:
    from sim_speed import WORKLOAD

    from kvlab.loadtest.workload import Workload
    from kvlab.sim.config import build_config
    from kvlab.replay.run import run_offline

    cfg = build_config(model, "h100", max_model_len=32768)
    t0 = time.perf_counter()
    timing = timings(model, source)
    build_s = time.perf_counter() - t0
    timing.reset_counts()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    res = run_offline(model, "h100", Workload.model_validate(WORKLOAD), duration_s, concurrency=users,
                      config=dataclasses.replace(cfg, cost=timing))
    out = {"timing_source": timing.timing_source, "build_s": round(build_s, 2),
           "wall_s": round(time.perf_counter() - wall0, 2), "cpu_s": round(time.process_time() - cpu0, 2),
           "engine_steps": res.results.engine_steps, "output_tokens_per_s": res.results.output_tokens_per_s,
           "provenance_counts": timing.provenance_counts}
    if isinstance(timing, kernels.KernelTiming):
        out.update(memo_hit_rate=round(1 - timing.misses / max(timing.lookups, 1), 4), estimator_calls=timing.calls,
                   steps_priced=timing.lookups, steps_with_estimator_calls=timing.misses,
                   memo_entries=timing.memo_entries)
    return out


def llama_1024_128(kt, roof) -> dict:
    """Step times at 1,024 in / 128 out with 16 concurrent requests (mean decode context 1,088)."""
    s = 1024 + 64
    steps = {"prefill_1024_tokens_ms": prefill(1024), "decode_16_rows_ms": decode(16, 16 * s),
             "mixed_1024_prefill_plus_15_decodes_ms": prefill(1024, 0, 15, 15 * s)}
    return {name: {"kernels": round(kt.step_time_s(w) * 1e3, 3), "kernels_gpu_only": round(kt.gpu_ms(w), 3),
                   "roofline": round(roof.step_time_s(w) * 1e3, 3)} for name, w in steps.items()}


def closed_loop_1024_128(source: str, requests: int = 200) -> dict:
    """16 users, each sending 1,024-token prompts for 128 tokens back to back (no think time)."""
    from kvlab.loadtest.workload import Workload
    from kvlab.sim.config import build_config
    from kvlab.replay.run import run_offline

    wl = Workload.model_validate({
        "name": "random-1024-128", "apps": {"count": 1, "system_tokens": 0},
        "session": {"turns": 1, "task_tokens": 1024, "tool_result_tokens": 0, "max_tokens": 128, "think_time_s": 0},
        "limits": {"max_context_tokens": 4096}})
    cfg = build_config("llama-3.1-8b", "h100", max_model_len=4096, enable_prefix_caching=False)
    timing = timings("llama-3.1-8b", source)
    res = run_offline("llama-3.1-8b", "h100", wl, 60.0, concurrency=16, config=dataclasses.replace(cfg, cost=timing))
    recs = [r for r in res.records if r["error_kind"] is None][:requests]
    ttft = sorted(r["ttft_s"] for r in recs)
    tpot = sorted(r["tpot_s"] for r in recs if r["tpot_s"] is not None)
    return {"requests": len(recs), "median_ttft_ms": round(ttft[len(ttft) // 2] * 1e3, 2),
            "median_tpot_ms": round(tpot[len(tpot) // 2] * 1e3, 3),
            "output_tokens_per_s": res.results.output_tokens_per_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--duration-s", type=float, default=600.0)
    a = ap.parse_args()
    if not kernels.available():
        sys.exit("aiconfigurator-core is not installed: pip install aiconfigurator-core==0.12.0")
    kt, roof = timings("llama-3.1-8b", "kernels"), timings("llama-3.1-8b", "roofline")
    out = {"per_call": call_costs(kt), "llama_3_1_8b_h100_1024_in_128_out_c16": llama_1024_128(kt, roof)}
    out["closed_loop_1024_128_c16"] = {s: closed_loop_1024_128(s) for s in ("kernels", "roofline")}
    out["simulated_run"] = {"model": a.model, "users": a.users, "duration_s": a.duration_s,
                            **{s: simulated_run(a.model, a.users, a.duration_s, s) for s in ("kernels", "roofline")}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
