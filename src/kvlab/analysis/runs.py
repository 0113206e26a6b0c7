"""Read results folders into tidy tables: one row per repeat, per cell and per config.

A results folder is what `kvlab experiment run` writes (run.json, spec.yaml, <cell>/repeat-<k>/...).
Nothing here recomputes a measurement: KV figures come from the server's own report (measured),
the kvlab memory model (predicted) or the simulator (simulated), and every column says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from kvlab.analysis import fleet
from kvlab.errors import KvlabError
from kvlab.experiments.records import read_json
from kvlab.units import GiB



def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


@dataclass
class RunSet:
    """All repeats found under some results folders."""

    folders: list[Path]
    specs: dict[str, dict]  # spec name -> spec as run
    repeats: pd.DataFrame  # one row per repeat (complete or not)
    missing: list[str] = field(default_factory=list)  # what is absent and why, in words
    plans: dict[str, tuple[Path, dict]] = field(default_factory=dict)  # spec name -> (plan folder, plan.json)

    @property
    def complete(self) -> pd.DataFrame:
        return self.repeats[self.repeats["status"] == "complete"]


def _engine_provenance(engine: str | None) -> str:
    from kvlab.deploy.engines import served_source  # the engine class says

    return served_source(engine)


def _row(rdir: Path, spec_name: str, spec: dict) -> dict[str, Any]:
    status = read_json(rdir / "status.json") or {}
    res = read_json(rdir / "results.json") or {}
    man = read_json(rdir / "manifest.json") or {}
    cell = res.get("cell") or status.get("cell") or {}
    server, pred, met, cli = (res.get(k) or {} for k in ("server", "prediction", "metrics", "client"))
    engine = res.get("engine") or status.get("engine")
    kv_mem = server.get("kv_cache_memory_bytes")
    return {
        "spec": spec_name,
        "folder": str(rdir),
        "cell_id": res.get("cell_id") or status.get("cell_id"),
        "model": cell.get("model"),
        "quant": cell.get("quant"),
        "workload": cell.get("workload"),
        "users": cell.get("users"),
        "repeat": res.get("repeat") or status.get("repeat"),
        "status": res.get("status") or status.get("status") or "unknown",
        "failure": _get(res, "failure", "reason") or _get(status, "failure", "reason"),
        "engine": engine,
        "source": _engine_provenance(engine),
        "attention": pred.get("attention"),
        "kv_cache_dtype": pred.get("kv_cache_dtype") or server.get("cache_dtype"),
        "weight_format": pred.get("quantization"),
        # capacity: reported by the server vs predicted by the memory model
        "kv_bytes_per_token": pred.get("kv_bytes_per_token"),
        "kv_cache_tokens_reported": server.get("kv_cache_tokens"),
        "kv_cache_tokens_predicted": pred.get("kv_cache_tokens"),
        "num_blocks_reported": server.get("num_gpu_blocks"),
        "num_blocks_predicted": pred.get("num_blocks"),
        "block_size": server.get("block_size") or pred.get("block_size"),
        "kv_cache_memory_bytes": kv_mem,
        "kv_budget_bytes_predicted": pred.get("kv_budget_bytes"),
        "max_concurrency_reported": server.get("max_concurrency"),
        "max_concurrency_predicted": pred.get("max_concurrency"),
        "max_model_len": server.get("max_model_len") or pred.get("max_model_len"),
        "weights_gib_reported": server.get("model_weights_gib"),
        "weights_gib_predicted": (pred.get("weight_bytes_per_gpu") or 0) / GiB if pred.get("weight_bytes_per_gpu") else None,
        "gpu_memory_bytes_predicted": _get(pred, "memory", "total_bytes"),
        "gpu_memory_utilization": _get(pred, "memory", "gpu_memory_utilization"),
        "num_gpus": pred.get("num_gpus") or 1,
        "gpu": pred.get("gpu"),
        # under load
        "window_s": cli.get("window_s") or met.get("duration_s"),
        "requests": cli.get("requests"),
        "errors": cli.get("errors"),
        "sessions": cli.get("sessions"),
        "output_tokens_per_s": cli.get("output_tokens_per_s"),
        "generation_tokens_per_s_server": met.get("generation_tokens_per_s"),
        "ttft_p50_s": _get(cli, "ttft_s", "p50"),
        "ttft_p95_s": _get(cli, "ttft_s", "p95"),
        "ttft_p99_s": _get(cli, "ttft_s", "p99"),
        "itl_p50_s": _get(cli, "itl_s", "p50"),
        "itl_p95_s": _get(cli, "itl_s", "p95"),
        "itl_p99_s": _get(cli, "itl_s", "p99"),
        "e2e_p50_s": _get(cli, "e2e_s", "p50"),
        "goodput_requests_per_min": _get(cli, "goodput", "request_goodput_per_min"),
        "goodput_sessions_per_min": _get(cli, "goodput", "session_goodput_per_min"),
        "sessions_met_slo": _get(cli, "goodput", "sessions_met_slo"),
        "slo_attainment": _get(cli, "goodput", "slo_attainment"),
        "preemptions": met.get("preemptions"),
        "kv_usage_peak_frac": met.get("kv_usage_peak_frac"),
        "kv_tokens_peak": met.get("kv_tokens_peak"),
        "kv_gib_mean": met.get("kv_gib_mean"),
        "running_peak": met.get("running_peak"),
        "waiting_peak": met.get("waiting_peak"),
        "prefix_cache_hit_rate": met.get("prefix_cache_hit_rate"),
        "mean_session_context_tokens": cli.get("mean_session_context_tokens"),
        "resident_sessions_peak": met.get("resident_sessions_peak"),
        "window_start_ts": _get(res, "window", "start_ts"),
        "window_end_ts": _get(res, "window", "end_ts"),
        "gpu_price_per_hour": res.get("gpu_price_per_hour", spec.get("gpu_price_per_hour")),
        "seed": res.get("seed") or man.get("seed"),
        "server_argv": " ".join(man.get("server_argv") or []),
        "vllm_version": server.get("vllm_version") or man.get("vllm_version"),
        "kvlab_version": man.get("kvlab_version"),
        "kvlab_git_commit": man.get("kvlab_git_commit"),
        "torch_version": man.get("torch_version"),
        "transformers_version": man.get("transformers_version"),
        "hardware": _hardware(man),
    }


def _hardware(man: dict) -> str | None:
    gpu = man.get("gpu") or {}
    if gpu.get("present"):
        g = gpu["gpus"]
        return f"{len(g)} x {g[0]['name']} (driver {g[0]['driver']})"
    host = man.get("host") or {}
    if host:
        return f"CPU: {host.get('cpu')} ({host.get('cpu_count')} cores), no GPU"
    return None


def load_runs(folders: list[Path | str]) -> RunSet:
    """Every repeat under the given results folders; absent or unreadable parts go to `missing`."""
    rows, specs, missing, plans = [], {}, [], {}
    paths = [Path(f) for f in folders]
    if not paths:
        raise KvlabError("give at least one results folder")
    for folder in paths:
        if not folder.is_dir():
            raise KvlabError(f"{folder} is not a folder")
        run = read_json(folder / "run.json")
        plan = fleet.read_plan(folder)
        if run is None and plan is not None:  # only a plan so far (kvlab plan --spec)
            plans[folder.name] = (folder / "plan", plan)
            specs[folder.name] = {}
            missing.append(f"{folder.name}: no experiment has run in {folder} yet, only its fleet plan")
            continue
        if run is None:
            raise KvlabError(f"{folder} is not a kvlab results folder (no run.json; `kvlab experiment run` writes one)")
        name = run.get("spec_name", folder.name)
        try:
            spec = yaml.safe_load((folder / "spec.yaml").read_text()) or {}
        except (OSError, ValueError, yaml.YAMLError):
            spec = {}
            missing.append(f"{folder}: spec.yaml is missing or unreadable")
        specs[name] = spec
        if plan is not None:
            plans[name] = (folder / "plan", plan)
        found = sorted(folder.glob("*/repeat-*/"))
        found = [d for d in found if ".partial-" not in d.name]
        if not found:
            missing.append(f"{name}: no repeat has run yet")
        for rdir in found:
            row = _row(rdir, name, spec)
            rows.append(row)
            if row["status"] != "complete":
                why = row["failure"] or "not finished (interrupted, or still running)"
                missing.append(f"{name}: {row['cell_id']} repeat {row['repeat']} is {row['status']}: {why}")
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=list(_row(Path("."), "", {}).keys()))
    return RunSet(folders=paths, specs=specs, repeats=df, missing=missing, plans=plans)


def config_label(model: str, quant: str) -> str:
    return f"{model}/{quant}"
