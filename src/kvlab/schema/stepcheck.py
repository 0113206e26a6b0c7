"""The record of `kvlab sim check-log`: a vLLM server's own stats lines against kvlab's simulated engine."""

from __future__ import annotations

from typing import ClassVar

from kvlab.schema import Part, Record, figure


class CheckedLine(Part):
    """One decode-dominated stats line: what vLLM measured and what the simulator prices at its batch."""

    stamp: str | None  # the line's "MM-DD HH:MM:SS"
    running: int = figure("measured", description="Running: the snapshot at the line")
    waiting: int = figure("measured")
    kv_cache_usage: float = figure("measured", description="GPU KV cache usage, a fraction")
    measured_gen_tok_s: float = figure("measured", unit="tok/s", description="Avg generation throughput")
    context_per_request: int = figure("computed", unit="tokens", description="from the usage, less half a block a request")
    simulated_step_ms: float = figure("simulated", unit="ms", description="a pure-decode step at that batch and context")
    simulated_gen_tok_s: float = figure("simulated", unit="tok/s", description="running / the simulated step")
    error: float = figure("computed", description="simulated / measured generation throughput - 1")
    note: str = ""


class StepCheckResult(Record):
    """Every stats line of one server log, the decode-dominated ones priced by the simulator
    (`kvlab.sim.stepcheck`)."""

    KIND: ClassVar[str] = "sim-check-log"
    VERSION: ClassVar[int] = 1

    log: str
    model: str
    gpu: str
    vllm_version: str  # the release simulated (the log's, unless --vllm-version was given)
    timing_source: str
    host_source: str
    kv_cache_tokens: int = figure("measured", unit="tokens", description="the cache the lines' usage is a share of")
    kv_cache_source: str  # the log's "KV cache size" line, or the memory model's prediction where the log has none
    stats_lines: int = figure("measured", description="V1 stats lines in the log")
    lines: list[CheckedLine]  # the scored ones, in the log's order
    unscored: dict[str, int]  # why the other lines were not priced -> how many
    within_25pct: int = figure("computed")
    median_error: float | None = figure("computed")
