"""`kvlab serve` and `kvlab profiles`."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kvlab.clikit import emit_json, hear_ctrl_c

console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160, highlight=False,
                  soft_wrap=True)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160, highlight=False, soft_wrap=True)


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.6g}"
    return str(v)


def print_plan(srv) -> None:
    """Engine and why, the profile, the exact environment and command, before anything starts."""
    p = srv.profile
    console.print(f"engine: [bold]{srv.engine}[/bold] — {escape(srv.engine_reason)}")
    console.print(f"profile: {srv.served_model_name} --quant {srv.spec.quant} — {escape(p.description)}")
    if p.note:
        console.print(f"  note: {escape(p.note)}")
    for note in srv.engine_impl.notes(srv.config):
        console.print(f"  {escape(note)}")
    if srv.refusal is not None:
        console.print(f"[yellow]allocation-only:[/yellow] {escape(srv.refusal.reason)}; the server is started "
                      "only to record vLLM's own KV sizing, not to serve")
    env = srv.env
    console.print("environment (on top of the inherited one): "
                  + (" ".join(f"{k}={v}" for k, v in env.items()) if env else "nothing added")
                  + "".join(f" (unset {k})" for k in srv.command.unset))
    console.print("command:", markup=False)
    sys.stdout.flush()
    sys.stdout.write(srv.command.shell_line() + "\n")
    sys.stdout.flush()


def print_prediction_only(srv) -> None:
    r = srv.prediction
    if r is None:
        console.print(f"[dim]{escape(srv.prediction_note)}[/dim]")
        return
    console.print(f"predicted (kvlab): {r.kv_cache_tokens:,} KV tokens = {r.num_blocks:,} blocks x {r.block_size} "
                  f"({srv.predicted_backend}), max concurrency {r.max_concurrency:.2f}x at {r.max_model_len:,} "
                  f"tokens — {escape(srv.prediction_note)}")


def print_comparison(srv) -> None:
    rows = srv.comparison()
    if not rows:
        console.print(f"[dim]{escape(srv.prediction_note)}[/dim]")
        f = srv.facts
        console.print(f"reported ({srv.reported_label}): KV cache tokens {_fmt(f.kv_cache_tokens)}, "
                      f"max concurrency {_fmt(f.max_concurrency)}")
        return
    t = Table(title=f"{srv.served_model_name} --quant {srv.spec.quant}: KV cache, predicted beside reported")
    t.add_column("quantity")
    t.add_column("predicted (kvlab)", justify="right")
    t.add_column(srv.engine_impl.reported_column, justify="right")
    t.add_column("")
    for row in rows:
        mark = {True: "[green]same[/green]", False: "[red bold]DIFFERENT[/red bold]", None: "[dim]—[/dim]"}[row.match]
        note = f" [dim]({escape(row.note)})[/dim]" if row.note and row.match is not True else ""
        t.add_row(row.quantity, _fmt(row.predicted), _fmt(row.reported), mark + note)
    console.print(t)
    diffs = [r.quantity for r in rows if r.match is False]
    if diffs:
        console.print(f"[red]predicted and reported differ in: {', '.join(diffs)}[/red]")
    else:
        console.print("predicted = reported for every quantity the server reported")
    console.print(f"[dim]predicted: {escape(srv.prediction_note)}; reported: {srv.reported_label}[/dim]")


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_cmd(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Card name (kvlab cards), local folder or Hugging Face id"),
    quant: str = typer.Option("bf16", "--quant", help="Serve profile: bf16, fp8, fp8-kv, fp8+fp8-kv, awq, gptq, gptq-int8, bnb4 (kvlab profiles MODEL)"),
    engine: Optional[str] = typer.Option(None, "--engine", help="vllm, vllm-cpu or sim (default: $ENGINE, else vllm where a GPU is visible, else vllm-cpu)"),
    port: Optional[int] = typer.Option(None, "--port", help="Default: a free port"),
    host_: str = typer.Option("127.0.0.1", "--host", help="Address to bind"),
    kv_memory_gib: Optional[float] = typer.Option(None, "--kv-memory-gib", help="KV cache budget: VLLM_CPU_KVCACHE_SPACE on the CPU build (default 1), --kv-cache-memory-bytes on a GPU"),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="vLLM's flag (CPU build default: 4096)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Passed to vLLM as VLLM_API_KEY; never printed or recorded"),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="GPU preset (kvlab gpus): the sim engine's GPU, and the budget estimate of the prediction"),
    allocation_only: bool = typer.Option(False, "--allocation-only", help="Start just long enough to record vLLM's KV sizing, then stop"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the engine, environment and exact command; start nothing"),
    log: Optional[Path] = typer.Option(None, "--log", help="Server log (default: results/serve/MODEL-QUANT-ENGINE-TIME.log)"),
    record: Optional[Path] = typer.Option(None, "--record", help="Record JSON (default: the log path with .json)"),
    health_timeout: float = typer.Option(600, "--health-timeout", help="Seconds to wait for /health"),
    as_json: bool = typer.Option(False, "--json", help="Print the record as one JSON object instead of tables"),
) -> None:
    """Serve MODEL with a profile on real vLLM (GPU or CPU build) or the simulator; extra vLLM flags after --."""
    from kvlab.deploy.launcher import ServeSpec, Server

    spec = ServeSpec(model, quant=quant, engine=engine, host=host_, port=port, kv_memory_gib=kv_memory_gib,
                     max_model_len=max_model_len, extra_args=list(ctx.args), api_key=api_key,
                     allocation_only=allocation_only, log_path=log, health_timeout_s=health_timeout, gpu=gpu)
    srv = Server(spec)
    if dry_run:
        if as_json:
            emit_json({k: v for k, v in srv.record().items() if k not in ("facts", "comparison", "exit_code", "stop")})
        else:
            print_plan(srv)
            print_prediction_only(srv)
        return
    if not as_json:
        print_plan(srv)
        console.print(f"log: {srv.log_path}")
    record_path = record or srv.log_path.with_suffix(".json")
    # Ctrl-C and SIGTERM stop the server.
    hear_ctrl_c()
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        _run(srv, record_path, as_json)
    except KeyboardInterrupt:
        srv.stop()
        srv.write_record(record_path)
        err.print(f"stopped (Ctrl-C): the server's process group is gone; record: {record_path}")


def _run(srv, record_path: Path, as_json: bool) -> None:
    from kvlab.errors import KvlabError

    try:
        _start_showing_progress(srv, as_json)
    finally:
        if srv.stop_report is not None or srv.alive():
            srv.write_record(record_path)
    if as_json:
        emit_json(srv.record())
    else:
        print_comparison(srv)
    if srv.spec.allocation_only:
        why = f" (after sizing, vLLM failed: {srv.allocation_error})" if srv.allocation_error else ""
        console.print(f"allocation-only: vLLM's KV sizing recorded, nothing is serving{escape(why)}; record: {record_path}")
        return
    console.print(f"serving {srv.served_model_name} at {srv.base_url} (pid {srv.pid}, process group {srv.pid}); "
                  f"Ctrl-C stops it. Record: {record_path}")
    sys.stdout.flush()
    code = srv.wait()
    srv.write_record(record_path)
    raise KvlabError(f"the server exited on its own with code {code} (log: {srv.log_path}); last lines:\n"
                     f"{srv.log_tail()}")


def _start_showing_progress(srv, as_json: bool) -> None:
    """srv.start(), with a live line on a terminal while it waits for /health: the seconds waited,
    the phase of the start read from the server's log (loading weights, profiling, capturing CUDA
    graphs, ...) and the timeout."""
    from kvlab.clikit import live_progress

    timeout = srv.spec.health_timeout_s
    with live_progress(as_json, elapsed=False) as progress:
        task = progress.add_task(f"{srv.engine}: starting", total=None)

        def show(waited_s: float, phase: str | None) -> None:
            progress.update(task, description=f"{srv.engine}: {phase or 'starting'}, waiting for /health "
                                              f"({waited_s:.0f} s of the {timeout:g} s timeout)")

        srv.on_wait = show
        try:
            srv.start()
        finally:
            srv.on_wait = None


def profiles_cmd(
    model: Optional[str] = typer.Argument(None, help="A card name; default: every model"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Serve profiles: quantization levels per model, their vLLM flags, and whether this machine's CPU build serves them."""
    from kvlab.deploy import engines, host
    from kvlab.deploy.profiles import all_profiles, model_profiles
    from kvlab.models.cards import card

    models = {model: model_profiles(card(model).name)} if model else all_profiles()
    cpu, install = host.cpu_features(), host.vllm_install()
    out = {}
    for name, mp in models.items():
        c = None if name == "_default" else card(name)
        mla = c is not None and c.arch.mla is not None
        rows = {}
        for q, p in mp.profiles.items():
            checkpoint = engines.twin_weights_differ(p.checkpoint, c)
            r = engines.cpu_refusal(p.serve_config(name), mla, checkpoint, cpu, install)
            rows[q] = {**p.model_dump(exclude={"name"}),
                       "cpu_build_here": "serves" if r is None else
                       ("allocation-only" if r.allocation_only_ok else "refused") + f": {r.reason}"}
        out[name] = rows
    if as_json:
        emit_json({"cpu": cpu.to_dict(), "profiles": out})
        return
    t = Table(title=f"Serve profiles (deploy/profiles); CPU build here: {cpu.isa}")
    for col in ("model", "quant", "vLLM flags", "checkpoint", f"CPU build ({cpu.isa})"):
        t.add_column(col)
    for name, rows in out.items():
        for q, row in rows.items():
            t.add_row(name, q, " ".join(row["args"]) or "—", row["checkpoint"] or "—",
                      row["cpu_build_here"].split(":")[0])
    console.print(t)


def register(app: typer.Typer) -> None:
    app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(serve_cmd)
    app.command("profiles")(profiles_cmd)
