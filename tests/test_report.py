"""The report from records alone: headline figures, partial and failed cells, --compare.

Records are written here in the runner's format with figures from a real CPU-build run
(34,512 and 8,192 KV tokens in 1 GiB), so the tests need no server."""

import json
from pathlib import Path

import pytest

from kvlab.analysis import tables
from kvlab.analysis.report import build_report
from kvlab.analysis.runs import load_runs
from kvlab.errors import KvlabError
from kvlab.experiments.records import write_json_atomic

GiB = 1 << 30
CONFIGS = {  # model: (attention, kv bytes/token, reported tokens)
    "deepseek-v2-lite": ("MLA", 31_104, 34_512),
    "llama-3.1-8b": ("GQA", 131_072, 8_192),
}


def _repeat(out: Path, model: str, users: int, k: int, *, tps: float, preemptions: float = 0, failed: bool = False):
    attention, kvb, tokens = CONFIGS[model]
    cell = {"model": model, "quant": "bf16", "workload": "agent-smoke", "users": users}
    cell_id = f"{model}__bf16__agent-smoke__u{users}"
    rdir = out / cell_id / f"repeat-{k}"
    rdir.mkdir(parents=True)
    status = "failed" if failed else "complete"
    write_json_atomic(rdir / "status.json", {"cell": cell, "cell_id": cell_id, "repeat": k, "status": status,
                                             "engine": "vllm-cpu"})
    res = {"cell": cell, "cell_id": cell_id, "repeat": k, "status": status, "engine": "vllm-cpu", "seed": k - 1,
           "gpu_price_per_hour": 2.5}
    if failed:
        res["failure"] = {"reason": "the server died during the run", "log_tail": ["Killed"]}
    else:
        res.update({
            "window": {"start_ts": 1000.0, "end_ts": 1030.0},
            "server": {"kv_cache_tokens": tokens, "num_gpu_blocks": tokens // 16, "block_size": 16,
                       "kv_cache_memory_bytes": GiB, "cache_dtype": "auto", "vllm_version": "0.32.0"},
            "prediction": {"attention": attention, "kv_cache_dtype": "auto", "quantization": "auto",
                           "kv_bytes_per_token": kvb, "kv_cache_tokens": tokens, "num_blocks": tokens // 16,
                           "weight_bytes_per_gpu": 100 << 20, "num_gpus": 1},
            "metrics": {"preemptions": preemptions, "kv_usage_peak_frac": 0.1, "kv_gib_mean": 0.05,
                        "generation_tokens_per_s": tps, "prefix_cache_hit_rate": 0.5},
            "client": {"requests": 10, "requests_ok": 10, "errors": 0, "sessions": 4, "output_tokens_per_s": tps,
                       "window_s": 30.0, "ttft_s": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
                       "itl_s": {"p50": 0.1, "p95": 0.2, "p99": 0.3},
                       "goodput": {"request_goodput_per_min": 12.0, "sessions_met_slo": 2}},
        })
    write_json_atomic(rdir / "results.json", res)
    write_json_atomic(rdir / "manifest.json", {"seed": k - 1, "server_argv": ["python", "-m", "vllm"], "kvlab_version": "0.1.0",
                                               "host": {"cpu": "test CPU", "cpu_count": 2}, "gpu": {"present": False}})
    (rdir / "metrics.csv").write_text(
        "ts,family,name,labels,value\n"
        f'1000.0,vllm:kv_cache_usage_perc,vllm:kv_cache_usage_perc,"{{}}",0.0\n'
        f'1000.0,vllm:cache_config_info,vllm:cache_config_info,"{{""num_gpu_blocks"": ""{tokens // 16}"", ""block_size"": ""16""}}",1.0\n'
        f'1015.0,vllm:kv_cache_usage_perc,vllm:kv_cache_usage_perc,"{{}}",0.1\n'
        f'1015.0,vllm:num_requests_running,vllm:num_requests_running,"{{}}",3.0\n')


