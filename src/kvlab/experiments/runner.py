"""Run a spec: for each cell start the server, warm up, run the load while scraping metrics, stop,
write the record. Finished repeats are skipped on a rerun; Ctrl-C stops the current server and
keeps what is finished; a crashed server marks its cell failed with the log tail and the run goes on.

`plan_run` (claim the folder, choose the engine, find what is pending) and `run_server_group` (one
server's pending repeats) are shared with the Ray runner (ray_runner.py), which runs each group as
a Ray task; `run_spec` runs the groups one after another here.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Callable

import yaml

from kvlab.errors import KvlabError
from kvlab.experiments import index
from kvlab.experiments.records import aggregate_repeats, environment_facts
from kvlab.experiments.spec import Cell, Spec, cells
from kvlab.io import RecordWriteError, make_dir, write_text_atomic
from kvlab.redact import redact_argv, redact_env
from kvlab.schema.experiment import (
    CellKey,
    CellRepeat,
    CellResults,
    ClientFigures,
    Failure,
    Manifest,
    RepeatResults,
    RunFolder,
    Scrapes,
    SimTiming,
    Status,
    Window,
)
from kvlab.schema.metrics import MetricsFigures
from kvlab.schema.server import Prediction, PredictionRecord, ServerFacts

LOG_TAIL_LINES = 40
SERVER_FACTS_SOURCE = "reported by the server (startup log, vllm:cache_config_info)"
POOL_SOURCE = "the server's startup log and vllm:cache_config_info on its /metrics"


def cell_key(cell: Cell) -> CellKey:
    return CellKey.model_validate(asdict(cell))


def log_tail(path: Path | None, n: int = LOG_TAIL_LINES) -> list[str]:
    if not path or not Path(path).exists():
        return []
    lines = Path(path).read_text(errors="replace").splitlines()
    return lines[-n:]


# ---------------------------------------------------------------------------------------------
# The results folder belongs to one spec


def claim_folder(spec: Spec, out: Path) -> None:
    """A results folder holds one spec's results; a different spec there is refused before anything starts."""
    make_dir(out)
    run = RunFolder.read_optional(out / "run.json")
    if run is not None and (run.spec_name != spec.name or run.spec_digest != spec.digest):
        raise KvlabError(
            f"{out} holds results of another spec ({run.spec_name}, digest {run.spec_digest}); "
            f"this one is {spec.name} (digest {spec.digest}): choose another --out"
        )
    if run is None:
        stray = [p for p in out.iterdir() if not p.name.startswith(".")]
        if stray:
            raise KvlabError(f"{out} is not empty and holds no kvlab run: choose another --out")
        RunFolder(spec_name=spec.name, spec_digest=spec.digest, created_ts=time.time()).write(out / "run.json")
        write_text_atomic(out / "spec.yaml", yaml.safe_dump(spec.model_dump(), sort_keys=False))


def repeat_dir(out: Path, cell: Cell, k: int) -> Path:
    return inside(out, out / cell.cell_id / f"repeat-{k}")


def inside(out: Path, path: Path) -> Path:
    """path, checked to lie in the results folder (cell ids are made folder-safe in spec.py)."""
    if not path.resolve().is_relative_to(out.resolve()):
        raise KvlabError(f"{path} would lie outside the results folder {out}")
    return path


def is_complete(rdir: Path) -> bool:
    status = Status.read_optional(rdir / "status.json")
    return status is not None and status.status == "complete" and (rdir / "results.json").exists()


def _set_status(rdir: Path, cell: Cell, k: int, status: str, **extra: Any) -> None:
    prev = Status.read_optional(rdir / "status.json")
    data = prev.model_dump(exclude={"schema_version"}) if prev is not None else {}
    data.update({"cell": cell_key(cell), "cell_id": cell.cell_id, "repeat": k, "status": status, **extra})
    Status.model_validate(data).write(rdir / "status.json")


def _set_aside_partial(rdir: Path) -> None:
    """An unfinished repeat is redone; its files are kept beside it, never deleted."""
    if rdir.exists() and not is_complete(rdir):
        rdir.rename(rdir.with_name(f"{rdir.name}.partial-{int(time.time())}"))


# ---------------------------------------------------------------------------------------------
# Client-side figures from the per-request records


