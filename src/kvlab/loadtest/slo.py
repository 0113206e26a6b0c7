"""Goodput: requests and agent sessions per minute that met a service-level objective.

A request meets the SLO when it succeeded and every set threshold holds (TTFT, the p95 of its own
inter-token gaps, TPOT, E2E), as `vllm bench serve --goodput` judges requests. A session meets it
when it finished (all planned turns, no error) and every one of its turns met it. Sessions the run
cut short are counted apart, not as failures; so are requests cancelled by the end of the run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvlab.schema.load import Goodput
from kvlab.schema.slo import SLO, SLOFrom


def _as_slo(slo: SLO | dict | None) -> SLO:
    if slo is None:
        return SLO()
    return slo if isinstance(slo, SLO) else SLO.model_validate(slo)


def itl_p95_s(gaps: list[float]) -> float | None:
    return float(np.percentile(gaps, 95)) if len(gaps) else None


def requests_meeting(df, slo: SLO):
    """Boolean Series: which rows met the SLO."""
    ok = df["error_kind"].isna()
    if slo.ttft_s is not None:
        ok &= df["ttft_s"].fillna(np.inf) <= slo.ttft_s
    if slo.itl_p95_s is not None:
        # A one-token reply has no gap to judge.
        p95 = df["itl_s"].map(lambda g: itl_p95_s(list(g)) if g is not None else None)
        ok &= p95.fillna(0.0) <= slo.itl_p95_s
    if slo.tpot_s is not None:
        ok &= df["tpot_s"].fillna(0.0) <= slo.tpot_s
    if slo.e2e_s is not None:
        ok &= df["e2e_s"].fillna(np.inf) <= slo.e2e_s
    return ok


def run_span_s(df) -> float:
    """First request sent to last reply finished."""
    if df.empty:
        return 0.0
    end = (df["start_ts"] + df["e2e_s"].fillna(0.0)).max()
    return float(end - df["start_ts"].min())


def goodput(records_df, slo: SLO | dict | None = None, duration_s: float | None = None,
            slo_from: SLOFrom = "workload") -> dict[str, Any]:
    """Measured request and session goodput of one run's records (`read_requests`), as the data
    of a kvlab.schema.load.Goodput.

    `slo`: an SLO or a dict like {"ttft_s": 2, "itl_p95_s": 0.1}; `slo_from`: whose SLO it is
    (recorded with the score); `duration_s`: the run's length (default: first request sent to
    last reply finished)."""
    slo = _as_slo(slo)
    turns = records_df[(records_df["kind"] == "turn") & (records_df["error_kind"] != "cancelled")].copy()
    turns["met"] = requests_meeting(turns, slo)
    span = duration_s if duration_s is not None else run_span_s(turns)
    per_min = 60.0 / span if span > 0 else float("nan")

    finished, met, unfinished = 0, 0, 0
    for _, s in turns.groupby("session_id"):
        failed = s["error_kind"].notna().any()
        complete = len(s) == int(s["turns_planned"].iloc[0])
        if not (failed or complete):
            unfinished += 1
            continue
        finished += 1
        met += int(complete and not failed and bool(s["met"].all()))
    n_met = int(turns["met"].sum())
    return Goodput.model_validate({
        "source": "measured",
        "slo": slo,
        "slo_from": slo_from,
        "duration_s": span,
        "requests": len(turns),
        "requests_ok": int(turns["error_kind"].isna().sum()),
        "requests_met_slo": n_met,
        "slo_attainment": n_met / len(turns) if len(turns) else None,
        "requests_per_min": len(turns) * per_min,
        "request_goodput_per_min": n_met * per_min,
        "sessions_finished": finished,
        "sessions_met_slo": met,
        "sessions_unfinished": unfinished,
        "sessions_per_min": finished * per_min,
        "session_goodput_per_min": met * per_min,
    }).model_dump(mode="json")
