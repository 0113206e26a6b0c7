"""`kvlab scrape` and `kvlab metrics ...`: record vLLM's metrics and print a run's figures."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Optional

import typer

from kvlab.errors import KvlabError
from kvlab.units import parse_duration_s

SUMMARY_FILE = "metrics-summary.json"
metrics_app = typer.Typer(help="Per-run figures from vLLM's Prometheus metrics.", no_args_is_help=True)

JSON = typer.Option(False, "--json", help="Print one JSON object")
MODEL = typer.Option(None, "--model-name", help="The served model name (needed when the samples hold several)")
MEAN_CTX = typer.Option(None, "--mean-session-context-tokens", help="Mean context per agent session, for resident sessions")
KV_BPT = typer.Option(None, "--kv-bytes-per-token", help="KV bytes per token (kvlab kv) for exact GiB; default: from vllm:cache_config_info")


def scrape_cmd(
    url: str = typer.Argument(..., help="vLLM server (http://127.0.0.1:8000) or its /metrics URL"),
    duration: str = typer.Option("60s", "--duration", help="How long to scrape (60s, 5m, 1h)"),
    out: Path = typer.Option(..., "--out", help="Run directory: metrics.csv is appended to, metrics-summary.json written"),
    interval: str = typer.Option("1s", "--interval", help="Time between scrapes"),
    gpu: bool = typer.Option(True, "--gpu/--no-gpu", help="Sample nvidia-smi beside each scrape when present"),
    as_json: bool = JSON,
) -> None:
    """Scrape a vLLM server's /metrics for a while into DIR/metrics.csv, then print the figures."""
    from kvlab.clikit import live_progress
    from kvlab.metrics.figures import summarize_all
    from kvlab.metrics.samples import SAMPLES_FILE
    from kvlab.metrics.scraper import Scraper, redacted
    from kvlab.schema.metrics import MetricsFigures, MetricsSummary

    seconds, interval_s = parse_duration_s(duration), parse_duration_s(interval)
    out.mkdir(parents=True, exist_ok=True)
    scraper = Scraper(url, out / SAMPLES_FILE, interval_s, gpu=None if gpu else False)
    start = time.time()
    try:
        with scraper, live_progress(as_json, bar=True, count=False) as progress:
            task = progress.add_task("scrape", total=seconds)
            while (left := start + seconds - time.time()) > 0:
                progress.update(task, completed=seconds - left, description=(
                    f"scrape: {seconds - left:,.0f}/{seconds:,.0f} s, {scraper.scrapes} scrapes, {scraper.gaps} failed"))
                time.sleep(min(0.5, left))
    except KeyboardInterrupt:
        pass  # the context manager scraped once more and closed the file: nothing is lost
    if scraper.gaps == scraper.scrapes:
        raise KvlabError(f"all {scraper.scrapes} scrapes of {scraper.url} failed ({scraper.last_error}); "
                         f"gaps recorded in {out / SAMPLES_FILE}")
    summary = MetricsSummary(source=redacted(scraper.url), figures={
        m: MetricsFigures.from_run(f) for m, f in summarize_all(out / SAMPLES_FILE, start_ts=start).items()})
    summary.write(out / SUMMARY_FILE)
    _print({m: f.model_dump(mode="json") for m, f in summary.figures.items()}, as_json)
    if not as_json:
        _console().print(f"[dim]{scraper.scrapes} scrapes, {scraper.gaps} failed; samples in {out / SAMPLES_FILE}, "
                         f"figures in {out / SUMMARY_FILE}[/dim]")


