"""The Grafana dashboard names only metrics vLLM exports; the Prometheus path's pieces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvlab.errors import KvlabError
from kvlab.metrics.dashboard import load_dashboard, metric_names, queries, unknown_metrics
from kvlab.metrics.exposition import parse_exposition
from kvlab.metrics.figures import INPUT_FAMILIES, summarize
from kvlab.metrics.promql import Prometheus, _frame, family_of

ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "vllm-kvlab.json"
REAL = ROOT / "tests" / "fixtures" / "vllm-0.32-cpu-deepseek-twin.metrics.txt"
EXPORTED = {s.name for s in parse_exposition(REAL.read_text()).samples}


def test_every_dashboard_expression_names_metrics_of_the_real_exposition():
    d = load_dashboard(DASHBOARD)
    qs = queries(d)
    assert len(qs) >= 20
    assert all(metric_names(q.expr) for q in qs)  # each query selects something
    assert unknown_metrics(d, EXPORTED) == {}
    used = set().union(*(metric_names(q.expr) for q in qs))
    # what the issue asks the dashboard to show
    assert {"vllm:kv_cache_usage_perc", "vllm:cache_config_info", "vllm:num_requests_running",
            "vllm:num_requests_waiting", "vllm:num_preemptions_total", "vllm:prompt_tokens_total",
            "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
            "vllm:inter_token_latency_seconds_bucket", "vllm:prefix_cache_hits_total",
            "vllm:prefix_cache_queries_total"} <= used


def test_dashboard_is_grafana_shaped():
    d = load_dashboard(DASHBOARD)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    names = [v["name"] for v in d["templating"]["list"]]
    assert names[:2] == ["datasource", "model_name"]
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"]
            assert {"h", "w", "x", "y"} <= set(p["gridPos"])
    # per model_name: every panel not tied to one server selects and labels by model_name
    for q in queries(d):
        if "kv_instance" not in q.expr and q.where.startswith("panel"):
            assert 'model_name=~"$model_name"' in q.expr, q.where


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.9, sum by (le, model_name) (rate(vllm:x_bucket{a="b{c}"}[5m])))') == {"vllm:x_bucket"}
    assert metric_names("vllm:a * on(engine) group_left(x) vllm:b offset 5m") == {"vllm:a", "vllm:b"}
    assert metric_names("sum(rate(DCGM_FI_DEV_FB_USED[$__rate_interval])) / 1e9") == {"DCGM_FI_DEV_FB_USED"}
    assert metric_names('vllm:kv_cache_usage_perc{instance="$kv_instance"} * ($num_gpu_blocks - 1)') == {"vllm:kv_cache_usage_perc"}
    d = {"panels": [{"title": "t", "targets": [{"refId": "A", "expr": "vllm:gpu_cache_usage_perc"}]}]}
    assert unknown_metrics(d, EXPORTED) == {"panel 't' A": {"vllm:gpu_cache_usage_perc"}}


def test_cli_check_dashboard(kvlab, tmp_path):
    r = kvlab("metrics", "check-dashboard", str(DASHBOARD), "--against", str(REAL))
    assert r.returncode == 0, r.stderr
    bad = json.loads(DASHBOARD.read_text())
    bad["panels"][1]["targets"][0]["expr"] = "vllm:gpu_cache_usage_perc"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    r = kvlab("metrics", "check-dashboard", str(tmp_path / "bad.json"), "--against", str(REAL))
    assert r.returncode == 2 and "vllm:gpu_cache_usage_perc" in r.stderr


def test_family_of_prometheus_series_names():
    assert family_of("vllm:prompt_tokens_total") == "vllm:prompt_tokens"
    assert family_of("vllm:iteration_tokens_total_bucket") == "vllm:iteration_tokens_total"
    assert family_of("vllm:kv_cache_usage_perc") == "vllm:kv_cache_usage_perc"
    # the same families as prometheus_client's parser gives for the real exposition
    for s in parse_exposition(REAL.read_text()).samples:
        if s.name in INPUT_FAMILIES:
            assert family_of(s.name) == s.family, s.name


def test_prometheus_matrix_becomes_the_samples_frame():
    series = [
        {"metric": {"__name__": "vllm:generation_tokens_total", "engine": "0", "model_name": "m",
                    "instance": "127.0.0.1:8000", "job": "vllm"}, "values": [[100.0, "5"], [101.0, "25"], [102.0, "40"]]},
        {"metric": {"__name__": "vllm:cache_config_info", "engine": "0", "instance": "127.0.0.1:8000", "job": "vllm",
                    "num_gpu_blocks": "65", "block_size": "32"}, "values": [[100.0, "1"]]},
        {"metric": {"__name__": "vllm:kv_cache_usage_perc", "engine": "0", "model_name": "m",
                    "instance": "127.0.0.1:8000", "job": "vllm"}, "values": [[100.0, "0.5"], [102.0, "0.25"]]},
    ]
    up = [{"metric": {"__name__": "up", "instance": "127.0.0.1:8000", "job": "vllm"},
           "values": [[100.0, "1"], [101.0, "1"], [101.5, "0"], [102.0, "1"]]}]
    df = _frame(series, up)
    assert len(df) == 3 + 1 + 2 + 1
    assert "__name__" not in df["labels"][0] and '"instance":"127.0.0.1:8000"' in df["labels"][0]
    f = summarize(df, model_name="m")
    assert f.generation_tokens == 35 and f.scrape_gaps == 1
    assert f.kv_tokens_peak == 32 * 32 and f.num_gpu_blocks == 65


def test_prometheus_errors_are_one_line():
    with pytest.raises(KvlabError, match="not an http"):
        Prometheus("localhost:9090")
    with pytest.raises(KvlabError, match="cannot reach Prometheus"):
        Prometheus("http://127.0.0.1:1", timeout_s=2).query("up", 0)
