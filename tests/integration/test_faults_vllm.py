"""The fault a fake cannot show: a real vLLM (CPU build, Llama-3.1-8B twin) SIGKILLed, its whole
process group (API server and engine core), in the middle of an experiment cell's load.

One vLLM start (~1 min). The rerun that completes the failed repeat uses the fake engine
(tests/fake_engine.py), so that no second vLLM starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from proc_watch import TAG_ENV, GroupWatch, group_members, new_tag, tagged

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CELL = "llama-3.1-8b__bf16__agent-smoke__u2"
SPEC = {
    "name": "kill-vllm", "engine": "vllm-cpu", "models": ["llama-3.1-8b"], "quants": ["bf16"],
    "workloads": ["agent-smoke"], "load": {"shape": "constant", "users": [2]}, "duration_s": "12s",
    "warmup_s": 0, "kv_memory_gib": 1, "max_model_len": 4096, "scrape_interval_s": 0.5,
}


def _ok_turns(folder: Path) -> int:
    n = 0
    for p in folder.glob("requests-*.jsonl*"):
        for line in p.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            n += rec["kind"] == "turn" and rec["error_kind"] is None
    return n


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("kill")
    spec_path = work / "kill-vllm.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    out = work / "r"
    tag = new_tag()
    p = subprocess.Popen([sys.executable, "-m", "kvlab", "experiment", "run", str(spec_path), "--out", str(out)],
                         cwd=REPO, env={**os.environ, TAG_ENV: tag}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    records = out / CELL / "repeat-1" / "load" / "requests"
    try:
        with GroupWatch(tag) as watch:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and p.poll() is None and _ok_turns(records) < 1:
                time.sleep(0.5)
            assert p.poll() is None and _ok_turns(records) >= 1, "no request was answered before the kill"
            [pgid] = watch.groups_with("vllm.entrypoints.openai.api_server")
            members = group_members({pgid})
            names = [" ".join(psutil.Process(m.pid).cmdline())[:80] for m in members]
            os.killpg(pgid, signal.SIGKILL)
            stdout, stderr = p.communicate(timeout=180)
        yield {"out": out, "rc": p.returncode, "stdout": stdout, "stderr": stderr, "pgid": pgid,
               "members": names, "watch": watch, "tag": tag, "spec_path": spec_path}
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        for q in tagged(tag):
            q.kill()


def test_the_user_is_told_which_repeat_failed_and_why(killed_run):
    r = killed_run
    assert r["rc"] == 0, r["stderr"][-3000:]  # the run went to its end; the repeat is failed
    assert len(r["members"]) >= 2  # vLLM's API server and its engine core, one process group
    assert f"{CELL} repeat 1: failed: the server died during the run (exit code -9, killed by SIGKILL)" in r["stderr"]
    assert "0 repeat(s) complete, 1 not" in r["stderr"]
    assert r["stdout"].strip().splitlines()[-1] == str(r["out"])


def test_nothing_of_the_run_is_left(killed_run):
    assert group_members({killed_run["pgid"]}) == []
    assert killed_run["watch"].leftovers() == []


def test_what_was_measured_before_the_kill_is_kept(killed_run):
    from kvlab.loadtest.records import read_requests
    from kvlab.metrics.samples import GAP, read_samples

    rdir = killed_run["out"] / CELL / "repeat-1"
    res = json.loads((rdir / "results.json").read_text())
    assert res["status"] == "failed"
    tail = "\n".join(res["failure"]["log_tail"])
    assert "POST /v1/chat/completions HTTP/1.1" in tail  # vLLM's own log, up to the kill
    reqs = read_requests(rdir / "load" / "requests.parquet")
    ok = reqs[reqs["error_kind"].isna() & (reqs["kind"] == "turn")]
    assert len(ok) >= 1 and (ok["completion_tokens"] > 0).all()
    # a request in flight at the kill is cut (incomplete) or refused (connect); none may be, when the
    # kill lands in a tool pause and the runner stops the load before the next turn
    assert set(reqs["error_kind"].dropna()) <= {"connect", "incomplete"}
    samples = read_samples(rdir)
    gaps = samples[samples["name"] == GAP]
    assert len(gaps) >= 1 and {json.loads(x)["kind"] for x in gaps["labels"]} == {"unreachable"}
    # vLLM's counters up to the kill are kept: the generation counter grew with the answered tokens
    # (its last scrape, every 0.5 s, may come before the last of them: 21 of 24 in one run)
    gen = samples[samples["name"] == "vllm:generation_tokens_total"]["value"]
    in_flight_max = SPEC["load"]["users"][0] * 16  # agent-smoke replies are at most 16 tokens
    assert gen.is_monotonic_increasing and 0 < gen.max() <= ok["completion_tokens"].sum() + in_flight_max
    for p in killed_run["out"].rglob("*.json"):
        json.loads(p.read_text())
    assert list(killed_run["out"].rglob("*.tmp")) == []


def test_the_rerun_redoes_only_the_killed_repeat(killed_run, monkeypatch):
    import fake_engine
    from kvlab.experiments import index, runner
    from kvlab.experiments.spec import load_spec

    fake_engine.install(monkeypatch.setattr)  # no second vLLM start: the fake serves the rerun
    monkeypatch.setenv(TAG_ENV, killed_run["tag"])
    monkeypatch.chdir(REPO)
    events = []
    runner.run_spec(load_spec(killed_run["spec_path"]), killed_run["out"], on_event=lambda k, d: events.append((k, d)))
    assert ("plan", {"repeats_total": 1, "repeats_pending": 1, "skipped": 0}) in events
    rows = index.query(killed_run["out"])
    assert [r["status"] for r in rows] == ["complete"]
    assert list((killed_run["out"] / CELL).glob("repeat-1.partial-*"))  # the killed repeat's files, kept aside
    assert tagged(killed_run["tag"]) == []
