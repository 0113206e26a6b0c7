"""The simulated engine in virtual time: determinism, block accounting, preemption onset, prefix
caching, metrics, and the roofline's arithmetic."""

import dataclasses
import json
from math import ceil

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvlab.loadtest.plan import SessionPlan, TurnPlan
from kvlab.loadtest.workload import Workload
from kvlab.models import memory
from kvlab.models.cards import card
from kvlab.sim import tokens
from kvlab.sim.config import build_config
from kvlab.replay.run import run_offline
from kvlab.replay.sessions import closed_loop, predicted_max_users
from kvlab.schema.replay import SimRunResults
from kvlab.sim.timing import HOST_MEASURED, MEMORY_EFFICIENCY, PER_SEQ_OVERHEAD_S, ROOFLINE_PER_SEQ_S, STEP_OVERHEAD_S


def _spread(x: float) -> dict:
    return {"dist": "uniform", "low": 0.7 * x, "high": 1.3 * x}


# Four turns over a 1,500-token system prompt, 300 tokens in and 120 out per turn, 1 s think, +-30 %.
AGENTS = Workload.model_validate({
    "name": "sim-test", "apps": {"count": 1, "system_tokens": 1500},
    "session": {"turns": 4, "task_tokens": _spread(300), "tool_result_tokens": _spread(300),
                "max_tokens": _spread(120), "think_time_s": _spread(1.0)},
    "limits": {"max_context_tokens": 4000}})


@pytest.fixture(scope="module")
def small_kv():
    """DeepSeek-V2-Lite on an H100 with the KV cache cut to 600 blocks: agents run out of it."""
    return build_config("deepseek-v2-lite", "h100", max_model_len=4096, num_gpu_blocks_override=600)


def _run(cfg, users=12, seed=0, duration_s=60.0, **kw):
    return run_offline("deepseek-v2-lite", "h100", AGENTS, duration_s, concurrency=users, seed=seed, config=cfg, **kw)


def test_same_seed_same_run(small_kv):
    a, b = _run(small_kv, seed=3), _run(small_kv, seed=3)
    assert a.records == b.records
    assert a.samples == b.samples
    assert a.results.num_preemptions == b.results.num_preemptions
    c = _run(small_kv, seed=4)
    assert c.records != a.records


def test_blocks_never_leak_and_preemptions_recompute(small_kv):
    res = _run(small_kv, users=16, check_blocks=True)  # asserts free + used == total after every step
    eng = res.engine
    assert res.results.num_preemptions > 0
    assert eng.metrics.counters["vllm:num_preemptions"] == res.results.num_preemptions
    done = [r for r in res.records if r["error_kind"] is None]
    assert done and all(r["completion_tokens"] > 0 for r in done)
    assert any(r["num_preemptions"] > 0 for r in done)
    eng.bm.check_no_leak(list(eng.scheduler.running.values()))


def test_decode_fast_path_changes_nothing(small_kv):
    fast = _run(small_kv, users=16)
    slow = _run(small_kv, users=16, fast_decode=False)
    assert fast.records == slow.records
    assert fast.samples == slow.samples


def test_previous_turn_block_check_changes_nothing(small_kv, monkeypatch):
    from kvlab.sim.block_manager import BlockManager

    fast = _run(small_kv, users=16)
    lookup = BlockManager.find_cached_prefix

    def dict_only(self, seq):
        seq.prev_blocks = []
        return lookup(self, seq)

    monkeypatch.setattr(BlockManager, "find_cached_prefix", dict_only)
    slow = _run(small_kv, users=16)
    assert fast.records == slow.records
    assert fast.samples == slow.samples


# One long agent turn over a shared 1000-token system prompt, ending at 8192 tokens: the last KV
# block fills on the last step, so every user holds its full context at the same moment.
LADDER_TURN = TurnPlan(200, 8192 - 1200 + 1, 0.0)


def _synchronized_agents(n: int) -> list[SessionPlan]:
    return [SessionPlan(f"u{i}", "app0", 1000, (LADDER_TURN,)) for i in range(n)]


def _ladder_onset(cfg) -> int:
    return predicted_max_users(cfg.num_blocks, cfg.block_size, _synchronized_agents(1000))


def _ladder_rung(model: str, users: int) -> SimRunResults:
    # every request reaches the engine core at once: no front end admitting them one by one
    cfg = dataclasses.replace(build_config(model, "h100"), frontend_per_request_s=0.0, frontend_per_prompt_token_s=0.0)
    res = run_offline(model, "h100", _synchronized_agents(users), 900.0, config=cfg)
    assert res.results.requests_completed == users
    return res.results


