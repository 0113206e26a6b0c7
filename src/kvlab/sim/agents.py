"""A built-in agent workload for `kvlab sim run`: sessions of tool-using turns over a shared prefix.

Each session belongs to one of `apps` apps (sessions of an app share its system prompt and tool
definitions: `system_tokens`), then runs `turns` turns: the agent appends `user_tokens` (the task,
then tool results), asks for `reply_tokens`, and thinks for `think_time_s` before the next turn.
`jitter` spreads each number uniformly by +-jitter (a fraction), drawn from `seed`, so sessions
differ but a seed always gives the same plans. A stand-in for the workload YAML loader
(`kvlab.loadtest.workload`), which yields the same `SessionPlan`s.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from kvlab.errors import KvlabError
from kvlab.loadtest.plan import SessionPlan, TurnPlan


@dataclass(frozen=True)
class AgentWorkload:
    turns: int = 8
    system_tokens: int = 2000
    user_tokens: int = 400
    reply_tokens: int = 200
    think_time_s: float = 2.0
    apps: int = 1
    jitter: float = 0.0
    ramp_s: float = 0.0  # slot i of N starts at i x ramp_s / N

    def __post_init__(self):
        for name in ("turns", "apps"):
            if getattr(self, name) < 1:
                raise KvlabError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("system_tokens", "user_tokens", "think_time_s", "ramp_s"):
            if getattr(self, name) < 0:
                raise KvlabError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.reply_tokens < 1:
            raise KvlabError(f"--reply-tokens must be at least 1, got {self.reply_tokens}")
        if not 0 <= self.jitter < 1:
            raise KvlabError(f"--jitter must be in [0, 1), got {self.jitter}")

    def sessions(self, seed: int, users: int) -> Iterator[SessionPlan]:
        """An endless stream of session plans; the first `users` carry the ramp-up offsets."""
        rng = random.Random(seed)

        def spread(x: float) -> float:
            return x * (1 + self.jitter * (2 * rng.random() - 1)) if self.jitter else x

        k = 0
        while True:
            turns = tuple(
                TurnPlan(max(0, round(spread(self.user_tokens))), max(1, round(spread(self.reply_tokens))),
                         max(0.0, spread(self.think_time_s)))
                for _ in range(self.turns)
            )
            offset = k * self.ramp_s / users if k < users else 0.0
            yield SessionPlan(f"s{seed}-{k}", f"app{k % self.apps}", self.system_tokens, turns, offset)
            k += 1
