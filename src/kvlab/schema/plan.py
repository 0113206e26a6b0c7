"""plan.json (kvlab.plan.planner.plan): the fleet planned for a number of agents, per config.

Its figures are the planner's: sessions per GPU simulated, HBM per GPU predicted by the memory
model, GPUs, savings and dollars computed from those, as `provenance` says; each planned config
names the simulator's step-time source (`timing_source`)."""

from __future__ import annotations

from typing import Any

from kvlab.schema import Part, Record
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
    timing_source: str | None = None  # what priced its simulated steps (kvlab.sim.timing.step_timing)
    timing_provenance: dict[str, int] | None = None  # the chosen probe's engine steps per provenance
    search: dict[str, Any] | None = None
    figures: dict[str, Any] | None = None  # kvlab.plan.fleet.fleet_figures
    savings: dict[str, Any] | None = None


class PlanRecord(Record):
    KIND = "plan"
    provenance: str
    inputs: PlanInputs
    baseline: str
    configs: list[PlannedConfig]
    attribution_configs: list[dict[str, Any]]
    rebound: dict[str, Any]  # kvlab.plan.rebound.rebound
    out_dir: str
    run: dict[str, float | int]

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        return data if version == 0 else super().upgrade(data, version)  # the same keys before schema_version