def client_figures(summary: dict[str, Any], df, window_s: float) -> ClientFigures:
    """The load run's summary, scored once by the load runner (load.json), as the repeat records
    it: errors counted (by kind apart), the scrape window, and the mean resident context of a
    session (its last request's prompt + reply)."""
    turns = df[(df["kind"] == "turn") & df["error_kind"].isna()] if len(df) else df
    mean_ctx = None
    if len(turns):
        last = turns.sort_values("start_ts").groupby("session_id").tail(1)
        mean_ctx = float((last["prompt_tokens"].fillna(0) + last["completion_tokens"].fillna(0)).mean())
    return ClientFigures.model_validate({
        **summary, "errors_by_kind": summary["errors"], "errors": summary["requests"] - summary["requests_ok"],
        "mean_session_context_tokens": mean_ctx, "window_s": window_s})


# ---------------------------------------------------------------------------------------------
# One repeat


def _workload(spec: Spec, cell: Cell):
    """The cell's workload with the spec's load shape (and step hold) applied."""
    from kvlab.loadtest.workload import load_workload

    wl = load_workload(cell.workload).with_shape(spec.load.shape)
    if spec.load.step_s is not None:
        shape = wl.load.shape.model_copy(update={"step_hold_s": spec.load.step_s})
        wl = wl.model_copy(update={"load": wl.load.model_copy(update={"shape": shape})})
    return wl


def run_repeat(spec: Spec, cell: Cell, k: int, server: Any, out: Path, engine_reason: str) -> RepeatResults:
    from kvlab.loadtest.records import read_requests
    from kvlab.loadtest.runner import run_load
    from kvlab.metrics.figures import summarize
    from kvlab.metrics.scraper import Scraper

    rdir = repeat_dir(out, cell, k)
    _set_aside_partial(rdir)
    make_dir(rdir, exist_ok=False)
    seed = spec.seed + k - 1
    started = time.time()
    _set_status(rdir, cell, k, "running", started_ts=started, engine=server.engine, seed=seed)
    manifest = Manifest.model_validate({
        "cell": cell_key(cell), "cell_id": cell.cell_id, "repeat": k, "seed": seed,
        "spec": spec.model_dump(), "spec_digest": spec.digest,
        "engine": server.engine, "engine_reason": engine_reason,
        "server_argv": redact_argv(list(server.argv)), "server_env": redact_env(dict(server.env)),
        "started_ts": started, **environment_facts(),
    })
    manifest.write(rdir / "manifest.json")
    prediction = Prediction.from_capacity(server.prediction)
    PredictionRecord(prediction=prediction).write(rdir / "prediction.json")
    workload = _workload(spec, cell)
    # One score per repeat, by the load run: the spec's SLO where the spec sets one, else the workload's.
    slo, slo_from = (spec.slo_given, "spec") if spec.slo_given is not None else (workload.slo, "workload")
    api_key = getattr(server.spec, "api_key", None)  # the server's key: the load must send it
    if spec.warmup_s > 0:
        run_load(host=server.base_url, workload=workload.with_shape("constant"), users=cell.users,
                 duration_s=spec.warmup_s, out_dir=rdir / "warmup", seed=seed + 10_000, api_key=api_key,
                 slo=slo, slo_from=slo_from)
    log_mark = len(server.log_text())  # the server's log so far: startup, warm-up, earlier repeats on it
    with Scraper(server.base_url + "/metrics", rdir / "metrics.csv", interval_s=spec.scrape_interval_s) as scraper:
        t0 = time.time()
        load = run_load(host=server.base_url, workload=workload, users=cell.users, duration_s=spec.duration_s,
                        out_dir=rdir / "load", seed=seed, spawn_rate=spec.load.spawn_rate, api_key=api_key,
                        slo=slo, slo_from=slo_from)
        t1 = time.time()
    # kvlab's simulator: its own series, read once after the load (a read before it would take an
    # answer from the scrapes, which a server that stops answering /metrics counts)
    after = read_metrics_text(server.base_url)
    client = client_figures(load.summary, read_requests(load.records_path), t1 - t0)
    metrics = summarize(rdir / "metrics.csv", start_ts=t0, end_ts=t1,
                        mean_session_context_tokens=client.mean_session_context_tokens)
    reason = _failure(server, client)
    _copy_server_log(server, rdir)
    step_check(spec, server, rdir, since=log_mark)
    failure = Failure(reason=reason, log_tail=log_tail(rdir / "server.log")) if reason else None
    results = RepeatResults(
        cell=cell_key(cell), cell_id=cell.cell_id, repeat=k, seed=seed,
        status="failed" if failure else "complete", engine=server.engine,
        window=Window(start_ts=t0, end_ts=t1),
        server=server_facts(server),
        prediction=prediction, metrics=MetricsFigures.from_run(metrics),
        scrapes=Scrapes(total=scraper.scrapes, gaps=scraper.gaps, last_error=scraper.last_error),
        client=client, gpu_price_per_hour=spec.gpu_price_per_hour, failure=failure,
        timing=sim_timing(None, after, getattr(server.facts, "timing_source", None),
                          getattr(server.facts, "host_source", None)))
    results.write(rdir / "results.json")
    manifest = manifest.model_copy(update={"ended_ts": time.time()})
    manifest.write(rdir / "manifest.json")
    _set_status(rdir, cell, k, results.status, ended_ts=manifest.ended_ts, failure=failure)
    return results


