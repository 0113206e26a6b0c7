"""The record types mirror what their writers produce: a field added on one side and not the other
fails here, not silently in a report. Reading refuses other layouts in one line."""

import dataclasses
import json

import pytest

from kvlab.deploy.engines import served_source
from kvlab.deploy.facts import StartupFacts
from kvlab.metrics.figures import RunFigures
from kvlab.models import memory
from kvlab.models.cards import card
from kvlab.schema import RecordError
from kvlab.schema.experiment import RunFolder, Status
from kvlab.schema.metrics import MetricsFigures, MetricsSummary
from kvlab.schema.server import Prediction, PredictionRecord, ServerFacts


def test_server_facts_and_prediction_mirror_their_dataclasses():
    assert set(ServerFacts.model_fields) - {"source", "pool_source", "launched_by_kvlab"} == {f.name for f in dataclasses.fields(StartupFacts)}
    cap = memory.capacity(card("llama-3.1-8b").arch, model_name="llama-3.1-8b", gpu="h100", max_model_len=4096)
    pred = Prediction.from_capacity(cap)
    assert pred.model_dump(exclude={"source"}) == json.loads(json.dumps(cap.to_dict()))
    assert Prediction.source_of("kv_cache_tokens") == "predicted"
    assert ServerFacts.source_of("kv_cache_tokens", served_source("sim")) == "simulated"
    assert ServerFacts.source_of("kv_cache_tokens", served_source("vllm")) == "measured"


def test_metrics_figures_mirror_run_figures(tmp_path):
    assert set(MetricsFigures.model_fields) == {f.name for f in dataclasses.fields(RunFigures)}
    summary = MetricsSummary(source="http://h:1/metrics", figures={"m": MetricsFigures.from_run(RunFigures("m"))})
    summary.write(tmp_path / "metrics-summary.json")
    assert MetricsSummary.read(tmp_path / "metrics-summary.json") == summary.model_copy(update={"schema_version": 1})


def test_previous_layouts_are_read_and_other_versions_refused(tmp_path):
    # before schema_version: prediction.json was the provenance beside the prediction's keys
    (tmp_path / "p.json").write_text(json.dumps({"provenance": "predicted by the kvlab memory model"}))
    assert PredictionRecord.read(tmp_path / "p.json").prediction is None
    (tmp_path / "run.json").write_text(json.dumps({"spec_name": "s", "spec_digest": "d"}))
    assert RunFolder.read(tmp_path / "run.json").spec_name == "s"
    (tmp_path / "status.json").write_text(json.dumps({"schema_version": 7, "status": "complete"}))
    with pytest.raises(RecordError, match=r"status.json: a status record of schema_version 7 is not readable"):
        Status.read(tmp_path / "status.json")
    (tmp_path / "bad.json").write_text(json.dumps({"cell": {}, "status": "complete"}))
    with pytest.raises(RecordError, match="not a valid status record"):
        Status.read(tmp_path / "bad.json")
    assert Status.read_optional(tmp_path / "missing.json") is None


# -- kvlab sim run's results.json -----------------------------------------------------------------


def _sim_run(tmp_path, manifest=None):
    from kvlab.replay.run import run_offline
    from kvlab.sim.config import build_config

    cfg = build_config("deepseek-v2-lite", "h100", max_model_len=4096)
    return run_offline("deepseek-v2-lite", "h100", "agent-smoke", 10.0, concurrency=2, config=cfg,
                       out_dir=tmp_path, manifest=manifest)


def test_sim_run_results_are_one_type_written_and_read(tmp_path):
    from kvlab.schema.replay import SimCapacity, SimRunManifest, SimRunResults

    manifest = SimRunManifest(command=["kvlab", "sim", "run"], seed=0, users=2, workload={"name": "agent-smoke"},
                              duration_s=10.0, predicted_max_users_without_preemption=7)
    res = _sim_run(tmp_path, manifest).results
    assert isinstance(res, SimRunResults) and res.requests_completed > 0 and res.manifest == manifest
    back = SimRunResults.read(tmp_path / "results.json")
    assert back == res.model_copy(update={"schema_version": 1})
    # every field but the optional ones is written by summarize() (extra keys are refused by the type)
    written = set(json.loads((tmp_path / "results.json").read_text()))
    assert set(SimRunResults.model_fields) - written <= {"timing_source", "timing_provenance"}
    assert SimRunResults.source_of("num_preemptions") == "simulated"
    assert SimRunResults.source_of("output_tokens_per_s") == "computed"
    assert SimRunResults.source_of("wall_s") == "measured"
    assert SimCapacity.source_of("num_gpu_blocks") == "predicted"
    # the step-timing keys another part of kvlab says are accepted
    timed = SimRunResults.from_data({**back.to_data(), "timing_source": "roofline", "timing_provenance": {"roofline": 3}})
    assert timed.timing_provenance == {"roofline": 3}


