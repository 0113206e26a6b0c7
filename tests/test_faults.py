"""The fault table (docs/faults.md): each fault injected for real into an experiment run whose
server is tests/fake_openai.py started by kvlab's own launcher (tests/fake_engine.py), with the
outcome asserted: what the user is told, no process of the run left (by an environment tag every
child inherits, and by process group), the finished records intact and readable, the run resumable.

The one fault a fake cannot show, a real vLLM killed mid-run, is in tests/integration/test_faults_vllm.py.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import yaml

import fake_engine
from fault_checks import TaggedRun, assert_records_whole, record_lines, results, status, wait_for
from proc_watch import TAG_ENV, GroupWatch, group_members, tagged
from kvlab import deploy
from kvlab.deploy import launcher
from kvlab.experiments import index, runner
from kvlab.experiments.spec import Cell, validate_spec
from kvlab.io import RecordWriteError
from kvlab.loadtest.records import read_requests
from kvlab.metrics.samples import GAP, read_samples

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
U1, U2 = "llama-3.1-8b__bf16__agent-smoke__u1", "llama-3.1-8b__bf16__agent-smoke__u2"


def spec_data(**kw) -> dict:
    base = dict(name="faults", engine="vllm-cpu", models=["llama-3.1-8b"], workloads=["agent-smoke"],
                load={"users": [2]}, duration_s=3, warmup_s=0, kv_memory_gib=1, max_model_len=4096,
                scrape_interval_s=0.5)
    return {**base, **kw}


def make_spec(**kw):
    return validate_spec(spec_data(**kw), "test spec")


class Fake(TaggedRun):
    """The fake engine for one test: its fault plan, and the tag that finds its processes."""

    def __init__(self, mp: pytest.MonkeyPatch):
        super().__init__(mp)
        fake_engine.install(mp.setattr)
        mp.delenv(fake_engine.FAKE_ENV, raising=False)

    def plan(self, **faults) -> None:
        self.mp.setenv(fake_engine.FAKE_ENV, json.dumps(faults))


@pytest.fixture
def fake(monkeypatch):
    f = Fake(monkeypatch)
    yield f
    f.kill_leftovers()  # a failing test must not leave its processes behind


# ---------------------------------------------------------------------------------------------
# The server killed mid-run (SIGKILL to its whole group, an engine-core child included)


def test_server_killed_mid_run_fails_the_repeat_and_the_run_goes_on(fake, tmp_path):
    import threading

    fake.plan(child=True)
    spec, out = make_spec(load={"users": [1, 2]}, duration_s=4), tmp_path / "r"
    killed: list[int] = []

    def kill_during_first_load(watch: GroupWatch) -> None:
        wait_for(lambda: record_lines(out / U1 / "repeat-1" / "load" / "requests") >= 2, what="the first requests")
        [pgid] = watch.groups_with("fake_openai.py")
        assert len(group_members({pgid})) == 2  # the API server and its child
        os.killpg(pgid, signal.SIGKILL)
        killed.append(pgid)

    with fake.watch() as watch:
        t = threading.Thread(target=kill_during_first_load, args=(watch,))
        t.start()
        runner.run_spec(spec, out)
        t.join()
    assert killed and group_members(set(killed)) == []
    st = status(out, U1)
    assert st["status"] == "failed"
    assert st["failure"]["reason"] == "the server died during the run (exit code -9, killed by SIGKILL)"
    assert any("INFO fake vLLM API server" in line for line in st["failure"]["log_tail"])
    # What was measured before the kill is kept and readable.
    reqs = read_requests(out / U1 / "repeat-1" / "load")
    assert (reqs["error_kind"].isna()).sum() >= 2 and reqs["error_kind"].notna().any()
    samples = read_samples(out / U1 / "repeat-1")
    gaps = samples[samples["name"] == GAP]
    assert len(gaps) >= 1 and all(json.loads(lab)["kind"] == "unreachable" for lab in gaps["labels"])
    assert results(out, U1)["scrapes"]["gaps"] == len(gaps)
    # The next cell of the same server started a new one and finished.
    assert status(out, U2)["status"] == "complete"
    assert (out / "llama-3.1-8b__bf16.server.log").read_text().count("INFO fake vLLM API server") == 2
    assert watch.leftovers() == []
    assert_records_whole(out)
    # Resumable: the rerun redoes the failed repeat only, and keeps the failed one's files aside.
    fake.plan()
    events = []
    runner.run_spec(spec, out, on_event=lambda kind, data: events.append((kind, data)))
    assert ("plan", {"repeats_total": 2, "repeats_pending": 1, "skipped": 1}) in events
    assert status(out, U1)["status"] == "complete"
    assert list((out / U1).glob("repeat-1.partial-*"))
    assert {r["status"] for r in index.query(out)} == {"complete"}


# ---------------------------------------------------------------------------------------------
# Servers that die at start or are never healthy


def test_server_that_dies_at_start_or_never_answers_health(fake, tmp_path, monkeypatch):
    # 10 s: the dying fake lives 1 s after its imports, and a loaded CI machine once took over 3 s for
    # both, so the exit came after a 3 s deadline (stop 42's CI); the hanging one costs the full 10 s
    monkeypatch.setattr(deploy, "ServeSpec", partial(deploy.ServeSpec, health_timeout_s=10))
    fake.plan(**{"llama-3.1-8b": {"exit_at_start": 1}, "deepseek-v2-lite": {"hang": True}})
    spec = make_spec(models=["llama-3.1-8b", "deepseek-v2-lite", "qwen2.5-7b"])
    out = tmp_path / "r"
    with fake.watch() as watch:
        runner.run_spec(spec, out)
    dies, hangs = status(out, "llama-3.1-8b__bf16__agent-smoke__u2"), status(out, "deepseek-v2-lite__bf16__agent-smoke__u2")
    assert dies["status"] == hangs["status"] == "failed"
    assert dies["failure"]["reason"].startswith("the server did not start: the server exited with code 1 during "
                                                "start (vllm-cpu, log: ")
    assert any("ValueError: To serve at least one request" in line for line in dies["failure"]["log_tail"])
    assert hangs["failure"]["reason"].startswith("the server did not start: no answer on http://127.0.0.1:")
    assert "/health within 10 s" in hangs["failure"]["reason"]
    assert status(out, "qwen2.5-7b__bf16__agent-smoke__u2")["status"] == "complete"  # the run went on
    assert len(watch.groups_with("fake_openai.py")) == 3 and watch.leftovers() == []
    assert_records_whole(out)
    fake.plan()
    events = []
    runner.run_spec(spec, out, on_event=lambda kind, data: events.append((kind, data)))
    assert ("plan", {"repeats_total": 3, "repeats_pending": 2, "skipped": 1}) in events
    assert {r["status"] for r in index.query(out)} == {"complete"}


def test_serve_never_healthy_says_so_and_leaves_nothing(fake, tmp_path):
    fake.plan(hang=True)
    with fake.watch() as watch:
        r = subprocess.run([sys.executable, str(TESTS / "fake_engine.py"), "serve", "llama-3.1-8b", "--engine",
                            "vllm-cpu", "--health-timeout", "3", "--log", str(tmp_path / "s.log")],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith("kvlab: error: no answer on http://127.0.0.1:") and "/health within 3 s (vllm-cpu, log: " in first
    assert first.endswith("nothing is left running. Last 40 log lines:")
    assert "INFO fake vLLM API server" in r.stderr  # the tail of the server's log
    assert len(watch.groups_with("fake_openai.py")) == 1 and watch.leftovers() == []
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["stop"]["signals_sent"][0] == "SIGINT" and record["stop"]["survivors"] == []


# ---------------------------------------------------------------------------------------------
# Faulty answers: a storm of 5xx, stalled streams, malformed SSE, /metrics gone mid-run


@pytest.fixture(scope="module")
def answer_faults(tmp_path_factory):
    """One run, three servers: every request 5xx; every 3rd 5xx and /metrics gone after 3
    answers; stalled streams (longer than the workload's stall timeout) and malformed SSE."""
    work = tmp_path_factory.mktemp("answers")
    wl = yaml.safe_load((REPO / "loadtest" / "agent-smoke.yaml").read_text())
    wl["request"]["stall_timeout_s"] = 1
    (work / "stalls.yaml").write_text(yaml.safe_dump(wl))
    with pytest.MonkeyPatch.context() as mp:
        f = Fake(mp)
        f.plan(**{"llama-3.1-8b": {"fault_all": "http_500"},
                  "deepseek-v2-lite": {"faults_every": {"http_500": 3}, "metrics_gone_after": 3},
                  "qwen2.5-7b": {"faults_every": {"stall": 4, "malformed": 3}, "stall_s": 3}})
        spec = make_spec(models=["llama-3.1-8b", "deepseek-v2-lite", "qwen2.5-7b"], workloads=[str(work / "stalls.yaml")],
                         duration_s=5)
        events = []
        try:
            with f.watch() as watch:
                runner.run_spec(spec, work / "r", on_event=lambda kind, data: events.append((kind, data)))
            yield {"out": work / "r", "events": events, "leftovers": watch.leftovers(), "spec": spec}
        finally:
            f.kill_leftovers()


def _cell(run, model: str) -> str:
    [c] = [c.cell_id for c in runner.cells(run["spec"]) if c.model == model]
    return c


def test_a_storm_of_5xx_fails_the_repeat_with_the_counts(answer_faults):
    run = answer_faults
    cell = _cell(run, "llama-3.1-8b")
    st = status(run["out"], cell)
    assert st["status"] == "failed"
    reason = st["failure"]["reason"]
    probes = results(run["out"], cell)["client"]["probes"]
    assert probes >= 3 and reason == f"no request succeeded (0 requests, {probes} calibration probes; errors: http_5xx {probes})"
    want = {"cell": cell, "repeat": 1, "status": "failed", "reason": reason}
    assert any(kind == "repeat_done" and want.items() <= data.items() for kind, data in run["events"])
    # A partial storm is counted, and the repeat stands.
    partial_ = results(run["out"], _cell(run, "deepseek-v2-lite"))
    assert partial_["status"] == "complete"
    assert partial_["client"]["errors_by_kind"]["http_5xx"] >= 1 and partial_["client"]["requests_ok"] >= 1


def test_stalled_and_malformed_streams_are_counted_and_the_run_goes_on(answer_faults):
    run = answer_faults
    cell = _cell(run, "qwen2.5-7b")
    assert cell.startswith("qwen2.5-7b__bf16__stalls.yaml-") and "/" not in cell  # a workload path, made folder-safe
    res = results(run["out"], cell)
    assert res["status"] == "complete"
    reqs = read_requests(run["out"] / cell / "repeat-1" / "load")
    kinds = reqs["error_kind"].value_counts().to_dict()
    assert kinds.get("stall", 0) >= 1 and kinds.get("malformed_sse", 0) >= 1
    turns = reqs[reqs["kind"] == "turn"]
    assert res["client"]["errors_by_kind"] == turns["error_kind"].value_counts().to_dict()
    stalls = reqs[reqs["error_kind"] == "stall"]
    assert (stalls["e2e_s"] >= 1).all()  # cut after the workload's stall_timeout_s, not the server's 3 s


def test_metrics_gone_mid_run_leaves_gaps_and_the_figures_of_what_was_scraped(answer_faults):
    run = answer_faults
    cell = _cell(run, "deepseek-v2-lite")
    res = results(run["out"], cell)
    assert res["status"] == "complete"
    samples = read_samples(run["out"] / cell / "repeat-1")
    gaps = samples[samples["name"] == GAP]
    assert len(gaps) == res["scrapes"]["gaps"] >= 2
    assert {json.loads(x)["error"] for x in gaps["labels"]} == {"HTTP 404"}
    assert res["scrapes"]["last_error"] == "HTTP 404"
    # the scrapes before the gap still give the pool: 8,192 tokens = 64 blocks x 128
    assert res["metrics"]["kv_cache_size_tokens"] == 8192


def test_answer_faults_leave_nothing_running_and_records_whole(answer_faults):
    assert answer_faults["leftovers"] == []
    assert_records_whole(answer_faults["out"])


# ---------------------------------------------------------------------------------------------
# Ctrl-C (and SIGTERM) in each stage of `kvlab experiment run`, and in `kvlab report`


def _kvlab_fake(args: list[str], tag: str, env: dict | None = None) -> subprocess.Popen:
    """`kvlab ARGS` with the fake engine, in a session of its own as from a terminal."""
    full_env = {**os.environ, TAG_ENV: tag, **(env or {})}
    return subprocess.Popen([sys.executable, str(TESTS / "fake_engine.py"), *args], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _any_file(folder: Path, pattern: str) -> bool:
    return any(folder.glob(pattern))


STAGES = {
    # stage: (fault plan, spec changes, when the stage is reached: f(results folder, cell id))
    "server start": ({"start_delay_s": 60}, {},
                     lambda out, cell: "INFO fake vLLM" in _text(out / "llama-3.1-8b__bf16.server.log")),
    "warm-up": ({}, {"warmup_s": 60},
                lambda out, cell: record_lines(out / cell / "repeat-1" / "warmup" / "requests") >= 1),
    "load": ({}, {}, lambda out, cell: record_lines(out / cell / "repeat-1" / "load" / "requests") >= 1),
    "finalize": ({}, {}, lambda out, cell: (out / "marker").exists()),
}
SLOW_REPLIES = {"itl_s": 0.05}  # ~0.5 s a request: the signal lands before a run's 8 requests are done


def _text(p: Path) -> str:
    try:
        return p.read_text()
    except OSError:
        return ""


def bounded_workload(folder: Path) -> Path:
    """agent-smoke ending after 8 requests: a run (and its rerun) as long as it takes to send them."""
    wl = yaml.safe_load((REPO / "loadtest" / "agent-smoke.yaml").read_text())
    wl["load"]["max_requests"] = 8
    path = folder / "smoke8.yaml"
    path.write_text(yaml.safe_dump(wl))
    return path


@pytest.mark.parametrize("stage, sig", [(s, signal.SIGINT) for s in STAGES] + [("load", signal.SIGTERM)],
                         ids=[f"ctrl-c in {s}" for s in STAGES] + ["sigterm in load"])
def test_ctrl_c_in_each_stage_stops_everything_and_the_rerun_completes(fake, tmp_path, stage, sig):
    plan, changes, reached = STAGES[stage]
    fake.plan(**plan, **SLOW_REPLIES)
    wl = bounded_workload(tmp_path)
    spec_path = tmp_path / "faults.yaml"
    spec_path.write_text(yaml.safe_dump(spec_data(workloads=[str(wl)], duration_s=60, **changes)))
    cell = Cell("llama-3.1-8b", "bf16", str(wl), 2).cell_id
    out = tmp_path / "r"
    env = {fake_engine.PAUSE_ENV: "finalize", fake_engine.MARKER_ENV: str(out / "marker")} if stage == "finalize" else {}
    with fake.watch() as watch:
        p = _kvlab_fake(["experiment", "run", str(spec_path), "--out", str(out)], fake.tag, env)
        try:
            wait_for(lambda: reached(out, cell) or p.poll() is not None, what=stage)
            assert p.poll() is None, p.communicate()[1][-2000:]
            watch.sample()
            if sig == signal.SIGINT:
                os.killpg(p.pid, signal.SIGINT)  # the terminal's Ctrl-C: kvlab's whole foreground group
            else:
                os.kill(p.pid, signal.SIGTERM)  # a job scheduler's cancel
            _, stderr = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
    assert p.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (f"interrupted: finished repeats are kept in {out}; rerun the same "
                                               "command to complete it")
    assert watch.leftovers() == []
    if stage != "server start":
        assert watch.groups_with("locust") and watch.groups_with("fake_openai.py")
    assert_records_whole(out)
    st = status(out, cell) if (out / cell / "repeat-1").exists() else None
    if stage == "finalize":
        assert st["status"] == "complete"  # the repeat was finished: a rerun keeps it
    elif st is not None:
        assert st["status"] == "running"  # marked unfinished, redone on the rerun
    fake.plan(**SLOW_REPLIES)
    r = subprocess.run([sys.executable, str(TESTS / "fake_engine.py"), "experiment", "run", str(spec_path),
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == str(out)
    if stage == "finalize":
        assert "1 finished repeat(s) kept, 0 to run" in r.stderr
    assert status(out, cell)["status"] == "complete"
    assert tagged(fake.tag) == []


def test_kvlab_killed_outright_leaves_a_lease_and_the_rerun_stops_its_server(fake, tmp_path):
    """kill -9 (the OOM killer) gives kvlab no chance to stop anything: the server's lease names its
    process group, and the next run in the folder stops it before it starts its own."""
    fake.plan(child=True, **SLOW_REPLIES)
    wl = bounded_workload(tmp_path)
    spec_path = tmp_path / "faults.yaml"
    spec_path.write_text(yaml.safe_dump(spec_data(workloads=[str(wl)], duration_s=60)))
    cell = Cell("llama-3.1-8b", "bf16", str(wl), 2).cell_id
    out, lease = tmp_path / "r", tmp_path / "r" / ".llama-3.1-8b__bf16.server.lease"
    with fake.watch() as watch:
        p = _kvlab_fake(["experiment", "run", str(spec_path), "--out", str(out)], fake.tag)
        try:
            wait_for(lambda: record_lines(out / cell / "repeat-1" / "load" / "requests") >= 1 or p.poll() is not None,
                     what="the load")
            watch.sample()
            os.kill(p.pid, signal.SIGKILL)
            p.wait(30)
        finally:
            if p.poll() is None:
                p.kill()
        [server] = watch.groups_with("fake_openai.py")
        assert len(group_members({server})) == 2  # orphaned, still running: the server and its child
        assert json.loads(lease.read_text())["pgid"] == server
        r = subprocess.run([sys.executable, str(TESTS / "fake_engine.py"), "experiment", "run", str(spec_path),
                            "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"stopped what a killed run left running: process group {server} (" in r.stderr
        assert group_members({server}) == [] and not lease.exists()
        assert watch.leftovers(wait_s=60) == []  # the orphaned Locust ended at its request bound
    assert status(out, cell)["status"] == "complete" and list((out / cell).glob("repeat-1.partial-*"))
    assert_records_whole(out)


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_ctrl_c_in_report_marks_it_incomplete_and_a_rerun_completes_it(fake, tmp_path, inherited):
    """Also when kvlab report starts with SIGINT ignored, as a non-interactive shell starts a
    background command (`kvlab report ... &` in a script)."""
    out = tmp_path / "r"
    runner.run_spec(make_spec(), out)
    rep = tmp_path / "report"
    env = {fake_engine.PAUSE_ENV: "report", fake_engine.MARKER_ENV: str(tmp_path / "marker")}
    before = signal.signal(signal.SIGINT, signal.SIG_IGN if inherited == "ignored" else signal.default_int_handler)
    try:  # the child inherits an ignored SIGINT
        p = _kvlab_fake(["report", str(out), "--out", str(rep)], fake.tag, env)
    finally:
        signal.signal(signal.SIGINT, before)
    if inherited == "ignored":
        wait_for(lambda: (tmp_path / "marker.signals").exists(), what="the report's start")
        assert "Handlers.SIG_IGN" in (tmp_path / "marker.signals").read_text()
    try:
        wait_for(lambda: (tmp_path / "marker").exists() or p.poll() is not None, what="the report's plots")
        os.killpg(p.pid, signal.SIGINT)
        try:
            _, stderr = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # say what the report started with (kvlab report must hear it anyway)
            signals = tmp_path / "marker.signals"
            pytest.fail(f"kvlab report went on after SIGINT; it started with "
                        f"{signals.read_text() if signals.exists() else 'no state recorded'}")
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (f"interrupted: the report in {rep} is incomplete (its report.json "
                                               "says so); the results are untouched: rerun the same command")
    assert json.loads((rep / "report.json").read_text())["complete"] is False
    assert not (rep / "index.html").exists() and list(rep.glob("*.tmp")) == []
    r = subprocess.run([sys.executable, "-m", "kvlab", "report", str(out), "--out", str(rep)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((rep / "report.json").read_text())["complete"] is True and (rep / "index.html").exists()


# ---------------------------------------------------------------------------------------------
# The port taken


def test_serve_on_a_taken_port_is_refused_before_anything_starts(fake, tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        with fake.watch() as watch:
            r = subprocess.run([sys.executable, str(TESTS / "fake_engine.py"), "serve", "llama-3.1-8b", "--engine",
                                "vllm-cpu", "--port", str(port), "--log", str(tmp_path / "s.log")],
                               capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"kvlab: error: port {port} on 127.0.0.1 is in use (Address already in use): "
                                "pick another --port")
    assert watch.groups_with("fake_openai.py") == set() and not (tmp_path / "s.log").exists()


def test_a_port_taken_after_it_was_picked_is_replaced(fake, monkeypatch):
    """The runner's servers get free ports; one taken in between is picked again."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        picks = iter([port])
        real = launcher.free_port
        monkeypatch.setattr(launcher, "free_port", lambda h: next(picks, None) or real(h))
        srv = launcher.Server(launcher.ServeSpec("llama-3.1-8b", engine="vllm-cpu", log_path=Path(os.devnull)))
        assert srv.port == port
        with srv:
            assert srv.port != port and srv.healthy and f"--port {srv.port}" in " ".join(srv.argv)
    assert tagged(fake.tag) == []


def test_a_port_taken_between_the_check_and_the_bind_is_a_start_failure(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "port_in_use", lambda host, port: None)  # the race: free when checked
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        srv = launcher.Server(launcher.ServeSpec("llama-3.1-8b", engine="vllm-cpu", port=port,
                                                 log_path=tmp_path / "s.log", health_timeout_s=30))
        with pytest.raises(launcher.ServerStartError) as e:
            srv.start()
    first = str(e.value).splitlines()[0]
    assert first.startswith("the server exited with code 1 during start (vllm-cpu, log: ")
    assert "address already in use" in str(e.value).lower()
    assert tagged(fake.tag) == []


# ---------------------------------------------------------------------------------------------
# The disk full while writing records


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs mounted for the test when we may (root), else None."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        yield None
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "kvlab-test", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(disk: Path) -> Path:
    """Write until the file system is full."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
        except OSError as e:
            assert e.errno == errno.ENOSPC
        try:
            while True:  # the last partial MiB
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def test_disk_full_while_writing_records_stops_the_run_and_keeps_what_is_finished(fake, tmp_path, small_disk,
                                                                                  monkeypatch, capsys):
    """On a real full file system (a tmpfs) when the test runs as root, else ENOSPC raised by a
    monkeypatched fsync in kvlab.io (every record write goes through it)."""
    import kvlab.io
    from kvlab.cli import main

    out = (small_disk or tmp_path) / "r"
    spec_path = tmp_path / "faults.yaml"
    spec_path.write_text(yaml.safe_dump(spec_data(repeats=2)))
    real_repeat, real_fsync, full = runner.run_repeat, kvlab.io._fsync, {}

    def fill_before_second_repeat(spec, cell, k, *a):
        if k == 2 and "filled" not in full:
            full["filled"] = True
            full["filler"] = _fill(small_disk) if small_disk is not None else None
        return real_repeat(spec, cell, k, *a)

    def fsync_or_enospc(path):  # without a tmpfs: the disk is "full" from the second repeat on
        if "filler" in full and small_disk is None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_fsync(path)

    monkeypatch.setattr(runner, "run_repeat", fill_before_second_repeat)
    monkeypatch.setattr(kvlab.io, "_fsync", fsync_or_enospc)
    with fake.watch() as watch:
        with pytest.raises(SystemExit) as e:
            main(["experiment", "run", str(spec_path), "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"kvlab: error: cannot write {out / U2 / 'repeat-2'}")
    assert ": No space left on device (errno 28); what was written before is kept. The run stopped; finished " \
           f"repeats are kept in {out}: free space and rerun the same command to complete it" in line
    assert watch.leftovers() == [] and watch.groups_with("fake_openai.py")
    # The finished repeat is whole; nothing half-written is left.
    assert status(out, U2, 1)["status"] == "complete" and results(out, U2, 1)["status"] == "complete"
    for p in out.rglob("*.json"):
        json.loads(p.read_text())
    assert list(out.rglob("*.tmp")) == []
    # Resumable once there is space again.
    first = results(out, U2, 1)
    if full.pop("filler"):
        (small_disk / "filler").unlink()
    runner.run_spec(make_spec(repeats=2), out)
    assert status(out, U2, 2)["status"] == "complete" and status(out, U2, 1)["status"] == "complete"
    assert results(out, U2, 1) == first  # kept, not redone
    assert tagged(fake.tag) == []


def test_record_write_error_names_the_file_and_keeps_the_old_version(tmp_path, monkeypatch):
    import kvlab.io

    p = tmp_path / "results.json"
    kvlab.io.write_json_atomic(p, {"v": 1})

    def enospc(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(kvlab.io, "_fsync", enospc)
    with pytest.raises(RecordWriteError, match=r"cannot write .*results.json: No space left on device \(errno 28\)"):
        kvlab.io.write_json_atomic(p, {"v": 2})
    assert json.loads(p.read_text()) == {"v": 1} and sorted(x.name for x in tmp_path.iterdir()) == ["results.json"]
