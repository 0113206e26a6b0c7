"""Read results folders into tidy tables: one row per repeat, per cell and per config.

A results folder is what `kvlab experiment run` writes (run.json, spec.yaml, <cell>/repeat-<k>/...);
`find_runs` finds every one at or below a folder.
Nothing here recomputes a measurement: KV figures come from the server's own report (measured),
the kvlab memory model (predicted) or the simulator (simulated); every column's source is declared
in its type (kvlab.schema.report.RepeatRow), read from the records' types (kvlab.schema.experiment).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml

from kvlab.analysis import fleet
from kvlab.errors import KvlabError
from kvlab.deploy.engines import served_source
from kvlab.schema.experiment import Manifest, RepeatResults, RunFolder, Status
from kvlab.schema.plan import PlanRecord
from kvlab.schema.report import RepeatRow
from kvlab.schema.stepcheck import StepCheckResult
from kvlab.units import GiB


@dataclass
class RunSet:
    """All repeats found under some results folders."""

    folders: list[Path]
    specs: dict[str, dict]  # spec name -> spec as run
    repeats: pd.DataFrame  # one row per repeat (complete or not): RepeatRow's columns
    missing: list[str] = field(default_factory=list)  # what is absent and why, in words
    plans: dict[str, tuple[Path, PlanRecord]] = field(default_factory=dict)  # spec name -> (plan folder, plan.json)

    @property
    def complete(self) -> pd.DataFrame:
        return self.repeats[self.repeats["status"] == "complete"]

    @property
    def engines(self) -> set[str]:
        return set(self.repeats["engine"].dropna()) if len(self.repeats) else set()


def _pct(p: Any, name: str) -> float | None:
    return getattr(p, name) if p is not None else None


def _row(rdir: Path, spec_name: str, spec: dict) -> RepeatRow:
    """One repeat's row, every figure taken from the field of the record that holds it."""
    status = Status.read_optional(rdir / "status.json")
    res = RepeatResults.read_optional(rdir / "results.json")
    man = Manifest.read_optional(rdir / "manifest.json")
    check = StepCheckResult.read_optional(rdir / "step_check.json")
    head = res or status
    cell = head.cell if head else None
    server, pred, met, cli = (getattr(res, k, None) for k in ("server", "prediction", "metrics", "client"))
    good = cli.goodput if cli else None
    engine = (res.engine if res else None) or (status.engine if status else None)
    failure = (res.failure if res else None) or (status.failure if status else None)
    g = lambda obj, name: getattr(obj, name) if obj is not None else None  # noqa: E731
    return RepeatRow(
        spec=spec_name, folder=str(rdir), cell_id=g(head, "cell_id"),
        model=g(cell, "model"), quant=g(cell, "quant"), workload=g(cell, "workload"), users=g(cell, "users"),
        repeat=g(head, "repeat"), status=head.status if head else "unknown",
        failure=failure.reason if failure else None, engine=engine, source=served_source(engine),
        timing_source=res.timing.timing_source if res and res.timing else g(server, "timing_source"),
        host_source=(res.timing.host_source if res and res.timing else None) or g(server, "host_source"),
        attention=g(pred, "attention"),
        kv_cache_dtype=g(server, "cache_dtype"), kv_cache_dtype_predicted=g(pred, "kv_cache_dtype"),
        weight_format=g(pred, "quantization"),
        # capacity: reported by the server vs predicted by the memory model, never one for the other
        kv_bytes_per_token=g(pred, "kv_bytes_per_token"),
        kv_cache_tokens_reported=g(server, "kv_cache_tokens"), kv_cache_tokens_predicted=g(pred, "kv_cache_tokens"),
        num_blocks_reported=g(server, "num_gpu_blocks"), num_blocks_predicted=g(pred, "num_blocks"),
        block_size=g(server, "block_size"), block_size_predicted=g(pred, "block_size"),
        kv_cache_memory_bytes=g(server, "kv_cache_memory_bytes"), kv_budget_bytes_predicted=g(pred, "kv_budget_bytes"),
        max_concurrency_reported=g(server, "max_concurrency"), max_concurrency_predicted=g(pred, "max_concurrency"),
        max_model_len=g(server, "max_model_len"), max_model_len_predicted=g(pred, "max_model_len"),
        weights_gib_reported=g(server, "model_weights_gib"),
        weights_gib_predicted=pred.weight_bytes_per_gpu / GiB if pred else None,
        gpu_memory_bytes_predicted=pred.memory.total_bytes if pred and pred.memory else None,
        gpu_memory_utilization=pred.memory.gpu_memory_utilization if pred and pred.memory else None,
        num_gpus=pred.num_gpus if pred else 1, gpu=g(pred, "gpu"),
        # under load: the load generator's figures (client) and the server's (metrics)
        window_s=g(cli, "window_s"), requests=g(cli, "requests"), errors=g(cli, "errors"),
        sessions=g(cli, "sessions"), output_tokens_per_s=g(cli, "output_tokens_per_s"),
        generation_tokens_per_s_server=g(met, "generation_tokens_per_s"),
        ttft_p50_s=_pct(g(cli, "ttft_s"), "p50"), ttft_p95_s=_pct(g(cli, "ttft_s"), "p95"),
        ttft_p99_s=_pct(g(cli, "ttft_s"), "p99"), itl_p50_s=_pct(g(cli, "itl_s"), "p50"),
        itl_p95_s=_pct(g(cli, "itl_s"), "p95"), itl_p99_s=_pct(g(cli, "itl_s"), "p99"),
        e2e_p50_s=_pct(g(cli, "e2e_s"), "p50"),
        requests_per_min=g(good, "requests_per_min"),
        goodput_requests_per_min=g(good, "request_goodput_per_min"),
        goodput_sessions_per_min=g(good, "session_goodput_per_min"),
        sessions_met_slo=g(good, "sessions_met_slo"), slo_attainment=g(good, "slo_attainment"),
        slo_from=g(good, "slo_from"),
        preemptions=g(met, "preemptions"), kv_usage_peak_frac=g(met, "kv_usage_peak_frac"),
        kv_tokens_peak=g(met, "kv_tokens_peak"), kv_gib_mean=g(met, "kv_gib_mean"),
        running_peak=g(met, "running_peak"), waiting_peak=g(met, "waiting_peak"),
        prefix_cache_hit_rate=g(met, "prefix_cache_hit_rate"),
        mean_session_context_tokens=g(cli, "mean_session_context_tokens"),
        resident_sessions_peak=g(met, "resident_sessions_peak"),
        window_start_ts=g(g(res, "window"), "start_ts"), window_end_ts=g(g(res, "window"), "end_ts"),
        gpu_price_per_hour=g(res, "gpu_price_per_hour") if res and res.gpu_price_per_hour is not None
        else spec.get("gpu_price_per_hour"),
        seed=g(res, "seed") if res and res.seed is not None else g(man, "seed"),
        server_argv=" ".join(man.server_argv if man else []),
        vllm_version=g(server, "vllm_version") or g(man, "vllm_version"),
        kvlab_version=g(man, "kvlab_version"), kvlab_git_commit=g(man, "kvlab_git_commit"),
        torch_version=g(man, "torch_version"), transformers_version=g(man, "transformers_version"),
        hardware=_hardware(man.model_dump()) if man else None,
        step_check_lines=len(check.lines) if check else None, step_check_within_25pct=g(check, "within_25pct"),
        step_check_median_error=g(check, "median_error"),
    )


