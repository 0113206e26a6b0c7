"""Token counts -> text, calibrated against the server's own `usage.prompt_tokens`.

Text is seeded filler words: an app's system prompt is the same string in every session of the
app (so the prefix cache can hit), a session's task starts with its id (so sessions diverge right
after the shared prefix), tool results are fresh per turn. How many tokens a word costs depends on
the server's tokenizer, so three tiny probes (max_tokens=1) measure it before the first turn:
  A = [user ""]            -> base + 1 message
  B = [system "", user ""] -> base + 2 messages
  C = [user (N words)]     -> A + N x tokens_per_word
The counts recorded per request are always the server's; the calibration only aims the sizes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from kvlab.errors import KvlabError

# Common English words, as agents' prompts and tool outputs are mostly English and JSON keys.
WORDS: tuple[str, ...] = tuple("""
the of and to in is for on that with as it by this be are from at or an was not can you will if
have all which has more other new one about also any when use used using data file files system
user users result results tool tools call function value values name type list item items error
status code request response query search read write open close update create delete return
first next last time step steps plan task tasks agent model server client session turn input
output text content message messages number string object array field fields path line lines
table row rows column key keys cache memory block page size count total check run test tests
build start stop done ready found missing valid check retry report summary answer question
source target local remote config option options default value change changes state event
events order range start end before after between within without under over into out up down
""".split())

PROBE_WORDS = 128


class CalibrationError(KvlabError, ValueError):
    """The server's usage counts cannot size prompts (a run must stop, not retry)."""


@dataclass(frozen=True)
class Calibration:
    """Tokens per filler word and the chat template's overhead, as measured on one server."""

    tokens_per_word: float = 1.0
    message_tokens: float = 4.0  # template tokens per message (role markers, separators)
    base_tokens: float = 3.0  # template tokens per request (generation prompt, BOS)
    measured: bool = False
    # how the figures were found: "default" (before calibration), "calibrated" (the server's usage
    # on probes A, B, C), "tokenizer" (a local tokenizer), "tokens_per_word" (a stated ratio)
    method: str = "default"

    def words_for(self, n_tokens: int) -> int:
        if n_tokens <= 0:
            return 0
        return max(1, round(n_tokens / self.tokens_per_word))

    def prompt_tokens(self, text_tokens: float, n_messages: int) -> int:
        """What a prompt of `n_messages` holding `text_tokens` should count on the server."""
        return round(self.base_tokens + self.message_tokens * n_messages + text_tokens)

    @classmethod
    def fit(cls, a_tokens: int, b_tokens: int, c_tokens: int, probe_words: int = PROBE_WORDS) -> "Calibration":
        """From the probe counts A, B, C (module docstring)."""
        message = max(0, b_tokens - a_tokens)
        base = max(0, a_tokens - message)
        per_word = (c_tokens - a_tokens) / probe_words
        if per_word <= 0:
            raise CalibrationError(
                f"calibration failed: the server's usage.prompt_tokens does not grow with the prompt (probe A "
                f"[user \"\"] counted {a_tokens}, B [system \"\", user \"\"] {b_tokens}, C [user {probe_words} words] "
                f"{c_tokens}), so it cannot size prompts; rerun with --no-calibrate and --tokenizer PATH or "
                f"--tokens-per-word X")
        return cls(tokens_per_word=per_word, message_tokens=message, base_tokens=base, measured=True,
                   method="calibrated")


def filler(key: str, n_words: int) -> str:
    """`n_words` seeded words; the same key gives the same text in every process."""
    rng = random.Random(key)
    return " ".join(rng.choices(WORDS, k=n_words))


def probe_messages(kind: str) -> list[dict]:
    if kind == "A":
        return [{"role": "user", "content": ""}]
    if kind == "B":
        return [{"role": "system", "content": ""}, {"role": "user", "content": ""}]
    if kind == "C":
        return [{"role": "user", "content": filler("kvlab:probe", PROBE_WORDS)}]
    raise ValueError(kind)


@dataclass(frozen=True)
class TextMaker:
    """Renders a plan's token counts into text for one run (seed) and one calibration."""

    seed: int
    calibration: Calibration

    def system_prompt(self, app_id: str, n_tokens: int) -> str:
        return _system_prompt(self.seed, app_id, self.calibration.words_for(n_tokens))

    def task(self, session_id: str, n_tokens: int) -> str:
        head = f"Task {session_id}:"
        return f"{head} {filler(f'{self.seed}:{session_id}:task', self.calibration.words_for(n_tokens))}"

    def tool_result(self, session_id: str, turn: int, n_tokens: int) -> str:
        words = filler(f"{self.seed}:{session_id}:tool:{turn}", self.calibration.words_for(n_tokens))
        return f"Tool result {turn}: {words}" if words else f"Tool result {turn}: ok"


@lru_cache(maxsize=256)
def _system_prompt(seed: int, app_id: str, n_words: int) -> str:
    return filler(f"{seed}:{app_id}:system", n_words)
