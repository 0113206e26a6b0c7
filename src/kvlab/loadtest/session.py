"""One agent session in play: the conversation a SessionPlan becomes, turn by turn.

The system prompt (the app's shared prefix) opens it; each turn appends its user message (the task,
then a tool result), the server's reply is appended verbatim — regenerated or trimmed text would
change the prefix and defeat the prefix cache — and the next turn resends everything.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlab.loadtest.plan import SessionPlan, TurnPlan
from kvlab.loadtest.render import TextMaker


@dataclass(frozen=True)
class TurnRequest:
    turn: int
    messages: list[dict]
    max_tokens: int
    planned_prompt_tokens: int


class SessionRun:
    def __init__(self, plan: SessionPlan) -> None:
        self.plan = plan
        self.text: TextMaker | None = None
        self.turn = 0
        self.aborted = False
        self.messages: list[dict] = []
        self._text_tokens = 0.0  # plan tokens in the conversation so far (replies: measured)

    def begin(self, text: TextMaker) -> None:
        """Render with the calibration in force when the first turn is sent."""
        if self.text is not None:
            return
        self.text = text
        if self.plan.system_tokens > 0:
            self.messages.append({"role": "system", "content": text.system_prompt(self.plan.app_id, self.plan.system_tokens)})
            self._text_tokens += self.plan.system_tokens

    @property
    def done(self) -> bool:
        return self.aborted or self.turn >= len(self.plan.turns)

    @property
    def current(self) -> TurnPlan:
        return self.plan.turns[self.turn]

    def next_request(self) -> TurnRequest:
        """Append this turn's user message and return the request to send."""
        t, text = self.current, self.text
        assert text is not None, "begin() renders the session before its first request"
        content = (text.task(self.plan.session_id, t.user_tokens) if self.turn == 0
                   else text.tool_result(self.plan.session_id, self.turn, t.user_tokens))
        self.messages.append({"role": "user", "content": content})
        self._text_tokens += t.user_tokens
        planned = text.calibration.prompt_tokens(self._text_tokens, len(self.messages))
        return TurnRequest(self.turn, list(self.messages), t.max_tokens, planned)

    def add_reply(self, text: str, completion_tokens: int | None) -> float:
        """The server's reply, verbatim; returns the pause before the next turn."""
        self.messages.append({"role": "assistant", "content": text})
        self._text_tokens += completion_tokens if completion_tokens is not None else self.current.max_tokens
        pause = self.current.think_time_s
        self.turn += 1
        return pause

    def abort(self) -> None:
        """A failed turn ends the session: without the reply there is no next prompt."""
        self.aborted = True