def test_sim_run_results_previous_layout_read_other_version_refused(tmp_path):
    from kvlab.schema.replay import SimRunResults

    res = _sim_run(tmp_path).results
    old = {k: v for k, v in res.to_data().items() if k not in ("schema_version", "manifest")}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert SimRunResults.read(tmp_path / "old.json").num_preemptions == res.num_preemptions
    (tmp_path / "new.json").write_text(json.dumps({**old, "schema_version": 9}))
    with pytest.raises(RecordError, match=r"new.json: a sim-run-results record of schema_version 9 is not readable"):
        SimRunResults.read(tmp_path / "new.json")


# -- plan.json, the server lease, the twin marker -------------------------------------------------


def test_plan_record_parts_mirror_the_planner(tmp_path):
    from kvlab.plan.rebound import rebound
    from kvlab.schema.plan import FleetFigures, PlanRecord, Rebound, Saving

    fig = {"gpus": 10, "hbm_total_gib": 800.0, "hbm_per_gpu_gib": 80.0, "gpu_demand": 9.5, "calls_per_day": 1e6}
    half = {**fig, "gpus": 5, "hbm_total_gib": 400.0, "gpu_demand": 4.75}
    reb = Rebound.model_validate({**rebound("base", fig, 1, {"half": (half, 1)}, [50.0], [1.0, 2.0]), "plot": "r.png"})
    assert reb.configs[0].cells[1].gpus == 10 and reb.grid[0].demand_x == 0.5
    assert FleetFigures.source_of("sessions_per_replica") == "simulated"
    assert FleetFigures.source_of("weights_gib_per_gpu") == "predicted"
    assert FleetFigures.source_of("gpus") == Saving.source_of("saved") == "computed"
    (tmp_path / "plan.json").write_text(json.dumps({"schema_version": 2, "configs": []}))
    with pytest.raises(RecordError, match=r"plan.json: a plan record of schema_version 2 is not readable"):
        PlanRecord.read(tmp_path / "plan.json")


def test_server_lease_typed_previous_layout_read_other_version_refused(tmp_path):
    import os
    import subprocess

    from kvlab.deploy.process import _read_lease, _write_lease, stop_leftover
    from kvlab.schema.lease import ServerLease

    lease = tmp_path / ".m.server.lease"
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        _write_lease(lease, child.pid, ["sleep", "30"], tmp_path / "server.log")
        typed = ServerLease.read(lease)
        assert (typed.pid, typed.pgid, typed.kvlab_pid, typed.program) == (child.pid, child.pid, os.getpid(), ["sleep", "30"])
    finally:
        child.kill()
        child.wait()
    old = {k: v for k, v in typed.to_data().items() if k != "schema_version"}
    lease.write_text(json.dumps(old))  # before schema_version: the same keys
    assert _read_lease(lease) == typed
    assert stop_leftover(lease) is None and not lease.exists()  # its group is gone: the lease is removed
    lease.write_text('{"pid": 1')  # torn
    assert _read_lease(lease) is None and not lease.exists()
    lease.write_text(json.dumps({**old, "schema_version": 4}))
    with pytest.raises(RecordError, match="a lease record of schema_version 4 is not readable"):
        stop_leftover(lease)
    assert lease.exists()  # not judged blindly, not removed


def test_twin_marker_typed_previous_layout_reused_other_version_rebuilt(tmp_path):
    from kvlab.models.twins import MARKER, _is_built, read_marker
    from kvlab.schema.twin import TwinMarker

    TwinMarker(twin_of="llama-3.1-8b", hf_id="meta-llama/Llama-3.1-8B", recipe="abc", kvlab_version="0",
               seed=0, params=123).write(tmp_path / MARKER)
    assert read_marker(tmp_path).params == 123 and _is_built(tmp_path / MARKER, "abc")
    assert not _is_built(tmp_path / MARKER, "other recipe")
    old = {k: v for k, v in json.loads((tmp_path / MARKER).read_text()).items() if k != "schema_version"}
    (tmp_path / MARKER).write_text(json.dumps(old))
    assert _is_built(tmp_path / MARKER, "abc")  # a twin built before schema_version is reused
    (tmp_path / MARKER).write_text(json.dumps({**old, "schema_version": 3}))
    assert not _is_built(tmp_path / MARKER, "abc")  # another layout: built again
    with pytest.raises(RecordError, match="a twin record of schema_version 3 is not readable"):
        read_marker(tmp_path)
    assert not _is_built(tmp_path / "none.json", "abc")