STEPS_PRICED = "kvlab:sim_steps_priced"  # kvlab.sim.metrics (the scraper keeps vllm:* only)
TIMING_INFO = "kvlab:sim_timing_info"


def sim_counters(metrics_text: str | None) -> tuple[dict[str, str], dict[str, float]]:
    """(kvlab:sim_timing_info's labels: timing_source, host_source; steps priced per provenance) from
    one /metrics text of kvlab's simulator; ({}, {}) on vLLM, which has neither series, or where
    /metrics did not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    info: dict[str, str] = {}
    steps: dict[str, float] = {}
    if not metrics_text:
        return info, steps
    try:
        for family in text_string_to_metric_families(metrics_text):
            if family.name == TIMING_INFO:
                info = next((dict(s.labels) for s in family.samples), {})
            elif family.name in (STEPS_PRICED, STEPS_PRICED + "_total"):  # the parser names it either way
                steps.update({s.labels.get("provenance", "?"): s.value for s in family.samples
                              if s.name == STEPS_PRICED + "_total"})
    except ValueError:  # not an exposition (a fault, a proxy's page)
        return {}, {}
    return info, steps


def read_metrics_text(base_url: str) -> str | None:
    """One GET of the server's /metrics for kvlab's own series, or None."""
    import httpx

    try:
        r = httpx.get(base_url + "/metrics", timeout=10.0)
    except httpx.HTTPError:
        return None
    return r.text if r.status_code == 200 else None


def sim_timing(before: str | None, after: str | None, timing_source: str | None,
               host_source: str | None = None) -> SimTiming | None:
    """The simulator's timing source, what priced its time outside the steps, and the steps it priced
    between two /metrics texts (None before: since the server started), per provenance; None on vLLM
    (the sources from the startup facts where the series are missing)."""
    info0, steps0 = sim_counters(before)
    info1, steps1 = sim_counters(after)
    source = info1.get("timing_source") or info0.get("timing_source") or timing_source
    if source is None:
        return None
    host = info1.get("host_source") or info0.get("host_source") or host_source
    steps = {p: int(v - steps0.get(p, 0.0)) for p, v in steps1.items()}
    return SimTiming(timing_source=source, host_source=host, steps_priced={p: n for p, n in steps.items() if n > 0})


def server_facts(server: Any) -> ServerFacts:
    """What the server said about itself, where it was read, and whether kvlab launched it."""
    return ServerFacts.from_facts(server.facts, source=getattr(server, "facts_source", SERVER_FACTS_SOURCE),
                                  pool_source=getattr(server, "pool_source", POOL_SOURCE),
                                  launched_by_kvlab=getattr(server, "launched_by_kvlab", True))


def _failure(server: Any, client: ClientFigures) -> str | None:
    """Why a repeat that ran to its end measured nothing that counts, or None."""
    if not server.alive():
        server.stop()  # what is left of its group (vLLM's engine core outlives a killed API server)
        code, gone = getattr(server, "exit_code", None), getattr(server, "gone", None)
        how = f" (exit code {code}{_signal_name(code)})" if code is not None else ""
        how = f" ({gone})" if gone else how  # a server kvlab did not start: it stopped answering
        return f"the server died during the run{how}"
    if not client.requests_ok:
        errors: dict[str, int] = {}
        for kind, n in [*client.probe_errors.items(), *client.errors_by_kind.items()]:
            errors[kind] = errors.get(kind, 0) + n
        said = ", ".join(f"{kind} {n}" for kind, n in errors.items()) or "no request was answered"
        return (f"no request succeeded ({client.requests} requests, "
                f"{client.probes} calibration probes; errors: {said})")
    return None


def _signal_name(code: int) -> str:
    import signal

    try:
        return f", killed by {signal.Signals(-code).name}" if code < 0 else ""
    except ValueError:
        return ""


def step_check(spec: Spec, server: Any, rdir: Path, since: int = 0) -> Path | None:
    """A real vLLM on a GPU preset the spec names: its own stats lines in the repeat's server.log from
    character `since` on (where the repeat's load began: the server's log holds its warm-up and the earlier
    repeats it served too) priced by kvlab's simulated engine of the same serve configuration
    (`kvlab.sim.stepcheck`, what `kvlab sim check-log` prints; the startup facts from the whole log),
    written to step_check.json. None, with nothing written and the repeat unaffected, where there is
    nothing to check (another engine, no preset, no stats line in the load) or the simulator cannot build
    the configuration."""
    if getattr(server, "engine", None) != "vllm" or not spec.gpu or getattr(server, "config", None) is None:
        return None
    from kvlab.sim import stepcheck
    from kvlab.sim.config import build_config

    try:
        server_log = stepcheck.read_log((rdir / "server.log").read_text(encoding="utf-8", errors="replace"), since)
        if not server_log.lines:
            return None
        result = stepcheck.check(server_log, build_config(server.config, spec.gpu, **server_log.engine_args()),
                                 "server.log, the lines of the repeat's load")
    except (KvlabError, OSError):
        return None
    return result.write(rdir / "step_check.json")


def _copy_server_log(server: Any, rdir: Path) -> None:
    """This server's log, from its start to now (not earlier servers' lines in the same file)."""
    write_text_atomic(rdir / "server.log", server.log_text())


def fail_repeat(out: Path, cell: Cell, k: int, reason: str, tail: list[str], engine: str | None = None) -> None:
    rdir = repeat_dir(out, cell, k)
    if is_complete(rdir):
        return
    _set_aside_partial(rdir)
    make_dir(rdir)
    failure = Failure(reason=reason, log_tail=tail)
    RepeatResults(cell=cell_key(cell), cell_id=cell.cell_id, repeat=k, status="failed", failure=failure,
                  engine=engine).write(rdir / "results.json")
    _set_status(rdir, cell, k, "failed", ended_ts=time.time(), failure=failure, engine=engine)


def _figures(r: RepeatResults) -> dict:
    return {"client": r.client.model_dump() if r.client else {},
            "metrics": r.metrics.model_dump() if r.metrics else {}}


def finalize_cell(out: Path, cell: Cell, spec: Spec) -> CellResults:
    """<cell>/results.json: every repeat's status, the mean and 95 % interval of their figures."""
    repeats = [r for k in range(1, spec.repeats + 1)
               if (r := RepeatResults.read_optional(repeat_dir(out, cell, k) / "results.json")) is not None]
    complete = [r for r in repeats if r.status == "complete"]
    summary = CellResults(
        cell=cell_key(cell), cell_id=cell.cell_id,
        repeats_planned=spec.repeats, repeats_complete=len(complete),
        status="complete" if len(complete) == spec.repeats else ("partial" if complete else "failed"),
        repeats=[CellRepeat(repeat=r.repeat, status=r.status, dir=f"repeat-{r.repeat}", failure=r.failure)
                 for r in repeats],
        aggregate=aggregate_repeats([_figures(r) for r in complete]),
        first_complete_repeat=complete[0].repeat if complete else None)
    summary.write(inside(out, out / cell.cell_id / "results.json"))
    return summary


