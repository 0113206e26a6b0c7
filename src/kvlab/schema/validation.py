"""bench/sim_validation_summary.json (written by `python bench/sim_validation.py`): how far the
simulator's figures stray from published real-vLLM runs, read where a simulated figure is shown.

`error_band()` is the sentence that goes beside every simulated figure (report, planner tables,
demo): the test rows' share within ±25 % and the timing the validation ran on, where the summary
file exists in the working directory; else a pointer to the validation table in docs/simulator-validation.md."""

from __future__ import annotations

from pathlib import Path

from pydantic import ConfigDict

from kvlab.errors import KvlabError
from kvlab.schema import Part

SUMMARY_FILE = Path("bench") / "sim_validation_summary.json"
NO_SUMMARY = "validation error band: see the simulator validation table, docs/simulator-validation.md (python bench/sim_validation.py)"


class SimValidationSummary(Part):
    """The headline of the validation table (other keys the validator writes are ignored)."""

    model_config = ConfigDict(extra="ignore")
    test_within_25pct_share: float  # share of the test rows' figures within ±25 % of the measured
    timing: str  # the timing the validation ran on


def summary_paths() -> list[Path]:
    """Where the summary is looked for: the working directory's bench/ (a checkout's root, where
    `make demo` and bench/sim_validation.py run; kvlab looks for nothing outside its package)."""
    return [Path.cwd() / SUMMARY_FILE]


def read_summary() -> SimValidationSummary | None:
    """The first summary file found, or None; one that is there but unreadable raises KvlabError."""
    import json

    from pydantic import ValidationError

    for path in summary_paths():
        if not path.is_file():
            continue
        try:
            return SimValidationSummary.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, ValidationError) as e:
            first = str(e).splitlines()[0]
            raise KvlabError(f"{path}: not a simulator validation summary ({first})") from None
    return None


def error_band() -> str:
    """The validation error band, in words, for a simulated figure's label."""
    s = read_summary()
    if s is None:
        return NO_SUMMARY
    return (f"validation: {s.test_within_25pct_share:.0%} of test figures within ±25 % of published vLLM runs "
            f"(timing {s.timing}; bench/sim_validation.py)")
