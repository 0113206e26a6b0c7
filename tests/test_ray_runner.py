"""`kvlab experiment run SPEC --ray` on a local Ray cluster (a head with 2 CPUs; `kvlab_gpu` stands in
for GPUs): two server groups on the simulated engine run at once, the results folder holds what the
local runner writes for the same spec and seed, a rerun skips everything, the API key is in no
record and none of Ray's logs; a Ray worker killed mid-load fails its group's repeat with the
reason, the other group completes, nothing is left running, the rerun completes."""

from __future__ import annotations

import os
import re
import signal
import tempfile
import threading
from pathlib import Path

import pytest

from fault_checks import REPO, assert_records_whole, record_lines, status, wait_for
from proc_watch import TAG_ENV, GroupWatch, group_members, new_tag
from kvlab.experiments import index, runner
from kvlab.experiments.spec import validate_spec
from kvlab.schema.experiment import CellResults, Manifest, RepeatResults

ray = pytest.importorskip("ray")
from kvlab.experiments.ray_runner import run_spec_on_ray  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray cluster and four simulated servers: over a minute on 2 cores

MODELS = ["llama-3.1-8b", "qwen3-8b"]
KEY = "sk-kvlab-" + os.urandom(12).hex()


def two_groups(name: str, duration_s: float = 4):
    return validate_spec(dict(
        name=name, engine="sim", gpu="h100", models=MODELS, workloads=["agent-smoke"], load={"users": [2]},
        duration_s=duration_s, warmup_s=0, max_model_len=4096, scrape_interval_s=0.5, seed=7,
        serve_args=["--speedup", "20"]), "test spec")


def cell_of(model: str) -> str:
    return f"{model}__bf16__agent-smoke__u2"


@pytest.fixture(scope="module")
def cluster():
    """A head with 2 CPUs and 2 stand-in GPUs; its workers inherit the test tag and the key (the
    environment is the only way the key reaches a task)."""
    tag = new_tag()
    saved = {k: os.environ.get(k) for k in (TAG_ENV, "KVLAB_API_KEY")}
    os.environ[TAG_ENV], os.environ["KVLAB_API_KEY"] = tag, KEY
    temp = tempfile.mkdtemp(prefix="kray")  # short: Ray's socket paths must fit
    cwd = os.getcwd()
    os.chdir(REPO)
    ray.init(address="local", num_cpus=2, resources={"kvlab_gpu": 2}, include_dashboard=False,
             log_to_driver=False, object_store_memory=80 * 1024 * 1024, _temp_dir=temp)
    yield {"tag": tag, "temp": Path(temp)}
    ray.shutdown()
    os.chdir(cwd)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run(spec, out, events=None, **kw):
    sink = events if events is not None else []
    return run_spec_on_ray(spec, out, api_key=KEY, on_event=lambda kind, data: sink.append((kind, data)), **kw)


def servers_and_locusts_left(watch: GroupWatch) -> list:
    groups = watch.groups_with("sim serve") | watch.groups_with("locust")
    assert watch.groups_with("sim serve") and watch.groups_with("locust")
    return group_members(groups)


