"""The fault table (docs/faults.md) tried on kvlab's own simulated vLLM: `kvlab sim serve --fault`
started by kvlab's launcher for an experiment (the spec's `serve_args`, or $KVLAB_SIM_FAULT), the
load and the scraper run against it, and what the user is told, what the records count and that
nothing is left running are checked as in tests/test_faults.py (there against tests/fake_openai.py).

The counts are checked against the server's own log: every injected fault logs one line."""

from __future__ import annotations

import json

import pytest
import yaml

from fault_checks import REPO, TaggedRun, assert_records_whole, results, status
from kvlab import deploy
from kvlab.errors import KvlabError
from kvlab.experiments import index, runner
from kvlab.experiments.spec import validate_spec
from kvlab.loadtest.records import read_requests
from kvlab.metrics.samples import GAP, read_samples
from kvlab.models import memory
from kvlab.models.cards import card
from kvlab.sim.args import parse_serve_args
from kvlab.sim.faults import FAULT_ENV

MODEL, USERS = "llama-3.1-8b", 2
SPEEDUP = ["--speedup", "20"]  # the simulated clock 20x the wall clock: a request takes milliseconds


def sim_spec(name: str, faults: list[str], workload: str = "agent-smoke", duration_s: float = 4):
    return validate_spec(dict(
        name=name, engine="sim", gpu="h100", models=[MODEL], workloads=[workload], load={"users": [USERS]},
        duration_s=duration_s, warmup_s=0, max_model_len=4096, scrape_interval_s=0.5,
        serve_args=[*SPEEDUP, *[a for f in faults for a in ("--fault", f)]]), "test spec")


def the_cell(spec) -> str:
    [cell] = runner.cells(spec)
    return cell.cell_id


def injected(out, cell: str, spec: str) -> int:
    """Lines the server logged for the fault `spec` (kvlab.sim.faults.injected)."""
    log = (out / cell / "repeat-1" / "server.log").read_text()
    return log.count(f"injected fault {spec} ")


def turn_errors(out, cell: str) -> dict:
    reqs = read_requests(out / cell / "repeat-1" / "load")
    return reqs[reqs["kind"] == "turn"]["error_kind"].value_counts().to_dict()


@pytest.fixture
def sim(monkeypatch):
    run = TaggedRun(monkeypatch)
    monkeypatch.delenv(FAULT_ENV, raising=False)
    yield run
    run.kill_leftovers()  # a failing test must not leave its processes behind


def run(sim: TaggedRun, spec, out, **kw) -> tuple[list, list]:
    """run_spec under a process watch: (its events, what was left running)."""
    events = []
    with sim.watch() as watch:
        runner.run_spec(spec, out, on_event=lambda kind, data: events.append((kind, data)), **kw)
    assert watch.groups_with("sim serve") and watch.groups_with("locust")
    return events, watch.leftovers()


# ---------------------------------------------------------------------------------------------
# A storm of 5xx


def test_a_storm_of_5xx_fails_the_repeat_with_the_counts(sim, tmp_path):
    spec, out = sim_spec("sim-5xx", ["http-5xx"], duration_s=2), tmp_path / "r"
    events, left = run(sim, spec, out)
    cell = the_cell(spec)
    st, res = status(out, cell), results(out, cell)
    assert st["status"] == res["status"] == "failed"
    probes = res["client"]["probes"]
    reason = f"no request succeeded (0 requests, {probes} calibration probes; errors: http_5xx {probes})"
    assert st["failure"]["reason"] == reason
    want = {"cell": cell, "repeat": 1, "status": "failed", "reason": reason}
    assert any(kind == "repeat_done" and want.items() <= data.items() for kind, data in events)
    # every probe was answered 500 by the server, which logged each one (a probe in flight when the load
    # stopped may lack its record)
    assert probes >= 3 and probes <= injected(out, cell, "http-5xx") <= probes + USERS
    reqs = read_requests(out / cell / "repeat-1" / "load")
    assert set(reqs["status_code"]) == {500} and set(reqs["error_kind"]) == {"http_5xx"}
    assert left == []
    assert_records_whole(out)


# ---------------------------------------------------------------------------------------------
# Faulty answers on one server: stalled streams, malformed SSE, a partial 5xx storm, /metrics gone

ANSWER_FAULTS = ["stall:2:3:4", "malformed-sse:3", "http-5xx:5", "metrics-gone:3"]


