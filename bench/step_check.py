"""Decode steps under load, checked against vLLM's own periodic stats lines as published.

vLLM's engine logs, every 10 s, the tokens it generated per second over the interval with a
snapshot of its running requests and KV-cache usage:

    Engine 000: Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 2345.6 tokens/s,
    Running: 128 reqs, Waiting: 0 reqs, GPU KV cache usage: 35.2%, Prefix cache hit rate: 0.0%

In a decode-dominated interval that is the engine's step rate at a known batch (each step gives
every running request one token): `kvlab.sim.stepcheck` prices the same step with the simulator's own
step-time backend and compares the throughputs. This script does it for published lines
(bench/published_steps.yaml: the line verbatim, its source and the server's flags), on servers the
benchmark rows of bench/published_runs.yaml do not score, and beside each the same step at the measured
host time (bench/engine_core_host.py), for comparison only.

Declared before any row was priced (2026-12-06, session 32):
- every row is a check: **no constant is fitted on them**, so there is no train split;
- a row is scored when its line is vLLM V1's, decoding dominates the interval and nothing in the
  source's setup is outside what kvlab models (speculative decoding, LoRA, images, --enforce-eager:
  the row's `cannot_model`); the interval's rules, the context and the pricing are
  `kvlab.sim.stepcheck`'s (prompt throughput at most 10 % of the generation throughput, at least 8
  requests running), the same as `kvlab sim check-log` applies to a user's own log;
- the KV cache's size is the one the source's own log states ("GPU KV cache size: N tokens") where
  it does; else the memory model's prediction at the flags the source states, said so in the row;
  a row whose source states neither is not scored;
- shared prefix blocks are held once but read by each request that shares them: where the prefix
  cache hit rate is not 0 the context is a lower bound, said so in the row.

Run: `python bench/step_check.py [PATH] [--json]` (seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sim_validation as sv  # noqa: E402  (bench/sim_validation.py: the published runs' model and GPU maps)

from kvlab.errors import KvlabError  # noqa: E402
from kvlab.io import read_mapping  # noqa: E402
from kvlab.schema import figure  # noqa: E402
from kvlab.serve_config import options_config  # noqa: E402
from kvlab.sim.config import build_config  # noqa: E402
from kvlab.sim.stepcheck import (StatsLine, StepCheck, is_v0_stats_line, parse_stats_line, price,  # noqa: E402
                                 summary, unscored_reason)

PATH = Path(__file__).with_name("published_steps.yaml")
# The published runs' models (bench/sim_validation.py MODELS), and those only these lines serve.
MODELS = {**sv.MODELS,
          "Qwen/Qwen2-7B-Instruct": ("qwen2.5-7b", None, "Qwen2-7B has Qwen2.5-7B's layers (config.json: hidden 3584, 28 "
                                     "layers, 28 heads / 4 KV heads, intermediate 18944, vocab 152064)")}


class StepRow(BaseModel):
    """One published stats line and the server that printed it, as the source states them."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    source_url: str
    locator: str  # where on the page (the comment, the log block)
    run: str  # the benchmark run the line belongs to: its lines, in the file's order, are consecutive
    model: str  # Hugging Face id (a key of bench/sim_validation.py's MODELS)
    gpu: str  # a key of bench/sim_validation.py's GPUS
    tp: int = 1
    vllm_version: str
    quantization: str | None = None  # vLLM's method, as bench/published_runs.yaml spells it
    kv_cache_dtype: str | None = None
    kv_cache_tokens: int | None = figure("measured", unit="tokens", description="the source log's 'GPU KV cache size'")
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float | None = None
    line: str  # verbatim
    cannot_model: str | None = None
    notes: str = ""


