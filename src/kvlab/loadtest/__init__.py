"""Agent-style load: the session model, streaming measurements, and the Locust users that play it.

Modules: plan (the token-level contract), workload (profiles -> SessionPlans), render (text and
calibration), session (a conversation in play), stream (SSE measurements), driver (one process's
sessions, probes and records), records (per-request records), shapes (load shapes), slo (goodput),
runner (Locust as a subprocess). Locust itself is imported only by loadtest/locustfile.py.
"""

from typing import Any

__all__ = ["goodput"]


def __getattr__(name: str) -> Any:
    # `kvlab.loadtest.goodput(records_df, slo)`, imported lazily: it needs pandas/numpy, which the
    # Locust processes importing this package do not.
    if name == "goodput":
        from kvlab.loadtest.slo import goodput

        return goodput
    raise AttributeError(name)
