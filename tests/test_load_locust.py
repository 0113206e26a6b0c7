"""Locust runs (as subprocesses, the way users run them) against the in-process fake server:
CSVs and records agree, streaming latencies are measured as bytes arrive, faults are counted by
kind while the run goes on, shapes, request bounds, master/worker scale-out, and the commands."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fake_openai import FakeConfig, FakeOpenAI
from kvlab.loadtest.records import read_requests
from kvlab.loadtest.runner import run_load
from kvlab.loadtest.workload import load_workload

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = REPO / "loadtest" / "locustfile.py"

TINY = {
    "name": "tiny",
    "apps": {"count": 2, "system_tokens": 64},
    "session": {"turns": 2, "task_tokens": 32, "tool_result_tokens": 16, "max_tokens": 4, "think_time_s": 0.1},
    "request": {"timeout_s": 3, "stall_timeout_s": 1, "connect_timeout_s": 2},
    "limits": {"max_context_tokens": 1024},
    "load": {"users": 2, "duration_s": 4, "max_requests": 1000},
}


def profile(tmp_path, **overrides) -> Path:
    data = json.loads(json.dumps(TINY))
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    p = tmp_path / f"{data['name']}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def stats_rows(path: Path) -> dict[tuple[str, str], dict]:
    with open(path) as fh:
        return {(r["Type"], r["Name"]): r for r in csv.DictReader(fh)}


def history_users(path: Path) -> list[int]:
    with open(path) as fh:
        return [int(r["User Count"]) for r in csv.DictReader(fh)]


def test_agent_run_measures_the_stream_as_it_arrives(tmp_path):
    # first token after 0.4 s, then one token every 0.15 s: a reader that waits for 1 KiB would
    # see the first token only with the last ones
    with FakeOpenAI(FakeConfig(ttft_s=0.4, itl_s=0.15)) as srv:
        t_before = time.time()
        res = run_load(srv.url, profile(tmp_path), users=2, duration_s=4, out_dir=tmp_path / "run", seed=3)
        t_after = time.time()
        assert srv.verbatim_violations() == []
    assert res.returncode == 0
    for p in (res.stats_csv, res.stats_history_csv, res.failures_csv, res.html_report, res.records_path):
        assert p.is_file(), p
    df = res.requests()
    turns = df[df.kind == "turn"]
    assert len(turns) >= 4 and turns.error_kind.isna().all()
    assert ((turns.start_ts > t_before) & (turns.start_ts < t_after)).all()
    assert turns.ttft_s.between(0.4, 0.9).all()
    assert all(0.1 <= g < 0.6 for gaps in turns.itl_s for g in gaps)
    assert (turns.itl_s.map(len) == 3).all() and (turns.completion_tokens == 4).all()
    assert (turns.e2e_s - turns.ttft_s > 0.3).all()
    assert turns.session_id.str.startswith("s3-").all()

    rows = stats_rows(res.stats_csv)
    assert int(rows[("POST", "tiny")]["Request Count"]) == len(turns)
    assert int(rows[("TTFT", "tiny")]["Request Count"]) == len(turns)
    assert int(rows[("TPOT", "tiny")]["Request Count"]) == len(turns)
    assert int(rows[("ITL", "tiny")]["Request Count"]) == sum(map(len, turns.itl_s))
    # Locust's median (rounded to 10 ms above 100 ms) and the records agree
    assert float(rows[("TTFT", "tiny")]["Median Response Time"]) == pytest.approx(turns.ttft_s.median() * 1000, abs=15)
    assert read_requests(res.out_dir).equals(df)  # a run folder reads as its requests.parquet
    meta = json.loads((res.out_dir / "load.json").read_text())
    assert meta["summary"]["requests"] == len(turns) and meta["shape_schedule"] == [{"offset_s": 0.0, "users": 2}]
    assert load_workload(res.out_dir / "workload.yaml").name == "tiny"
    with pytest.raises(Exception, match="already holds a load run"):
        run_load(srv.url, "agent-smoke", 1, 1, out_dir=res.out_dir)


def fault_plan(n: int, body: dict) -> str | None:
    if body["max_tokens"] == 1:
        return None  # let the calibration probes through
    return {0: "http_500", 1: "malformed", 2: "stall", 3: "drop", 4: "error_event", 5: "no_done", 6: "trickle",
            7: "http_400"}.get(n % 11)


def test_faults_are_counted_by_kind_and_the_run_goes_on(tmp_path):
    with FakeOpenAI(FakeConfig(fault_when=fault_plan, stall_s=2, trickle_s=4)) as srv:
        res = run_load(srv.url, profile(tmp_path, load={"users": 4}), users=4, duration_s=8, out_dir=tmp_path / "run")
    df = res.requests()
    turns = df[df.kind == "turn"]
    kinds = set(turns.error_kind.dropna())
    assert {"http_5xx", "http_4xx", "malformed_sse", "stall", "incomplete", "stream_error", "timeout"} <= kinds
    assert turns.error_kind.isna().sum() >= 5  # the run went on
    assert set(turns[turns.error_kind == "http_5xx"].status_code) == {500}
    assert set(turns[turns.error_kind == "stall"].status_code) == {200}
    # every failed POST is in Locust's stats too, under its kind
    rows = stats_rows(res.stats_csv)
    failed = turns.error_kind.notna() & (turns.error_kind != "cancelled")
    assert int(rows[("POST", "tiny")]["Failure Count"]) == failed.sum()
    messages = (res.failures_csv).read_text()
    assert "http_5xx: HTTP 500" in messages and "stall: no byte for 1 s" in messages
    assert res.summary["errors"]["malformed_sse"] >= 1


def test_server_down(tmp_path):
    res = run_load("http://127.0.0.1:9", profile(tmp_path), users=2, duration_s=3, out_dir=tmp_path / "run")
    df = res.requests()
    assert res.returncode == 0 and len(df) >= 2 and set(df.error_kind) == {"connect"}
    assert res.summary["requests"] == 0  # no turn could start: calibration needs the server
    assert res.summary["probe_errors"]["connect"] == len(df)
    rows = stats_rows(res.stats_csv)
    assert int(rows[("GET", "/v1/models")]["Failure Count"]) >= 2  # retried about once a second


def test_api_key_is_sent_and_never_written(tmp_path, monkeypatch):
    key = "sk-kvlab-test-4f1c2d"
    monkeypatch.setenv("KVLAB_API_KEY", key)
    with FakeOpenAI(FakeConfig(api_key=key)) as srv:
        res = run_load(srv.url, profile(tmp_path), users=2, duration_s=3, out_dir=tmp_path / "run")
    turns = res.requests().query("kind == 'turn'")
    assert len(turns) >= 2 and turns.error_kind.isna().all()  # the server accepted every request
    for f in res.out_dir.rglob("*"):
        if f.is_file():
            assert key.encode() not in f.read_bytes(), f
    assert key not in " ".join(res.command)


def test_request_bound_ends_the_run(tmp_path):
    with FakeOpenAI(FakeConfig(itl_s=0.02)) as srv:
        t0 = time.monotonic()
        res = run_load(srv.url, profile(tmp_path), users=3, duration_s=60, max_requests=7, out_dir=tmp_path / "run")
        took = time.monotonic() - t0
    turns = res.requests().query("kind == 'turn'")
    assert len(turns) == 7 and turns.error_kind.isna().all()  # in-flight requests were let finish
    assert took < 40  # stopped by the bound, not by the 60 s run time


def test_two_workers_split_the_sessions(tmp_path):
    with FakeOpenAI(FakeConfig(itl_s=0.01)) as srv:
        res = run_load(srv.url, profile(tmp_path), users=4, duration_s=5, workers=2, out_dir=tmp_path / "run")
        assert srv.verbatim_violations() == []
    df = res.requests()
    turns = df[df.kind == "turn"]
    assert turns.worker.nunique() == 2 and len(list(res.records_dir.glob("requests-*.jsonl"))) == 2
    assert df[df.kind == "probe"].worker.nunique() == 2  # each worker calibrates itself
    # worker i plays sessions i, i+2, i+4, ...: no session is played by both
    index_parity = turns.session_id.str.split("-").str[1].astype(int) % 2
    assert turns.groupby("worker").apply(lambda g: index_parity[g.index].nunique()).eq(1).all()
    assert turns.groupby("session_id").worker.nunique().eq(1).all()
    rows = stats_rows(res.stats_csv)  # the master aggregates both workers' stats
    assert int(rows[("POST", "tiny")]["Request Count"]) == len(turns)
    assert int(rows[("TTFT", "tiny")]["Request Count"]) == turns.error_kind.isna().sum()


def test_steps_and_diurnal_shapes_drive_the_user_count(tmp_path):
    with FakeOpenAI(FakeConfig(itl_s=0.01)) as srv:
        steps = run_load(srv.url, profile(tmp_path, load={"shape": {"steps": [1, 3], "step_hold_s": 3}}), users=3,
                         duration_s=6, shape="steps", out_dir=tmp_path / "steps")
        day = run_load(srv.url, profile(tmp_path, name="day", load={"shape": {"min_users": 1, "period_s": 6}}),
                       users=4, duration_s=6, shape="diurnal", out_dir=tmp_path / "day")
    seen = history_users(steps.stats_history_csv)
    assert 1 in seen and 3 in seen and max(seen) == 3
    meta = json.loads((steps.out_dir / "load.json").read_text())
    assert meta["shape_schedule"] == [{"offset_s": 0.0, "users": 1}, {"offset_s": 3.0, "users": 3}]
    day_users = {u for u in history_users(day.stats_history_csv) if u > 0}
    assert len(day_users) >= 3 and max(day_users) <= 4  # the compressed day rises and falls


def test_poisson_starts_the_scheduled_sessions(tmp_path):
    p = profile(tmp_path, load={"shape": {"sessions_per_min": 150}})
    with FakeOpenAI(FakeConfig(itl_s=0.01)) as srv:
        res = run_load(srv.url, p, users=6, duration_s=5, shape="poisson", out_dir=tmp_path / "run")
    turns = res.requests().query("kind == 'turn'")
    wl = load_workload(p).with_shape("poisson")
    due = []
    for s in wl.sessions(0):
        if s.start_offset_s >= 4.0:  # allow for the start-up of the run
            break
        due.append(s.session_id)
    started = set(turns[turns.turn == 0].session_id)
    assert set(due) <= started
    first = turns[turns.turn == 0]
    assert first.start_lag_s.notna().all() and first.start_lag_s.median() < 0.5  # slots were free


def test_plain_locust_command(tmp_path):
    with FakeOpenAI(FakeConfig(itl_s=0.01)) as srv:
        cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", srv.url, "--headless", "-u", "2",
               "-t", "3s", "--csv", str(tmp_path / "out" / "ci"), "--workload", str(profile(tmp_path)),
               "--only-summary", "--exit-code-on-error", "0"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = read_requests(tmp_path / "out" / "ci_requests")
    assert (df.kind == "turn").sum() >= 2
    assert (tmp_path / "out" / "ci_stats.csv").is_file()
    assert "TTFT" in proc.stderr  # Locust's own summary table lists the streaming metrics


def test_plain_locust_with_a_bad_workload(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("session:\n  turns: {dist: uniform, low: 3}\n")
    proc = subprocess.run([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-t", "1s",
                           "--host", "http://127.0.0.1:9", "--workload", str(bad)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert "kvlab: error:" in proc.stderr and "field session.turns.uniform.high" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_kvlab_load_command(kvlab, tmp_path):
    with FakeOpenAI(FakeConfig(itl_s=0.01)) as srv:
        p = kvlab("load", "--host", srv.url, "--workload", str(profile(tmp_path)), "--users", "2",
                  "--duration", "3s", "--out", str(tmp_path / "run"), "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["summary"]["requests"] >= 2 and out["summary"]["source"] == "measured"
    assert "kvlab load:" not in p.stderr  # --json: no progress (tests/test_user_path.py sees it on a terminal)
    assert Path(out["records"]).is_file()
    bad = kvlab("load", "--host", "http://127.0.0.1:9", "--workload", "no-such-profile")
    assert bad.returncode == 2 and bad.stderr.startswith("kvlab: error: unknown workload") and "Traceback" not in bad.stderr
    assert kvlab("load", "--host", "x", "--shape", "zigzag").returncode == 2
    env_free = {k: v for k, v in os.environ.items()}
    assert kvlab("load", "--host", "x", "--duration", "soon", env=env_free).stderr.startswith("kvlab: error: duration")
