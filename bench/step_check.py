"""Decode steps under load, checked against vLLM's own periodic stats lines as published.

vLLM's engine logs, every 10 s, the tokens it generated per second over the interval with a
snapshot of its running requests and KV-cache usage:

    Engine 000: Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 2345.6 tokens/s,
    Running: 128 reqs, Waiting: 0 reqs, GPU KV cache usage: 35.2%, Prefix cache hit rate: 0.0%

In a decode-dominated interval that is the engine's step rate at a known batch: each step gives
every running request one token, so generation throughput = running / step time. The running
requests' context follows from the usage: the blocks held, `usage x usable blocks`, hold the
requests' tokens, less half a block each on average (the last block is partly filled). This check
prices the same step with the simulator's own step-time backend (`cost.decode_step_s`, the engine's
hot path for pure-decode steps, host time included) and compares the throughputs. It checks the
kernel tables' decode steps at large batches, under real load, on servers the benchmark rows of
bench/published_runs.yaml score (published log lines, bench/published_steps.yaml: their sources there).

Declared before any row was priced (2026-12-06, session 32):
- every row is a check: **no constant is fitted on them**, so there is no train split;
- a row is scored when its line is vLLM V1's, decoding dominates the interval (prompt throughput at
  most `DECODE_DOMINATED` of the generation throughput: the prefill tokens' share of the interval's
  work is then small for these models), at least `MIN_RUNNING` requests run, and nothing in the
  source's setup is outside what kvlab models (speculative decoding, LoRA, images, --enforce-eager:
  the row's `cannot_model`);
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
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sim_validation as sv  # noqa: E402  (bench/sim_validation.py: the published runs' model and GPU maps)

from kvlab.errors import KvlabError  # noqa: E402
from kvlab.io import read_mapping  # noqa: E402
from kvlab.schema import figure  # noqa: E402
from kvlab.serve_config import options_config  # noqa: E402
from kvlab.sim.config import build_config  # noqa: E402

PATH = Path(__file__).with_name("published_steps.yaml")
# The published runs' models (bench/sim_validation.py MODELS), and those only these lines serve.
MODELS = {**sv.MODELS,
          "Qwen/Qwen2-7B-Instruct": ("qwen2.5-7b", None, "Qwen2-7B has Qwen2.5-7B's layers (config.json: hidden 3584, 28 "
                                     "layers, 28 heads / 4 KV heads, intermediate 18944, vocab 152064)")}
DECODE_DOMINATED = 0.10  # prompt throughput / generation throughput at most this
MIN_RUNNING = 8
FULL_USAGE = 0.95  # a row's note: preemptions likely (not a scoring rule)

# vLLM V1's LoggingStatLogger line (vllm/v1/metrics/loggers.py): "GPU" or, on other platforms, the device's name
V1_LINE = re.compile(
    r"Avg prompt throughput: (?P<prompt>[\d.]+) tokens/s, Avg generation throughput: (?P<gen>[\d.]+) tokens/s, "
    r"Running: (?P<running>\d+) reqs?, Waiting: (?P<waiting>\d+) reqs?, \w+ KV cache usage: (?P<usage>[\d.]+)%"
    r"(?:, Prefix cache hit rate: (?P<hit>[\d.]+)%)?")
# V0's (vllm/engine/metrics.py): Swapped and Pending instead of Waiting
V0_LINE = re.compile(r"Avg prompt throughput: [\d.]+ tokens/s, Avg generation throughput: [\d.]+ tokens/s, "
                     r"Running: \d+ reqs?, Swapped: \d+ reqs?, Pending: \d+ reqs?")


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
class Parsed:
    prompt: float
    gen: float
    running: int
    waiting: int
    usage: float  # fraction
    hit: float | None  # fraction


@dataclass
class Checked:
    row: StepRow
    parsed: Parsed | None
    reason: str | None  # not scored: why
    sim_gen: float | None = None  # simulated generation tokens/s
    step_ms: float | None = None
    context: int | None = None  # mean context per running request
    blocks_source: str = ""
    timing_source: str = ""
    sim_gen_measured_host: float | None = None  # the same step with the measured host time (for comparison only)
    previous_running: int | None = None  # the same run's previous stats line's Running (the batch moved)

    @property
    def error(self) -> float | None:
        return None if self.sim_gen is None else self.sim_gen / self.parsed.gen - 1

    @property
    def error_measured_host(self) -> float | None:
        return None if self.sim_gen_measured_host is None else self.sim_gen_measured_host / self.parsed.gen - 1


def load(path: str | Path = PATH) -> PublishedSteps:
    try:
        pub = PublishedSteps.model_validate(read_mapping(path, "the published stats lines"))
    except ValidationError as e:
        raise KvlabError(f"{path}: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
    ids = [r.id for r in pub.rows]
    if len(set(ids)) != len(ids):
        raise KvlabError(f"{path}: duplicate ids")
    return pub


def parse(line: str) -> Parsed | None:
    m = V1_LINE.search(line)
    if not m:
        return None
    hit = m["hit"]
    return Parsed(float(m["prompt"]), float(m["gen"]), int(m["running"]), int(m["waiting"]),
                  float(m["usage"]) / 100, None if hit is None else float(hit) / 100)


def check(row: StepRow) -> Checked:
    p = parse(row.line)
    if p is None:
        why = "a V0 engine's line (Swapped/Pending): not the V1 engine kvlab simulates" if V0_LINE.search(row.line) \
            else "not vLLM's periodic stats line"
        return Checked(row, None, why)
    if row.cannot_model:
        return Checked(row, p, row.cannot_model)
    if p.running < MIN_RUNNING:
        return Checked(row, p, f"{p.running} running requests (fewer than {MIN_RUNNING})")
    if p.prompt > DECODE_DOMINATED * p.gen:
        return Checked(row, p, f"prefill in the interval ({p.prompt:,.0f} prompt tokens/s against {p.gen:,.0f} generated)")
    if p.usage <= 0:
        return Checked(row, p, "no KV cache in use")
    if row.model not in MODELS:
        return Checked(row, p, f"no kvlab card or config for {row.model}")
    if row.gpu not in sv.GPUS:
        return Checked(row, p, f"no kvlab GPU preset for {row.gpu}")
    model, checkpoint_format, _ = MODELS[row.model]
    serve: dict = {"tensor_parallel_size": row.tp}
    if checkpoint_format:
        serve["quantization"] = checkpoint_format
    elif row.quantization:
        if row.quantization not in sv.QUANTIZATION:
            return Checked(row, p, f"no kvlab weight format for --quantization {row.quantization}")
        serve["quantization"] = sv.QUANTIZATION[row.quantization]
    if row.kv_cache_dtype not in (None, "auto"):
        serve["kv_cache_dtype"] = row.kv_cache_dtype
    if row.model in sv.NATIVE_MAX_MODEL_LEN:
        serve["max_model_len"] = sv.NATIVE_MAX_MODEL_LEN[row.model]
    for flag in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization"):
        if getattr(row, flag) is not None:
            serve[flag] = getattr(row, flag)
    release = row.vllm_version if sv.vllm_release(row.vllm_version) else sv.DEFAULT_VLLM_VERSION
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg = build_config(options_config(sv._model_path(model, Path(tmp)), **serve), sv.GPUS[row.gpu],
                               vllm_version=release)
        except KvlabError as e:
            return Checked(row, p, f"kvlab refuses it: {e}")
    block = cfg.capacity.block_size
    if row.kv_cache_tokens is None and row.gpu_memory_utilization is None:
        return Checked(row, p, "the KV cache's size is neither in the source's log nor follows from flags it states")
    if row.kv_cache_tokens is not None:
        usable = row.kv_cache_tokens // block
        source = f"KV cache {row.kv_cache_tokens:,} tokens (the source's log)"
    else:
        usable = cfg.capacity.num_blocks - 1
        source = f"KV cache {usable * block:,} tokens (predicted by the memory model)"
    held = p.usage * usable * block
    context = max(held - p.running * block / 2, p.running)
    if p.hit:
        source += f"; prefix hits {p.hit:.0%}: context a lower bound if running requests share blocks"
    step_s = cfg.cost.decode_step_s(p.running, round(context))
    with sv.host_measured(), tempfile.TemporaryDirectory() as tmp:  # the comparison: nothing is chosen by it
        alt = build_config(options_config(sv._model_path(model, Path(tmp)), **serve), sv.GPUS[row.gpu],
                           vllm_version=release)
    alt_s = alt.cost.decode_step_s(p.running, round(context))
    if p.waiting and p.usage >= FULL_USAGE:
        source += ("; KV cache full with requests waiting: a preempted request's recomputation is not in the prompt "
                   "throughput (vLLM counts a request's prompt once, at its first token)")
    return Checked(row, p, None, p.running / step_s, 1000 * step_s, round(context / p.running), source,
                   cfg.cost.timing_source, p.running / alt_s)


def link_runs(results: list[Checked]) -> None:
    """Each line's previous line of the same run: its Running, where the batch moved between them."""
    prev: Checked | None = None
    for c in results:
        if prev is not None and prev.row.run == c.row.run and prev.parsed and c.parsed:
            c.previous_running = prev.parsed.running
        prev = c


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def summary(scored: list[Checked], error) -> str:
    errs = [error(c) for c in scored]
    within = sum(abs(e) <= 0.25 for e in errs)
    return (f"within ±25 %: {within} of {len(errs)} ({within / len(errs):.0%}); median error {100 * _median(errs):+.1f} %; "
            f"simulated faster than published on {sum(e > 0 for e in errs)}")


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
                       f"{f'{c.parsed.gen:,.1f}' if c.parsed else '—'} | — | — | — | — | not scored: {c.reason} |")
        else:
            out.append(f"| {r.id} | {r.gpu} x{r.tp} | {r.vllm_version} | {running} | {c.context:,} | "
                       f"{c.parsed.gen:,.1f} | {c.sim_gen:,.1f} | {100 * c.error:+.1f} % | "
                       f"{100 * c.error_measured_host:+.1f} % | {c.step_ms:.1f} ms | {c.blocks_source}; {c.timing_source} |")
    scored = [c for c in results if c.reason is None]
    out.append("")
    out.append(f"- scored: {len(scored)} of {len(results)} rows (not scored: {len(results) - len(scored)}, each with its reason)")
    if scored:
        out.append(f"- at the simulator's host time ({host_words()}): {summary(scored, lambda c: c.error)}")
        out.append(f"- for comparison only, at the measured host time (bench/engine_core_host.py; nothing is chosen by "
                   f"these rows): {summary(scored, lambda c: c.error_measured_host)}")
    return "\n".join(out)


def host_words() -> str:
    from kvlab.sim import timing

    if timing.HOST_FITTED is None:
        return "measured"
    step, per_req = timing.HOST_FITTED
    return f"fitted on the benchmark table's train rows, {1e3 * step:.2f} ms per step + {1e6 * per_req:.1f} us per request"


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
            print(json.dumps({"id": c.row.id, "scored": c.reason is None, "reason": c.reason,
                              "published_gen_tok_s": c.parsed.gen if c.parsed else None,
                              "simulated_gen_tok_s": c.sim_gen, "error": c.error, "step_ms": c.step_ms,
                              "error_measured_host": c.error_measured_host, "previous_running": c.previous_running,
                              "context_per_request": c.context, "timing_source": c.timing_source}))
    else:
        print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
