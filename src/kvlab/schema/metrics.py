"""A run's server-side figures (kvlab.metrics.figures.RunFigures.to_dict()) and
metrics-summary.json (`kvlab metrics scrape`). `served` figures are measured on vLLM and simulated
on kvlab's simulated engine."""

from __future__ import annotations

from kvlab.schema import Part, Record, figure


class Latency(Part):
    """Server-side latency quantiles of one histogram over the run (seconds)."""

    family: str
    count: float | None = figure("served")
    mean_s: float | None = figure("served", unit="s")
    p50_s: float | None = figure("served", unit="s")
    p90_s: float | None = figure("served", unit="s")
    p95_s: float | None = figure("served", unit="s")
    p99_s: float | None = figure("served", unit="s")


def _served(unit: str | None = None):
    return figure("served", unit=unit)


class MetricsFigures(Part):
    """RunFigures.to_dict(): None where a figure could not be computed (`missing` says why)."""

    model_name: str | None
    engines: list[str] = []
    start_ts: float | None = None
    end_ts: float | None = None
    duration_s: float | None = None
    scrapes: int = 0
    scrape_gaps: int = 0
    counter_resets: int = 0
    block_size: int | None = _served("tokens")
    num_gpu_blocks: int | None = _served("blocks")
    kv_cache_size_tokens: int | None = _served("tokens")
    kv_bytes_per_block: float | None = _served("bytes")
    kv_usage_peak_frac: float | None = _served()
    kv_usage_mean_frac: float | None = _served()
    kv_usage_p95_frac: float | None = _served()
    kv_blocks_peak: float | None = _served("blocks")
    kv_blocks_mean: float | None = _served("blocks")
    kv_blocks_p95: float | None = _served("blocks")
    kv_tokens_peak: float | None = _served("tokens")
    kv_tokens_mean: float | None = _served("tokens")
    kv_tokens_p95: float | None = _served("tokens")
    kv_gib_peak: float | None = _served("GiB")
    kv_gib_mean: float | None = _served("GiB")
    kv_gib_p95: float | None = _served("GiB")
    running_peak: float | None = _served("requests")
    running_mean: float | None = _served("requests")
    waiting_peak: float | None = _served("requests")
    waiting_mean: float | None = _served("requests")
    preemptions: float | None = _served()
    requests_finished: float | None = _served()
    prefix_cache_queries_tokens: float | None = _served("tokens")
    prefix_cache_hits_tokens: float | None = _served("tokens")
    prefix_cache_hit_rate: float | None = _served()
    prompt_tokens: float | None = _served("tokens")
    generation_tokens: float | None = _served("tokens")
    prompt_tokens_per_s: float | None = _served("tokens/s")
    generation_tokens_per_s: float | None = _served("tokens/s")
    ttft: Latency
    itl: Latency
    e2e: Latency
    queue_time: Latency
    mean_session_context_tokens: float | None = figure("measured", unit="tokens")
    resident_sessions_peak: float | None = figure("computed", unit="sessions")
    resident_sessions_mean: float | None = figure("computed", unit="sessions")
    gpu_count: int | None = figure("measured")
    gpu_memory_used_peak_gib: float | None = figure("measured", unit="GiB")
    gpu_utilization_mean_ratio: float | None = figure("measured")
    gpu_power_mean_w: float | None = figure("measured", unit="W")
    provenance: dict[str, str] = {}
    missing: dict[str, list[str]] = {}

    @classmethod
    def from_run(cls, figures) -> "MetricsFigures":
        """From a RunFigures."""
        return cls.model_validate(figures.to_dict())


class MetricsSummary(Record):
    """metrics-summary.json: the scraped URL and the figures per served model name."""

    KIND = "metrics-summary"
    source: str  # the /metrics URL scraped (credentials removed)
    figures: dict[str, MetricsFigures]

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        if version != 0:
            return super().upgrade(data, version)
        return data  # the same layout, before schema_version
