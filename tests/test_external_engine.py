"""Engine `external`: a spec cell against a vLLM kvlab did not start (here `kvlab sim serve`, started
by the test on a free 127.0.0.1 port): kvlab starts nothing, runs the same load, scraping, records
and report, says where the pool was read and that it did not launch the server; a server killed
mid-run fails the repeat with the reason and leaves nothing of kvlab's running; the rerun completes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import httpx
import pytest

from fault_checks import REPO, TaggedRun, assert_records_whole, record_lines, status, wait_for
from proc_watch import TAG_ENV
from kvlab.errors import KvlabError
from kvlab.experiments import index, runner
from kvlab.experiments.spec import validate_spec
from kvlab.models import memory
from kvlab.models.cards import card
from kvlab.ports import free_port
from kvlab.schema.experiment import Manifest, RepeatResults

MODEL = "llama-3.1-8b"
CELL = f"{MODEL}__bf16__agent-smoke__u2"


class SimServer:
    """`kvlab sim serve` as someone else's server: not tagged, so not counted as kvlab's."""

    def __init__(self, port: int, log):
        env = {k: v for k, v in os.environ.items() if k != TAG_ENV}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvlab", "sim", "serve", MODEL, "--gpu", "h100", "--host", "127.0.0.1",
             "--port", str(port), "--max-model-len", "4096", "--speedup", "20"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        wait_for(self._up, timeout_s=120, what="kvlab sim serve")

    def _up(self) -> bool:
        assert self.proc.poll() is None, "kvlab sim serve exited"
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def external_spec(url: str, name: str = "ext", duration_s: float = 4):
    return validate_spec(dict(
        name=name, engine="external", endpoint=url, gpu="h100", max_model_len=4096, models=[MODEL],
        workloads=["agent-smoke"], load={"users": [2]}, duration_s=duration_s, warmup_s=0,
        scrape_interval_s=0.5), "test spec")


@pytest.fixture
def tagged(monkeypatch):
    run = TaggedRun(monkeypatch)
    yield run
    run.kill_leftovers()


@pytest.mark.slow  # a simulated server, two runs and a report: ~40 s on 2 cores
def test_a_cell_against_a_server_kvlab_did_not_start(tagged, tmp_path):
    port = free_port()
    with open(tmp_path / "sim.log", "wb") as log:
        sim = SimServer(port, log)
        try:
            spec, out = external_spec(sim.url), tmp_path / "r"
            with tagged.watch() as watch:
                runner.run_spec(spec, out)
            assert watch.groups_with("locust") and not watch.groups_with("sim serve")  # kvlab started no server
            assert watch.leftovers() == []
            assert sim.proc.poll() is None  # and stopped none
            from conftest import run_kvlab

            one = run_kvlab("experiment", "one", "--model", MODEL, "--endpoint", sim.url, "--gpu", "h100",
                            "--workload", "agent-smoke", "--users", "2", "--duration", "3s", "--warmup", "0s",
                            "--out", str(tmp_path / "one"), timeout=240)
            assert one.returncode == 0, one.stderr
            assert "engine: external (requested with --engine external)" in one.stderr
            assert RepeatResults.read(tmp_path / "one" / CELL / "repeat-1" / "results.json").status == "complete"
        finally:
            sim.kill()
    rdir = out / CELL / "repeat-1"
    res = RepeatResults.read(rdir / "results.json")
    assert res.status == "complete" and res.engine == "external", res.failure
    facts = res.server
    assert facts.launched_by_kvlab is False
    assert facts.pool_source == f"vllm:cache_config_info on {sim.url}/metrics"
    assert facts.vllm_version == "0.32.0+kvlab.sim"  # from /version
    cap = memory.capacity(card(MODEL).arch, model_name=MODEL, gpu="h100", max_model_len=4096)
    assert facts.kv_cache_tokens == res.prediction.kv_cache_tokens == cap.kv_cache_tokens
    assert facts.num_gpu_blocks == cap.num_blocks
    assert res.client.requests_ok > 0 and res.metrics.scrapes >= 3
    man = Manifest.read(rdir / "manifest.json")
    assert man.engine == "external" and man.server_argv == [] and man.server_env == {}
    assert (rdir / "server.log").read_text() == ""  # its log is where it runs
    assert_records_whole(out)
    from conftest import run_kvlab

    r = run_kvlab("report", str(out), "--out", str(tmp_path / "report"))
    assert r.returncode == 0, r.stderr
    headline = json.loads((tmp_path / "report" / "headline.json").read_text())
    assert [h["config"] for h in headline] == [f"{MODEL}/bf16"] and headline[0]["source"] == "measured"
    assert headline[0]["kv_cache_tokens_reported"] == cap.kv_cache_tokens


@pytest.mark.slow  # two simulated servers, two runs: ~30 s on 2 cores
def test_an_endpoint_killed_mid_run_fails_the_repeat_and_the_rerun_completes(tagged, tmp_path):
    port = free_port()
    spec, out = None, tmp_path / "r"
    with open(tmp_path / "sim.log", "wb") as log:
        sim = SimServer(port, log)
        spec = external_spec(sim.url, "ext-dies", duration_s=8)
        killer = threading.Thread(target=lambda: (
            wait_for(lambda: record_lines(out / CELL / "repeat-1" / "load" / "requests") >= 1, 120, "the load"),
            sim.kill()), daemon=True)
        killer.start()
        try:
            with tagged.watch() as watch:
                runner.run_spec(spec, out)
            killer.join(5)
            assert watch.leftovers(wait_s=30) == []
        finally:
            sim.kill()
        st = status(out, CELL)
        assert st["status"] == "failed"
        assert st["failure"]["reason"].startswith(f"the server died during the run (the endpoint {sim.url} "
                                                  "does not answer (ConnectError")
        assert_records_whole(out)
        sim = SimServer(port, log)  # back on the same address: the same spec, the same results folder
        try:
            events = []
            runner.run_spec(spec, out, on_event=lambda kind, data: events.append((kind, data)))
        finally:
            sim.kill()
    assert ("plan", {"repeats_total": 1, "repeats_pending": 1, "skipped": 0}) in events
    assert status(out, CELL)["status"] == "complete"
    assert list((out / CELL).glob("repeat-1.partial-*"))
    assert {r["status"] for r in index.query(out)} == {"complete"}


def test_an_endpoint_that_does_not_answer_fails_the_group_at_once(tagged, tmp_path):
    spec, out = external_spec(f"http://127.0.0.1:{free_port()}", "ext-none"), tmp_path / "r"
    runner.run_spec(spec, out)
    st = status(out, CELL)
    assert st["status"] == "failed" and st["failure"]["reason"].startswith(
        "the server did not start: the endpoint http://127.0.0.1:")


@pytest.mark.parametrize("data, message", [
    (dict(engine="external"), "engine external needs an endpoint for llama-3.1-8b bf16"),
    (dict(engine="sim", endpoint="http://10.0.0.5:8000"), "but engine sim starts its own servers"),
    (dict(engine="external", endpoint={"url": "http://127.0.0.1:1", "api_key_env": "KVLAB_TEST_NO_SUCH_KEY"}),
     "takes its API key from $KVLAB_TEST_NO_SUCH_KEY, which is not set here"),
])
def test_endpoint_mistakes_are_one_line_errors_before_anything_starts(tmp_path, monkeypatch, data, message):
    monkeypatch.delenv("KVLAB_TEST_NO_SUCH_KEY", raising=False)
    spec = validate_spec(dict(name="ext-bad", gpu="h100", models=[MODEL], workloads=["agent-smoke"], **data), "t")
    with pytest.raises(KvlabError, match=message.replace("$", r"\$").replace("(", r"\(")):
        runner.run_spec(spec, tmp_path / "r")
    assert not (tmp_path / "r" / CELL).exists()


@pytest.mark.parametrize("data, message", [
    (dict(endpoint="10.0.0.5:8000"), "field endpoint.url"),
    (dict(endpoints=[dict(model="qwen3-8b", url="http://a:1")]), "qwen3-8b bf16 is not a model and level"),
    (dict(endpoint={"url": "http://a:1", "api_key": "sk-x"}), "api_key"),
])
def test_bad_endpoint_fields_are_refused(data, message):
    with pytest.raises(KvlabError, match=message):
        validate_spec(dict(name="x", engine="external", models=[MODEL], **data), "spec")


def test_kvlab_serve_does_not_launch_an_external_engine(kvlab):
    r = kvlab("serve", MODEL, "--engine", "external")
    assert r.returncode != 0 and "engine external starts no server" in r.stderr
    assert "Traceback" not in r.stderr
