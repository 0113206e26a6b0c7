"""The user's path: `make experiment` ends with the comparison report over every run in its results
folder (two models, one report), `make report` over results/, and live progress on the long
commands on a terminal (a pseudo-terminal here), none in a pipe or with --json.

Everything runs on the simulated engine with short windows, so the tests need no GPU and little time.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).resolve().parent.parent if (Path(sys.prefix) / "bin").is_dir() else None
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def make(target: str, cwd: Path, **variables: str) -> subprocess.CompletedProcess:
    """`make TARGET VAR=...` from the repository's Makefile, run in `cwd`, with the kvlab under test
    (this interpreter and this checkout's src) and no set-up step (the environment is installed)."""
    venv = Path(sys.prefix)
    extra = "cpu"
    argv = ["make", "-f", str(REPO / "Makefile"), "-o", str(venv / f".kvlab-setup-{extra}"), target,
            f"VENV={venv}", f"EXTRA={extra}", f"KVLAB={sys.executable} -m kvlab",
            *(f"{k}={v}" for k, v in variables.items())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_two_make_experiments_end_in_one_report_of_both(tmp_path):
    """`make experiment MODEL=deepseek-v2-lite`, then `MODEL=llama-3.1-8b`: each prints the report's
    path last; the second report holds both models side by side, the MLA model compared with the
    GQA baseline; `kvlab report results/one` and `make report` work on the same runs."""
    cell = dict(QUANT="bf16", ENGINE="sim", GPU="h100", USERS="2", DURATION="4", WARMUP="0")
    first = make("experiment", tmp_path, MODEL="deepseek-v2-lite", **cell)
    assert first.returncode == 0, first.stderr[-3000:]
    report = tmp_path / "results" / "one" / "report" / "index.html"
    assert first.stdout.strip().splitlines()[-1] == "results/one/report/index.html" and report.is_file()
    second = make("experiment", tmp_path, MODEL="llama-3.1-8b", **cell)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.strip().splitlines()[-1] == "results/one/report/index.html"

    out = report.parent
    rec = json.loads((out / "report.json").read_text())
    assert rec["complete"] and rec["baseline"] == "llama-3.1-8b/bf16"
    assert any(s.startswith("deepseek-v2-lite/bf16 (MLA") and "llama-3.1-8b/bf16" in s for s in rec["headline"])
    head = {r["config"] for r in json.loads((out / "headline.json").read_text())}
    load = {r["config"] for r in json.loads((out / "under_load.json").read_text())}
    assert head == load == {"deepseek-v2-lite/bf16", "llama-3.1-8b/bf16"}
    md = (out / "summary.md").read_text()
    assert "| deepseek-v2-lite/bf16 |" in md and "| llama-3.1-8b/bf16 |" in md

    r = subprocess.run([sys.executable, "-m", "kvlab", "report", "results/one"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "results/one/report/index.html"
    r = make("report", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "results/report/index.html"
    assert {x["config"] for x in json.loads((tmp_path / "results" / "report" / "headline.json").read_text())} == head