# ---------------------------------------------------------------------------------------------
# The whole spec


def run_spec(spec: Spec, out: Path, only: dict[str, str] | None = None, engine: str | None = None,
             on_event: Callable[[str, dict], None] | None = None, api_key: str | None = None) -> Path:
    """Run every cell of the spec that is not finished yet; returns the results folder.

    api_key: the servers' key (vLLM --api-key, given to them as VLLM_API_KEY) that the load sends;
    it is written nowhere. A record that cannot be written (a full disk) stops the run: the
    RecordWriteError says which file, and everything finished before it is kept."""
    out = Path(out)
    emit = on_event or (lambda kind, data: None)
    for c in cells(spec, only):  # an endpoint's key missing here: refused before anything starts
        endpoint_key(spec.endpoint_for(c.model, c.quant), api_key)
    plan = plan_run(spec, out, only, engine, emit)
    done_cells: set[str] = set()

    def cell_done(cell: Cell) -> None:
        finalize_cell(out, cell, spec)
        done_cells.add(cell.cell_id)

    try:
        for group in plan.groups:
            run_server_group(spec, out, group, plan.engine, plan.engine_reason, emit, api_key, cell_done)
    except BaseException:
        # Ctrl-C, a full disk: sum up what is finished; the first error is the one to tell.
        with contextlib.suppress(RecordWriteError):
            _finalize_rest(out, spec, plan.work, done_cells)
        raise
    _finalize_rest(out, spec, plan.work, done_cells)
    return out


