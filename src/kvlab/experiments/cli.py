"""`kvlab experiment run|one|ls`."""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

experiment_app = typer.Typer(help="Run experiment specs and query their records.", no_args_is_help=True)


API_KEY = typer.Option(None, "--api-key", envvar="KVLAB_API_KEY", show_envvar=True,
                       help="vLLM --api-key for the servers (given to them as VLLM_API_KEY) and the load; never recorded")


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _run_stopping_cleanly(spec, folder: Path, only, engine, api_key, ray: str | None = None) -> None:
    """Ctrl-C, or SIGTERM from a job scheduler, stops the servers and Locust and keeps what is
    finished; a record that cannot be written (a full disk) ends the run with one line."""
    from kvlab.clikit import hear_ctrl_c
    from kvlab.errors import KvlabError
    from kvlab.io import RecordWriteError

    hear_ctrl_c()
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        _progress_runner(spec, folder, only, engine, api_key, ray)
    except KeyboardInterrupt:
        sys.stderr.write(f"interrupted: finished repeats are kept in {folder}; rerun the same command to complete it\n")
        raise typer.Exit(130)
    except RecordWriteError as e:
        raise KvlabError(f"{e}. The run stopped; finished repeats are kept in {folder}: free space and rerun "
                         "the same command to complete it") from None


LOAD_FAILURES: list[str] = []  # repeats whose load stopped on what retrying cannot cure (this invocation)


def _progress_runner(spec, out: Path, only, engine, api_key=None, ray: str | None = None):
    """ray: None runs here; "" on Ray at $RAY_ADDRESS or a local cluster; else on Ray at that address."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from kvlab.experiments.runner import run_spec

    console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)
    task = None
    groups: dict[int, int] = {}  # Ray: one bar per running server group

    def on_event(kind: str, data: dict) -> None:
        nonlocal task
        if "group" in data:
            _group_progress(progress, groups, kind, data)
        if kind == "cluster":
            console.print(f"Ray cluster: {data['nodes']} node(s), {data['cpus']:g} CPUs, {data['gpus']:g} {data['resource']}")
        elif kind == "leftover":
            console.print(f"[yellow]stopped what a killed run left running: {escape(data['stopped'])}[/yellow]",
                          soft_wrap=True)
        elif kind == "engine":
            console.print(f"engine: {data['engine']} ({data['reason']})")
        elif kind == "plan":
            if data["skipped"]:
                console.print(f"{data['skipped']} finished repeat(s) kept, {data['repeats_pending']} to run")
            task = progress.add_task(spec.name, total=data["repeats_total"], completed=data["skipped"])
        elif kind == "server_start":
            progress.update(task, description=f"{spec.name}: starting {data['model']} {data['quant']}")
        elif kind == "repeat_start":
            progress.update(task, description=f"{spec.name}: {data['cell']} #{data['repeat']}")
        elif kind == "repeat_done":
            progress.advance(task)
            for w in data.get("warnings") or []:
                console.print(f"[yellow]{data['cell']} repeat {data['repeat']}: warning: {escape(w)}[/yellow]",
                              soft_wrap=True)
            if data.get("load_failed"):
                LOAD_FAILURES.append(f"{data['cell']} repeat {data['repeat']}: {data['reason']}")
            if data["status"] != "complete":
                why = f": {data['reason']}" if data.get("reason") else ""
                console.print(f"[yellow]{data['cell']} repeat {data['repeat']}: {data['status']}{escape(why)}[/yellow]",
                              soft_wrap=True)  # one line, whatever the width: logs are grepped

    with progress:
        if ray is None:
            return run_spec(spec, out, only=only, engine=engine, on_event=on_event, api_key=api_key)
        from kvlab.experiments.ray_runner import run_spec_on_ray

        return run_spec_on_ray(spec, out, only=only, engine=engine, on_event=on_event, api_key=api_key,
                               address=ray or None)


def _group_progress(progress, groups: dict[int, int], kind: str, data: dict) -> None:
    """A bar per server group while its Ray task runs, saying on which node."""
    i = data["group"]
    if kind == "group_start":
        groups[i] = progress.add_task(f"  {data['model']} {data['quant']} on {data['node']}", total=data["repeats"])
    elif kind == "repeat_done" and i in groups:
        progress.advance(groups[i])
    elif kind == "group_done" and i in groups:
        progress.remove_task(groups.pop(i))


def _finish(out: Path) -> None:
    from kvlab.experiments.index import query

    rows = query(out)
    failed = [r for r in rows if r["status"] != "complete"]
    sys.stderr.write(f"{len(rows) - len(failed)} repeat(s) complete, {len(failed)} not\n")
    sys.stdout.write(f"{out}\n")  # the last line printed is the results directory


@experiment_app.command("run")
def run_cmd(
    spec_path: str = typer.Argument(..., metavar="SPEC", help="Spec YAML (or the name of one in experiments/)"),
    only: Optional[str] = typer.Option(None, "--only", help="Run only matching cells: model=...,quant=...,workload=...,users=..."),
    out: Optional[Path] = typer.Option(None, "--out", help="Results folder (default: results/<spec name>)"),
    engine: Optional[str] = typer.Option(None, "--engine", help="Override the spec's engine: vllm, vllm-cpu, sim, external"),
    api_key: Optional[str] = API_KEY,
    ray: bool = typer.Option(False, "--ray", help="Each server group as a Ray task on a cluster: at ADDRESS, else "
                             "$RAY_ADDRESS, else one kvlab starts on this machine (pip install 'kvlab\\[ray]')"),
    ray_address: Optional[str] = typer.Argument(None, metavar="[ADDRESS]", help="With --ray: the cluster to join"),
) -> None:
    """Run a spec's cells (skips finished ones); the last line printed is the results folder."""
    from kvlab.errors import KvlabError
    from kvlab.experiments.spec import load_spec, parse_only

    if ray_address and not ray:
        raise KvlabError(f"{ray_address}: an ADDRESS after SPEC is the Ray cluster of --ray; add --ray")
    if ray:
        from kvlab.experiments.ray_runner import import_ray

        import_ray()  # without the extra: one line naming it, before anything starts
    spec = load_spec(spec_path)
    folder = out or Path("results") / spec.name
    LOAD_FAILURES.clear()
    _run_stopping_cleanly(spec, folder, parse_only(only), engine, api_key, (ray_address or "") if ray else None)
    planned = _plan_after(spec, folder) if spec.plan is not None and only is None else True
    _finish(folder)
    if LOAD_FAILURES:
        # a load that could not measure (calibration that cannot fit) is not a run that went well
        sys.stderr.write(f"kvlab: error: {len(LOAD_FAILURES)} repeat(s) stopped before measuring; first: "
                         f"{LOAD_FAILURES[0]}\n")
        raise typer.Exit(1)
    if not planned:
        raise typer.Exit(2)


