"""What a workload asks for, in tokens and seconds: the contract between the workload model, the
Locust users that turn it into HTTP requests, and the simulator that plays it in virtual time.

A plan says how many tokens each turn adds and how long the agent pauses; the text itself is made
by the load generator, and the tokens really sent are what the server reports in `usage`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TurnPlan:
    """One request of a session."""

    user_tokens: int  # tokens this turn appends before its request: the task, or a tool result
    max_tokens: int  # reply length asked for (with ignore_eos where the server accepts it)
    think_time_s: float  # pause after the reply, before the next turn (tool run, thinking)


@dataclass(frozen=True)
class SessionPlan:
    """One agent session: a shared prefix, then turns whose context grows by each turn's input and
    the server's verbatim reply."""

    session_id: str
    app_id: str  # sessions of one app share its system prompt and tool definitions
    system_tokens: int  # the app's shared prefix (system prompt + tool schemas)
    turns: tuple[TurnPlan, ...]
    start_offset_s: float = 0.0  # when the session starts, for open-loop arrivals

    @property
    def context_tokens_at_end(self) -> int:
        """Tokens in the conversation after the last reply (template tokens not included)."""
        return self.system_tokens + sum(t.user_tokens + t.max_tokens for t in self.turns)
