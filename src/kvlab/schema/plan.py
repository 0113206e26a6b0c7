"""plan.json (kvlab.plan.planner.plan): the fleet planned for a number of agents, per config.

Its figures are the planner's: sessions per GPU simulated, HBM per GPU predicted by the memory
model, GPUs, savings and dollars computed from those, as `provenance` says; each planned config
names the simulator's step-time source (`timing_source`)."""

from __future__ import annotations

from typing import Any, Literal

from kvlab.schema import Part, Record, figure
from kvlab.schema.slo import SLO


class PlanInputs(Part):
    workload: dict[str, str]  # name, source (the profile's path)
    agents: int
    calls_per_agent_hour: float
    calls_per_agent_hour_source: str
    gpu: str
    models: list[str]
    quants: list[str]
    slo: SLO
    slo_attainment: float
    gpu_price_per_hour: float | None
    tensor_parallel_size: int
    max_model_len: int
    sim_s: float
    warmup_s: float
    tolerance: float
    seed: int
    serve_args: list[str] = []  # the spec's `vllm serve` flags on top of each level's (plans before them: none)
    vllm_version: str = "0.32"  # the vLLM release simulated (plans written before it: kvlab's default then, 0.32)


def _f(source: str, unit: str | None = None, description: str | None = None) -> Any:
    """A figure every planned config has (figure() alone defaults to None)."""
    return figure(source, unit=unit, description=description, default=...)  # type: ignore[arg-type]


class ProbeStep(Part):
    """One probe of a search (kvlab.plan.search.ProbeLog): a simulated run at `users` sessions."""

    users: int
    stage: Literal["coarse", "fine"]
    sim_s: float = _f("simulated", unit="s")
    attainment: float = _f("simulated", description="share of the judged requests within the SLO")
    margin: float | None = _f("simulated", description="<= 1 meets the SLO; null where requests failed")
    passed: bool
    judged: int = _f("simulated", unit="requests")
    cached: bool
    cpu_s: float = _f("measured", unit="s")


class Search(Part):
    """The search for sessions per replica within the SLO (kvlab.plan.search.SearchResult)."""

    status: Literal["ok", "slo_unmet", "at_cap"]
    sessions_per_replica: int = _f("simulated", unit="sessions")
    missed_at: int | None = _f("simulated", unit="sessions", description="the smallest load above that missed")
    attainment: float | None = _f("simulated")
    probes: list[ProbeStep]
    simulated_cpu_s: float = _f("measured", unit="s")
    reproduce: str  # the `kvlab sim run` command of the probe at the answer


class ProbeFigures(Part):
    """The fine probe at the answer (kvlab.plan.probe.Probe.figures), judged against the SLO."""

    requests_completed: int = _f("simulated", unit="requests")
    output_tokens: int = _f("simulated", unit="tokens")
    calls_per_s: float = _f("simulated", unit="calls/s")
    prompt_tokens_per_s: float = _f("simulated", unit="tok/s")
    output_tokens_per_s: float = _f("simulated", unit="tok/s")
    cached_tokens_per_s: float = _f("simulated", unit="tok/s")
    calls_in_window: int = _f("simulated", unit="calls")
    kv_usage_mean: float = _f("simulated")
    kv_usage_max: float = _f("simulated")
    kv_in_use_bytes_mean: float = _f("simulated", unit="bytes")
    running_mean: float = _f("simulated", unit="requests")
    preemptions: float = _f("simulated")
    ttft_p50_s: float | None = _f("simulated", unit="s")
    ttft_p95_s: float | None = _f("simulated", unit="s")
    itl_p95_p50_s: float | None = _f("simulated", unit="s")
    tpot_p50_s: float | None = _f("simulated", unit="s")
    attainment: float | None = _f("simulated")
    requests_judged: int = _f("simulated", unit="requests")
    api_server_load: float | None = figure(
        "computed", unit="s/s", description="seconds of one simulated API-server process's work per second at this "
        "load (the window's requests, prompt tokens, streamed outputs and engine steps at kvlab.sim's front-end costs, its share of "
        "them with --api-server-count N); above 1, it cannot keep up")