def _plan_after(spec, folder: Path) -> bool:
    """The spec's plan: block, planned into FOLDER/plan (where `kvlab report` finds it); probes are
    cached, so a rerun plans again in seconds. False when it could not be planned (said why)."""
    from kvlab.errors import KvlabError
    from kvlab.plan.planner import plan, request_from_spec

    sys.stderr.write(f"planning the fleet of the spec's plan: block ({spec.plan.agents:,} agents) on the simulator\n")
    try:
        result = plan(request_from_spec(spec, folder / "plan"))
    except KeyboardInterrupt:
        sys.stderr.write(f"interrupted while planning: the results in {folder} are kept; rerun the same command "
                         "to plan again (finished repeats are skipped, simulated probes reused)\n")
        raise typer.Exit(130)
    except KvlabError as e:
        sys.stderr.write(f"kvlab: error: plan: {e} (the measured results in {folder} are kept)\n")
        return False
    sys.stderr.write(f"plan: {folder / 'plan' / 'plan.json'} (baseline {result['baseline']}; `kvlab report` shows it)\n")
    return True


@experiment_app.command("one")
def one_cmd(
    model: str = typer.Option(..., "--model"),
    quant: str = typer.Option("bf16", "--quant"),
    engine: Optional[str] = typer.Option(None, "--engine", help="vllm, vllm-cpu or sim (default: vllm with a GPU, else vllm-cpu)"),
    workload: Optional[str] = typer.Option(None, "--workload", help="Default: agent on a GPU, agent-smoke on the CPU build"),
    users: int = typer.Option(4, "--users"),
    duration: str = typer.Option("60s", "--duration"),
    warmup: str = typer.Option("10s", "--warmup"),
    repeats: int = typer.Option(1, "--repeats"),
    gpu: Optional[str] = typer.Option(None, "--gpu"),
    results: Path = typer.Option(Path("results") / "one", "--results",
                                 help="The cell goes to RESULTS/<model>-<quant>/<digest> (`kvlab report RESULTS` compares every cell there)"),
    out: Optional[Path] = typer.Option(None, "--out", help="The cell's folder itself (instead of one under --results)"),
    api_key: Optional[str] = API_KEY,
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="A vLLM kvlab did not start (engine external): its URL"),
    metrics_url: Optional[str] = typer.Option(None, "--metrics-url", help="The endpoint's /metrics, where it is elsewhere"),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="The environment variable holding the endpoint's key"),
) -> None:
    """One cell with sensible defaults (what `make experiment MODEL=... QUANT=...` runs); with
    --endpoint, against a server kvlab did not start (MODEL: the card or config.json to predict with)."""
    from kvlab.deploy import choose_engine
    from kvlab.deploy.engines import engine_class
    from kvlab.experiments.spec import validate_spec

    if endpoint:
        engine = engine or "external"
    chosen, _ = choose_engine(engine)  # for the defaults; the runner says which engine and why
    data = {
        "name": re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model}-{quant}").strip("._-") or "one",
        "engine": engine or "auto", "models": [model], "quants": [quant],
        **engine_class(chosen).cell_defaults(),  # workloads; on the CPU build also its small KV budget and context
        "load": {"shape": "constant", "users": [users]},
        "duration_s": duration, "warmup_s": warmup, "repeats": repeats, "gpu": gpu,
    }
    if workload:
        data["workloads"] = [workload]
    if endpoint:
        data["endpoint"] = {"url": endpoint, "metrics_url": metrics_url, "api_key_env": api_key_env}
    spec = validate_spec(data, "make experiment")
    folder = out or results / spec.name / spec.digest
    _run_stopping_cleanly(spec, folder, None, engine, api_key)
    _finish(folder)


