"""kvlab's simulated scheduler against vLLM's own V1 `Scheduler` (the installed vLLM, the CPU build of
0.32), step by step: the same requests scheduled with the same token counts and the same
preemptions, over random scenarios with chunked prefill, prefix-cache hits and a KV cache small
enough to preempt (bench/scheduler_conformance.py; bench/vllm_scheduler_trace.py drives vLLM's
scheduler without a model). Also that the check can fail: kvlab simulating vLLM 0.11.0's admission
and free queue does not match 0.32's scheduler; and vLLM's AsyncScheduler against kvlab's async scheduling."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kvlab.errors import KvlabError
from kvlab.sim.block_manager import BlockManager
from kvlab.sim.config import build_config, scheduler_behaviour
from kvlab.sim.sequence import Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import scheduler_conformance as conf  # noqa: E402
import vllm_scheduler_trace as vtrace  # noqa: E402

SCENARIOS = range(25)


@pytest.fixture(scope="module")
def vllm_runs():
    pytest.importorskip("vllm.v1.core.sched.scheduler", reason="needs vLLM (CPU or GPU build)")
    scenarios = [conf.scenario(seed) for seed in SCENARIOS]
    return vtrace.version(), scenarios, [vtrace.trace(**s) for s in scenarios]


def test_every_step_matches_vllms_scheduler(vllm_runs):
    version, scenarios, traces = vllm_runs
    rows = conf.compare(scenarios, traces, version)
    assert [r["first_difference"] for r in rows] == [None] * len(rows), [
        (seed, r) for seed, r in zip(SCENARIOS, rows) if r["first_difference"] is not None]
    # the scenarios exercise what they are for: preemptions, chunked prefills, cache hits, arrivals
    assert sum(r["preemptions"] for r in rows) > 100
    steps = [step for t in traces for step, _ in t]
    assert any(n > 1 and len(step) > 1 for step in steps for n in step.values())  # a prefill among decodes
    assert any(not step for step in steps)  # idle steps between arrivals


def test_a_published_bursts_scale_matches_vllms_scheduler():
    """At a published burst's scale (conf.burst_scenario: ShareGPT-shaped prompts at once on the KV cache of
    gpustack's Qwen3-32B A100 run, here 400 of them) every step matches vLLM's scheduler too, through
    hundreds of preemptions, many of requests that already had their first token."""
    pytest.importorskip("vllm.v1.core.sched.scheduler", reason="needs vLLM (CPU or GPU build)")
    s = conf.burst_scenario(400)
    trace = vtrace.trace(**s)
    (row,) = conf.compare([s], [trace], vtrace.version())
    assert row["first_difference"] is None and row["steps"] > 1000, row
    assert row["preemptions"] > 100
    prompts, seen, after_first = {r[0]: len(r[1]) for r in s["requests"]}, set(), set()
    for step, preempted in trace:
        after_first.update(r for r in preempted if r in seen)
        seen.update(r for r, n in step.items() if n == 1 or n >= prompts[r])  # a decode, or a whole prompt's prefill
    assert len(after_first) > 50


def test_the_check_sees_another_releases_scheduler(vllm_runs):
    """vLLM 0.11.0's scheduler admits on the first chunk and frees every block to the back of the queue:
    simulated as that release, kvlab must not match 0.32's scheduler."""
    version, scenarios, traces = vllm_runs
    if scheduler_behaviour(version) == scheduler_behaviour("0.11.0"):
        pytest.skip(f"vLLM {version} schedules as 0.11.0 does")
    rows = conf.compare(scenarios, traces, "0.11.0")
    assert sum(r["first_difference"] is not None for r in rows) >= len(rows) // 2


def test_scheduler_behaviour_by_release():
    # (admission reserves the whole sequence, freed blocks without a hash reused first,
    #  chunked prefill off: a prompt over the budget skipped rather than the end of admission, async scheduling)
    assert scheduler_behaviour("0.9.2") == (False, False, True, False)
    assert scheduler_behaviour("0.11.0") == (False, False, True, False)
    assert scheduler_behaviour("0.12.0") == (False, False, False, False)
    assert scheduler_behaviour("0.14.0") == (False, False, False, True)
    assert scheduler_behaviour("0.14.0", pipeline_parallel=True).async_scheduling is False
    assert scheduler_behaviour("0.19.0") == (True, False, False, True)
    assert scheduler_behaviour("0.27.1") == (True, False, False, True)
    assert scheduler_behaviour("0.28.0") == (True, True, False, True)
    assert scheduler_behaviour("0.32") == (True, True, False, True)
    assert scheduler_behaviour("0.32", reserve_full_isl=False, async_scheduling=False) == (False, True, False, False)
    with pytest.raises(KvlabError, match="no-scheduler-reserve-full-isl.*0.19"):
        scheduler_behaviour("0.11.0", reserve_full_isl=False)
    cfg = build_config("llama-3.1-8b", "h100", vllm_version="0.11.0")
    assert (cfg.scheduler_reserve_full_isl, cfg.uncached_blocks_first, cfg.skip_unfit_prompts,
            cfg.async_scheduling) == (False, False, True, False)


def _freed_order(uncached_first: bool) -> tuple[list[int], list[int]]:
    """(the blocks of a request of 2 full blocks and 1 partial, the blocks a fresh request takes after it is freed)."""
    bm = BlockManager(8, 4, enable_caching=True, uncached_first=uncached_first)
    a = Sequence("a", list(range(10)), 1, 0.0)
    assert bm.allocate_slots(a, 10)
    held = list(a.block_table)
    bm.free_seq(a)
    b = Sequence("b", [99] * 28, 1, 0.0)
    assert bm.allocate_slots(b, 28)
    return held, list(b.block_table)


def test_free_queue_order_by_release():
    held, taken = _freed_order(uncached_first=True)
    # 0.28+: the partial block (no hash) first, then the never-used blocks, the cached ones last (tail first)
    assert taken == [held[2], 4, 5, 6, 7, held[1], held[0]]
    held, taken = _freed_order(uncached_first=False)
    # before: the never-used blocks, then the freed ones in the order freed (tail first)
    assert taken == [4, 5, 6, 7, held[2], held[1], held[0]]


def test_async_scheduling_matches_vllms_async_scheduler(vllm_runs):
    """vLLM's AsyncScheduler (the GPU default from 0.14), driven as its engine core's batch queue of two
    drives it: the same busy steps as kvlab's async scheduling; kvlab's synchronous scheduling differs."""
    version, scenarios, _ = vllm_runs
    some = [{**s, "async_scheduling": True} for s in scenarios[:10]]
    traces = [vtrace.trace(**s) for s in some]
    rows = conf.compare(some, traces, version, busy_only=True)
    assert [r["first_difference"] for r in rows] == [None] * len(rows)
    sync = conf.compare([{**s, "async_scheduling": False} for s in some], traces, version, busy_only=True)
    assert sum(r["first_difference"] is not None for r in sync) >= len(sync) // 2
    assert sum(r["steps"] for r in sync) > sum(r["kvlab_steps"] for r in sync)  # finished slots freed later