@pytest.mark.parametrize("model", ["deepseek-v2-lite", "llama-3.1-8b"])
def test_preemption_starts_where_the_memory_model_says(model):
    cfg = build_config(model, "h100")
    cap = memory.capacity(card(model).arch, model_name=model, gpu="h100", max_model_len=card(model).context_length)
    assert (cfg.num_blocks, cfg.block_size) == (cap.num_blocks, cap.block_size)
    n = _ladder_onset(cfg)
    shared = 1000 // cap.block_size
    # n users fit: the shared prompt blocks plus each user's own blocks, in num_blocks - 1 (null block).
    assert shared + n * (ceil(8191 / cap.block_size) - shared) <= cap.num_blocks - 1
    assert shared + (n + 1) * (ceil(8191 / cap.block_size) - shared) > cap.num_blocks - 1
    assert _ladder_rung(model, n).num_preemptions == 0
    assert _ladder_rung(model, n + 1).num_preemptions > 0


def test_llama_preempts_earlier_by_the_kv_ratio():
    onset = {}
    for model in ("deepseek-v2-lite", "llama-3.1-8b"):
        cfg = build_config(model, "h100")
        onset[model] = (_ladder_onset(cfg), cfg.capacity.kv_cache_tokens)
    (ds_users, ds_tokens), (ll_users, ll_tokens) = onset["deepseek-v2-lite"], onset["llama-3.1-8b"]
    assert (ds_users, ll_users) == (200, 63)
    # 3.19x the users for 3.16x the KV tokens (DeepSeek's 4.21x smaller KV per token, less its 2x weights).
    assert ds_users / ll_users == pytest.approx(ds_tokens / ll_tokens, rel=0.02)


def test_shared_system_prompt_hits_the_prefix_cache():
    cfg = build_config("deepseek-v2-lite", "h100")
    turn = TurnPlan(100, 20, 0.5)
    plans = [SessionPlan("a", "app", 1000, (turn, turn)), SessionPlan("b", "app", 1000, (turn,), start_offset_s=1.0),
             SessionPlan("c", "other", 1000, (turn,), start_offset_s=1.0)]
    res = run_offline("deepseek-v2-lite", "h100", plans, 30.0, config=cfg)
    by = {(r["session_id"], r["turn"]): r for r in res.records}
    bs = cfg.block_size
    assert by[("a", 0)]["cached_tokens"] == 0
    assert by[("b", 0)]["cached_tokens"] == 1000 // bs * bs  # another session of the same app
    assert by[("c", 0)]["cached_tokens"] == 0  # another app's system prompt
    # The next turn hits its history (prompt + verbatim reply) in full blocks, except the reply's last
    # token: it was sampled, never computed, so its KV was never written.
    history = 1000 + 100 + 20
    assert by[("a", 1)]["cached_tokens"] == (history - 1) // bs * bs
    assert res.engine.metrics.counters["vllm:prefix_cache_hits"] == sum(r["cached_tokens"] for r in res.records)


def test_metric_samples_are_what_a_scraper_parses(small_kv):
    res = _run(small_kv, users=8, duration_s=20.0)
    m = res.engine.metrics
    reg = CollectorRegistry()
    reg.register(m)
    parsed = [(f.name, s.name, s.labels, s.value) for f in text_string_to_metric_families(generate_latest(reg).decode())
              for s in f.samples if not s.name.endswith("_created")]
    assert parsed == list(m.samples())
    last_ts = max(r[0] for r in res.samples)
    at_end = [(fam, name, json.loads(labels), value) for ts, fam, name, labels, value in res.samples if ts == last_ts]
    assert at_end == parsed  # the last scrape is the final state
    assert {r[2] for r in res.samples} >= {"vllm:num_preemptions_total", "vllm:kv_cache_usage_perc",
                                          "vllm:time_to_first_token_seconds_bucket"}


def test_records_hold_itls_that_add_up(small_kv):
    res = _run(small_kv, users=8, duration_s=30.0)
    for r in res.records:
        if r["error_kind"] is None:
            assert len(r["itl_s"]) == r["completion_tokens"] - 1
            assert r["ttft_s"] + sum(r["itl_s"]) == pytest.approx(r["e2e_s"])
            if r["completion_tokens"] > 1:
                assert r["tpot_s"] == pytest.approx(sum(r["itl_s"]) / (r["completion_tokens"] - 1))