def parse_where(text: str | None) -> dict[str, str] | None:
    """--where model=...,status=... -> {"model": ..., "status": ...}."""
    from kvlab.errors import KvlabError

    if not text:
        return None
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise KvlabError(f"--where: {part!r} is not KEY=VALUE (e.g. model=deepseek-v2-lite,status=complete)")
        out[key.strip()] = value.strip()
    return out


@experiment_app.command("ls")
def ls_cmd(
    results: Path = typer.Argument(..., help="A results folder"),
    where: Optional[str] = typer.Option(None, "--where", help="Filters: model=...,quant=...,status=..."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List the repeats in a results folder (from its SQLite index, rebuilt from the files); each
    figure's heading says where it comes from (measured, predicted, simulated)."""
    from kvlab.clikit import emit_json

    from rich.console import Console
    from rich.table import Table

    from kvlab.errors import KvlabError
    from kvlab.experiments.index import column_sources, query, rebuild
    from kvlab.deploy.engines import served_source

    if not (results / "run.json").exists():
        raise KvlabError(f"{results} is not a kvlab results folder (no run.json)")
    rebuild(results)
    filters = parse_where(where)
    rows = query(results, filters)
    sources = column_sources(results)
    engines = {r["engine"] for r in rows if r["engine"]}
    said = {n: (" / ".join(sorted({served_source(e) for e in engines})) or "served") if src == "served" else src
            for n, (src, _) in sources.items()}
    if as_json:
        for r in rows:
            r.pop("results_json", None)
        emit_json({"repeats": rows, "sources": said})
        return
    t = Table(title=f"{results}")
    for col in ("cell_id", "repeat", "status", "engine"):
        t.add_column(col)
    for name, label, _ in LS_FIGURES:
        t.add_column(f"{label}\n({said[name]})")
    fmt = lambda v, f: "—" if v is None else f.format(v)  # noqa: E731
    for r in rows:
        t.add_row(r["cell_id"], str(r["repeat"]), r["status"], r["engine"] or "—",
                  *(fmt(r[name], f) for name, _, f in LS_FIGURES))
    Console().print(t)


# (index column, heading, format) of `kvlab experiment ls`; the heading's source comes from the index.
LS_FIGURES = (
    ("kv_cache_tokens_reported", "KV tokens", "{:,}"),
    ("kv_cache_tokens_predicted", "KV tokens", "{:,}"),
    ("output_tokens_per_s", "out tok/s", "{:.6g}"),
    ("ttft_p95_s", "TTFT p95 s", "{:.6g}"),
    ("preemptions", "preemptions", "{:g}"),
    ("kv_usage_peak_frac", "KV peak", "{:.6g}"),
    ("goodput_requests_per_min", "goodput req/min", "{:.6g}"),
)


def register(app: typer.Typer) -> None:
    app.add_typer(experiment_app, name="experiment")
