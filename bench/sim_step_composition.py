"""Where a simulated run's time goes, step by step (a diagnosis tool for the validation table).

A published run of bench/published_runs.yaml, mapped to a `kvlab sim bench` run as
bench/sim_validation.py maps it (`map_run`), is simulated once with every engine step recorded:

- steps with prefill chunks (mixed steps: the chunks plus the decode rows scheduled with them) and
  pure decode steps: how many, tokens per step, rows per step, seconds, milliseconds per step;
- under the measured kernel tables (`kvlab.sim.kernels.KernelTiming`), the GPU terms of the mixed
  steps (non-attention ops at all the step's tokens, context attention of the chunks, generation
  attention of the decode rows) and of the pure decode steps, and the host time of all steps;
- the prefill rate the simulator assumes: prefill tokens over the mixed steps' time;
- the simulated figures beside the published ones, with the error.

`--gpu-scale K` is a WHAT-IF, not a fitted constant: every step's GPU time (its time less its host
time) is multiplied by K, the host time kept, and the run simulated again: a published run whose
figures all come within a few per cent at one K ran on a device K times slower than the tables'
(in both compute-bound prefill and memory-bound decode steps), not on a different schedule.

All figures printed are simulated, except the column marked published (bench/published_runs.yaml).

Run: `python bench/sim_step_composition.py RUN_ID [--timing auto|kernels|roofline] [--gpu-scale K]`
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import published_runs  # noqa: E402  (bench/published_runs.py)
import sim_validation  # noqa: E402  (bench/sim_validation.py: the published-run mapping)

from kvlab.errors import KvlabError  # noqa: E402
from kvlab.sim import timing as sim_timing  # noqa: E402
from kvlab.sim.timing import StepWork  # noqa: E402

# Published figure -> the `kvlab sim bench` result field it is compared with.
RESULT_FIELDS = {"duration_s": "duration", "throughput_tok_s": "total_token_throughput", "ttft_ms": "mean_ttft_ms",
                 "tpot_ms": "mean_tpot_ms", "input_throughput": None}
TERMS = ("non_attention", "context_attention", "generation_attention")


@dataclass
class Kind:
    """The steps of one kind (mixed or pure decode), summed."""

    steps: int = 0
    tokens: int = 0  # tokens computed (prefill chunks plus decode rows)
    prefill_tokens: int = 0
    rows: int = 0  # scheduled requests, summed over steps
    seconds: float = 0.0
    host_s: float = 0.0
    terms_ms: dict = field(default_factory=lambda: dict.fromkeys(TERMS, 0.0))

    def add(self, tokens: int, prefill: int, rows: int, seconds: float, host: float, terms: dict | None) -> None:
        self.steps += 1
        self.tokens += tokens
        self.prefill_tokens += prefill
        self.rows += rows
        self.seconds += seconds
        self.host_s += host
        for k, v in (terms or {}).items():
            self.terms_ms[k] += v


class StepRecorder:
    """Wraps a step backend (`step_time_s`, `decode_step_s`) and records every step it prices,
    its GPU time times `gpu_scale` (1: as priced). Everything else is the backend's."""

    def __init__(self, cost, gpu_scale: float = 1.0):
        self._cost, self.gpu_scale = cost, gpu_scale
        self.mixed, self.decode = Kind(), Kind()
        self.step_tokens: dict[int, int] = {}  # mixed steps per token count (multiples of 1,024, rounded down)

    def __getattr__(self, name):
        return getattr(self._cost, name)

    def _terms(self, w: StepWork) -> dict | None:
        return self._cost.breakdown_ms(w) if hasattr(self._cost, "breakdown_ms") else None

    def step_time_s(self, w: StepWork) -> float:
        s = self._cost.step_time_s(w)
        host = self._cost.host_s(w.requests)
        s = (s - host) * self.gpu_scale + host
        decodes = w.num_decodes if w.num_decodes >= 0 else (w.requests if not w.prefill_pairs else w.requests - 1)
        if w.chunks or w.prefill_pairs:
            self.mixed.add(w.tokens, w.tokens - decodes, w.requests, s, host, self._terms(w))
            self.step_tokens[w.tokens // 1024 * 1024] = self.step_tokens.get(w.tokens // 1024 * 1024, 0) + 1
        else:
            self.decode.add(w.tokens, 0, w.requests, s, host, self._terms(w))
        return s

    def decode_step_s(self, num_seqs: int, kv_tokens: int) -> float:
        s = self._cost.decode_step_s(num_seqs, kv_tokens)
        host = self._cost.host_s(num_seqs)
        s = (s - host) * self.gpu_scale + host
        w = StepWork(num_seqs, num_seqs, num_seqs, kv_tokens, kv_tokens, 0, 0, num_seqs, ())
        self.decode.add(num_seqs, 0, num_seqs, s, host, self._terms(w))
        return s


@dataclass
class Composition:
    run_id: str
    bench: sim_validation.BenchRun
    config: dict  # the simulated engine's scheduler and KV figures
    timing_source: str
    recorder: StepRecorder
    result: dict  # the `kvlab sim bench` result record's data
    published: dict  # published name -> value


def compose(run_id: str, timing: str = sim_timing.DEFAULT_TIMING, gpu_scale: float = 1.0,
            num_prompts: int | None = None) -> Composition:
    """Simulate published run `run_id` with every step recorded (`num_prompts` replaces the run's
    count, for a quick look; the run's stated token totals shrink or grow with it)."""
    if not gpu_scale > 0:
        raise KvlabError(f"--gpu-scale must be positive, got {gpu_scale}")
    pub = published_runs.load()
    run = pub.by_id().get(run_id)
    if run is None:
        raise KvlabError(f"no published run {run_id!r} in {published_runs.PATH.name}")
    bench = sim_validation.map_run(run)
    if not isinstance(bench, sim_validation.BenchRun):
        raise KvlabError(f"{run_id}: kvlab cannot model it: {bench}")
    if num_prompts is not None and "closed_loop" in bench.workload:
        raise KvlabError(f"{run_id}: a closed-loop window has no prompt count (--num-prompts does not apply)")
    if num_prompts is not None:
        share = num_prompts / bench.workload["num_prompts"]
        totals = {k: max(round(v * share), num_prompts) for k, v in bench.workload.items()
                  if k in ("total_input_tokens", "total_output_tokens")}
        bench = dataclasses.replace(bench, workload={**bench.workload, "num_prompts": num_prompts, **totals})
    res, cfg = sim_validation.run_simulated(bench, timing, lambda cost: StepRecorder(cost, gpu_scale))
    recorder = cfg.cost
    config = {"max_num_seqs": cfg.max_num_seqs, "max_num_batched_tokens": cfg.max_num_batched_tokens,
              "kv_cache_tokens": cfg.num_blocks * cfg.block_size}
    return Composition(run_id, bench, config, res.timing_source, recorder, sim_validation.simulated_figures(res, bench),
                       run.measured.figures())


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def report(c: Composition) -> str:
    r, b = c.recorder, c.bench
    lines = [f"# {c.run_id}: step composition (simulated{'' if r.gpu_scale == 1 else f'; WHAT-IF: GPU time x {r.gpu_scale:g}'})",
             f"model {b.model} on {b.gpu}, flags {b.serve}, workload {b.workload}",
             f"engine: max_num_seqs {c.config['max_num_seqs']}, max_num_batched_tokens "
             f"{c.config['max_num_batched_tokens']}, KV cache {c.config['kv_cache_tokens']:,} tokens; "
             f"preemptions {c.result.get('num_preemptions', 0)}",
             f"timing source: {c.timing_source}", ""]
    total = r.mixed.seconds + r.decode.seconds
    lines.append(f"steps: {r.mixed.steps + r.decode.steps:,}, {total:.2f} s of steps "
                 f"(run duration {c.result['duration']:.2f} s), host time {r.mixed.host_s + r.decode.host_s:.2f} s; "
                 f"peak output {c.result['max_output_tokens_per_s']:,.0f} tok/s")
    for name, k in (("mixed (prefill chunks + decode rows)", r.mixed), ("pure decode", r.decode)):
        if not k.steps:
            lines.append(f"- {name}: none")
            continue
        lines.append(f"- {name}: {k.steps:,} steps, {k.tokens:,} tokens ({k.prefill_tokens:,} prefill), "
                     f"{k.seconds:.2f} s; per step {k.tokens / k.steps:,.0f} tokens, {k.rows / k.steps:.0f} rows, "
                     f"{k.seconds / k.steps * 1e3:.2f} ms")
        if any(k.terms_ms.values()):
            terms = ", ".join(f"{t.replace('_', ' ')} {v / 1e3 * r.gpu_scale:.2f} s" for t, v in k.terms_ms.items())
            lines.append(f"  GPU terms (kernel tables{'' if r.gpu_scale == 1 else ', scaled'}): {terms}; host {k.host_s:.2f} s")
    if r.mixed.steps:
        lines.append(f"prefill rate in mixed steps: {r.mixed.prefill_tokens / r.mixed.seconds:,.0f} prefill tok/s "
                     f"({r.mixed.tokens / r.mixed.seconds:,.0f} tok/s with their decode rows)")
        lines.append("mixed steps by tokens (1,024-token bins): "
                     + ", ".join(f"{t:,}+: {n}" for t, n in sorted(r.step_tokens.items())))
    lines += ["", "| figure | published | simulated | error |", "|---|---:|---:|---:|"]
    for name, ref in c.published.items():
        fld = RESULT_FIELDS.get(name, name)
        if fld is None or fld not in c.result:
            continue
        sim = float(c.result[fld])
        lines.append(f"| {name} | {_num(ref)} | {_num(sim)} | {sim_validation._err(sim, ref)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_id", help="a run id of bench/published_runs.yaml")
    p.add_argument("--timing", default=sim_timing.DEFAULT_TIMING, help="step-time backend (auto, kernels, roofline)")
    p.add_argument("--gpu-scale", type=float, default=1.0,
                   help="WHAT-IF: multiply every step's GPU time by this (host time kept); 1 = as priced")
    args = p.parse_args(argv)
    try:
        print(report(compose(args.run_id, args.timing, args.gpu_scale)))
    except KvlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
