"""What the fault tests check after a fault, whichever server misbehaved (tests/fake_openai.py in
tests/test_faults.py, `kvlab sim serve --fault` in tests/test_sim_faults.py): the records a repeat
left, and no process of the run left, found by an environment tag every child inherits."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from proc_watch import TAG_ENV, GroupWatch, new_tag, tagged
from kvlab.experiments import index

REPO = Path(__file__).resolve().parents[1]


class TaggedRun:
    """One test's runs: the tag that finds their processes, in the repository (for loadtest/ and
    deploy/ profiles), without a key from the environment."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.mp = mp
        self.tag = new_tag()
        mp.setenv(TAG_ENV, self.tag)
        mp.delenv("KVLAB_API_KEY", raising=False)
        mp.chdir(REPO)

    def watch(self) -> GroupWatch:
        return GroupWatch(self.tag)

    def kill_leftovers(self) -> None:
        for p in tagged(self.tag):
            p.kill()


def status(out: Path, cell: str, k: int = 1) -> dict:
    return json.loads((out / cell / f"repeat-{k}" / "status.json").read_text())


def results(out: Path, cell: str, k: int = 1) -> dict:
    return json.loads((out / cell / f"repeat-{k}" / "results.json").read_text())


def assert_records_whole(out: Path) -> None:
    """Every JSON record parses, no temporary file is left, the index lists every repeat."""
    for p in out.rglob("*.json"):
        json.loads(p.read_text())
    assert [p for p in out.rglob("*.tmp")] == []
    rows = index.query(out)
    assert len(rows) == len(list(p for p in out.glob("*/repeat-*/status.json") if ".partial-" not in str(p)))


def record_lines(folder: Path) -> int:
    return sum(p.read_text().count("\n") for p in folder.glob("requests-*.jsonl*")) if folder.is_dir() else 0


def wait_for(predicate, timeout_s: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
