"""Load shapes: how many Locust users run at each second of a run.

The Locust `LoadTestShape` in loadtest/locustfile.py only asks `ShapePlan.users_at(t)`; the logic is
here so it is tested without Locust (whose gevent monkey-patching must stay out of kvlab and pytest).

- constant: `users` for the whole run.
- steps: a ladder (1, 2, 4, ... users by default), each step held `step_hold_s` (default: the run
  split evenly), to find the concurrency where the server starts preempting.
- poisson: open-loop session arrivals at `sessions_per_min`; users are only slots that play the
  scheduled sessions (`users` slots; a session that finds no free slot starts late, recorded as
  `start_lag_s`).
- diurnal: a 24-hour curve (hourly weights) compressed into `period_s`, scaled to `users` at its peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ShapeKind = Literal["constant", "steps", "poisson", "diurnal"]
SHAPES: tuple[str, ...] = ("constant", "steps", "poisson", "diurnal")

# Relative traffic by hour of day (00:00 ... 23:00): a quiet night, a morning ramp, a midday
# plateau with an early-afternoon peak, an evening tail. Agents "around the clock" still follow
# the people and batch jobs that drive them.
DEFAULT_HOURLY_WEIGHTS: tuple[float, ...] = (
    0.25, 0.2, 0.18, 0.17, 0.18, 0.22, 0.3, 0.45, 0.65, 0.82, 0.92, 0.97,
    0.95, 0.98, 1.0, 0.97, 0.9, 0.8, 0.68, 0.58, 0.5, 0.42, 0.35, 0.3,
)


class ShapeSpec(BaseModel):
    """The `load.shape` block of a workload profile; `kind` may be overridden per run."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ShapeKind = "constant"
    # steps
    steps: list[int] | None = Field(default=None, min_length=1)
    step_hold_s: float | None = Field(default=None, gt=0)
    # poisson
    sessions_per_min: float = Field(default=30.0, gt=0)
    # diurnal
    period_s: float | None = Field(default=None, gt=0)
    min_users: int = Field(default=1, ge=0)
    hourly_weights: list[float] = Field(default=list(DEFAULT_HOURLY_WEIGHTS), min_length=24, max_length=24)

    @model_validator(mode="after")
    def _check(self) -> "ShapeSpec":
        if self.steps is not None and any(s < 1 for s in self.steps):
            raise ValueError("steps: every step needs at least 1 user")
        if any(w < 0 for w in self.hourly_weights) or max(self.hourly_weights) <= 0:
            raise ValueError("hourly_weights: weights must be >= 0 with a positive peak")
        return self


def ladder(users: int) -> list[int]:
    """1, 2, 4, ... up to `users` (which is always the last step)."""
    out, n = [], 1
    while n < users:
        out.append(n)
        n *= 2
    return out + [users]


@dataclass(frozen=True)
class ShapePlan:
    """A shape with the run's user count and duration: users at each second, None = stop."""

    spec: ShapeSpec
    users: int
    duration_s: float

    @property
    def steps(self) -> list[int]:
        return list(self.spec.steps) if self.spec.steps else ladder(self.users)

    @property
    def step_hold_s(self) -> float:
        return self.spec.step_hold_s or self.duration_s / len(self.steps)

    @property
    def period_s(self) -> float:
        return self.spec.period_s or self.duration_s

    @property
    def peak_users(self) -> int:
        return max(self.steps) if self.spec.kind == "steps" else self.users

    def users_at(self, t_s: float) -> int | None:
        if t_s >= self.duration_s:
            return None
        kind = self.spec.kind
        if kind in ("constant", "poisson"):
            return self.users
        if kind == "steps":
            i = int(t_s // self.step_hold_s)
            return self.steps[i] if i < len(self.steps) else None
        return self.diurnal_users(t_s)

    def diurnal_users(self, t_s: float) -> int:
        """Linear interpolation between hourly weights, scaled so the peak hour has `users`."""
        w = self.spec.hourly_weights
        hour = 24.0 * ((t_s % self.period_s) / self.period_s)
        i = int(math.floor(hour)) % 24
        frac = hour - math.floor(hour)
        level = (w[i] * (1 - frac) + w[(i + 1) % 24] * frac) / max(w)
        lo = min(self.spec.min_users, self.users)
        return lo + int(round((self.users - lo) * level))

    def schedule(self, tick_s: float = 1.0) -> list[tuple[float, int]]:
        """(offset_s, users) at every change: what the run asked for, written beside the records."""
        if self.spec.kind in ("constant", "poisson"):
            return [(0.0, self.users)]  # one level for the whole run
        out: list[tuple[float, int]] = []
        t = 0.0
        while (u := self.users_at(t)) is not None:
            if not out or out[-1][1] != u:
                out.append((round(t, 3), u))
            t += tick_s
        return out