@pytest.fixture(scope="module")
def answer_faults(tmp_path_factory):
    """One run of agent-smoke with a 1 s stall timeout: every 4th request silent 3 s after 2 tokens,
    every 3rd cut mid-stream, every 5th answered 500 (the first match wins), /metrics 404 after 3 answers."""
    work = tmp_path_factory.mktemp("sim-answers")
    wl = yaml.safe_load((REPO / "loadtest" / "agent-smoke.yaml").read_text())
    wl["request"]["stall_timeout_s"] = 1
    (work / "stalls.yaml").write_text(yaml.safe_dump(wl))
    spec = sim_spec("sim-answers", ANSWER_FAULTS, workload=str(work / "stalls.yaml"), duration_s=5)
    with pytest.MonkeyPatch.context() as mp:
        s = TaggedRun(mp)
        mp.delenv(FAULT_ENV, raising=False)
        try:
            _, left = run(s, spec, work / "r")
        finally:
            s.kill_leftovers()
    return {"out": work / "r", "cell": the_cell(spec), "leftovers": left}


def injected_in_probes(out, cell: str, kind: str) -> int:
    """Faults that hit calibration probes (counted apart from the turns' errors)."""
    reqs = read_requests(out / cell / "repeat-1" / "load")
    return int(((reqs["kind"] == "probe") & (reqs["error_kind"] == kind)).sum())


def test_stalled_and_malformed_streams_are_counted_and_the_run_goes_on(answer_faults):
    out, cell = answer_faults["out"], answer_faults["cell"]
    res = results(out, cell)
    assert res["status"] == "complete" and res["client"]["requests_ok"] >= 1
    kinds = turn_errors(out, cell)
    assert res["client"]["errors_by_kind"] == kinds
    # each fault the server logged is a record of its kind (bar one in flight per user when the load stopped)
    for kind, fault in (("stall", "stall:2:3:4"), ("malformed_sse", "malformed-sse:3"), ("http_5xx", "http-5xx:5")):
        logged = injected(out, cell, fault) - injected_in_probes(out, cell, kind)
        assert 1 <= kinds.get(kind, 0) <= logged <= kinds.get(kind, 0) + USERS, (kind, kinds, logged)
    reqs = read_requests(out / cell / "repeat-1" / "load")
    stalls = reqs[reqs["error_kind"] == "stall"]
    assert ((stalls["e2e_s"] >= 1) & (stalls["e2e_s"] < 3)).all()  # cut at the 1 s stall timeout, not the 3 s
    assert (stalls["completion_tokens"].fillna(2) <= 2).all()
    assert set(reqs[reqs["error_kind"] == "malformed_sse"]["error_detail"]) == {"event data is not JSON"}
    assert set(reqs[reqs["error_kind"] == "http_5xx"]["status_code"]) == {500}


def test_metrics_gone_mid_run_leaves_gaps_and_the_figures_of_what_was_scraped(answer_faults):
    out, cell = answer_faults["out"], answer_faults["cell"]
    res = results(out, cell)
    assert res["status"] == "complete"
    samples = read_samples(out / cell / "repeat-1")
    gaps = samples[samples["name"] == GAP]
    assert len(gaps) == res["scrapes"]["gaps"] >= 2
    assert {json.loads(x)["error"] for x in gaps["labels"]} == {"HTTP 404"}
    assert res["scrapes"]["last_error"] == "HTTP 404"
    # 3 answers: the launcher's read of the pool at start, then 2 scrapes
    assert res["scrapes"]["total"] - res["scrapes"]["gaps"] == 2
    assert injected(out, cell, "metrics-gone:3") == 1
    cap = memory.capacity(card(MODEL).arch, model_name=MODEL, gpu="h100", max_model_len=4096)
    assert res["metrics"]["kv_cache_size_tokens"] == cap.kv_cache_tokens  # from the scrapes before the gap


def test_answer_faults_leave_nothing_running_and_records_whole(answer_faults):
    assert answer_faults["leftovers"] == []
    assert_records_whole(answer_faults["out"])


# ---------------------------------------------------------------------------------------------
# The server dies mid-run


def test_server_dying_mid_run_fails_the_repeat_and_the_rerun_completes(sim, tmp_path, monkeypatch):
    """die-after through $KVLAB_SIM_FAULT: the spec, and so its results folder, stays the same for the rerun."""
    monkeypatch.setenv(FAULT_ENV, "die-after:3")
    spec, out = sim_spec("sim-dies", [], duration_s=4), tmp_path / "r"
    cell = the_cell(spec)
    events, left = run(sim, spec, out)
    st = status(out, cell)
    assert st["status"] == "failed"
    assert st["failure"]["reason"] == "the server died during the run (exit code 1)"
    assert "injected fault die-after:3 (kvlab sim serve --fault): the engine dies now" in st["failure"]["log_tail"][-1]
    assert left == []
    # after the death: requests refused, scrapes gaps saying the server is unreachable
    reqs = read_requests(out / cell / "repeat-1" / "load")
    assert (reqs["error_kind"] == "connect").any()
    samples = read_samples(out / cell / "repeat-1")
    gaps = samples[samples["name"] == GAP]
    assert len(gaps) == results(out, cell)["scrapes"]["gaps"] >= 1
    assert {json.loads(lab)["kind"] for lab in gaps["labels"]} == {"unreachable"}
    assert_records_whole(out)
    # Resumable: without the fault the rerun redoes the failed repeat, and keeps its files aside.
    monkeypatch.delenv(FAULT_ENV)
    events, left = run(sim, spec, out)
    assert ("plan", {"repeats_total": 1, "repeats_pending": 1, "skipped": 0}) in events
    assert status(out, cell)["status"] == "complete" and results(out, cell)["client"]["requests_ok"] >= 1
    assert list((out / cell).glob("repeat-1.partial-*"))
    assert {r["status"] for r in index.query(out)} == {"complete"}
    assert left == []
    # the shared log file holds both servers; each repeat's server.log only its own server's lines
    shared = next(out.glob("*.server.log")).read_text()
    assert shared.count("injected fault die-after:3") == 1
    assert "injected fault" not in (out / cell / "repeat-1" / "server.log").read_text()
    assert "injected fault die-after:3" in next((out / cell).glob("repeat-1.partial-*/server.log")).read_text()