class PublishedSteps(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rows: list[StepRow]


@dataclass
class Checked:
    row: StepRow
    parsed: StatsLine | None
    reason: str | None  # not scored: why
    step: StepCheck | None = None  # at the simulator's host time
    blocks_source: str = ""
    timing_source: str = ""
    step_measured_host: StepCheck | None = None  # the same step at the measured host time (for comparison only)
    previous_running: int | None = None  # the same run's previous stats line's Running (the batch moved)

    @property
    def error(self) -> float | None:
        return None if self.step is None else self.step.error

    @property
    def error_measured_host(self) -> float | None:
        return None if self.step_measured_host is None else self.step_measured_host.error


def load(path: str | Path = PATH) -> PublishedSteps:
    try:
        pub = PublishedSteps.model_validate(read_mapping(path, "the published stats lines"))
    except ValidationError as e:
        raise KvlabError(f"{path}: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
    ids = [r.id for r in pub.rows]
    if len(set(ids)) != len(ids):
        raise KvlabError(f"{path}: duplicate ids")
    return pub


def check(row: StepRow) -> Checked:
    p = parse_stats_line(row.line)
    if p is None:
        why = ("a V0 engine's line (Swapped/Pending): not the V1 engine kvlab simulates" if is_v0_stats_line(row.line)
               else "not vLLM's periodic stats line")
        return Checked(row, None, why)
    if row.cannot_model:
        return Checked(row, p, row.cannot_model)
    reason = unscored_reason(p)
    if reason:
        return Checked(row, p, reason)
    mapped = sv.serve_flags(row, MODELS)
    if isinstance(mapped, str):
        return Checked(row, p, mapped)
    if row.gpu not in sv.GPUS:
        return Checked(row, p, f"no kvlab GPU preset for {row.gpu}")
    model, serve, _ = mapped
    if row.kv_cache_tokens is None and row.gpu_memory_utilization is None:
        return Checked(row, p, "the KV cache's size is neither in the source's log nor follows from flags it states")
    release = sv._release(row)

    def config():
        with tempfile.TemporaryDirectory() as tmp:
            return build_config(options_config(sv._model_path(model, Path(tmp)), **serve), sv.GPUS[row.gpu],
                                vllm_version=release)

    try:
        cfg = config()
    except KvlabError as e:
        return Checked(row, p, f"kvlab refuses it: {e}")
    with sv.host_measured():  # the comparison: nothing is chosen by it
        alt = config()
    block = cfg.capacity.block_size
    if row.kv_cache_tokens is not None:
        kv_tokens = row.kv_cache_tokens
        source = f"KV cache {kv_tokens:,} tokens (the source's log)"
    else:
        kv_tokens = cfg.capacity.num_blocks * block  # as vLLM logs the size: every block
        source = f"KV cache {kv_tokens:,} tokens (predicted by the memory model)"
    step = price(cfg.cost, p, kv_tokens, block)
    return Checked(row, p, None, step, "; ".join(filter(None, [source, step.note])), cfg.cost.timing_source,
                   price(alt.cost, p, kv_tokens, block))


def link_runs(results: list[Checked]) -> None:
    """Each line's previous line of the same run: its Running, where the batch moved between them."""
    prev: Checked | None = None
    for c in results:
        if prev is not None and prev.row.run == c.row.run and prev.parsed and c.parsed:
            c.previous_running = prev.parsed.running
        prev = c


def markdown(results: list[Checked]) -> str:
    out = ["| row | GPU | vLLM | running (previous line) | context / request | published gen tok/s | simulated | error | "
           "error, measured host time | step (sim) | notes |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in results:
        r = c.row
        running = "—" if c.parsed is None else f"{c.parsed.running}" + (
            f" ({c.previous_running})" if c.previous_running not in (None, c.parsed.running) else "")
        if c.reason:
            out.append(f"| {r.id} | {r.gpu} x{r.tp} | {r.vllm_version} | {running} | — | "
                       f"{f'{c.parsed.gen_tok_s:,.1f}' if c.parsed else '—'} | — | — | — | — | not scored: {c.reason} |")
        else:
            st = c.step
            out.append(f"| {r.id} | {r.gpu} x{r.tp} | {r.vllm_version} | {running} | {st.context_per_request:,} | "
                       f"{c.parsed.gen_tok_s:,.1f} | {st.sim_gen_tok_s:,.1f} | {100 * c.error:+.1f} % | "
                       f"{100 * c.error_measured_host:+.1f} % | {1000 * st.step_s:.1f} ms | {c.blocks_source}; {c.timing_source} |")
    scored = [c for c in results if c.reason is None]
    out.append("")
    out.append(f"- scored: {len(scored)} of {len(results)} rows (not scored: {len(results) - len(scored)}, each with its reason)")
    if scored:
        out.append(f"- at the simulator's host time ({host_words()}): {summary([c.error for c in scored])}")
        out.append(f"- for comparison only, at the measured host time (bench/engine_core_host.py; nothing is chosen by "
                   f"these rows): {summary([c.error_measured_host for c in scored])}")
    return "\n".join(out)


def host_words() -> str:
    from kvlab.sim import timing

    if not timing.HOST_FITTED:
        return "measured"
    return f"fitted on the benchmark table's train rows, {timing.host_fitted_words()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", nargs="?", default=str(PATH))
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    a = ap.parse_args(argv)
    try:
        results = [check(r) for r in load(a.path).rows]
        link_runs(results)
    except KvlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        for c in results:
            st = c.step
            print(json.dumps({"id": c.row.id, "scored": c.reason is None, "reason": c.reason,
                              "published_gen_tok_s": c.parsed.gen_tok_s if c.parsed else None,
                              "simulated_gen_tok_s": st and st.sim_gen_tok_s, "error": c.error,
                              "step_ms": st and 1000 * st.step_s, "error_measured_host": c.error_measured_host,
                              "previous_running": c.previous_running,
                              "context_per_request": st and st.context_per_request, "timing_source": c.timing_source}))
    else:
        print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