@dataclass(frozen=True)
class RunPlan:
    """What a run of a spec does: its engine, every repeat, and the pending ones by server group."""

    engine: str
    engine_reason: str
    work: list[tuple[Cell, int]]
    groups: list[list[tuple[Cell, int]]]  # pending repeats, one list per server (model x level)


def plan_run(spec: Spec, out: Path, only: dict[str, str] | None, engine: str | None,
             emit: Callable[[str, dict], None]) -> RunPlan:
    """Claim the folder, choose the engine, check the endpoints and find what is left to run
    (emits `engine` and `plan`); the local runner and the Ray runner start from this."""
    from kvlab import deploy
    from kvlab.deploy.engines import engine_class

    todo = cells(spec, only)
    if not todo:
        raise KvlabError("no cell of the spec matches --only")
    chosen, reason = deploy.choose_engine(engine or spec.engine)  # the spec's "auto": as if none was requested
    for c in todo:  # an endpoint for an engine that launches, none for external: refused before anything starts
        _check_endpoint(engine_class(chosen), c, spec.endpoint_for(c.model, c.quant))
    claim_folder(spec, out)
    _stop_leftovers(out, emit)
    emit("engine", {"engine": chosen, "reason": reason})
    work = [(c, k) for c in todo for k in range(1, spec.repeats + 1)]
    pending = [(c, k) for c, k in work if not is_complete(repeat_dir(out, c, k))]
    emit("plan", {"repeats_total": len(work), "repeats_pending": len(pending), "skipped": len(work) - len(pending)})
    groups = [list(g) for _, g in groupby(pending, key=lambda ck: ck[0].server_key)]
    return RunPlan(chosen, reason, work, groups)


def _check_endpoint(engine_cls: Any, cell: Cell, endpoint: Any) -> None:
    launched = engine_cls.launched_by_kvlab
    if endpoint is not None and launched:
        raise KvlabError(f"the spec names an endpoint ({endpoint.url}) for {cell.model} {cell.quant}, but engine "
                         f"{engine_cls.name} starts its own servers: use engine: external")
    if endpoint is None and not launched:
        raise KvlabError(f"engine {engine_cls.name} needs an endpoint for {cell.model} {cell.quant}: "
                         "the spec's endpoint: URL (or an endpoints: entry for this model and level)")


def endpoint_key(endpoint: Any, api_key: str | None) -> str | None:
    """The key the endpoint wants: from the environment variable it names, else the run's --api-key."""
    import os

    if endpoint is None or not endpoint.api_key_env:
        return api_key
    key = os.environ.get(endpoint.api_key_env)
    if not key:
        raise KvlabError(f"the endpoint {endpoint.url} takes its API key from ${endpoint.api_key_env}, "
                         "which is not set here")
    return key