def _hardware(man: dict) -> str | None:
    gpu = man.get("gpu") or {}
    if gpu.get("present"):
        g = gpu["gpus"]
        return f"{len(g)} x {g[0]['name']} (driver {g[0]['driver']})"
    host = man.get("host") or {}
    if host:
        return f"CPU: {host.get('cpu')} ({host.get('cpu_count')} cores), no GPU"
    return None


def find_runs(folder: Path | str) -> list[Path]:
    """The results folders at or below `folder`: every folder holding a run.json (`kvlab experiment
    run` writes one, `make experiment` one per cell under results/one/<model>-<quant>/<digest>/), or
    only a fleet plan (plan/plan.json of `kvlab plan --spec`, plan.json of `kvlab plan`). Below a
    found folder nothing more is looked for. Oldest first (run.json's created_ts, else the file's
    time), so that the first run made is the first config of the report."""
    folder = Path(folder)
    found: list[tuple[float, str, Path]] = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        marker = here / "run.json" if "run.json" in files else _plan_file(here)
        if marker is not None:
            found.append((_created(marker), str(here), here))
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and ".partial-" not in d)
    return [p for _, _, p in sorted(found)]


def _plan_file(folder: Path) -> Path | None:
    for f in (folder / "plan" / "plan.json", folder / "plan.json"):
        if f.is_file():
            return f
    return None


