"""Seeded distributions for workload profiles: a plain number is a fixed value, a mapping with
`dist:` names one of the shapes below. Bounds (`min`, `max`) clip every draw."""

from __future__ import annotations

import math
import random
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


class _Dist(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min: float = 0.0
    max: float = math.inf

    def _clip(self, x: float) -> float:
        return min(max(x, self.min), self.max)

    def draw(self, rng: random.Random) -> float:
        return self._clip(self._raw(rng))

    def draw_int(self, rng: random.Random) -> int:
        return int(round(self.draw(rng)))

    def _raw(self, rng: random.Random) -> float:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    @property
    def mean_estimate(self) -> float:
        """Mean before clipping (for sizing and messages, not for measurements)."""
        raise NotImplementedError  # pragma: no cover

    @property
    def smallest(self) -> float:
        """The smallest value a draw can take."""
        return self.min


class Fixed(_Dist):
    dist: Literal["fixed"] = "fixed"
    value: float = Field(ge=0)

    def _raw(self, rng: random.Random) -> float:
        return self.value

    @property
    def smallest(self) -> float:
        return self._clip(self.value)

    @property
    def mean_estimate(self) -> float:
        return self._clip(self.value)


class Uniform(_Dist):
    """Uniform on [low, high]; integer fields round the draw."""

    dist: Literal["uniform"]
    low: float = Field(ge=0)
    high: float = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> "Uniform":
        if self.high < self.low:
            raise ValueError(f"high ({self.high:g}) is below low ({self.low:g})")
        return self

    def _raw(self, rng: random.Random) -> float:
        return rng.uniform(self.low, self.high)

    @property
    def smallest(self) -> float:
        return self._clip(self.low)

    @property
    def mean_estimate(self) -> float:
        return (self.low + self.high) / 2


class LogNormal(_Dist):
    """Heavy-tailed sizes (tool outputs): the median and sigma of the log."""

    dist: Literal["lognormal"]
    median: float = Field(gt=0)
    sigma: float = Field(ge=0)

    def _raw(self, rng: random.Random) -> float:
        return rng.lognormvariate(math.log(self.median), self.sigma)

    @property
    def mean_estimate(self) -> float:
        return self.median * math.exp(self.sigma**2 / 2)


class Exponential(_Dist):
    """Memoryless pauses (think time, tool run time)."""

    dist: Literal["exponential"]
    mean: float = Field(gt=0)

    def _raw(self, rng: random.Random) -> float:
        return rng.expovariate(1.0 / self.mean)

    @property
    def mean_estimate(self) -> float:
        return self.mean


class Choice(_Dist):
    """One of `values`, with optional `weights`."""

    dist: Literal["choice"]
    values: list[float] = Field(min_length=1)
    weights: list[float] | None = None

    @model_validator(mode="after")
    def _weights_match(self) -> "Choice":
        if self.weights is not None and len(self.weights) != len(self.values):
            raise ValueError(f"weights has {len(self.weights)} entries, values has {len(self.values)}")
        return self

    def _raw(self, rng: random.Random) -> float:
        return rng.choices(self.values, weights=self.weights)[0]

    @property
    def smallest(self) -> float:
        return self._clip(min(self.values))

    @property
    def mean_estimate(self) -> float:
        w = self.weights or [1.0] * len(self.values)
        return sum(v * x for v, x in zip(self.values, w)) / sum(w)


def _number_is_fixed(v: Any) -> Any:
    if isinstance(v, bool):
        return v  # let pydantic reject it
    if isinstance(v, (int, float)):
        return {"dist": "fixed", "value": v}
    return v


Dist = Annotated[
    Union[Fixed, Uniform, LogNormal, Exponential, Choice],
    BeforeValidator(_number_is_fixed),
    Field(discriminator="dist"),
]
