"""What the load generator measured: a run's summary (kvlab.loadtest.summary), its goodput scored
once against the SLO that governs it, and load.json (kvlab.loadtest.runner)."""

from __future__ import annotations

from typing import Any, Literal

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
    # the load generator's own health (kvlab.loadtest.runner): the busiest Locust process's CPU,
    # and what the run should not be read without (client queueing, ...)
    client_cpu_busiest: float | None = figure("measured", unit="fraction of one core")
    warnings: list[str] = []


class ScheduleStep(Part):
    offset_s: float
    users: int


class ClientCPU(Part):
    """One Locust process's CPU during the run, sampled about once a second by the runner (psutil),
    as a fraction of one core (a process runs its users on one core: 1.0 is saturated)."""

    source: str = "measured"
    role: Literal["standalone", "master", "worker"]
    pid: int
    samples: int = figure("measured")
    mean: float | None = figure("measured", unit="fraction of one core")
    p90: float | None = figure("measured", unit="fraction of one core")
    max: float | None = figure("measured", unit="fraction of one core")
    cpu_s: float = figure("measured", unit="s")  # user + system over the run


class PromptSizing(Part):
    """How prompt sizes (token counts) became words: calibrated on the server's usage (probes A, B,
    C), or without probes (--no-calibrate) from a local tokenizer or a stated tokens-per-word."""

    method: Literal["calibrated", "tokenizer", "tokens_per_word"]
    tokenizer: str | None = None
    tokens_per_word: float | None = None
    message_tokens: float | None = None
    base_tokens: float | None = None
    source: str


class LoadRecord(Record):
    """load.json: the Locust command, the shape schedule, the paths of what it wrote, the summary,
    how prompts were sized, the client's own CPU, warnings, and why the run failed (if it did)."""

    KIND = "load"
    VERSION = 2
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
    prompt_sizing: PromptSizing | None = None  # None: no calibration finished (no turn was sized)
    client_cpu: list[ClientCPU] = []
    warnings: list[str] = []
    failure: str | None = None  # a run that stopped on an error retrying cannot cure (calibration)

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        if version == 1:
            return data  # version 2 added prompt_sizing, client_cpu, warnings, failure (all optional)
        if version != 0:
            return super().upgrade(data, version)
        goodput: dict[str, Any] = (data.get("summary") or {}).get("goodput") or {}
        goodput.setdefault("slo_from", "workload")  # before typed records, load.json was scored with the workload's
        return data
