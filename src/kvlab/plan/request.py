"""What a fleet plan is asked for: one pydantic type for `kvlab plan`'s options, the Python API and
an experiment spec's `plan:` block.

`PlanBlock` is what a spec's `plan:` block holds (the fleet and the planner's settings);
`PlanRequest` adds the configs, workload and GPU (`kvlab plan`'s flags, or the spec's own fields).
Field names are the spec's YAML keys; the names of the former `PlanRequest` dataclass
(`tp`, `attainment`, `cost_drops_pct`, `volume_x`) are accepted as aliases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvlab.errors import KvlabError
from kvlab.models.memory import DEFAULT_VLLM_VERSION

DEFAULT_COST_DROPS_PCT = (25.0, 50.0, 75.0, 90.0)
DEFAULT_VOLUME_GROWTH = (1.0, 2.0, 5.0, 10.0, 20.0)

# field -> (is it valid, what it must be); one message for the spec's field and kvlab plan's flag.
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "agents": (lambda v: v >= 1, "must be at least 1"),
    "calls_per_agent_hour": (lambda v: v is None or v > 0, "must be positive"),
    "slo_attainment": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "tensor_parallel_size": (lambda v: v >= 1, "must be at least 1"),
    "cost_drop_pct": (lambda v: bool(v) and all(0 <= x < 100 for x in v), "values are percentages in [0, 100)"),
    "volume_growth": (lambda v: bool(v) and all(x > 0 for x in v), "values must be positive"),
    "sim_s": (lambda v: v >= 30, "must be at least 30 simulated seconds"),
    "models": (bool, "must name at least one model"),
    "quants": (bool, "must name at least one quantization level"),
    "gpu_price_per_hour": (lambda v: v is None or v >= 0, "must not be negative"),
    "max_model_len": (lambda v: v is None or v > 0, "must be positive"),
    "tolerance": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "workers": (lambda v: v >= 0, "must be >= 0"),
}
# field -> kvlab plan's flag, for the one-line error of a request
FLAGS = {"agents": "--agents", "calls_per_agent_hour": "--calls-per-agent-hour", "slo_attainment": "--slo-attainment",
         "tensor_parallel_size": "-tp", "cost_drop_pct": "--cost-drop", "volume_growth": "--volume-growth",
         "sim_s": "--sim-s", "models": "--models", "quants": "--quants", "gpu_price_per_hour": "--gpu-price",
         "max_model_len": "--max-model-len", "tolerance": "--tolerance", "workers": "--workers", "slo": "--slo",
         "baseline": "--baseline", "workload": "--workload", "gpu": "--gpu", "seed": "--seed", "out": "--out",
         "tp": "-tp", "attainment": "--slo-attainment", "cost_drops_pct": "--cost-drop", "volume_x": "--volume-growth",
         "vllm_version": "--vllm-version"}


class PlanBlock(BaseModel):
    """A spec's `plan:` block: the fleet to plan for the spec's models x quants, first workload, GPU,
    SLO and price (`kvlab plan --spec`, and `kvlab experiment run` after the cells)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    agents: int
    calls_per_agent_hour: float | None = None  # default: as many as one busy baseline session at the SLO
    slo_attainment: float = Field(0.95, validation_alias=AliasChoices("slo_attainment", "attainment"))
    tensor_parallel_size: int = Field(1, validation_alias=AliasChoices("tensor_parallel_size", "tp"))
    baseline: str | None = None  # MODEL/QUANT; default: the first non-MLA model at its first level
    cost_drop_pct: list[float] = Field(default_factory=lambda: list(DEFAULT_COST_DROPS_PCT),
                                       validation_alias=AliasChoices("cost_drop_pct", "cost_drops_pct"))
    volume_growth: list[float] = Field(default_factory=lambda: list(DEFAULT_VOLUME_GROWTH),
                                       validation_alias=AliasChoices("volume_growth", "volume_x"))
    sim_s: float = 180.0  # simulated seconds per probe
    vllm_version: str = DEFAULT_VLLM_VERSION  # the vLLM release simulated (kernel choice, memory profiling)

    @field_validator(*_CHECKS, check_fields=False)
    @classmethod
    def _check(cls, value: Any, info) -> Any:
        valid, must = _CHECKS[info.field_name]
        if not valid(value):
            raise ValueError(f"{must}, got {value!r}")
        return value

    @field_validator("vllm_version")
    @classmethod
    def _readable_release(cls, value: str) -> str:
        from kvlab.sim.timing import vllm_release

        try:
            vllm_release(value)  # the release check kvlab sim run and sim serve make
        except KvlabError as e:  # the flag's name comes first in the one line (_one_line)
            raise ValueError(str(e).removeprefix("vLLM version ")) from None
        return value


class PlanRequest(PlanBlock):
    """`kvlab.plan.planner.plan`'s input. Invalid fields raise a one-line KvlabError naming
    `kvlab plan`'s flag."""

    workload: str  # a profile in loadtest/ or a YAML path
    gpu: str  # GPU preset
    models: list[str]
    quants: list[str] = Field(default_factory=lambda: ["bf16"])
    slo: dict[str, float | None] = Field(default_factory=dict)  # overrides the workload's slo block
    gpu_price_per_hour: float | None = None
    max_model_len: int | None = None  # default: the workload's longest session, to a multiple of 4,096
    seed: int = 0
    tolerance: float = 0.03
    workers: int = 0  # 0: one per CPU core
    serve_args: list[str] = Field(default_factory=list)  # `vllm serve` flags on top of each level's (a spec's)
    use_cache: bool = True
    out: Path | None = None  # where plan.json and rebound.png go
    verbose: bool = True

    def __init__(self, **fields: Any):
        try:
            super().__init__(**fields)
        except ValidationError as e:
            raise KvlabError(_one_line(e)) from None


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    msg = first["msg"].removeprefix("Value error, ")
    flag = FLAGS.get(field, field or "plan")
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{flag} {msg}{more}" if first["type"] == "value_error" else f"{flag}: {msg}{more}"


def request_from_spec(spec: Any, out: Path, **given: Any) -> PlanRequest:
    """The plan of an experiment spec's configs: its models x quants, first workload, GPU, SLO,
    price, seed, max_model_len and `plan:` block; `given` (PlanRequest fields) overrides them.
    `spec` is any object with those attributes (kvlab.experiments.spec.Spec): kvlab.plan does not
    import the experiments stage."""
    block = spec.plan
    if block is None and "agents" not in given:
        raise KvlabError(f"spec {spec.name} has no plan: block; add one (plan: {{agents: 10000}}) or pass --agents")
    if spec.gpu is None and "gpu" not in given:
        raise KvlabError(f"spec {spec.name} names no gpu: add gpu: h100 (kvlab gpus) or pass --gpu")
    from_spec: dict[str, Any] = {
        "workload": spec.workloads[0], "gpu": spec.gpu, "models": list(spec.models), "quants": list(spec.quants),
        "slo": spec.slo.model_dump(), "gpu_price_per_hour": spec.gpu_price_per_hour, "seed": spec.seed,
        "max_model_len": spec.max_model_len, "out": out, "serve_args": list(spec.serve_args),
    }
    if block is not None:
        from_spec.update(block.model_dump())
    return PlanRequest(**{**from_spec, **given})
