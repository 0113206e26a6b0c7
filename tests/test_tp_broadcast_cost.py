"""bench/tp_broadcast_cost.py: what vLLM's multiprocess executor (-tp > 1) pickles per step, on the
installed release's own SchedulerOutput and ModelRunnerOutput (docs/simulator-validation.md, "The
tensor-parallel step's broadcast, measured")."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import frontend_cost  # noqa: E402


def test_it_pickles_the_installed_vllms_own_step_and_output_and_fits_a_line():
    """vLLM 0.32's batched CachedRequestData (one record of lists, not one a request as up to 0.8.x); each
    step and output survives the round trip with its N request ids, whose 39 characters each (`cmpl-`, 32
    hex digits, `-0`) the step's bytes hold at least once; the line is the least-squares one over the
    batches' totals."""
    out = subprocess.run([sys.executable, str(BENCH / "tp_broadcast_cost.py"), "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["vllm"].startswith("0.32") and r["per_request_records"] is False
    batches = {int(n): b for n, b in r["batches"].items()}
    assert sorted(batches) == [1, 8, 32, 128, 256, 512]
    for n, b in batches.items():
        assert b["round_trip"] and b["step_bytes"] >= 39 * n and b["output_bytes"] >= 39 * n
        assert b["total_s"] == pytest.approx(sum(b["parts_s"])) and all(p > 0 for p in b["parts_s"])
    ns = sorted(batches)
    assert (r["per_step_s"], r["per_request_s"]) == pytest.approx(
        frontend_cost.fit(ns, [batches[n]["total_s"] for n in ns]))
    assert r["per_request_s"] > 0


def test_a_python_without_vllm_is_a_one_line_error():
    out = subprocess.run([sys.executable, str(BENCH / "tp_broadcast_cost.py"), "--vllm-python", "/bin/false"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 1 and out.stderr.startswith("error: the driver failed under /bin/false")
    assert len(out.stderr.strip().splitlines()) == 1
