"""One run's measured figures from its records: counts, errors by kind, latency percentiles (as
`vllm bench serve` reports them), tokens, calibration accuracy, goodput."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvlab.loadtest.slo import goodput, run_span_s
from kvlab.schema.load import LoadSummary
from kvlab.schema.slo import SLO, SLOFrom

PERCENTILES = (50, 90, 95, 99)


def percentiles(values) -> dict[str, float] | None:
    arr = np.asarray([v for v in values if v is not None and not np.isnan(v)], dtype=float)
    if arr.size == 0:
        return None
    out = {"mean": float(arr.mean())}
    out.update({f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES})
    return out


def _int_sum(series) -> int | None:
    s = series.dropna()
    return int(s.sum()) if len(s) else None


def summarize(df, slo: SLO | dict | None = None, duration_s: float | None = None,
              slo_from: SLOFrom = "workload") -> dict[str, Any]:
    """The data of a kvlab.schema.load.LoadSummary: figures over `duration_s` (default: the run's
    span), goodput scored once against `slo` (whose it is: `slo_from`)."""
    turns = df[df["kind"] == "turn"]
    ok = turns[turns["error_kind"].isna()]
    span = duration_s if duration_s is not None else run_span_s(turns)
    gaps = [g for row in ok["itl_s"] for g in row]
    planned = ok.dropna(subset=["planned_prompt_tokens", "prompt_tokens"])
    calib_err = ((planned["prompt_tokens"] - planned["planned_prompt_tokens"]).abs() / planned["prompt_tokens"])
    return LoadSummary.model_validate({
        "source": "measured",
        "requests": len(turns),
        "requests_ok": len(ok),
        "probes": int((df["kind"] == "probe").sum()),
        "errors": {str(k): int(v) for k, v in turns["error_kind"].value_counts().items()},
        "probe_errors": {str(k): int(v) for k, v in df.loc[df["kind"] == "probe", "error_kind"].value_counts().items()},
        "sessions": int(turns["session_id"].nunique()),
        "duration_s": span,
        "requests_per_s": len(ok) / span if span > 0 else None,
        "output_tokens_per_s": (_int_sum(ok["completion_tokens"]) or 0) / span if span > 0 else None,
        "ttft_s": percentiles(ok["ttft_s"]),
        "tpot_s": percentiles(ok["tpot_s"]),
        "itl_s": percentiles(gaps),
        "e2e_s": percentiles(ok["e2e_s"]),
        "prompt_tokens": _int_sum(ok["prompt_tokens"]),
        "completion_tokens": _int_sum(ok["completion_tokens"]),
        "cached_tokens": _int_sum(ok["cached_tokens"]),
        "calibration_error_median": float(calib_err.median()) if len(calib_err) else None,
        "goodput": goodput(df, slo, span, slo_from),
    }).model_dump(mode="json")
