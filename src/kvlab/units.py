"""Units every stage shares: binary sizes and the one duration grammar.

A duration is a number of seconds (`90`, `1.5`), one number with a unit (`90s`, `2m`, `1.5h`,
`500ms`) or Locust's `-t` form, units in falling order (`1h30m`, `2m30s`, `1h 30m 15s`);
units are case-insensitive.
"""

from __future__ import annotations

import re

from kvlab.errors import KvlabError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

_SECONDS_PER_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3}
_NUMBER = r"\d+(?:\.\d+)?"
_PART = re.compile(rf"({_NUMBER})\s*(ms|h|m|s)", re.IGNORECASE)
_DURATION = re.compile(rf"\s*(?:{_NUMBER}|(?:{_NUMBER}\s*(?:ms|h|m|s)\s*)+)\s*", re.IGNORECASE)
_EXAMPLES = "use seconds or e.g. 90s, 5m, 1h30m, 500ms"


class DurationError(KvlabError, ValueError):
    """Not a duration. A ValueError too, so that a pydantic validator reports it on its field."""


def parse_duration_s(value: str | int | float, *, allow_zero: bool = False, what: str | None = None) -> float:
    """'90', '90s', '2m', '1.5h', '500ms', '1h30m' (or a number) -> seconds, positive (or zero
    where allow_zero). `what` names the option or field in the message."""
    where = f"{what}: " if what else ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DurationError(f"{where}not a duration: {value!r} ({_EXAMPLES})")
    if isinstance(value, str):
        seconds = _seconds_of_text(value, where)
    else:
        seconds = float(value)
    if seconds != seconds or seconds < 0 or (seconds == 0 and not allow_zero):
        raise DurationError(f"{where}a duration must be positive, got {value!r}")
    return seconds


def _seconds_of_text(text: str, where: str) -> float:
    if not _DURATION.fullmatch(text):
        raise DurationError(f"{where}not a duration: {text!r} ({_EXAMPLES})")
    parts = _PART.findall(text)
    if not parts:
        return float(text)
    units = [u.lower() for _, u in parts]
    order = list(_SECONDS_PER_UNIT)
    if [order.index(u) for u in units] != sorted({order.index(u) for u in units}):
        raise DurationError(f"{where}not a duration: {text!r} (units in falling order, each once: 1h30m, not 30m1h)")
    return sum(float(n) * _SECONDS_PER_UNIT[u] for n, u in zip((n for n, _ in parts), units))
