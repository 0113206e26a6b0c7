"""Workload profiles and the seeded SessionPlans they generate."""

import itertools
import math

import pytest

from kvlab.errors import KvlabError
from kvlab.loadtest.plan import SessionPlan
from kvlab.loadtest.workload import TEMPLATE_MARGIN_TOKENS_PER_MESSAGE, Workload, load_workload, profile_names

PROFILES = ["agent", "agent-smoke", "random", "shared-prefix"]


def take(it, n):
    return list(itertools.islice(it, n))


@pytest.mark.parametrize("name", PROFILES)
def test_profiles_load_and_generate(name):
    wl = load_workload(name)
    assert wl.name == name
    sessions = take(wl.sessions(0), 50)
    assert all(isinstance(s, SessionPlan) for s in sessions)
    assert all(s.context_tokens_at_end <= wl.limits.max_context_tokens for s in sessions)
    assert all(s.turns[-1].think_time_s == 0.0 for s in sessions)


def test_profile_names_cover_the_shipped_yaml():
    assert set(PROFILES) <= set(profile_names())


def test_random_profile_is_vllm_bench_random():
    s = next(load_workload("random").sessions(7))
    assert (s.system_tokens, len(s.turns), s.turns[0].user_tokens, s.turns[0].max_tokens) == (0, 1, 1024, 128)


def test_shared_prefix_profile_shares_four_prefixes():
    wl = load_workload("shared-prefix")
    sessions = take(wl.sessions(0), 200)
    assert {s.app_id for s in sessions} == {"app0", "app1", "app2", "app3"}
    assert {s.system_tokens for s in sessions} == {1024}


def test_sessions_are_deterministic_per_seed_and_index():
    wl = load_workload("agent")
    a, b, c = take(wl.sessions(3), 20), take(wl.sessions(3), 20), take(wl.sessions(4), 20)
    assert a == b
    assert a != c
    assert wl.session_plan(3, 11) == a[11]  # index i depends on (seed, i) only


def test_app_prefix_is_shared_by_the_apps_sessions():
    wl = load_workload("agent")
    by_app = {}
    for s in take(wl.sessions(0), 200):
        by_app.setdefault(s.app_id, set()).add(s.system_tokens)
    assert len(by_app) == 8 and all(len(v) == 1 for v in by_app.values())
    assert all(1500 <= next(iter(v)) <= 3000 for v in by_app.values())


def test_workers_partition_the_stream():
    wl = load_workload("agent-smoke")
    whole = take(wl.sessions(1), 30)
    parts = [take(wl.sessions(1, i, 3), 10) for i in range(3)]
    assert sorted(p.session_id for part in parts for p in part) == sorted(s.session_id for s in whole)
    assert parts[1][0] == whole[1] and parts[2][3] == whole[11]
    with pytest.raises(KvlabError, match="worker index 3"):
        next(wl.sessions(1, 3, 3))


def test_poisson_offsets_are_open_loop_arrivals():
    wl = load_workload("agent-smoke").with_shape("poisson")
    offsets = [s.start_offset_s for s in take(wl.sessions(0), 2000)]
    assert offsets == sorted(offsets) and offsets[0] > 0
    rate_per_min = 60 * len(offsets) / offsets[-1]
    assert rate_per_min == pytest.approx(wl.load.shape.sessions_per_min, rel=0.06)
    # closed-loop shapes start every session at once
    assert {s.start_offset_s for s in take(load_workload("agent-smoke").sessions(0), 10)} == {0.0}


def test_context_limit_truncates_sessions():
    wl = Workload.model_validate({
        "name": "tight", "apps": {"system_tokens": 100},
        "session": {"turns": 50, "task_tokens": 50, "tool_result_tokens": 100, "max_tokens": 20},
        "limits": {"max_context_tokens": 1000}})
    s = wl.session_plan(0, 0)
    per_turn = 2 * TEMPLATE_MARGIN_TOKENS_PER_MESSAGE
    # 100 + (50 + 20 + 16) + k x (100 + 20 + 16) <= 1000 -> k = 6 more turns
    assert len(s.turns) == 1 + math.floor((1000 - 100 - 50 - 20 - per_turn) / (100 + 20 + per_turn))
    assert s.context_tokens_at_end <= 1000


def test_distributions_draw_within_bounds():
    wl = load_workload("agent")
    turns = [t for s in take(wl.sessions(0), 300) for t in s.turns]
    assert all(16 <= t.max_tokens <= 512 for t in turns)
    assert all(0 <= t.think_time_s <= 30 for t in turns)
    sizes = sorted(t.user_tokens for s in take(wl.sessions(0), 300) for t in s.turns[1:])
    assert sizes[len(sizes) // 2] == pytest.approx(300, rel=0.15)  # lognormal median 300


@pytest.mark.parametrize("yaml_text, field", [
    ("session:\n  turns: {dist: uniform, low: 5, high: 2}\n", "session.turns.uniform"),
    ("session:\n  max_tokens: {dist: gamma, k: 2}\n", "session.max_tokens"),
    ("apps:\n  count: 0\n", "apps.count"),
    ("load:\n  shape:\n    kind: sawtooth\n", "load.shape.kind"),
    ("session:\n  think_time_s: -1\n", "session.think_time_s.fixed.value"),
    ("sesion:\n  turns: 3\n", "sesion"),
    ("slo:\n  ttft_s: 0\n", "slo.ttft_s"),
])
def test_bad_profile_names_the_field(tmp_path, yaml_text, field):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml_text)
    with pytest.raises(KvlabError) as e:
        load_workload(p)
    assert f"field {field}" in str(e.value) and str(p) in str(e.value)


def test_bad_profile_file(tmp_path):
    with pytest.raises(KvlabError, match="unknown workload 'nope'"):
        load_workload("nope")
    with pytest.raises(KvlabError, match="does not exist"):
        load_workload(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(KvlabError, match="mapping"):
        load_workload(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    with pytest.raises(KvlabError, match="not valid YAML"):
        load_workload(tmp_path / "broken.yaml")


def test_context_limit_below_first_turn_is_rejected(tmp_path):
    p = tmp_path / "w.yaml"
    p.write_text("apps: {system_tokens: 4000}\nlimits: {max_context_tokens: 2048}\n")
    with pytest.raises(KvlabError, match="limits.max_context_tokens"):
        load_workload(p)
