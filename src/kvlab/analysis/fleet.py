"""The fleet plan of a results folder (`<folder>/plan/plan.json`, written by `kvlab plan --spec` or
by `kvlab experiment run` for a spec with a `plan:` block) as report tables.

Nothing is recomputed: every figure is the planner's (sessions per GPU simulated, HBM predicted,
GPUs, savings and $ computed from those), as its `provenance` says; simulated figures are labelled
with the step-time source each config names (`timing_label`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from kvlab.plan.fleet import FACTOR_NAMES as FACTORS
from kvlab.schema.plan import PlanRecord, PlannedConfig

# The fleet figures a row shows (kvlab.schema.plan.FleetFigures: their sources are in the type).
FLEET_FIGURES = ("sessions_per_gpu", "gpus", "hbm_total_gib", "hbm_kv_gib", "kv_in_use_gib", "kv_in_use_mib_per_session",
                 "usd_per_day", "usd_per_1m_output_tokens")


def read_plan(folder: Path) -> PlanRecord | None:
    """The folder's plan/plan.json read through its type (None where there is none)."""
    return PlanRecord.read_optional(Path(folder) / "plan" / "plan.json")


def _not_planned(c: PlannedConfig) -> str | None:
    if not c.refusal:
        return None
    return c.refusal + (f"; nearest that works: {c.nearest}" if c.nearest else "")


def fleet_table(plan: PlanRecord) -> pd.DataFrame:
    """One row per planned config: the fleet it needs and what it saves against the baseline."""
    rows = []
    for c in plan.configs:
        f, s = c.figures, c.savings
        hbm = s.hbm_total_gib if s else None
        shares = (hbm.by_factor_pct if hbm else None) or {}
        rows.append({
            "config": c.config, "baseline": c.config == plan.baseline,
            "attention": c.attention, "kv_cache_dtype": c.kv_cache_dtype, "weights": c.weights,
            **{k: getattr(f, k) if f else None for k in FLEET_FIGURES},
            # at the planned load (the search's chosen probe, simulated): per GPU, and its latencies
            "output_tokens_per_s_per_gpu": _per_gpu(f.probe.output_tokens_per_s, f.gpus_per_replica) if f else None,
            "ttft_p95_s": f.probe.ttft_p95_s if f else None, "itl_p95_p50_s": f.probe.itl_p95_p50_s if f else None,
            # the simulated API server's work per second there (computed; None in plans written before it)
            "api_server_load": f.probe.api_server_load if f else None,
            "usd_per_1m_tokens": f.usd_per_1m_tokens if f else None,
            "timing_source": c.timing_source,
            "gpus_saved": s.gpus.saved if s and s.gpus else None, "hbm_saved_gib": hbm.saved if hbm else None,
            "hbm_saved_pct": hbm.saved_pct if hbm else None,
            **{f"share_{k}_pct": shares.get(k) for k in FACTORS},
            "not_planned": _not_planned(c),
        })
    return pd.DataFrame(rows)


def _per_gpu(value: float | None, gpus: int | None) -> float | None:
    return None if value is None else value / (gpus or 1)


def timing_label(plan: PlanRecord) -> str:
    """What priced the plan's simulated figures: "simulated (timing: <source>[; <source>])" (plans
    written before configs named their timing source: "simulated")."""
    sources = list(dict.fromkeys(c.timing_source for c in plan.configs if c.timing_source))
    return f"simulated (timing: {'; '.join(sources)})" if sources else "simulated"


def rebound_table(plan: PlanRecord) -> pd.DataFrame:
    """HBM demand against today's (the baseline) for each cost drop X and call growth K."""
    reb = plan.rebound
    by = {(g.cost_drop_pct, g.volume_x): g for g in reb.grid}
    rows = []
    for x in reb.cost_drops_pct:
        row: dict[str, Any] = {"row": f"cost per call -{x:g} %", "break_even_x": 1 / (1 - x / 100)}
        row.update({f"K={k:g}x": by[(x, k)].hbm_vs_today for k in reb.volume_x if (x, k) in by})
        rows.append(row)
    for c in reb.configs:
        row = {"row": f"{c.config}: {-c.cost_drop_pct:+.0f} %", "break_even_x": c.break_even_volume_x}
        row.update({f"K={k:g}x": cell.hbm_vs_today for k, cell in zip(reb.volume_x, c.cells)})
        rows.append(row)
    return pd.DataFrame(rows)


def summary(plan: PlanRecord) -> str:
    i = plan.inputs
    if not i.calls_per_agent_hour:
        return ""
    slo = ", ".join(f"{k} {v:g}" for k, v in i.slo.model_dump().items() if v is not None)
    return (f"{i.agents:,} agents ({i.workload.get('name')}, {i.calls_per_agent_hour:,.0f} calls per agent-hour) "
            f"on {i.gpu}, SLO {slo} for {i.slo_attainment:.0%} of requests; baseline {plan.baseline}")
