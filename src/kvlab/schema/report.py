"""The report's rows and report.json. Every figure column declares its source in the type
(measured, predicted, simulated, computed, or `served` = measured on vLLM, simulated on kvlab's
simulated engine); the report's headings and report.json's `columns` are read from here."""

from __future__ import annotations

from typing import Any

from pydantic import create_model

from kvlab.schema import Part, Record, figure


class RepeatRow(Part):
    """One repeat of a results folder (kvlab.analysis.runs), from its records alone."""

    spec: str
    folder: str
    cell_id: str | None
    model: str | None
    quant: str | None  # the profile level
    workload: str | None
    users: int | None
    repeat: int | None
    status: str
    failure: str | None
    engine: str | None
    source: str  # what `served` figures are for this engine: measured or simulated
    timing_source: str | None = None  # kvlab's simulator: what priced its steps (None on vLLM)
    host_source: str | None = None  # and its time outside them (None on vLLM and in records before it)
    attention: str | None = figure("predicted")
    kv_cache_dtype: str | None = figure("served")  # the server's --kv-cache-dtype as it reported it
    kv_cache_dtype_predicted: str | None = figure("predicted")
    weight_format: str | None = figure("predicted")
    kv_bytes_per_token: float | None = figure("predicted", unit="bytes")
    kv_cache_tokens_reported: float | None = figure("served", unit="tokens")
    kv_cache_tokens_predicted: float | None = figure("predicted", unit="tokens")
    num_blocks_reported: float | None = figure("served", unit="blocks")
    num_blocks_predicted: float | None = figure("predicted", unit="blocks")
    block_size: float | None = figure("served", unit="tokens")
    block_size_predicted: float | None = figure("predicted", unit="tokens")
    kv_cache_memory_bytes: float | None = figure("served", unit="bytes")
    kv_budget_bytes_predicted: float | None = figure("predicted", unit="bytes")
    max_concurrency_reported: float | None = figure("served", unit="requests")
    max_concurrency_predicted: float | None = figure("predicted", unit="requests")
    max_model_len: float | None = figure("served", unit="tokens")
    max_model_len_predicted: float | None = figure("predicted", unit="tokens")
    weights_gib_reported: float | None = figure("served", unit="GiB")
    weights_gib_predicted: float | None = figure("predicted", unit="GiB")
    gpu_memory_bytes_predicted: float | None = figure("predicted", unit="bytes")
    gpu_memory_utilization: float | None = None  # the setting the prediction assumed
    num_gpus: int
    gpu: str | None
    window_s: float | None = figure("measured", unit="s")
    requests: float | None = figure("served")
    errors: float | None = figure("served")
    sessions: float | None = figure("served")
    output_tokens_per_s: float | None = figure("served", unit="tokens/s")
    generation_tokens_per_s_server: float | None = figure("served", unit="tokens/s")
    ttft_p50_s: float | None = figure("served", unit="s")
    ttft_p95_s: float | None = figure("served", unit="s")
    ttft_p99_s: float | None = figure("served", unit="s")
    itl_p50_s: float | None = figure("served", unit="s")
    itl_p95_s: float | None = figure("served", unit="s")
    itl_p99_s: float | None = figure("served", unit="s")
    e2e_p50_s: float | None = figure("served", unit="s")
    requests_per_min: float | None = figure("served", unit="requests/min")
    goodput_requests_per_min: float | None = figure("served", unit="requests/min")
    goodput_sessions_per_min: float | None = figure("served", unit="sessions/min")
    sessions_met_slo: float | None = figure("served")
    slo_attainment: float | None = figure("served")
    slo_from: str | None  # whose SLO scored the goodput: spec or workload
    preemptions: float | None = figure("served")
    kv_usage_peak_frac: float | None = figure("served")
    kv_tokens_peak: float | None = figure("served", unit="tokens")
    kv_gib_mean: float | None = figure("served", unit="GiB")
    running_peak: float | None = figure("served", unit="requests")
    waiting_peak: float | None = figure("served", unit="requests")
    prefix_cache_hit_rate: float | None = figure("served")
    mean_session_context_tokens: float | None = figure("served", unit="tokens")
    resident_sessions_peak: float | None = figure("computed", unit="sessions")
    window_start_ts: float | None
    window_end_ts: float | None
    gpu_price_per_hour: float | None
    seed: int | None
    server_argv: str
    vllm_version: str | None
    kvlab_version: str | None
    kvlab_git_commit: str | None
    torch_version: str | None
    transformers_version: str | None
    hardware: str | None
    # a real vLLM's own decode steps (its stats lines) against kvlab's simulated engine of the same
    # configuration: step_check.json (kvlab.sim.stepcheck); None where the repeat has none
    step_check_lines: int | None = figure("computed", unit="lines", default=None)
    step_check_within_25pct: int | None = figure("computed", unit="lines", default=None)
    step_check_median_error: float | None = figure("computed", default=None)


def table_row(name: str, columns: list[str], **derived: str | None) -> type[Part]:
    """A report table's row type: `columns` taken from RepeatRow with their sources (a mean or a
    first value over repeats keeps its source), `derived` columns with the source given (None:
    not a figure)."""
    fields: dict[str, Any] = {}
    declared = RepeatRow.figure_sources()
    for col in columns:
        src = declared.get(col)
        fields[col] = (Any, figure(src, unit=RepeatRow.unit_of(col)) if src else None)
    for col, src in derived.items():
        fields[col] = (Any, figure(src) if src else None)  # type: ignore[arg-type]
    return create_model(name, __base__=Part, **fields)


def resolved(model: type[Part], served: str) -> dict[str, str]:
    """The sources of a row type's figure columns, `served` said as `served` (for the rows' engines:
    "measured", "simulated", or both joined by " / ")."""
    return {n: served if s == "served" else s for n, s in model.figure_sources().items()}


class ReportRecord(Record):
    """report.json: written first marked incomplete, last marked complete (a report cut short says
    so); `columns` names every figure column's source per table."""

    KIND = "report"
    complete: bool
    started: str | None = None
    kvlab_version: str
    baseline: str | None = None
    headline: list[str] = []
    missing: list[str] = []
    images: list[str] = []
    columns: dict[str, dict[str, str]] = {}

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        return data if version == 0 else super().upgrade(data, version)