def run_server_group(spec: Spec, out: Path, group: list[tuple[Cell, int]], chosen: str, reason: str,
                     emit: Callable[[str, dict], None], api_key: str | None,
                     cell_done: Callable[[Cell], None]) -> None:
    """The pending repeats of one server (model x level), in order, on one server started once
    (again if it dies): each repeat's records written in `out`; `cell_done(cell)` after a cell's
    last repeat. A server that does not start fails the rest of the group with the reason; any
    other error of a repeat fails that repeat and the group goes on. The server is stopped at the
    end, on Ctrl-C and on a full disk (those are raised)."""
    from kvlab import deploy
    from kvlab.deploy.engines import engine_class
    from kvlab.loadtest.runner import LoadFailed

    server = None
    try:
        for i, (cell, k) in enumerate(group):
            if server is None or not server.alive():
                if server is not None:
                    server.stop()
                server, why = _start_server(spec, out, cell, chosen, emit, api_key, engine_class(chosen), deploy)
                if server is None:
                    tail = log_tail(out / f"{cell.server_id}.server.log")
                    for c2, k2 in group[i:]:
                        fail_repeat(out, c2, k2, why, tail, chosen)
                        emit("repeat_done", {"cell": c2.cell_id, "repeat": k2, "status": "failed", "reason": why})
                    server = None
                    break
            emit("repeat_start", {"cell": cell.cell_id, "repeat": k})
            warnings: list[str] = []
            load_failed = False
            try:
                res = run_repeat(spec, cell, k, server, out, reason)
                status, why = res.status, res.failure.reason if res.failure else None
                warnings = list(res.client.warnings) if res.client else []
            except RecordWriteError:
                raise  # the disk is full: every later record would fail too
            except LoadFailed as e:  # the load stopped on what retrying cannot cure (calibration): its reason
                why, status, load_failed = str(e), "failed", True
                fail_repeat(out, cell, k, why, server.log_text().splitlines()[-LOG_TAIL_LINES:], chosen)
            except Exception as e:  # recorded with the server's log tail; the run goes on
                why = f"{type(e).__name__}: {e}"
                fail_repeat(out, cell, k, why, server.log_text().splitlines()[-LOG_TAIL_LINES:], chosen)
                status = "failed"
            emit("repeat_done", {"cell": cell.cell_id, "repeat": k, "status": status, "reason": why,
                                 "load_failed": load_failed, "warnings": warnings})
            if k == spec.repeats or (i + 1 < len(group) and group[i + 1][0] != cell):
                cell_done(cell)
    finally:
        if server is not None:
            server.stop()


def _start_server(spec: Spec, out: Path, cell: Cell, chosen: str, emit: Callable[[str, dict], None],
                  api_key: str | None, engine_cls: Any, deploy: Any) -> tuple[Any, str | None]:
    """(the started server of the cell's group, None), or (None, why it did not start)."""
    log = inside(out, out / f"{cell.server_id}.server.log")
    endpoint = spec.endpoint_for(cell.model, cell.quant)
    emit("server_start", {"model": cell.model, "quant": cell.quant})
    try:
        sspec = deploy.ServeSpec(model=cell.model, quant=cell.quant, engine=chosen, gpu=spec.gpu,
                                 kv_memory_gib=spec.kv_memory_gib, max_model_len=spec.max_model_len,
                                 extra_args=list(spec.serve_args), log_path=log,
                                 api_key=endpoint_key(endpoint, api_key),
                                 lease_path=out / f".{cell.server_id}.server.lease")
        return engine_cls.open_server(sspec, endpoint).start(), None
    except RecordWriteError:
        raise
    except KvlabError as e:
        return None, f"the server did not start: {str(e).splitlines()[0]}"


def _stop_leftovers(out: Path, emit: Callable[[str, dict], None]) -> None:
    """A run that was killed outright (kill -9, the OOM killer) could not stop its server: its
    lease names the process group, stopped here before anything starts."""
    from kvlab.deploy.process import stop_leftover

    for lease in sorted(out.glob(".*.server.lease")):
        what = stop_leftover(lease)
        if what:
            emit("leftover", {"stopped": what})


def _finalize_rest(out: Path, spec: Spec, work: list[tuple[Cell, int]], done_cells: set[str]) -> None:
    for c in {c for c, _ in work}:
        if c.cell_id not in done_cells and (out / c.cell_id).exists():
            finalize_cell(out, c, spec)
    index.rebuild(out)