def test_run_writes_records_atomically(small_kv, tmp_path):
    import pandas as pd

    _run(small_kv, users=4, duration_s=10.0, out_dir=tmp_path)
    reqs = pd.read_parquet(tmp_path / "requests.parquet")
    mets = pd.read_parquet(tmp_path / "metrics.parquet")
    results = json.loads((tmp_path / "results.json").read_text())
    assert SimRunResults.read(tmp_path / "results.json").requests_completed == results["requests_completed"]
    assert list(reqs.columns)[:6] == ["start_ts", "session_id", "app_id", "turn", "ttft_s", "itl_s"]
    assert list(mets.columns) == ["ts", "family", "name", "labels", "value"]
    assert results["requests_completed"] == int(reqs["error_kind"].isna().sum())
    assert not list(tmp_path.glob(".*.tmp"))


def test_decode_step_roofline_arithmetic(monkeypatch):
    """One Llama-3.1-8B decode on an H100 is weight-bandwidth bound: weights / (3.35 TB/s x eff)."""
    from kvlab.sim import timing as sim_timing
    cfg = build_config("llama-3.1-8b", "h100", timing="roofline")
    c = cfg.cost
    embed = 128256 * 4096 * 2  # the input embedding is a lookup, not read whole
    weights = cfg.capacity.weight_bytes - embed
    kv = 1000 * 131072
    gpu = (weights + kv) / (3.35e12 * MEMORY_EFFICIENCY) + ROOFLINE_PER_SEQ_S
    assert c.decode_step_s(1, 1000) == pytest.approx(gpu + STEP_OVERHEAD_S + PER_SEQ_OVERHEAD_S, rel=1e-12)
    # the host time fitted on the train rows (HOST_FITTED) for the release's vLLM generation while it is set
    # (the default release's, 0.32.0: from 0.11.0 on) ...
    step_s, per_seq_s = sim_timing.HOST_FITTED[(0, 11, 0)]
    assert c.host_s(8) == pytest.approx(step_s + 8 * per_seq_s)
    assert c.decode_step_s(1, 1000) == pytest.approx(gpu + c.host_s(1), rel=1e-12)
    step_s, per_seq_s = sim_timing.HOST_FITTED[(0, 0, 0)]  # ... a release before 0.11.0 its own
    assert build_config("llama-3.1-8b", "h100", timing="roofline", vllm_version="0.8.4").cost.host_s(8) == pytest.approx(
        step_s + 8 * per_seq_s)
    # ... and a run at -tp > 1 its generation's multiprocess-executor value where one is fitted (HOST_FITTED_MULTIPROC)
    monkeypatch.setattr(sim_timing, "HOST_FITTED_MULTIPROC", {(0, 0, 0): (0.004, 0.00005)})
    monkeypatch.setattr(sim_timing, "HOST_FITTED_ASYNC", None)  # (one scheduling mode's value: below)
    tp2 = build_config("llama-3.1-8b", "h100", timing="roofline", vllm_version="0.8.4", tensor_parallel_size=2)
    assert tp2.cost.host_s(8) == pytest.approx(0.004 + 8 * 0.00005)
    assert "before 0.11.0 at -tp > 1 (4.00 ms per step + 50.0 us" in tp2.host_source()
    # ... and a run served with async scheduling its (generation, executor)'s value where one is fitted
    # (HOST_FITTED_ASYNC), the other scheduling mode keeping the executor's
    monkeypatch.setattr(sim_timing, "HOST_FITTED_ASYNC", {((0, 0, 0), 2): (0.0005, 0.00002)})
    tp2a = build_config("llama-3.1-8b", "h100", timing="roofline", vllm_version="0.10.2", tensor_parallel_size=2,
                        async_scheduling=True)
    assert tp2a.cost.host_s(8) == pytest.approx(0.0005 + 8 * 0.00002)
    assert "before 0.11.0 at -tp > 1 with async scheduling (0.50 ms per step + 20.0 us" in tp2a.host_source()
    assert build_config("llama-3.1-8b", "h100", timing="roofline", vllm_version="0.10.2",
                        tensor_parallel_size=2).cost.host_s(8) == pytest.approx(0.004 + 8 * 0.00005)
    monkeypatch.setattr(sim_timing, "HOST_FITTED_ASYNC", None)
    assert build_config("llama-3.1-8b", "h100", timing="roofline", vllm_version="0.8.4").cost.host_s(8) == pytest.approx(
        step_s + 8 * per_seq_s)  # -tp 1 keeps HOST_FITTED's
    step_s, per_seq_s = sim_timing.HOST_FITTED[(0, 11, 0)]  # a generation without one: HOST_FITTED's at every -tp
    assert build_config("llama-3.1-8b", "h100", timing="roofline", tensor_parallel_size=2).cost.host_s(8) == pytest.approx(
        step_s + 8 * per_seq_s)
    # ... and the release's measured one (HOST_MEASURED: 0.32.0's by default, 0.11.0's at 0.11.0) without it
    monkeypatch.setattr(sim_timing, "HOST_FITTED", None)
    measured = build_config("llama-3.1-8b", "h100", timing="roofline").cost
    assert measured.host_s(8) == pytest.approx(HOST_MEASURED[(0, 32, 0)][0] + 8 * HOST_MEASURED[(0, 32, 0)][1])
    older = build_config("llama-3.1-8b", "h100", timing="roofline", vllm_version="0.11.0").cost
    assert older.host_s(8) == pytest.approx(0.00034 + 8 * 0.0000178)
    assert older.decode_step_s(1, 1000) == pytest.approx(gpu + older.host_s(1), rel=1e-12)
    # A 4096-token prefill is compute bound: 2 x active parameters per token dominates.
    assert c.compute_s(build_prefill_work(4096)) > c.memory_s(build_prefill_work(4096))