def _folder(tmp: Path, name: str, repeats: int = 1, fail_llama: bool = False, tps_scale: float = 1.0) -> Path:
    out = tmp / name
    out.mkdir()
    write_json_atomic(out / "run.json", {"spec_name": name, "spec_digest": "x"})
    (out / "spec.yaml").write_text(f"name: {name}\ngpu_price_per_hour: 2.5\n")
    for k in range(1, repeats + 1):
        _repeat(out, "deepseek-v2-lite", 4, k, tps=(3.0 + 0.1 * k) * tps_scale)
        _repeat(out, "llama-3.1-8b", 4, k, tps=(4.0 + 0.1 * k) * tps_scale, failed=fail_llama and k == 1)
    return out


def test_headline_measured_and_predicted(tmp_path):
    rep = build_report([_folder(tmp_path, "a")], out=tmp_path / "rep")
    assert rep.baseline == "llama-3.1-8b/bf16"
    assert rep.headline[0].startswith("deepseek-v2-lite/bf16 (MLA, KV auto) holds 4.21x the KV tokens of llama-3.1-8b/bf16")
    head = {r["config"]: r for r in json.loads((tmp_path / "rep" / "headline.json").read_text())}
    assert head["deepseek-v2-lite/bf16"]["kv_cache_tokens_reported"] == 34_512
    assert head["deepseek-v2-lite/bf16"]["kv_tokens_error_pct"] == 0.0
    assert round(head["deepseek-v2-lite/bf16"]["kv_saved_pct"], 1) == 76.3
    html = rep.html.read_text()
    assert html.count('<img alt="') >= 6 and "data:image/png;base64," in html
    cost = json.loads((tmp_path / "rep" / "cost.json").read_text())
    ds = next(c for c in cost if c["config"] == "deepseek-v2-lite/bf16")
    assert ds["usd_per_1m_output_tokens"] == pytest.approx(2.5 / 3600 / 3.1 * 1e6)
    assert ds["usd_per_session_at_slo"] == pytest.approx(2.5 * 30 / 3600 / 2)
    assert (tmp_path / "rep" / "summary.md").read_text().count("| deepseek-v2-lite/bf16 |") >= 2


def test_a_failed_cell_is_listed_and_the_rest_renders(tmp_path):
    rep = build_report([_folder(tmp_path, "a", fail_llama=True)], out=tmp_path / "rep")
    assert any("llama-3.1-8b__bf16__agent-smoke__u4 repeat 1 is failed: the server died during the run" in m
               for m in rep.missing)
    assert "the server died during the run" in rep.html.read_text()
    # only the MLA model reported a capacity: it is its own baseline
    assert rep.baseline == "deepseek-v2-lite/bf16"


def test_empty_results_render_and_say_so(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    write_json_atomic(out / "run.json", {"spec_name": "empty", "spec_digest": "x"})
    rep = build_report([out], out=tmp_path / "rep")
    assert rep.html.exists() and "no repeat has run yet" in " ".join(rep.missing)
    with pytest.raises(KvlabError, match="not a kvlab results folder"):
        build_report([tmp_path], out=tmp_path / "rep2")


def test_compare_flags_deltas_outside_the_interval(tmp_path):
    a = _folder(tmp_path, "a", repeats=3)
    b = _folder(tmp_path, "b", repeats=3, tps_scale=1.5)
    cmp = tables.compare(load_runs([a]), load_runs([b]))
    row = cmp[(cmp["config"] == "llama-3.1-8b/bf16") & (cmp["metric"] == "output_tokens_per_s")].iloc[0]
    assert row["a_mean"] == pytest.approx(4.2) and row["b_mean"] == pytest.approx(6.3)
    assert row["outside_a_interval"] is True or row["outside_a_interval"] == True  # noqa: E712
    same = cmp[(cmp["metric"] == "kv_cache_tokens_reported")].iloc[0]
    assert same["delta"] == 0


def test_report_cli(kvlab, tmp_path):
    a = _folder(tmp_path, "a", repeats=2)
    b = _folder(tmp_path, "b", repeats=2, tps_scale=0.5)
    r = kvlab("report", "--compare", str(a), str(b), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "rep" / "index.html")
    assert "Compared with an earlier run set" in (tmp_path / "rep" / "index.html").read_text()
    r = kvlab("report", str(a), "--baseline", "mistral-7b/bf16")
    assert r.returncode == 2 and "--baseline mistral-7b/bf16 is not among the configs run" in r.stderr
