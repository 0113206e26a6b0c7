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
    assert set(ServerFacts.model_fields) - {"source"} == {f.name for f in dataclasses.fields(StartupFacts)}
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