def test_two_groups_run_at_once_and_match_the_local_runner(cluster, tmp_path):
    spec = two_groups("ray-two")
    events: list = []
    with GroupWatch(cluster["tag"]) as watch:
        run(spec, tmp_path / "ray", events)
    wait_for(lambda: not servers_and_locusts_left(watch), 30, "the servers and Locust to end")
    nodes = {d["node"] for k, d in events if k == "group_start"}
    assert len([k for k, _ in events if k == "group_start"]) == 2 and nodes
    ray_res = {m: RepeatResults.read(tmp_path / "ray" / cell_of(m) / "repeat-1" / "results.json") for m in MODELS}
    assert {r.status for r in ray_res.values()} == {"complete"}
    a, b = (ray_res[m].window for m in MODELS)
    assert max(a.start_ts, b.start_ts) < min(a.end_ts, b.end_ts)  # both loads ran at once

    runner.run_spec(spec, tmp_path / "local", api_key=KEY)
    # the same files; a request record file is named after its host, pid and start time
    files = lambda root: sorted(re.sub(r"/requests-[^/]+\.jsonl$", "/requests-*.jsonl", str(p.relative_to(root)))  # noqa: E731
                                for p in root.rglob("*") if p.is_file())
    assert files(tmp_path / "ray") == files(tmp_path / "local")
    for m in MODELS:
        rdirs = [tmp_path / where / cell_of(m) / "repeat-1" for where in ("ray", "local")]
        mine, theirs = (RepeatResults.read(d / "results.json") for d in rdirs)
        same = {"cell", "cell_id", "repeat", "seed", "status", "engine", "server", "prediction", "gpu_price_per_hour"}
        assert mine.model_dump(include=same) == theirs.model_dump(include=same)
        m1, m2 = (Manifest.read(d / "manifest.json") for d in rdirs)
        assert m1.model_dump(include={"cell", "seed", "spec", "spec_digest", "engine", "engine_reason"}) == \
            m2.model_dump(include={"cell", "seed", "spec", "spec_digest", "engine", "engine_reason"})
        assert m1.server_argv[m1.server_argv.index("sim"):m1.server_argv.index("--port")] == \
            m2.server_argv[m2.server_argv.index("sim"):m2.server_argv.index("--port")]
        c1, c2 = (CellResults.read(tmp_path / w / cell_of(m) / "results.json") for w in ("ray", "local"))
        assert (c1.status, c1.repeats_complete, sorted(c1.aggregate)) == (c2.status, c2.repeats_complete,
                                                                          sorted(c2.aggregate))
    keys = lambda rows: [(r["cell_id"], r["repeat"], r["status"], r["engine"]) for r in rows]  # noqa: E731
    assert keys(index.query(tmp_path / "ray")) == keys(index.query(tmp_path / "local"))
    assert_records_whole(tmp_path / "ray")

    again: list = []
    run(spec, tmp_path / "ray", again)  # a rerun: nothing pending, no task
    assert ("plan", {"repeats_total": 2, "repeats_pending": 0, "skipped": 2}) in again
    assert not [k for k, _ in again if k == "group_start"]

    # The key reached the servers and the load (every request let in) and is written nowhere.
    assert all(r.client.requests_ok > 0 and r.client.errors == 0 for r in ray_res.values())
    written = [f for root in (tmp_path / "ray", cluster["temp"]) for f in root.rglob("*") if f.is_file()]
    assert any("session_" in str(f) and f.suffix in (".out", ".err", ".log") for f in written)  # Ray's logs
    assert [f for f in written if _holds(f, KEY.encode())] == []
    assert KEY not in repr(events)


def _holds(path: Path, needle: bytes) -> bool:
    try:
        return needle in path.read_bytes()
    except OSError:  # a socket, a file Ray removed meanwhile
        return False


def test_a_worker_killed_mid_load_fails_its_group_only_and_the_rerun_completes(cluster, tmp_path):
    spec, out = two_groups("ray-kill", duration_s=8), tmp_path / "r"
    victim = cell_of(MODELS[0])
    started: dict = {}

    def on_event(kind, data):
        if kind == "group_start" and data["model"] == MODELS[0]:
            started.update(data)
            threading.Thread(target=kill_mid_load, daemon=True).start()

    def kill_mid_load():
        requests = Path(started["scratch"]) / victim / "repeat-1" / "load" / "requests"
        wait_for(lambda: record_lines(requests) >= 1, 120, "the load")
        os.kill(started["pid"], signal.SIGKILL)

    events: list = []
    with GroupWatch(cluster["tag"]) as watch:
        run_spec_on_ray(spec, out, api_key=KEY, on_event=lambda k, d: (events.append((k, d)), on_event(k, d)))
        left = servers_and_locusts_left(watch)
    assert left == []  # the clean-up task stopped the dead worker's server and Locust
    st = status(out, victim)
    assert st["status"] == "failed"
    assert st["failure"]["reason"].startswith("the Ray worker running this server group died on node ")
    assert status(out, cell_of(MODELS[1]))["status"] == "complete"
    assert [d for k, d in events if k == "leftover"]  # what was stopped is said
    assert not Path(started["scratch"]).exists()
    assert_records_whole(out)

    rerun: list = []
    run(spec, out, rerun)
    assert ("plan", {"repeats_total": 2, "repeats_pending": 1, "skipped": 1}) in rerun
    assert {r["status"] for r in index.query(out)} == {"complete"}
    assert list((out / victim).glob("repeat-1.partial-*"))  # the failed one, set aside
    assert_records_whole(out)
