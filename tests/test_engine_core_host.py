"""bench/engine_core_host.py: vLLM's own engine core timed step by step (the measurement behind
kvlab.sim.timing.HOST_MEASURED)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import engine_core_host  # noqa: E402


def test_least_squares_line():
    assert engine_core_host.fit([1, 2, 4], [3.0, 5.0, 9.0]) == pytest.approx((1.0, 2.0))


@pytest.mark.slow
def test_it_times_the_installed_vllms_engine_core_step_by_step():
    """The installed vLLM (the CPU build) steps N requests of 32 prompt tokens and 64 output tokens:
    after the prefill step, 63 steps of N decodes each, of which the first 4 and last 2 are left out;
    each step's host part is what is left of it besides the model, its logits and the sampler."""
    out = subprocess.run([sys.executable, str(BENCH / "engine_core_host.py"), "--batches", "1,8", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert set(r["batches"]) == {"1", "8"}
    for b in r["batches"].values():
        assert b["decode_steps"] == engine_core_host.OUTPUT_TOKENS - 1 - engine_core_host.SKIP_FIRST - engine_core_host.SKIP_LAST
        assert 0 < b["host_s"] < b["step_s"] and 0 < b["gpu_work_s"] < b["step_s"]
    assert r["vllm"].startswith("0.32") and r["per_request_s"] > 0
