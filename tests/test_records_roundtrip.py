"""Round trip of the typed records: a real experiment cell runs on the simulated engine, then the
index, `kvlab experiment ls` and the report's tables are read back from its records, and every
figure they show equals the value in the record that holds it (the KV peak and goodput included),
with the source its type declares."""

import json

import pytest

from kvlab.analysis import tables
from kvlab.analysis.runs import load_runs
from kvlab.experiments import index
from kvlab.schema import RecordError
from kvlab.schema.experiment import CellResults, Manifest, RepeatResults, RunFolder, Status
from kvlab.schema.load import LoadRecord
from kvlab.schema.report import ReportRecord
from kvlab.schema.server import PredictionRecord

MODEL = "llama-3.1-8b"
SPEC = {
    "name": "roundtrip",
    "gpu": "h100",
    "models": [MODEL],
    "quants": ["bf16"],
    "workloads": ["agent-smoke"],
    "load": {"shape": "constant", "users": [3]},
    "duration_s": "5s",
    "warmup_s": 0,
    "max_model_len": 4096,
    "slo": {"ttft_s": 1.5, "itl_p95_s": 0.2},  # the spec sets one: it governs the goodput
    "scrape_interval_s": 0.1,  # often enough to see the short requests running
    "serve_args": ["--enable-prompt-tokens-details"],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import run_sim_cell

    return run_sim_cell(tmp_path_factory.mktemp("roundtrip"), SPEC, f"{MODEL}__bf16__agent-smoke__u3")


def test_every_record_reads_through_its_type(run):
    out, rdir, res = run
    assert RunFolder.read(out / "run.json").spec_name == "roundtrip"
    assert Status.read(rdir / "status.json").status == "complete"
    man = Manifest.read(rdir / "manifest.json")
    assert man.engine == res.engine == "sim" and man.cell == res.cell
    assert PredictionRecord.read(rdir / "prediction.json").prediction == res.prediction
    cell = CellResults.read(rdir.parent / "results.json")
    assert cell.first_complete_repeat == 1
    assert cell.aggregate["metrics.kv_usage_peak_frac"].mean == res.metrics.kv_usage_peak_frac
    assert cell.aggregate["client.goodput.request_goodput_per_min"].mean == res.client.goodput.request_goodput_per_min


def test_one_goodput_scored_once_with_the_spec_slo(run):
    _, rdir, res = run
    good = res.client.goodput
    assert good.slo_from == "spec" and good.slo.ttft_s == 1.5 and good.slo.itl_p95_s == 0.2
    load = LoadRecord.read(rdir / "load" / "load.json")
    assert load.summary.goodput == good  # the load run's score is the repeat's, not a second one
    assert res.client.output_tokens_per_s == load.summary.output_tokens_per_s
    assert good.requests > 0 and good.request_goodput_per_min is not None


def _expected_index(res):
    c, g = res.client, res.client.goodput
    return {
        "kv_cache_tokens_reported": res.server.kv_cache_tokens, "kv_cache_tokens_predicted": res.prediction.kv_cache_tokens,
        "output_tokens_per_s": c.output_tokens_per_s, "ttft_p50_s": c.ttft_s.p50, "ttft_p95_s": c.ttft_s.p95,
        "itl_p95_s": c.itl_s.p95, "requests": c.requests, "errors": c.errors, "preemptions": res.metrics.preemptions,
        "kv_usage_peak_frac": res.metrics.kv_usage_peak_frac, "requests_per_min": g.requests_per_min,
        "goodput_requests_per_min": g.request_goodput_per_min, "slo_from": "spec",
    }


def test_index_and_ls_show_the_records_figures(run, kvlab):
    out, rdir, res = run
    expected = _expected_index(res)
    assert expected["kv_usage_peak_frac"] is not None and expected["kv_usage_peak_frac"] > 0  # the KV column is filled
    (row,) = index.query(out)
    assert {k: row[k] for k in expected} == expected
    r = kvlab("experiment", "ls", str(out), "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    (ls_row,) = listed["repeats"]
    assert {k: ls_row[k] for k in expected} == expected
    # sources from the type: the server's figures are simulated on the sim engine
    assert listed["sources"]["kv_usage_peak_frac"] == "simulated"
    assert listed["sources"]["kv_cache_tokens_predicted"] == "predicted"
    assert listed["sources"]["goodput_requests_per_min"] == "simulated"
    table = kvlab("experiment", "ls", str(out), env={"COLUMNS": "300"})
    assert table.returncode == 0 and "(simulated)" in table.stdout and "(predicted)" in table.stdout


def test_report_tables_show_the_records_figures(run, tmp_path):
    from kvlab.analysis.report import build_report

    out, rdir, res = run
    rs = load_runs([out])
    (row,) = rs.repeats.to_dict(orient="records")
    c, g, m, s, p = res.client, res.client.goodput, res.metrics, res.server, res.prediction
    expected = {
        "output_tokens_per_s": c.output_tokens_per_s, "generation_tokens_per_s_server": m.generation_tokens_per_s,
        "ttft_p50_s": c.ttft_s.p50, "ttft_p95_s": c.ttft_s.p95, "ttft_p99_s": c.ttft_s.p99,
        "itl_p50_s": c.itl_s.p50, "itl_p95_s": c.itl_s.p95, "itl_p99_s": c.itl_s.p99, "e2e_p50_s": c.e2e_s.p50,
        "goodput_requests_per_min": g.request_goodput_per_min, "goodput_sessions_per_min": g.session_goodput_per_min,
        "slo_attainment": g.slo_attainment, "preemptions": m.preemptions, "kv_usage_peak_frac": m.kv_usage_peak_frac,
        "kv_tokens_peak": m.kv_tokens_peak, "running_peak": m.running_peak, "waiting_peak": m.waiting_peak,
        "prefix_cache_hit_rate": m.prefix_cache_hit_rate, "requests": c.requests, "errors": c.errors,
        "sessions": c.sessions, "resident_sessions_peak": m.resident_sessions_peak,
        "mean_session_context_tokens": c.mean_session_context_tokens,
    }
    assert set(expected) == set(tables.LOAD_COLUMNS)
    assert {k: row[k] for k in expected} == expected
    load = tables.under_load(rs).to_dict(orient="records")[0]
    assert {k: load[k] for k in expected} == pytest.approx(expected)  # the mean of one repeat
    cfg = tables.configs(rs).to_dict(orient="records")[0]
    assert (cfg["kv_cache_tokens_reported"], cfg["kv_cache_tokens_predicted"], cfg["kv_bytes_per_token"]) == (
        s.kv_cache_tokens, p.kv_cache_tokens, p.kv_bytes_per_token)
    # the KV dtype column is the server's; the prediction's has its own column
    assert (cfg["kv_cache_dtype"], cfg["kv_cache_dtype_predicted"]) == (s.cache_dtype, p.kv_cache_dtype)
    assert (cfg["block_size"], cfg["max_model_len"]) == (s.block_size, s.max_model_len)

    rep = build_report([out], out=tmp_path / "rep")
    written = {name: json.loads((rep.out / f"{name}.json").read_text())[0] for name in ("under_load", "headline")}
    assert {k: written["under_load"][k] for k in expected} == pytest.approx(expected)
    assert written["headline"]["kv_cache_tokens_reported"] == s.kv_cache_tokens
    record = ReportRecord.read(rep.out / "report.json")
    assert record.complete
    cols = record.columns
    # figures under load on the simulator also name what priced its steps (results.json's timing)
    label = f"simulated (timing: {res.timing.timing_source})"
    assert cols["under_load"]["kv_usage_peak_frac"] == cols["under_load"]["goodput_requests_per_min"] == label
    assert cols["headline"]["kv_cache_tokens_reported"] == "simulated"  # the memory model's pool, not timed
    assert cols["headline"]["kv_cache_tokens_predicted"] == "predicted"
    assert cols["headline"]["kv_tokens_error_pct"] == cols["cost"]["usd_per_1m_output_tokens"] == "computed"
    html = rep.html.read_text()
    assert "simulated (server)" in html and "predicted (kvlab)" in html and "measured (server)" not in html


def test_previous_layout_is_read_or_refused_in_one_line(run, tmp_path):
    out, rdir, res = run
    old = res.to_data()
    del old["schema_version"]
    # the layout before typed records: the spec's SLO at the top, no slo_from, provenance beside the facts
    old["slo"] = old["client"]["goodput"].pop("slo")
    del old["client"]["goodput"]["slo_from"]
    old["server"]["provenance"] = old["server"].pop("source")
    (tmp_path / "results.json").write_text(json.dumps(old))
    back = RepeatResults.read(tmp_path / "results.json")
    assert back.client.goodput == res.client.goodput and back.server == res.server
    (tmp_path / "future.json").write_text(json.dumps({**res.to_data(), "schema_version": 99}))
    with pytest.raises(RecordError, match="schema_version 99 is not readable") as e:
        RepeatResults.read(tmp_path / "future.json")
    assert "\n" not in str(e.value)