def _created(marker: Path) -> float:
    if marker.name == "run.json":
        run = RunFolder.read_optional(marker)
        if run is not None and run.created_ts is not None:
            return run.created_ts
    try:
        return marker.stat().st_mtime
    except OSError:
        return 0.0


def _read_plan(folder: Path) -> tuple[Path, PlanRecord] | None:
    """(the plan's folder, its plan.json) of a results folder (FOLDER/plan/) or of a plan folder itself."""
    plan = fleet.read_plan(folder)
    if plan is not None:
        return folder / "plan", plan
    plan = PlanRecord.read_optional(folder / "plan.json")
    return (folder, plan) if plan is not None else None


def load_runs(folders: list[Path | str], on_folder: Callable[[Path], None] | None = None) -> RunSet:
    """Every repeat in the results folders at or below the given folders (`find_runs`); absent or
    unreadable parts go to `missing`. on_folder: called with each results folder as it is read."""
    rows, specs, missing, plans = [], {}, [], {}
    paths = [Path(f) for f in folders]
    if not paths:
        raise KvlabError("give at least one results folder")
    runs: list[Path] = []
    seen: set[Path] = set()  # resolved: a folder given twice (or inside another given one) is read once
    where: dict[Path, str] = {}  # results folder -> its path below the folder given (names it where names clash)
    for folder in paths:
        if not folder.is_dir():
            raise KvlabError(f"{folder} is not a folder")
        below = find_runs(folder)
        if not below:
            raise KvlabError(f"{folder} is not a kvlab results folder and holds none (no run.json in it or below it; "
                             "`kvlab experiment run` and `make experiment` write one)")
        for r in below:
            if r.resolve() not in seen:
                seen.add(r.resolve())
                runs.append(r)
                where[r] = str(r.relative_to(folder)) if r != folder else folder.name
    for folder in runs:
        if on_folder is not None:
            on_folder(folder)
        run = RunFolder.read_optional(folder / "run.json")
        plan = _read_plan(folder)
        if run is None and plan is None:
            missing.append(f"{folder}: its run.json or plan.json is unreadable")
            continue
        if run is None:  # only a plan (kvlab plan [--spec]): its section says so
            name = _unique(folder.name, specs, where[folder])
            plans[name] = plan
            specs[name] = {}
            continue
        name = _unique(run.spec_name, specs, where[folder])
        try:
            spec = yaml.safe_load((folder / "spec.yaml").read_text()) or {}
        except (OSError, ValueError, yaml.YAMLError):
            spec = {}
            missing.append(f"{folder}: spec.yaml is missing or unreadable")
        specs[name] = spec
        if plan is not None:
            plans[name] = plan
        found = sorted(folder.glob("*/repeat-*/"))
        found = [d for d in found if ".partial-" not in d.name]
        if not found:
            missing.append(f"{name}: no repeat has run yet")
        for rdir in found:
            row = _row(rdir, name, spec).model_dump()
            rows.append(row)
            if row["status"] != "complete":
                why = row["failure"] or "not finished (interrupted, or still running)"
                missing.append(f"{name}: {row['cell_id']} repeat {row['repeat']} is {row['status']}: {why}")
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=list(RepeatRow.model_fields))
    return RunSet(folders=paths, specs=specs, repeats=df, missing=missing, plans=plans)


def _unique(name: str, taken: dict, where: str) -> str:
    """The spec's name, or, where another results folder already has it (`make experiment` of one
    model and quant with other settings: another digest), the name with the folder's path."""
    if name not in taken:
        return name
    base = f"{name} ({where})"
    out, i = base, 2
    while out in taken:
        out, i = f"{base} {i}", i + 1
    return out


def config_label(model: str, quant: str) -> str:
    return f"{model}/{quant}"
