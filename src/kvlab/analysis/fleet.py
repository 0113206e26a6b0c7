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
from kvlab.schema.plan import PlanRecord


def read_plan(folder: Path) -> dict | None:
    """The folder's plan/plan.json read through its type (None where there is none), as data."""
    plan = PlanRecord.read_optional(Path(folder) / "plan" / "plan.json")
    return plan.to_data() if plan is not None else None


def fleet_table(plan: dict) -> pd.DataFrame:
    """One row per planned config: the fleet it needs and what it saves against the baseline."""
    rows = []
    for c in plan["configs"]:
        f: dict[str, Any] = c.get("figures") or {}
        probe: dict[str, Any] = f.get("probe") or {}
        s: dict[str, Any] = c.get("savings") or {}
        hbm = s.get("hbm_total_gib") or {}
        shares = hbm.get("by_factor_pct") or {}
        rows.append({
            "config": c["config"], "baseline": c["config"] == plan.get("baseline"),
            "attention": c.get("attention"), "kv_cache_dtype": c.get("kv_cache_dtype"), "weights": c.get("weights"),
            "sessions_per_gpu": f.get("sessions_per_gpu"), "gpus": f.get("gpus"),
            "hbm_total_gib": f.get("hbm_total_gib"), "hbm_kv_gib": f.get("hbm_kv_gib"),
            "kv_in_use_gib": f.get("kv_in_use_gib"), "kv_in_use_mib_per_session": f.get("kv_in_use_mib_per_session"),
            "usd_per_day": f.get("usd_per_day"), "usd_per_1m_output_tokens": f.get("usd_per_1m_output_tokens"),
            "usd_per_1m_tokens": f.get("usd_per_1m_tokens"),
            # at the planned load (the search's chosen probe, simulated): per GPU, and its latencies
            "output_tokens_per_s_per_gpu": _per_gpu(probe.get("output_tokens_per_s"), f.get("gpus_per_replica")),
            "ttft_p95_s": probe.get("ttft_p95_s"), "itl_p95_p50_s": probe.get("itl_p95_p50_s"),
            "timing_source": c.get("timing_source"),
            "gpus_saved": (s.get("gpus") or {}).get("saved"), "hbm_saved_gib": hbm.get("saved"),
            "hbm_saved_pct": hbm.get("saved_pct"),
            **{f"share_{k}_pct": shares.get(k) for k in FACTORS},
            "not_planned": (c.get("refusal") + (f"; nearest that works: {c['nearest']}" if c.get("nearest") else ""))
            if c.get("refusal") else None,
        })
    return pd.DataFrame(rows)


def _per_gpu(value: float | None, gpus: int | None) -> float | None:
    return None if value is None else value / (gpus or 1)


def timing_label(plan: dict) -> str:
    """What priced the plan's simulated figures: "simulated (timing: <source>[; <source>])" (plans
    written before configs named their timing source: "simulated")."""
    sources = list(dict.fromkeys(c["timing_source"] for c in plan.get("configs", []) if c.get("timing_source")))
    return f"simulated (timing: {'; '.join(sources)})" if sources else "simulated"


def rebound_table(plan: dict) -> pd.DataFrame:
    """HBM demand against today's (the baseline) for each cost drop X and call growth K."""
    reb = plan.get("rebound") or {}
    by = {(g["cost_drop_pct"], g["volume_x"]): g for g in reb.get("grid", [])}
    rows = []
    for x in reb.get("cost_drops_pct", []):
        row = {"row": f"cost per call -{x:g} %", "break_even_x": 1 / (1 - x / 100)}
        row.update({f"K={k:g}x": by[(x, k)]["hbm_vs_today"] for k in reb.get("volume_x", []) if (x, k) in by})
        rows.append(row)
    for c in reb.get("configs", []):
        row = {"row": f"{c['config']}: {-c['cost_drop_pct']:+.0f} %", "break_even_x": c.get("break_even_volume_x")}
        row.update({f"K={k:g}x": cell["hbm_vs_today"] for k, cell in zip(reb.get("volume_x", []), c.get("cells", []))})
        rows.append(row)
    return pd.DataFrame(rows)


def summary(plan: dict) -> str:
    i = plan.get("inputs", {})
    slo = ", ".join(f"{k} {v:g}" for k, v in (i.get("slo") or {}).items() if v is not None)
    rate = i.get("calls_per_agent_hour")
    return (f"{i.get('agents', 0):,} agents ({(i.get('workload') or {}).get('name')}, "
            f"{rate:,.0f} calls per agent-hour) on {i.get('gpu')}, SLO {slo} for "
            f"{i.get('slo_attainment', 0):.0%} of requests; baseline {plan.get('baseline')}") if rate else ""
