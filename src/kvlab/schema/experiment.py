"""The records of `kvlab experiment run` (layout in kvlab.experiments.records): run.json, a
repeat's manifest.json, status.json and results.json, a cell's results.json, and the index row.

A repeat's goodput is scored once, by the load run (load.json), against the SLO that governs it:
the spec's where the spec sets `slo:`, else the workload's; results.json carries that score and
says whose SLO it was (client.goodput.slo, client.goodput.slo_from)."""

from __future__ import annotations

from typing import Any, Literal

from kvlab.schema import Part, Record, figure
from kvlab.schema.load import LoadSummary
from kvlab.schema.metrics import MetricsFigures
from kvlab.schema.server import Prediction, ServerFacts

RepeatStatus = Literal["running", "complete", "failed"]


class CellKey(Part):
    """One configuration of a spec (kvlab.experiments.spec.Cell)."""

    model: str
    quant: str  # the profile level
    workload: str
    users: int


class Failure(Part):
    reason: str
    log_tail: list[str] = []


class RunFolder(Record):
    """run.json: the spec a results folder belongs to."""

    KIND = "run"
    spec_name: str
    spec_digest: str
    created_ts: float | None = None

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        return data if version == 0 else super().upgrade(data, version)  # the same keys before schema_version


class Manifest(Record):
    """manifest.json of a repeat: what ran, where and with which versions (argv and env redacted)."""

    KIND = "manifest"
    cell: CellKey
    cell_id: str
    repeat: int
    seed: int
    spec: dict[str, Any]
    spec_digest: str
    engine: str
    engine_reason: str | None
    server_argv: list[str]
    server_env: dict[str, str]
    started_ts: float
    ended_ts: float | None = None
    kvlab_version: str | None
    kvlab_git_commit: str | None
    vllm_version: str | None
    vllm_distribution: str | None
    torch_version: str | None
    transformers_version: str | None
    locust_version: str | None
    python: str | None
    host: dict[str, Any]
    gpu: dict[str, Any]

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        return data if version == 0 else super().upgrade(data, version)


class RepeatHead(Record):
    """What status.json and a repeat's results.json both say: which repeat, how it ended."""

    cell: CellKey
    cell_id: str
    repeat: int
    status: RepeatStatus
    engine: str | None = None
    seed: int | None = None
    failure: Failure | None = None


class Status(RepeatHead):
    """status.json of a repeat: a repeat is complete when this says so (and results.json exists)."""

    KIND = "status"
    started_ts: float | None = None
    ended_ts: float | None = None

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        return data if version == 0 else super().upgrade(data, version)


class Window(Part):
    start_ts: float
    end_ts: float


class Scrapes(Part):
    total: int
    gaps: int
    last_error: str | None = None


class ClientFigures(LoadSummary):
    """The load run's summary (scored once, in load.json) as a repeat records it: errors counted,
    by kind apart, and the mean resident context of a session."""

    errors: int = figure("served")  # type: ignore[assignment]  (the summary's by-kind dict is errors_by_kind)
    errors_by_kind: dict[str, int] = {}
    mean_session_context_tokens: float | None = figure("served", unit="tokens")
    window_s: float = figure("measured", unit="s")  # the scrape window around the load run
    provenance: str = "measured by the load generator on the SSE stream"


class SimTiming(Part):
    """Where a simulated repeat's step times came from: the simulator's timing source
    (`kvlab:sim_timing_info`) and the engine steps the server priced per provenance
    (`kvlab:sim_steps_priced_total` read after the load run: since the server started, its warm-up
    and earlier repeats on the same server included; measured, interpolated, extrapolated, scaled, composed, roofline)."""

    timing_source: str
    # what priced the time outside the steps (host time, API server, request latency: SimConfig.host_source);
    # results written before it, and servers that did not say: None
    host_source: str | None = None
    steps_priced: dict[str, int] = figure("simulated", unit="steps", default={})  # since the server started
    source: str = "read from the simulated engine's /metrics (kvlab:sim_* series)"


class RepeatResults(RepeatHead):
    """results.json of a repeat. A repeat that failed before its load ran has only the failure."""

    KIND = "repeat-results"
    window: Window | None = None
    server: ServerFacts | None = None
    prediction: Prediction | None = None
    metrics: MetricsFigures | None = None
    scrapes: Scrapes | None = None
    client: ClientFigures | None = None
    gpu_price_per_hour: float | None = None
    timing: SimTiming | None = None  # kvlab's simulator only; None on vLLM

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        """Before typed records: a top-level `slo` (the spec's, which scored client.goodput) and a
        `provenance` beside the server facts."""
        if version != 0:
            return super().upgrade(data, version)
        slo = data.pop("slo", None)
        goodput = (data.get("client") or {}).get("goodput")
        if isinstance(goodput, dict):
            goodput.setdefault("slo", slo or {})
            goodput.setdefault("slo_from", "spec")
        if isinstance(data.get("server"), dict):
            server = data["server"]
            server.setdefault("source", server.pop("provenance", None))
        return data


class MeanCI95(Part):
    """Mean over repeats and the 95 % interval of the mean (Student t)."""

    n: int
    mean: float | None
    ci95_low: float | None
    ci95_high: float | None
    stdev: float | None


class CellRepeat(Part):
    repeat: int
    status: RepeatStatus
    dir: str
    failure: Failure | None = None


class CellResults(Record):
    """<cell>/results.json: every repeat's status, the mean and 95 % interval of every numeric
    figure of the complete ones (`client.<figure>`, `metrics.<figure>`, nested keys joined by '.')."""

    KIND = "cell-results"
    cell: CellKey
    cell_id: str
    repeats_planned: int
    repeats_complete: int
    status: Literal["complete", "partial", "failed"]
    repeats: list[CellRepeat]
    aggregate: dict[str, MeanCI95]
    first_complete_repeat: int | None = None  # its figures: repeat-<k>/results.json

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        if version != 0:
            return super().upgrade(data, version)
        first = data.pop("first", None)
        data["first_complete_repeat"] = first.get("repeat") if isinstance(first, dict) else None
        return data


class IndexRow(Part):
    """One repeat as a row of <results>/index.sqlite (its columns are these fields)."""

    spec: str
    cell_id: str
    model: str
    quant: str
    workload: str
    users: int
    repeat: int
    engine: str | None
    status: str
    started_ts: float | None
    ended_ts: float | None
    dir: str
    kv_cache_tokens_reported: int | None = figure("served", unit="tokens")
    kv_cache_tokens_predicted: int | None = figure("predicted", unit="tokens")
    output_tokens_per_s: float | None = figure("served", unit="tokens/s")
    ttft_p50_s: float | None = figure("served", unit="s")
    ttft_p95_s: float | None = figure("served", unit="s")
    itl_p95_s: float | None = figure("served", unit="s")
    requests: int | None = figure("served")
    errors: int | None = figure("served")
    preemptions: float | None = figure("served")
    kv_usage_peak_frac: float | None = figure("served")
    requests_per_min: float | None = figure("served", unit="requests/min")
    goodput_requests_per_min: float | None = figure("served", unit="requests/min")
    slo_from: str | None = None  # whose SLO scored the goodput: spec or workload
    results_json: str | None = None
