"""Experiment specs: a YAML file that names a matrix of models x quantizations x workloads x load
levels, validated before anything starts, with errors naming the field."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvlab import resources
from kvlab.errors import KvlabError
from kvlab.deploy.endpoint import Endpoint
from kvlab.io import read_mapping
from kvlab.models.cards import format_validation
from kvlab.plan.request import PlanBlock  # a spec's plan: block is the planner's own type
from kvlab.units import parse_duration_s  # noqa: F401  (also this module's public name)
from kvlab.schema.slo import SLO

ENGINES = ("auto", "vllm", "vllm-cpu", "sim", "external")
SHAPES = ("constant", "steps", "poisson", "diurnal")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Load(_Strict):
    shape: Literal["constant", "steps", "poisson", "diurnal"] = "constant"
    users: list[int] = Field(default_factory=lambda: [4], min_length=1)  # one cell per level
    spawn_rate: float = Field(10.0, gt=0)
    step_s: float | None = Field(None, gt=0)  # steps: how long each rung is held

    @field_validator("users")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(u < 1 for u in v):
            raise ValueError("every load level must be at least 1 user")
        return v


class CellEndpoint(Endpoint):
    """One (model, level)'s server in a spec's `endpoints:` list (engine external)."""

    model: str
    quant: str = "bf16"


def _endpoint(v):
    return {"url": v} if isinstance(v, str) else v


class Spec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    engine: Literal["auto", "vllm", "vllm-cpu", "sim", "external"] = "auto"
    # engine external: the server of every (model, level), or one per (model, level) in endpoints
    endpoint: Endpoint | None = None
    endpoints: list[CellEndpoint] = Field(default_factory=list)
    gpu: str | None = None  # GPU preset for predictions and the simulated engine
    models: list[str] = Field(min_length=1)
    quants: list[str] = Field(default_factory=lambda: ["bf16"], min_length=1)
    workloads: list[str] = Field(default_factory=lambda: ["agent"], min_length=1)
    load: Load = Field(default_factory=Load)
    duration_s: float = 60.0
    warmup_s: float = 10.0
    repeats: int = Field(1, ge=1, le=100)
    seed: int = 0
    slo: SLO = Field(default_factory=SLO)  # governs goodput only where the spec sets it: see slo_given
    gpu_price_per_hour: float | None = Field(None, ge=0)  # $ per GPU-hour, for cost figures
    kv_memory_gib: float | None = Field(None, gt=0)  # KV budget (CPU: VLLM_CPU_KVCACHE_SPACE)
    max_model_len: int | None = Field(None, gt=0)
    scrape_interval_s: float = Field(1.0, gt=0)
    serve_args: list[str] = Field(default_factory=list)  # extra `vllm serve` flags for every server
    skip_missing: bool = False  # skip model x quant pairs without a serve profile instead of refusing
    plan: PlanBlock | None = None  # a fleet plan from the same configs (kvlab plan --spec)

    @field_validator("duration_s", "warmup_s", mode="before")
    @classmethod
    def _duration(cls, v, info):
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            return parse_duration_s(v, allow_zero=info.field_name == "warmup_s")  # no warm-up: 0, "0", "0s"
        return v

    @field_validator("endpoint", mode="before")
    @classmethod
    def _endpoint_url(cls, v):
        return _endpoint(v)

    @model_validator(mode="after")
    def _check(self) -> "Spec":
        pairs = [(e.model, e.quant) for e in self.endpoints]
        if len(set(pairs)) != len(pairs):
            raise ValueError("endpoints lists a model and level twice")
        for m, q in pairs:
            if m not in self.models or q not in self.quants:
                raise ValueError(f"endpoints: {m} {q} is not a model and level of this spec")
        if self.warmup_s < 0:
            raise ValueError("warmup_s must not be negative")
        if self.load.shape == "steps" and self.load.step_s is not None and self.load.step_s > self.duration_s:
            raise ValueError("load.step_s is longer than duration_s: not one step would finish")
        for name, items in (("models", self.models), ("quants", self.quants), ("workloads", self.workloads)):
            if len(set(items)) != len(items):
                raise ValueError(f"{name} lists an entry twice")
        return self

    def endpoint_for(self, model: str, quant: str) -> Endpoint | None:
        """The server kvlab did not start that serves (model, level): its endpoints: entry, else endpoint."""
        for e in self.endpoints:
            if (e.model, e.quant) == (model, quant):
                return Endpoint.model_validate(e.model_dump(exclude={"model", "quant"}))
        return self.endpoint

    @property
    def slo_given(self) -> SLO | None:
        """The spec's own SLO where its file sets `slo:`; None leaves each workload's SLO to govern."""
        return self.slo if "slo" in self.model_fields_set else None

    @property
    def digest(self) -> str:
        """Identifies what the results depend on (not the name or description)."""
        d = self.model_dump(exclude={"name", "description", "plan"})  # a plan block changes no cell
        for key in ("endpoint", "endpoints"):  # unset: the digest of a spec written before they existed
            if not d[key]:
                del d[key]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def path_component(name: str) -> str:
    """`name` as one folder name that stays inside the results folder: card names, levels and
    workload names are kept as they are; a path or Hugging Face id (`../x`, `/data/m`, `org/m`)
    becomes its last part's safe characters plus a digest of the whole, so that two never collide."""
    if _SAFE.match(name) and ".." not in name:
        return name
    readable = re.sub(r"[^A-Za-z0-9._+-]+", "_", Path(name).name).strip("._-").replace("..", "_") or "x"
    return f"{readable[:60]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Cell:
    """One configuration of a spec: repeats of it live inside its directory."""

    model: str
    quant: str
    workload: str
    users: int

    @property
    def cell_id(self) -> str:
        parts = (self.model, self.quant, self.workload)
        return "__".join(path_component(p) for p in parts) + f"__u{self.users}"

    @property
    def server_id(self) -> str:
        """The folder-safe name of the cell's server (its log file)."""
        return f"{path_component(self.model)}__{path_component(self.quant)}"

    @property
    def server_key(self) -> tuple[str, str]:
        """Cells with the same key run on one server, started once."""
        return (self.model, self.quant)