@metrics_app.command("summarize")
def summarize_cmd(
    run: Path = typer.Argument(..., help="Run directory with metrics.csv, or the samples file"),
    start_ts: Optional[float] = typer.Option(None, "--start-ts", help="Window start, Unix seconds (default: first scrape)"),
    end_ts: Optional[float] = typer.Option(None, "--end-ts", help="Window end, Unix seconds (default: last scrape)"),
    model_name: Optional[str] = MODEL,
    mean_session_context_tokens: Optional[float] = MEAN_CTX,
    kv_bytes_per_token: Optional[float] = KV_BPT,
    as_json: bool = JSON,
) -> None:
    """The run's figures: KV in use (fraction, blocks, tokens, GiB), queues, preemptions, prefix hits, rates, latency."""
    from kvlab.metrics.figures import summarize, summarize_all

    kw = dict(start_ts=start_ts, end_ts=end_ts, mean_session_context_tokens=mean_session_context_tokens,
              kv_bytes_per_token=kv_bytes_per_token)
    if model_name:
        figures = {model_name: summarize(run, model_name=model_name, **kw).to_dict()}
    else:
        figures = {m: f.to_dict() for m, f in summarize_all(run, **kw).items()}
    _print(figures, as_json)


@metrics_app.command("summarize-prometheus")
def summarize_prometheus_cmd(
    prometheus: str = typer.Argument(..., help="Prometheus URL, e.g. http://127.0.0.1:9090"),
    start_ts: float = typer.Option(..., "--start-ts", help="Window start, Unix seconds"),
    end_ts: float = typer.Option(..., "--end-ts", help="Window end, Unix seconds"),
    model_name: Optional[str] = MODEL,
    selector: Optional[str] = typer.Option(None, "--selector", help='Extra label matchers, e.g. job="vllm"'),
    mean_session_context_tokens: Optional[float] = MEAN_CTX,
    kv_bytes_per_token: Optional[float] = KV_BPT,
    as_json: bool = JSON,
) -> None:
    """The same figures, read from an existing Prometheus that scrapes the vLLM servers."""
    from kvlab.metrics.promql import summarize_from_prometheus

    f = summarize_from_prometheus(prometheus, start_ts, end_ts, model_name, selector=selector,
                                  mean_session_context_tokens=mean_session_context_tokens,
                                  kv_bytes_per_token=kv_bytes_per_token)
    _print({f.model_name or "": f.to_dict()}, as_json)


@metrics_app.command("check-dashboard")
def check_dashboard_cmd(
    dashboard: Path = typer.Argument(..., help="Grafana dashboard JSON (e.g. deploy/grafana/vllm-kvlab.json)"),
    against: str = typer.Option(..., "--against", help="A vLLM server URL (its /metrics is read) or a saved exposition file"),
) -> None:
    """Check that every PromQL expression of a dashboard names metrics the server really exports."""
    from kvlab.metrics.dashboard import load_dashboard, queries, unknown_metrics
    from kvlab.metrics.exposition import parse_exposition

    d = load_dashboard(dashboard)
    parsed = parse_exposition(_exposition_text(against), prefix=None)
    exported = {s.name for s in parsed.samples}
    if not exported:
        raise KvlabError(f"{against} holds no metric samples")
    unknown = unknown_metrics(d, exported)
    if unknown:
        lines = "; ".join(f"{where}: {', '.join(sorted(n))}" for where, n in unknown.items())
        raise KvlabError(f"{dashboard} uses metrics {against} does not export: {lines}")
    _console().print(f"{len(queries(d))} PromQL expressions in {dashboard}: every metric they name is exported by {against}")


