"""The service-level objective a request must meet to count towards goodput: one type, read from a
workload profile's `slo:` and an experiment spec's `slo:` (the same keys), recorded with each score."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SLOFrom = Literal["spec", "workload"]  # which file's slo: governed a score


class SLO(BaseModel):
    """Per-request thresholds (seconds); a None threshold is not checked."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    ttft_s: float | None = Field(default=2.0, gt=0)
    itl_p95_s: float | None = Field(default=0.1, gt=0)
    tpot_s: float | None = Field(default=None, gt=0)
    e2e_s: float | None = Field(default=None, gt=0)
