"""What the load generator measured: a run's summary (kvlab.loadtest.summary), its goodput scored
once against the SLO that governs it, and load.json (kvlab.loadtest.runner)."""

from __future__ import annotations

from typing import Any

from kvlab.schema import Part, Record, figure
from kvlab.schema.slo import SLO, SLOFrom


class Percentiles(Part):
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float


class Goodput(Part):
    """Requests and sessions per minute that met `slo` (the one score of a run; `slo_from` says
    whose SLO governed it: the experiment spec's when it gives one, else the workload's)."""

    source: str = "measured"
    slo: SLO
    slo_from: SLOFrom = "workload"
    duration_s: float = figure("measured", unit="s")
    requests: int = figure("served")
    requests_ok: int = figure("served")
    requests_met_slo: int = figure("served")
    slo_attainment: float | None = figure("served")
    requests_per_min: float | None = figure("served", unit="requests/min")
    request_goodput_per_min: float | None = figure("served", unit="requests/min")
    sessions_finished: int = figure("served")
    sessions_met_slo: int = figure("served")
    sessions_unfinished: int = figure("served")
    sessions_per_min: float | None = figure("served", unit="sessions/min")
    session_goodput_per_min: float | None = figure("served", unit="sessions/min")


class LoadSummary(Part):
    """One run's figures from its per-request records, measured on the SSE stream."""

    source: str = "measured"
    requests: int = figure("served")
    requests_ok: int = figure("served")
    probes: int = figure("served")
    errors: dict[str, int] = {}  # by kind
    probe_errors: dict[str, int] = {}
    sessions: int = figure("served")
    duration_s: float = figure("measured", unit="s")
    requests_per_s: float | None = figure("served", unit="requests/s")
    output_tokens_per_s: float | None = figure("served", unit="tokens/s")
    ttft_s: Percentiles | None = figure("served", unit="s")
    tpot_s: Percentiles | None = figure("served", unit="s")
    itl_s: Percentiles | None = figure("served", unit="s")
    e2e_s: Percentiles | None = figure("served", unit="s")
    prompt_tokens: int | None = figure("served", unit="tokens")
    completion_tokens: int | None = figure("served", unit="tokens")
    cached_tokens: int | None = figure("served", unit="tokens")
    calibration_error_median: float | None = figure("served")
    goodput: Goodput


class ScheduleStep(Part):
    offset_s: float
    users: int


class LoadRecord(Record):
    """load.json: the Locust command, the shape schedule, the paths of what it wrote, the summary."""

    KIND = "load"
    command: list[str]
    returncode: int
    workload: str
    shape: str
    users: int
    duration_s: float
    workers: int
    shape_schedule: list[ScheduleStep]
    first_request_ts: float | None
    paths: dict[str, str]
    summary: LoadSummary

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        if version != 0:
            return super().upgrade(data, version)
        goodput: dict[str, Any] = (data.get("summary") or {}).get("goodput") or {}
        goodput.setdefault("slo_from", "workload")  # before typed records, load.json was scored with the workload's
        return data
