"""An experiment spec runs on the simulated engine end to end: `kvlab experiment run SPEC --engine sim`
starts `kvlab sim serve` through the launcher, Locust plays the workload over HTTP, the scraper
reads /metrics, and the records and the report say that every figure is simulated."""

import json

import pytest
import yaml

from kvlab.schema.experiment import Manifest, RepeatResults
from kvlab.models import memory
from kvlab.models.cards import card
from kvlab.sim.timing import host_label

SPEC = {
    "name": "sim-e2e",
    "engine": "auto",  # the command line chooses sim
    "gpu": "h100",
    "models": ["deepseek-v2-lite", "llama-3.1-8b"],
    "quants": ["bf16"],
    "workloads": ["agent-smoke"],
    "load": {"shape": "constant", "users": [4]},
    "duration_s": "6s",
    "warmup_s": 0,
    "max_model_len": 4096,
    # 10x the wall clock; cached tokens in usage, as a real vLLM gives them with this flag
    "serve_args": ["--speedup", "10", "--enable-prompt-tokens-details"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from conftest import run_kvlab

    root = tmp_path_factory.mktemp("sim-e2e")
    spec = root / "sim-e2e.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    r = run_kvlab("experiment", "run", str(spec), "--engine", "sim", "--out", str(root / "out"), timeout=240)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(root / "out")
    assert "engine: sim (requested with --engine sim)" in r.stderr
    return root


def _repeat(root, model):
    return root / "out" / f"{model}__bf16__agent-smoke__u4" / "repeat-1"


@pytest.mark.parametrize("model", ["deepseek-v2-lite", "llama-3.1-8b"])
def test_records_say_sim_and_hold_the_memory_models_pool(results, model):
    rdir = _repeat(results, model)
    typed = RepeatResults.read(rdir / "results.json")
    res, man = typed.model_dump(), Manifest.read(rdir / "manifest.json").model_dump()
    assert res["status"] == "complete" and res["engine"] == man["engine"] == "sim"
    assert man["server_argv"][1:5] == ["-m", "kvlab", "sim", "serve"]
    server = res["server"]
    # what priced the simulated steps: the server's /metrics (kvlab:sim_* series), steps per provenance
    assert res["timing"]["timing_source"] == server["timing_source"] and res["timing"]["timing_source"]
    assert sum(res["timing"]["steps_priced"].values()) > 0
    # and what priced the time outside them: the server's log and /metrics say the same
    assert res["timing"]["host_source"] == server["host_source"]
    assert res["timing"]["host_source"].startswith(host_label("0.32.0") + "; API server")
    cap = memory.capacity(card(model).arch, model_name=model, gpu="h100", max_model_len=4096)
    # startup log and vllm:cache_config_info, parsed by the launcher as for vLLM
    assert server["vllm_version"] == "0.32.0+kvlab.sim"
    assert (server["num_gpu_blocks"], server["block_size"], server["kv_cache_tokens"], server["max_model_len"]) == (
        cap.num_blocks, cap.block_size, cap.kv_cache_tokens, 4096)
    assert server["available_kv_memory_gib"] == round(cap.kv_budget_bytes / memory.GiB, 2)
    assert server["attention_backend"] == cap.attention_backend
    # the scraper read the same pool from /metrics
    met, cli = res["metrics"], res["client"]
    assert (met["num_gpu_blocks"], met["kv_cache_size_tokens"]) == (cap.num_blocks, cap.kv_cache_tokens)
    assert met["scrapes"] >= 3 and met["scrape_gaps"] == 0
    # usage.prompt_tokens_details.cached_tokens on the client = vllm:prefix_cache_hits on the server
    assert cli["requests_ok"] > 0 and cli["errors"] == 0
    assert cli["cached_tokens"] > 0
    assert met["prefix_cache_hits_tokens"] == cli["cached_tokens"]


def test_report_labels_the_figures_simulated(results):
    from conftest import run_kvlab

    rep = results / "report"
    r = run_kvlab("report", str(results / "out"), "--out", str(rep))
    assert r.returncode == 0, r.stderr
    headline = json.loads((rep / "headline.json").read_text())
    under_load = json.loads((rep / "under_load.json").read_text())
    assert {h["config"] for h in headline} == {"deepseek-v2-lite/bf16", "llama-3.1-8b/bf16"}
    assert {h["source"] for h in headline} == {h["source"] for h in under_load} == {"simulated"}
    html = (rep / "index.html").read_text()
    assert "simulated" in html
    # headers and plot titles say simulated too, never measured
    assert "simulated (server)" in html and "measured (server)" not in html
    # the load figures also say what priced the simulated steps, and where the error band is
    timing = "; ".join(dict.fromkeys(RepeatResults.read(_repeat(results, m) / "results.json").timing.timing_source
                                     for m in ("deepseek-v2-lite", "llama-3.1-8b")))  # the report's order
    assert f"## Under agent load (simulated (timing: {timing}))" in (rep / "summary.md").read_text()
    assert f"simulated (timing: {timing}) (server)" in html
    # and what priced the time outside the steps, from the same records
    host = RepeatResults.read(_repeat(results, "llama-3.1-8b") / "results.json").timing.host_source
    assert f"Simulated time outside the steps: {host}." in (rep / "summary.md").read_text()
    assert f"Simulated time outside the steps: {host}." in html.replace("&#39;", "'")


def test_analysis_headline_script_rebuilds_the_reports_headline(results):
    """analysis/headline.py reads the records with pandas only and finds the report's headline."""
    import importlib.util
    from pathlib import Path

    from conftest import run_kvlab

    path = Path(__file__).resolve().parents[1] / "analysis" / "headline.py"
    spec = importlib.util.spec_from_file_location("headline_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    baseline, head = script.headline(script.read_repeats([results / "out"]))
    rep = results / "report-check"
    r = run_kvlab("report", str(results / "out"), "--out", str(rep))
    assert r.returncode == 0, r.stderr
    report = {h["config"]: h for h in json.loads((rep / "headline.json").read_text())}
    assert json.loads((rep / "report.json").read_text())["headline"] == script.sentences(baseline, head)
    empty = lambda v: v is None or v != v  # noqa: E731  (JSON null in the report, NaN in pandas)
    for row in head.to_dict("records"):
        theirs = report[row["config"]]
        for key in ("kv_bytes_per_token", "kv_cache_tokens_reported", "kv_cache_tokens_predicted", "source"):
            assert row[key] == theirs[key], key
        for key in ("tokens_x_reported", "tokens_x_predicted", "kv_saved_pct"):
            assert (empty(row[key]) and empty(theirs[key])) or row[key] == pytest.approx(theirs[key]), key
    assert head.set_index("config").loc["deepseek-v2-lite/bf16", "tokens_x_predicted"] > 1  # MLA holds more

def test_shipped_sim_ladder_spec():
    from pathlib import Path

    from kvlab.experiments.spec import cells, load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "experiments" / "sim-ladder.yaml")
    assert (spec.engine, spec.gpu, spec.load.shape) == ("sim", "h100", "steps")
    assert spec.plan.agents == 10_000  # the planner's done-when fleet, planned after the cells
    assert {(c.model, c.quant) for c in cells(spec)} == {
        (m, q) for m in ("deepseek-v2-lite", "llama-3.1-8b") for q in ("bf16", "fp8-kv")}
