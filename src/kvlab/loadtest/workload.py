"""Workload profiles (loadtest/*.yaml) and the seeded SessionPlans they generate.

An "app" has a system prompt and tool definitions shared by all its agents (the prefix-cache
opportunity). A session picks an app, then plays `turns` requests: the task first, then one tool
result per turn, each followed by a short reply and a pause. Plain benchmark workloads are the same
model with one turn (random: no shared prefix; shared-prefix: a few apps, one turn).

`Workload.sessions(seed)` is deterministic: session i depends only on (seed, i), so a run can be
split over Locust workers by index and replayed by the simulator.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvlab import resources
from kvlab.errors import KvlabError
from kvlab.io import read_mapping
from kvlab.loadtest.dists import Dist
from kvlab.loadtest.plan import SessionPlan, TurnPlan
from kvlab.loadtest.shapes import ShapeKind, ShapeSpec
from kvlab.models.cards import format_validation
from kvlab.schema.slo import SLO

# Chat-template tokens per message are not in the plan; this margin keeps a planned session inside
# the context limit once they are added (the measured counts are recorded per request).
TEMPLATE_MARGIN_TOKENS_PER_MESSAGE = 8


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class AppSpec(_Spec):
    count: int = Field(default=1, ge=1)
    system_tokens: Dist = 0  # system prompt + tool schemas, shared by the app's sessions


class SessionSpec(_Spec):
    turns: Dist = 1
    task_tokens: Dist = 128  # the first user message
    tool_result_tokens: Dist = 0  # the user message before each later turn
    max_tokens: Dist = 64  # reply length asked for
    think_time_s: Dist = 0.0  # pause after a reply (tool run, thinking)


class RequestSpec(_Spec):
    endpoint: str = "/v1/chat/completions"
    model: str | None = None  # default: the first id from GET /v1/models
    temperature: float = Field(default=0.0, ge=0)
    ignore_eos: bool = True  # dropped automatically where the server refuses it
    timeout_s: float = Field(default=300.0, gt=0)  # whole request
    stall_timeout_s: float = Field(default=60.0, gt=0)  # no byte for this long: a stalled stream
    connect_timeout_s: float = Field(default=10.0, gt=0)

    @property
    def chat(self) -> bool:
        """Whether the requests go to a chat-completions endpoint (its messages through the chat template)."""
        return self.endpoint.endswith("/chat/completions")

    @field_validator("endpoint")
    @classmethod
    def _a_path(cls, v: str) -> str:
        if not v.startswith("/") or v.startswith("//") or any(c.isspace() for c in v):
            raise ValueError(f"{v!r} must be a path on --host, like /v1/chat/completions (load goes only to the "
                             "host you name, never to a URL in a file)")
        return v


class LimitSpec(_Spec):
    max_context_tokens: int = Field(default=8192, gt=0)  # plan tokens of a whole session


class PromptSizingSpec(_Spec):
    """Size prompts without calibration probes (for servers whose usage counts cannot size them):
    from a local tokenizer folder (the model's or a twin's) or a stated tokens-per-word ratio."""

    tokenizer: str | None = None
    tokens_per_word: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one(self) -> "PromptSizingSpec":
        if (self.tokenizer is None) == (self.tokens_per_word is None):
            raise ValueError("prompt_sizing needs exactly one of tokenizer (a local folder) or tokens_per_word")
        return self


MAX_DURATION_S = 30 * 24 * 3600.0  # a month: longer is a typo (the schedule is kept per second)


class LoadSpec(_Spec):
    """Defaults for a run; `kvlab load` / `run_load` arguments override them."""

    users: int = Field(default=8, ge=1)
    spawn_rate: float | None = Field(default=None, gt=0)  # users/s; default: all within a second
    duration_s: float = Field(default=60.0, gt=0, le=MAX_DURATION_S)
    max_requests: int | None = Field(default=100_000, ge=1)
    shape: ShapeSpec = ShapeSpec()




class Workload(_Spec):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    apps: AppSpec = AppSpec()
    session: SessionSpec = SessionSpec()
    request: RequestSpec = RequestSpec()
    limits: LimitSpec = LimitSpec()
    load: LoadSpec = LoadSpec()
    slo: SLO = SLO()
    prompt_sizing: PromptSizingSpec | None = None  # None: calibrate on the server's usage (probes)

    @model_validator(mode="after")
    def _fits(self) -> "Workload":
        s = self.session
        first = self.apps.system_tokens.smallest + max(s.task_tokens.smallest, 1) + max(s.max_tokens.smallest, 1)
        if first > self.limits.max_context_tokens:
            raise ValueError(f"limits.max_context_tokens ({self.limits.max_context_tokens}) is below the smallest "
                             f"first turn the distributions allow ({first:g} tokens)")
        return self

    def with_shape(self, kind: ShapeKind | None) -> "Workload":
        """The same workload run under another load shape."""
        if kind is None or kind == self.load.shape.kind:
            return self
        shape = self.load.shape.model_copy(update={"kind": kind})
        return self.model_copy(update={"load": self.load.model_copy(update={"shape": shape})})

    # --- session generation -----------------------------------------------------------------

    def app_system_tokens(self, seed: int) -> list[int]:
        rng = random.Random(f"{seed}:{self.name}:apps")
        return [self.apps.system_tokens.draw_int(rng) for _ in range(self.apps.count)]

    def session_plan(self, seed: int, index: int, start_offset_s: float = 0.0,
                app_tokens: list[int] | None = None) -> SessionPlan:
        """Session `index` of the stream `seed` (independent of every other index)."""
        apps = app_tokens if app_tokens is not None else self.app_system_tokens(seed)
        rng = random.Random(f"{seed}:{self.name}:session:{index}")
        app = rng.randrange(len(apps))
        s = self.session
        n_turns = max(1, s.turns.draw_int(rng))
        budget = self.limits.max_context_tokens - apps[app]
        turns: list[TurnPlan] = []
        for k in range(n_turns):
            user = (s.task_tokens if k == 0 else s.tool_result_tokens).draw_int(rng)
            user = max(user, 1) if k == 0 else user
            max_tokens = max(1, s.max_tokens.draw_int(rng))
            think = s.think_time_s.draw(rng)
            need = user + max_tokens + 2 * TEMPLATE_MARGIN_TOKENS_PER_MESSAGE
            if need > budget:
                if k > 0:
                    break
                user = max(1, budget - max_tokens - 2 * TEMPLATE_MARGIN_TOKENS_PER_MESSAGE)
                need = user + max_tokens + 2 * TEMPLATE_MARGIN_TOKENS_PER_MESSAGE
            budget -= need
            turns.append(TurnPlan(user_tokens=user, max_tokens=max_tokens, think_time_s=round(think, 3)))
        last = turns[-1]
        turns[-1] = TurnPlan(last.user_tokens, last.max_tokens, 0.0)  # nothing follows the last reply
        return SessionPlan(session_id=f"s{seed}-{index}", app_id=f"app{app}", system_tokens=apps[app],
                           turns=tuple(turns), start_offset_s=round(start_offset_s, 3))

    def arrival_offsets_s(self, seed: int) -> Iterator[float]:
        """Open-loop (poisson) session start times; 0 for every session of closed-loop shapes."""
        if self.load.shape.kind != "poisson":
            yield from itertools.repeat(0.0)
            return
        rng = random.Random(f"{seed}:{self.name}:arrivals")
        rate_per_s = self.load.shape.sessions_per_min / 60.0
        t = 0.0
        while True:
            t += rng.expovariate(rate_per_s)
            yield t

    def sessions(self, seed: int, worker_index: int = 0, worker_count: int = 1) -> Iterator[SessionPlan]:
        """The endless session stream of `seed`; a worker takes every `worker_count`-th session."""
        if not 0 <= worker_index < worker_count:
            raise KvlabError(f"worker index {worker_index} is outside 0..{worker_count - 1}")
        apps = self.app_system_tokens(seed)
        for i, offset in enumerate(self.arrival_offsets_s(seed)):
            if i % worker_count == worker_index:
                yield self.session_plan(seed, i, offset, apps)


# --- profiles ------------------------------------------------------------------------------------


def profile_names() -> list[str]:
    """Named profiles, looked up as kvlab.resources says: ./loadtest, then the package's loadtest/."""
    return resources.names(resources.LOADTEST)


def resolve_profile(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists() or "/" in str(name_or_path):
        if not p.is_file():
            raise KvlabError(f"workload file {p} does not exist")
        return p
    return resources.find(resources.LOADTEST, f"{name_or_path}.yaml", f"unknown workload {name_or_path!r}: give a "
                          f"YAML path or one of {', '.join(profile_names()) or '(none found)'}")


def load_workload(name_or_path: str | Path) -> Workload:
    """A profile by name (loadtest/NAME.yaml) or path; errors name the file and the field."""
    path = resolve_profile(name_or_path)
    data = read_mapping(path, "a workload (its fields at the top level)")
    data.setdefault("name", path.stem)
    try:
        return Workload.model_validate(data)
    except ValidationError as e:
        raise KvlabError(format_validation(e, str(path))) from None