def _exposition_text(source: str) -> str:
    if re.match(r"https?://", source):
        import httpx

        from kvlab.metrics.scraper import metrics_url

        try:
            r = httpx.get(metrics_url(source), timeout=10, trust_env=False)
        except httpx.HTTPError as e:
            raise KvlabError(f"cannot read {source}: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise KvlabError(f"{source} answered HTTP {r.status_code}")
        return r.text
    try:
        return Path(source).read_text(errors="replace")
    except OSError as e:
        raise KvlabError(f"cannot read {source}: {e}") from None


def register(app: typer.Typer) -> None:
    app.command("scrape")(scrape_cmd)
    app.add_typer(metrics_app, name="metrics")


# -- printing ------------------------------------------------------------------------------------
def _console():
    from kvlab.clikit import console

    return console


def _print(figures: dict[str, dict], as_json: bool) -> None:
    from rich.table import Table

    from kvlab.clikit import emit_json

    if as_json:
        emit_json(figures if len(figures) != 1 else next(iter(figures.values())))
        return
    for model, d in figures.items():
        t = Table(title=f"{model or '(no model)'}: {d['duration_s'] or 0:,.1f} s window, {d['scrapes']} scrapes, "
                        f"{d['scrape_gaps']} gaps", show_header=True)
        for col in ("figure", "value", "source / missing"):
            t.add_column(col, justify="right" if col == "value" else "left")
        for label, key, fmt in ROWS:
            t.add_row(label, *_cell(d, key, fmt))
        for fig, title in (("ttft", "TTFT"), ("itl", "ITL"), ("e2e", "E2E latency"), ("queue_time", "queue time")):
            lat = d[fig]
            value = ("—" if lat["p50_s"] is None else
                     f"{lat['p50_s'] * 1e3:,.1f} / {lat['p90_s'] * 1e3:,.1f} / {lat['p99_s'] * 1e3:,.1f}")
            note = ", ".join(d["missing"].get(fig, ())) or f"{lat['count'] or 0:,.0f} observations"
            t.add_row(f"{title} p50 / p90 / p99 (ms)", value, note)
        _console().print(t)


# (label, key, format) of the printed table; everything is in --json too.
ROWS = (
    ("KV pool: blocks x block size", "num_gpu_blocks", "{:,.0f}"),
    ("KV pool: tokens (kv_cache_size_tokens)", "kv_cache_size_tokens", "{:,.0f}"),
    ("KV usage peak / mean / p95", "kv_usage_peak_frac", "pct3"),
    ("KV tokens in use peak / mean / p95", "kv_tokens_peak", "triple:kv_tokens"),
    ("KV blocks in use peak / mean / p95", "kv_blocks_peak", "triple:kv_blocks"),
    ("KV GiB in use peak / mean / p95", "kv_gib_peak", "triple3:kv_gib"),
    ("requests running peak / mean", "running_peak", "pair:running"),
    ("requests waiting peak / mean", "waiting_peak", "pair:waiting"),
    ("preemptions", "preemptions", "{:,.0f}"),
    ("requests finished", "requests_finished", "{:,.0f}"),
    ("prefix cache hit rate", "prefix_cache_hit_rate", "{:.1%}"),
    ("prompt tokens (per s)", "prompt_tokens", "rate:prompt_tokens"),
    ("generation tokens (per s)", "generation_tokens", "rate:generation_tokens"),
    ("resident sessions peak / mean", "resident_sessions_peak", "pair:resident_sessions"),
    ("GPU memory used peak (GiB)", "gpu_memory_used_peak_gib", "{:,.2f}"),
    ("GPU utilisation mean", "gpu_utilization_mean_ratio", "{:.0%}"),
    ("GPU power mean (W)", "gpu_power_mean_w", "{:,.0f}"),
)


def _cell(d: dict, key: str, fmt: str) -> tuple[str, str]:
    if d.get(key) is None:
        return "—", ", ".join(d["missing"].get(key, ()))
    note = d["provenance"].get(key, "")
    kind, _, stem = fmt.partition(":")
    if kind == "pct3":
        value = " / ".join(f"{d[f'kv_usage_{s}_frac']:.1%}" for s in ("peak", "mean", "p95"))
    elif kind in ("triple", "triple3"):
        f = "{:,.0f}" if kind == "triple" else "{:,.3f}"
        value = " / ".join(f.format(d[f"{stem}_{s}"]) for s in ("peak", "mean", "p95"))
    elif kind == "pair":
        value = f"{d[f'{stem}_peak']:,.0f} / {d[f'{stem}_mean']:,.1f}"
    elif kind == "rate":
        per_s = d.get(f"{stem}_per_s")
        value = f"{d[stem]:,.0f}" + (f" ({per_s:,.1f}/s)" if per_s is not None else "")
    else:
        value = fmt.format(d[key])
    if key == "num_gpu_blocks" and d.get("block_size"):
        value = f"{d[key]:,} x {d['block_size']}"
    return value, note