@pytest.mark.parametrize("model,tp", [("llama-3.1-8b", 1), ("deepseek-v2-lite", 2)])
def test_decode_fast_path_prices_steps_exactly_as_step_time(model, tp):
    """decode_step_s skips building a StepWork; the floats must be the very same."""
    from kvlab.sim.timing import StepWork

    c = build_config(model, "h100", tensor_parallel_size=tp, timing="roofline").cost
    for n, kv in [(1, 0), (1, 1000), (7, 12345), (128, 987_654), (1024, 31_000_000)]:
        assert c.decode_step_s(n, kv) == c.step_time_s(StepWork(n, n, n, kv, kv, 0, 0))


def build_prefill_work(n):
    from kvlab.sim.timing import StepWork

    return StepWork(n, 1, 1, n, 0, n * (n + 1) // 2, 0)


def test_mla_moe_reads_only_routed_experts():
    c = build_config("deepseek-v2-lite", "h100", timing="roofline").cost
    assert c.expert_fraction(1) == pytest.approx(6 / 64)
    assert c.expert_fraction(10_000) == pytest.approx(1.0)
    assert c.kv_bytes_per_token == 27 * 576 * 2  # the MLA latent, bf16


def test_tokenizer_is_prefix_stable_and_counts_words():
    text = "You are a careful coding agent. Tools: read_file, write_file."
    ids = tokens.encode(text)
    assert tokens.encode(text + " Fix bug 42") [:len(ids)] == ids
    assert len(tokens.encode("one two three four")) == 4
    reply = tokens.decode(tokens.output_tokens(123, 0, 50))
    assert tokens.encode(reply) == tokens.output_tokens(123, 0, 50)


def test_workload_sessions_are_the_ones_locust_plays():
    """Closed-loop users play the workload's seeded session stream in order, started as Locust spawns them."""
    plans = list(zip(range(6), closed_loop(AGENTS, 5, users=4)))
    locust = list(zip(range(6), AGENTS.sessions(5)))
    assert [p.session_id for _, p in plans] == [p.session_id for _, p in locust] == [f"s5-{i}" for i in range(6)]
    assert [p.turns for _, p in plans] == [p.turns for _, p in locust]
    assert [p.start_offset_s for _, p in plans][:4] == [0.0, 0.25, 0.5, 0.75]  # 4 users within a second
    res = run_offline("deepseek-v2-lite", "h100", AGENTS, 20.0, concurrency=4, seed=5,
                      config=build_config("deepseek-v2-lite", "h100", max_model_len=4096))
    first = {r["session_id"]: r for r in res.records if r["turn"] == 0}
    by_id = dict((p.session_id, p) for _, p in locust)
    for sid, r in first.items():
        if sid in by_id:
            plan = by_id[sid]
            assert r["prompt_tokens"] == plan.system_tokens + plan.turns[0].user_tokens
            assert r["completion_tokens"] == plan.turns[0].max_tokens


def test_predicted_max_users_counts_each_apps_prefix_once():
    turn = TurnPlan(100, 21, 0.0)  # ends at 1,121 tokens: 70 blocks of 16 (the last token's KV never written)
    plans = [SessionPlan(f"s{i}", f"app{i % 2}", 1000, (turn,)) for i in range(10)]
    # 62 shared blocks per app (once each), 70 - 62 = 8 own blocks per session
    assert predicted_max_users(62 + 62 + 8 * 4 + 1, 16, plans) == 4
    assert predicted_max_users(62 + 62 + 8 * 4, 16, plans) == 3


def test_sim_run_cli_plays_a_workload_profile(kvlab, tmp_path):
    r = kvlab("sim", "run", "deepseek-v2-lite", "--gpu", "h100", "--users", "2,4", "--duration-s", "20",
              "--workload", "agent-smoke", "--max-model-len", "4096", "--out", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    runs = json.loads(r.stdout)["runs"]
    assert [x["users"] for x in runs] == [2, 4]
    for x in runs:
        folder = tmp_path / f"users-{x['users']}"
        assert {p.name for p in folder.iterdir()} == {"requests.parquet", "metrics.parquet", "results.json"}
        assert x["manifest"]["command"][:3] == ["kvlab", "sim", "run"]
        assert x["manifest"]["workload"]["name"] == "agent-smoke"
        assert x["manifest"]["workload"]["source"].endswith("loadtest/agent-smoke.yaml")
        assert x["capacity"]["num_gpu_blocks"] == 90446  # the memory model at --gpu-memory-utilization 0.92
        assert x["requests_completed"] > 0
    bad = kvlab("sim", "run", "deepseek-v2-lite", "--gpu", "h100", "--users", "0")
    assert bad.returncode == 2 and "--users must be positive" in bad.stderr
    bad = kvlab("sim", "run", "deepseek-v2-lite", "--gpu", "h100", "--workload", "no-such-profile")
    assert bad.returncode == 2 and "unknown workload 'no-such-profile'" in bad.stderr


def test_a_sessions_next_turn_checks_the_last_turns_freed_blocks_in_place(monkeypatch):
    """A session's next turn hands the prefix-cache lookup its previous turn's freed block table
    (`prev_blocks`), read when the turn is sent: with async scheduling (the default) a finished request's
    blocks are freed after the next `schedule`, after the player has seen it finish, so reading them then
    left every table empty and each lookup walked the whole context through the dict. The hits are the
    same either way (vLLM's lookup, one dict probe a block, gives the blocks the check confirms)."""
    from kvlab.sim.block_manager import BlockManager

    cfg = build_config("deepseek-v2-lite", "h100", max_model_len=4096)
    assert cfg.async_scheduling
    seen: list[tuple[int, int, bool]] = []  # (turn, len(prev_blocks), hits came back as the array)
    lookup = BlockManager.find_cached_prefix

    def spy(self, seq):
        hits = lookup(self, seq)
        seen.append((int(seq.seq_id.rsplit("-", 1)[1]), len(seq.prev_blocks), isinstance(hits, np.ndarray)))
        via_dict = [self.cached.get(h) for h in seq.hashes_for((seq.num_tokens - 1) // self.block_size, self.block_size)]
        n = len(hits)
        assert np.asarray(hits).tolist() == via_dict[:n] and (n == len(via_dict) or via_dict[n] is None)
        return hits

    monkeypatch.setattr(BlockManager, "find_cached_prefix", spy)
    run_offline("deepseek-v2-lite", "h100", AGENTS, 20.0, concurrency=4, seed=5, config=cfg)
    later = [(n, arr) for turn, n, arr in seen if turn > 0]
    assert later and all(n > 0 for n, _ in later)  # every later turn carries its last turn's table
    assert all(arr for _, arr in later)  # and its hits are those blocks, in place
    assert all(n == 0 for turn, n, _ in seen if turn == 0)


def test_the_event_loop_raises_the_collectors_threshold_and_restores_it():
    import gc

    from kvlab.replay.player import GC_GEN0_THRESHOLD, _fewer_gc_passes

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        with _fewer_gc_passes():
            assert gc.get_threshold() == (GC_GEN0_THRESHOLD, 10, 10)
        assert gc.get_threshold() == (700, 10, 10)
        with pytest.raises(RuntimeError), _fewer_gc_passes():
            raise RuntimeError("a run that fails")
        assert gc.get_threshold() == (700, 10, 10)
        gc.set_threshold(10 * GC_GEN0_THRESHOLD, 10, 10)  # a caller's higher threshold is not lowered
        with _fewer_gc_passes():
            assert gc.get_threshold()[0] == 10 * GC_GEN0_THRESHOLD
    finally:
        gc.set_threshold(*before)
