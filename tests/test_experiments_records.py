"""Run records: atomic writes, repeats' intervals, the folder claim, resume after Ctrl-C."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvlab.errors import KvlabError
from kvlab.experiments import index, records, runner
from kvlab.experiments.spec import Cell, Spec, cells, parse_duration_s, parse_only
from kvlab.schema.experiment import ClientFigures, RepeatResults
from kvlab.schema.load import Goodput
from kvlab.schema.slo import SLO


def test_mean_ci95_matches_student_t():
    r = records.mean_ci95([10.0, 12.0, 11.0, 13.0])
    assert r["mean"] == 11.5
    sd = (5 / 3) ** 0.5  # sample stdev of 10, 11, 12, 13
    assert r["stdev"] == pytest.approx(sd)
    assert r["ci95_high"] - r["mean"] == pytest.approx(3.182 * sd / 2)
    assert records.mean_ci95([5.0]) == {"n": 1, "mean": 5.0, "ci95_low": None, "ci95_high": None, "stdev": None}
    assert records.mean_ci95([])["mean"] is None


def test_aggregate_flattens_nested_figures():
    agg = records.aggregate_repeats([{"client": {"ttft_s": {"p50": 1.0}, "requests": 10}},
                                     {"client": {"ttft_s": {"p50": 3.0}, "requests": 12}}])
    assert agg["client.ttft_s.p50"]["mean"] == 2.0 and agg["client.requests"]["n"] == 2


def test_write_json_atomic_leaves_no_partial_file(tmp_path):
    p = tmp_path / "r.json"
    records.write_json_atomic(p, {"a": 1})
    class Unprintable:
        def __str__(self):
            raise ValueError("no text form")

    with pytest.raises(ValueError):
        records.write_json_atomic(p, {"a": Unprintable()})  # cannot be serialized: the old file stays whole
    assert json.loads(p.read_text()) == {"a": 1}
    records.write_json_atomic(p, {"a": float("nan")})  # a figure that could not be computed: null
    assert json.loads(p.read_text()) == {"a": None}
    assert [x.name for x in tmp_path.iterdir()] == ["r.json"]


def test_redaction():
    from kvlab import redact
    from kvlab.deploy import commands

    assert redact.redact_argv(["vllm", "serve", "m", "--api-key", "sk-123", "--port", "1"]) == \
        ["vllm", "serve", "m", "--api-key", "<redacted>", "--port", "1"]
    assert redact.redact_argv(["--api-key=sk-1", "--hf-token", "hf_x"]) == ["--api-key=<redacted>", "--hf-token", "<redacted>"]
    assert redact.redact_env({"HF_TOKEN": "x", "VLLM_CPU_KVCACHE_SPACE": "1", "MY_AUTH": "y"}) == \
        {"HF_TOKEN": "<redacted>", "VLLM_CPU_KVCACHE_SPACE": "1", "MY_AUTH": "<redacted>"}
    # one redaction: the launcher's environment goes through the same function as the records
    assert commands.redact_env is redact.redact_env
    assert commands.Command(["x"], {"VLLM_API_KEY": "sk"}).display_env == {"VLLM_API_KEY": "<redacted>"}


def test_durations_and_only():
    assert parse_duration_s("90s") == 90 and parse_duration_s("2m") == 120 and parse_duration_s(5) == 5
    with pytest.raises(ValueError):
        parse_duration_s("soon")
    assert parse_only("model=a,quant=bf16") == {"model": "a", "quant": "bf16"}
    with pytest.raises(KvlabError, match="not KEY=VALUE"):
        parse_only("colour=red")


def _spec(**kw):
    base = dict(name="t", models=["m1", "m2"], quants=["bf16"], workloads=["w"], load={"users": [1, 2]},
                duration_s=1, warmup_s=0, repeats=2)
    base.update(kw)
    return Spec.model_validate(base)


def test_cells_matrix_and_only():
    s = _spec()
    cs = cells(s)
    assert [c.cell_id for c in cs] == ["m1__bf16__w__u1", "m1__bf16__w__u2", "m2__bf16__w__u1", "m2__bf16__w__u2"]
    assert [c.cell_id for c in cells(s, {"model": "m2", "users": "2"})] == ["m2__bf16__w__u2"]


def test_folder_of_another_spec_is_refused(tmp_path):
    runner.claim_folder(_spec(), tmp_path / "r")
    runner.claim_folder(_spec(), tmp_path / "r")  # the same spec: fine (resume)
    with pytest.raises(KvlabError, match="holds results of another spec"):
        runner.claim_folder(_spec(repeats=3), tmp_path / "r")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(KvlabError, match="not empty and holds no kvlab run"):
        runner.claim_folder(_spec(), tmp_path / "other")


@dataclass
class FakeServer:
    spec: object
    engine: str = "fake"
    argv: list = field(default_factory=lambda: ["fake", "--api-key", "sk"])
    env: dict = field(default_factory=dict)
    log_path: Path = Path("/nonexistent")
    starts: list = field(default_factory=list)

    def start(self):
        FakeServer.started.append(self.spec.model)
        return self

    def stop(self):
        FakeServer.stopped += 1

    def alive(self):
        return True


def _client(requests: int) -> ClientFigures:
    """The figures a load run of `requests` answered requests scores (kvlab.loadtest.summary)."""
    goodput = Goodput(slo=SLO(), duration_s=10.0, requests=requests, requests_ok=requests, requests_met_slo=requests,
                      sessions_finished=1, sessions_met_slo=1, sessions_unfinished=0)
    return ClientFigures(requests=requests, requests_ok=requests, probes=0, sessions=1, duration_s=10.0,
                         goodput=goodput, errors=0, window_s=10.0)


def _fake_repeat(interrupt_after=None):
    calls = []

    def fake(spec, cell, k, server, out, reason):
        if interrupt_after is not None and len(calls) == interrupt_after:
            rdir = runner.repeat_dir(out, cell, k)
            rdir.mkdir(parents=True)
            runner._set_status(rdir, cell, k, "running")
            raise KeyboardInterrupt
        calls.append((cell.cell_id, k))
        rdir = runner.repeat_dir(out, cell, k)
        runner._set_aside_partial(rdir)
        rdir.mkdir(parents=True)
        res = RepeatResults(cell=runner.cell_key(cell), cell_id=cell.cell_id, repeat=k, status="complete",
                            client=_client(requests=10 + k))
        res.write(rdir / "results.json")
        runner._set_status(rdir, cell, k, "complete")
        return res

    return fake, calls


def test_resume_after_interrupt_runs_only_what_is_missing(tmp_path, monkeypatch):
    import kvlab.deploy as launcher

    FakeServer.started, FakeServer.stopped = [], 0
    monkeypatch.setattr(launcher, "Server", FakeServer)
    monkeypatch.setattr(launcher, "choose_engine", lambda e: ("sim", "test"))  # FakeServer stands in for its Server
    spec = _spec()
    fake, calls = _fake_repeat(interrupt_after=3)
    monkeypatch.setattr(runner, "run_repeat", fake)
    with pytest.raises(KeyboardInterrupt):
        runner.run_spec(spec, tmp_path / "r")
    assert len(calls) == 3 and FakeServer.stopped == len(FakeServer.started)  # the server was stopped
    partial = runner.repeat_dir(tmp_path / "r", Cell("m1", "bf16", "w", 2), 2)
    assert json.loads((partial / "status.json").read_text())["status"] == "running"
    fake2, calls2 = _fake_repeat()
    monkeypatch.setattr(runner, "run_repeat", fake2)
    runner.run_spec(spec, tmp_path / "r")
    assert len(calls2) == 8 - 3  # only the missing repeats
    assert calls2[0] == ("m1__bf16__w__u2", 2)
    assert list(partial.parent.glob("repeat-2.partial-*"))  # the interrupted repeat's files are kept aside
    rows = index.query(tmp_path / "r")
    assert len(rows) == 8 and {r["status"] for r in rows} == {"complete"}
    cell = json.loads((tmp_path / "r" / "m2__bf16__w__u2" / "results.json").read_text())
    assert cell["status"] == "complete" and cell["aggregate"]["client.requests"]["mean"] == 11.5