# ---------------------------------------------------------------------------------------------
# Servers that fail at start or are never healthy (the launcher, as `kvlab serve --engine sim` uses it)


# fail-start: a health timeout far beyond the start (the exit is what the launcher must see, not a
# timeout; on a loaded 2-core machine `kvlab sim serve` took over 3 s to exit); never-healthy: long
# enough for the simulator to start and log its injected fault before the launcher gives up.
@pytest.mark.parametrize("fault, first_line, timeout_s", [
    ("fail-start", "the server exited with code 1 during start (sim, log: ", 60),
    ("never-healthy", "no answer on http://127.0.0.1:", 15),
], ids=["fail-start", "never-healthy"])
def test_server_failing_at_start_or_never_healthy_says_so_and_leaves_nothing(sim, tmp_path, fault, first_line,
                                                                            timeout_s):
    server = deploy.Server(deploy.ServeSpec(MODEL, engine="sim", gpu="h100", max_model_len=4096,
                                            health_timeout_s=timeout_s,
                                            log_path=tmp_path / "s.log", extra_args=[*SPEEDUP, "--fault", fault]))
    with sim.watch() as watch:
        with pytest.raises(deploy.ServerStartError) as e:
            server.start()
    message = str(e.value)
    assert message.startswith(first_line) and "nothing is left running" in message.splitlines()[0]
    if fault == "never-healthy":
        assert f"/health within {timeout_s} s (sim, log: " in message.splitlines()[0]
        assert "injected fault never-healthy (kvlab sim serve --fault): /health answers 503" in message
    else:
        assert "ValueError: To serve at least one request with the model's max seq len (4096)" in message
        assert "larger than the available KV cache memory" in message
    assert watch.groups_with("sim serve") and watch.leftovers() == []


# ---------------------------------------------------------------------------------------------
# Bad specs


@pytest.mark.parametrize("spec, message", [
    ("bogus", "argument --fault: invalid fault 'bogus': unknown kind 'bogus' (kinds: http-5xx[:EVERY], "),
    ("http-5xx:0", "invalid fault 'http-5xx:0': EVERY must be a whole number >= 1, got '0'"),
    ("stall:2", "invalid fault 'stall:2': stall is written stall:AFTER_TOKENS:SECONDS[:EVERY]"),
    ("stall:x:1", "AFTER_TOKENS must be a whole number >= 0, got 'x'"),
    ("die-after:0", "invalid fault 'die-after:0': SECONDS must be a positive number of seconds, got '0'"),
    ("metrics-gone", "metrics-gone is written metrics-gone:AFTER"),
    ("never-healthy:1", "never-healthy is written never-healthy"),
])
def test_bad_fault_specs_are_refused_in_one_line(spec, message):
    with pytest.raises(KvlabError) as e:
        parse_serve_args([MODEL, "--gpu", "h100", "--fault", spec])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_faults_from_flags_and_the_environment(kvlab):
    args = parse_serve_args([MODEL, "--gpu", "h100", "--fault", "stall:1:2.5", "--fault", "http-5xx:3"],
                            fault_env=" metrics-gone:5  die-after:30 ")
    assert [(f.kind, f.every, f.after, f.seconds) for f in args.faults] == [
        ("stall", 1, 1, 2.5), ("http-5xx", 3, 0, 0.0), ("metrics-gone", 1, 5, 0.0), ("die-after", 1, 0, 30.0)]
    with pytest.raises(KvlabError, match=r"^\$KVLAB_SIM_FAULT: fault http-5xx is given twice \('http-5xx'\)"):
        parse_serve_args([MODEL, "--gpu", "h100", "--fault", "http-5xx:3"], fault_env="http-5xx")
    r = kvlab("sim", "serve", MODEL, "--gpu", "h100", "--fault", "stall:x:1", env={FAULT_ENV: ""})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("kvlab: error: argument --fault: invalid fault 'stall:x:1'")
    assert len(r.stderr.strip().splitlines()) == 1