class FleetFigures(Part):
    """One config's fleet for the planned agents (kvlab.plan.fleet.fleet_figures)."""

    sessions_per_replica: int = _f("simulated", unit="sessions", description="largest load within the SLO")
    sessions_per_gpu: float = _f("computed", unit="sessions")
    gpus_per_replica: int
    calls_per_session_hour: float = _f("simulated", unit="calls/h")
    concurrent_sessions: float = _f("computed", unit="sessions")
    replicas: int = _f("computed")
    gpus: int = _f("computed")
    gpu_demand: float = _f("computed", unit="GPUs", description="before rounding up to whole replicas")
    gpu_seconds_per_call: float = _f("computed", unit="s")
    weights_gib_per_gpu: float = _f("predicted", unit="GiB")
    kv_pool_gib_per_gpu: float = _f("predicted", unit="GiB")
    hbm_per_gpu_gib: float = _f("predicted", unit="GiB")
    hbm_weights_gib: float = _f("computed", unit="GiB")
    hbm_kv_gib: float = _f("computed", unit="GiB")
    hbm_total_gib: float = _f("computed", unit="GiB")
    hbm_provisioned_gib: float = _f("computed", unit="GiB")
    kv_in_use_gib: float = _f("simulated", unit="GiB", description="mean vllm:kv_cache_usage_perc x pool")
    kv_in_use_mib_per_session: float = _f("simulated", unit="MiB")
    kv_final_context_mib_per_session: float = _f("computed", unit="MiB")
    kv_bytes_per_token: int = _f("predicted", unit="bytes")
    kv_cache_tokens_per_gpu: int = _f("predicted", unit="tokens")
    calls_per_day: float = _f("computed", unit="calls")
    output_tokens_per_day: float = _f("computed", unit="tokens")
    tokens_per_day: float = _f("computed", unit="tokens")
    prompt_tokens_cached_share: float | None = _f("simulated")
    usd_per_day: float | None = _f("computed", unit="$")
    usd_per_1m_output_tokens: float | None = _f("computed", unit="$")
    usd_per_1m_tokens: float | None = _f("computed", unit="$")
    usd_per_call: float | None = _f("computed", unit="$")
    probe: ProbeFigures
    provenance: dict[str, str]  # figure -> where it comes from, in words


class Saving(Part):
    """What a config saves of one metric against the baseline, and each factor's share."""

    baseline: float = _f("computed")
    config: float = _f("computed")
    saved: float = _f("computed")
    saved_pct: float | None = _f("computed", unit="%")
    by_factor: dict[str, float] | None = figure("computed")  # absent: no attribution (see Savings)
    by_factor_pct: dict[str, float | None] | None = figure("computed", unit="%")


class Savings(Part):
    """Savings against the baseline (kvlab.plan.fleet.savings); a metric the fleet has no figure
    for (no --gpu-price: usd_per_day) is None."""

    gpus: Saving | None = None
    hbm_total_gib: Saving | None = None
    usd_per_day: Saving | None = None
    factors_changed: list[str]
    via: dict[str, str]  # the changed factors taken from the config -> the config planned for them


class PlannedConfig(Part):
    """One requested config: refused (refusal, nearest) or planned (search, figures, savings)."""

    config: str
    model: str
    quant: str  # the profile level
    refusal: str | None = None
    nearest: str | None = None
    gpu: str | None = None
    tp: int | None = None
    attention: str | None = None
    kv_cache_dtype: str | None = None
    weights: str | None = None
    timing_source: str | None = None  # what priced the simulated steps of its probes (kvlab.sim.timing)
    # and the time outside them: host time, API server, request latency (SimConfig.host_source; plans before it: None)
    host_source: str | None = None
    timing_provenance: dict[str, int] | None = None  # the chosen probe's engine steps per provenance
    search: Search | None = None
    figures: FleetFigures | None = None
    savings: Savings | None = None


class AttributionConfig(Part):
    """A config between the baseline and a requested one (one factor set changed), planned to split
    the savings by factor."""

    config: str
    timing_source: str | None = None
    timing_provenance: dict[str, int] | None = None
    search: Search
    figures: FleetFigures | None


class ReboundToday(Part):
    config: str
    gpus: int = _f("computed")
    hbm_gib: float = _f("computed", unit="GiB")


class ReboundGridCell(Part):
    """The baseline's fleet at K x today's calls when the cost per call falls X %."""

    cost_drop_pct: float
    volume_x: float
    demand_x: float = _f("computed")
    gpus: int = _f("computed")
    hbm_gib: float = _f("computed", unit="GiB")
    gpus_vs_today: float = _f("computed")
    hbm_vs_today: float = _f("computed")


class ReboundCell(Part):
    """A planned config's fleet at K x today's calls (at its own cost per call)."""

    volume_x: float
    gpus: int = _f("computed")
    hbm_gib: float = _f("computed", unit="GiB")
    gpus_vs_today: float = _f("computed")
    hbm_vs_today: float = _f("computed")


class ReboundConfig(Part):
    config: str
    cost_drop_pct: float = _f("computed", unit="%")
    break_even_volume_x: float | None = _f("computed")
    cells: list[ReboundCell]


class Rebound(Part):
    """The rebound scenario (kvlab.plan.rebound.rebound) and its plot."""

    today: ReboundToday
    cost_drops_pct: list[float]
    volume_x: list[float]
    grid: list[ReboundGridCell]
    configs: list[ReboundConfig]
    provenance: str
    plot: str | None = None  # rebound.png


class PlanRun(Part):
    wall_s: float = _f("measured", unit="s")
    probes: int
    probes_cached: int
    simulated_cpu_s: float = _f("measured", unit="s")


class PlanRecord(Record):
    KIND = "plan"
    provenance: str
    inputs: PlanInputs
    baseline: str
    configs: list[PlannedConfig]
    attribution_configs: list[AttributionConfig]
    rebound: Rebound
    out_dir: str
    run: PlanRun

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        return data if version == 0 else super().upgrade(data, version)  # the same keys before schema_version
