"""`kvlab load`: agent-style load with Locust, headless, with a live progress line."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from kvlab.clikit import emit_json


def progress_line(p) -> str:
    """`elapsed/duration s, users, requests (turns ended), in flight, failed, TTFT p50`: all counted
    from the run's own files as it goes (Locust's users, the request records)."""
    ttft = f"{p.ttft_p50_s:.3f} s" if p.ttft_p50_s is not None else "-"
    users = p.users if p.users is not None else "starting"
    flight = f"  in flight {p.in_flight}" if p.in_flight is not None else ""
    waiting = " (no turn has ended yet)" if p.requests == 0 and p.in_flight else ""
    when = (f"{p.elapsed_s:5.0f}/{p.duration_s:.0f} s" if p.elapsed_s <= p.duration_s else
            f"{p.duration_s:.0f}/{p.duration_s:.0f} s, stopping ({p.elapsed_s - p.duration_s:.0f} s)")
    return (f"kvlab load: {when}  users {users}  requests {p.requests}{waiting}"
            f"{flight}  failed {p.failures}  TTFT p50 {ttft}")


def _log_printer():
    """Where stderr is no terminal (a log file): a line every 10 s, not a carriage-return mess."""
    last = {"t": -1e9}

    def show(p) -> None:
        if p.elapsed_s - last["t"] >= 10:
            sys.stderr.write(progress_line(p) + "\n")
            sys.stderr.flush()
            last["t"] = p.elapsed_s

    return show


def _fmt_pct(d: dict | None, key: str) -> str:
    return f"{d[key] * 1000:.1f}" if d else "-"


def print_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result.summary
    console = Console(width=120)
    t = Table(title=f"measured on the client: {s['requests']} requests, {s['sessions']} sessions, {s['duration_s']:.1f} s")
    for col in ("metric (ms)", "mean", "p50", "p90", "p95", "p99"):
        t.add_column(col, justify="left" if col.startswith("metric") else "right")
    for name in ("ttft_s", "itl_s", "tpot_s", "e2e_s"):
        d = s[name]
        t.add_row(name.removesuffix("_s").upper(), *(_fmt_pct(d, k) for k in ("mean", "p50", "p90", "p95", "p99")))
    console.print(t)
    g = s["goodput"]
    counts = lambda d: ", ".join(f"{k} {v}" for k, v in d.items())  # noqa: E731
    if s["requests"] == 0:
        console.print("errors: no turn was sent (nothing was measured)")
    else:
        failed = s["requests"] - s["requests_ok"]
        console.print(f"errors: {counts(s['errors']) or 'none'}"
                      + (f" ({failed} of {s['requests']} turns failed)" if failed else ""))
    if s["probe_errors"]:
        console.print(f"calibration probes / model lookup failed: {counts(s['probe_errors'])}"
                      + ("; no workload request could start" if s["requests"] == 0 else ""))
    console.print(f"tokens: prompt {s['prompt_tokens'] or 0}, completion {s['completion_tokens'] or 0}, "
                  f"cached {s['cached_tokens'] if s['cached_tokens'] is not None else 'not reported'}")
    rate = lambda x: f"{x:.1f}" if x == x else "-"  # noqa: E731  (NaN: no time span measured)
    console.print(f"goodput (SLO {', '.join(f'{k}<={v:g}' for k, v in g['slo'].items() if v is not None)}): "
                  f"{rate(g['request_goodput_per_min'])} requests/min of {rate(g['requests_per_min'])}, "
                  f"{rate(g['session_goodput_per_min'])} sessions/min of {rate(g['sessions_per_min'])}")
    sizing = result.prompt_sizing
    if sizing:
        console.print(f"prompt sizing: {sizing['method']}, {sizing['tokens_per_word']:.3f} tokens per word ({sizing['source']})")
    cpu = ", ".join(f"{c['role']} {c['p90']:.0%}" for c in result.client_cpu if c["p90"] is not None)
    console.print(f"client CPU (p90 of one-second samples, of one core): {cpu or 'not sampled (run too short)'}")
    for w in result.warnings:
        console.print(f"[yellow]warning: {w}[/yellow]", soft_wrap=True)
    console.print(f"records: {result.records_path}\nLocust CSVs: {result.out_dir}/locust_*.csv")


def register(app: typer.Typer) -> None:
    @app.command("load")
    def load_cmd(
        host: str = typer.Option(..., "--host", help="Server base URL, e.g. http://127.0.0.1:8000"),
        workload: str = typer.Option("agent", "--workload", help="Profile name in loadtest/ (agent, agent-smoke, random, shared-prefix) or a YAML path"),
        users: Optional[int] = typer.Option(None, "--users", "-u", help="Peak users (poisson: session slots); default: the workload's"),
        duration: Optional[str] = typer.Option(None, "--duration", "-t", help="Run time: 90, 90s, 5m, 1h30m; default: the workload's"),
        shape: Optional[str] = typer.Option(None, "--shape", help="constant | steps | poisson | diurnal; default: the workload's"),
        out: Optional[str] = typer.Option(None, "--out", help="Run folder (default results/load/WORKLOAD-TIMESTAMP)"),
        seed: int = typer.Option(0, "--seed", help="Session stream seed"),
        workers: int = typer.Option(0, "--workers", help="Local Locust workers (0: one process); more when the "
                                    "run warns that a Locust process was busy >= 80 % of a core"),
        max_requests: Optional[int] = typer.Option(None, "--max-requests", help="Stop after this many requests"),
        spawn_rate: Optional[float] = typer.Option(None, "--spawn-rate", "-r", help="Users started per second"),
        no_calibrate: bool = typer.Option(False, "--no-calibrate", help="Do not probe the server's usage to size "
                                          "prompts; size them from --tokenizer or --tokens-per-word"),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="With --no-calibrate: a local tokenizer "
                                                "folder (the model's or a twin's) that counts the prompts"),
        tokens_per_word: Optional[float] = typer.Option(None, "--tokens-per-word", help="With --no-calibrate: "
                                                        "tokens per filler word, as stated"),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object"),
    ) -> None:
        """Agent-style load with Locust, headless: Locust CSVs, per-request records, goodput.

        Plays a workload profile against an OpenAI-compatible server (vLLM) and measures every
        request on the stream: TTFT, every inter-token gap, TPOT, E2E, prompt/completion/cached tokens.

        Exits 1 when no turn succeeded, or when the calibration cannot fit (the server's usage does
        not count the prompt: use --no-calibrate). Warns when a Locust process was busy >= 80 % of a
        core (latencies may include client queueing: use --workers N)."""
        from kvlab.clikit import live_progress, progress_shown
        from kvlab.errors import KvlabError
        from kvlab.loadtest.runner import parse_duration, run_load

        if workers < 0:
            raise KvlabError("--workers must be >= 0")
        run = lambda show: run_load(host, workload, users, parse_duration(duration) if duration else None,  # noqa: E731
                                    shape, out, seed, workers=workers, max_requests=max_requests,
                                    spawn_rate=spawn_rate, progress=show, calibrate=not no_calibrate,
                                    tokenizer=tokenizer, tokens_per_word=tokens_per_word)
        if progress_shown(as_json):
            with live_progress(bar=True, count=False, elapsed=False, transient=False) as bar:
                task = bar.add_task("kvlab load: starting Locust", total=None)
                result = run(lambda p: bar.update(task, description=progress_line(p), total=p.duration_s,
                                                  completed=min(p.elapsed_s, p.duration_s)))
        else:
            result = run(None if as_json else _log_printer())
        if as_json:
            emit_json({"out_dir": str(result.out_dir), "records": str(result.records_path), "summary": result.summary,
                       "client_cpu": result.client_cpu, "warnings": result.warnings,
                       "prompt_sizing": result.prompt_sizing})
        else:
            print_summary(result)
        for w in result.warnings if as_json else []:
            sys.stderr.write(f"kvlab: warning: {w}\n")
        if not result.summary["requests_ok"]:
            sent = result.summary["requests"]
            sys.stderr.write(f"kvlab: error: {'no turn was sent' if not sent else f'all {sent} turns failed'}: "
                             f"nothing was measured (see {result.out_dir}/load.json)\n")
            raise typer.Exit(1)