def has_profile(model: str, quant: str) -> bool:
    from kvlab.deploy.profiles import profile
    from kvlab.models.cards import builtin_cards

    try:
        profile(model if model in builtin_cards() else None, quant)
    except KvlabError:
        return False
    return True


def cells(spec: Spec, only: dict[str, str] | None = None) -> list[Cell]:
    """The matrix, grouped so that each (model, quant) server starts once."""
    out = [
        Cell(m, q, w, u)
        for m in spec.models
        for q in spec.quants
        if not spec.skip_missing or has_profile(m, q)
        for w in spec.workloads
        for u in spec.load.users
    ]
    if only:
        for key, value in only.items():
            out = [c for c in out if str(getattr(c, key)) == value]
    return out


def parse_only(text: str | None) -> dict[str, str]:
    """--only model=deepseek-v2-lite,quant=bf16 -> {"model": ..., "quant": ...}."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in ("model", "quant", "workload", "users") or not value.strip():
            raise KvlabError(f"--only: {part!r} is not KEY=VALUE with KEY one of model, quant, workload, users")
        out[key] = value.strip()
    return out


def load_spec(path: str | Path) -> Spec:
    p = Path(path)
    if not p.is_file():  # a name: ./experiments/NAME.yaml, else the package's (kvlab.resources)
        if p.suffix in (".yaml", ".yml") or p.name != str(path):
            raise KvlabError(f"no experiment spec at {path}")
        names = ", ".join(resources.names(resources.SPECS)) or "none"
        p = resources.find(resources.SPECS, f"{path}.yaml", f"no experiment spec at {path}, nor one by that name ({names})")
    return validate_spec(read_mapping(p, "a spec"), str(p))


def validate_spec(data: dict, where: str = "spec") -> Spec:
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        raise KvlabError(format_validation(e, where)) from None
    _check_names(spec, where)
    return spec


def _check_names(spec: Spec, where: str) -> None:
    """Unknown models, quantizations, workloads or GPUs are errors before anything starts."""
    from kvlab import hardware
    from kvlab.models.cards import builtin_cards, unknown_model_message

    cards = builtin_cards()
    for m in spec.models:
        if m not in cards and not Path(m).exists() and "/" not in m:
            raise KvlabError(f"{where}: field models: {unknown_model_message(m)}")
    if spec.gpu:
        try:
            hardware.gpu(spec.gpu)
        except KvlabError as e:
            raise KvlabError(f"{where}: field gpu: {e}") from None
    from kvlab.deploy.profiles import profile

    for m in spec.models:
        for q in spec.quants:
            try:
                profile(m if m in cards else None, q)
            except KvlabError as e:
                if not spec.skip_missing:
                    raise KvlabError(f"{where}: field quants: {e} (or set skip_missing: true)") from None
    from kvlab.loadtest.workload import load_workload

    for w in spec.workloads:
        try:
            load_workload(w)
        except KvlabError as e:
            raise KvlabError(f"{where}: field workloads: {e}") from None
