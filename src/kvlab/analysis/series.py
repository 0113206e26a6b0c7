"""Time series from the raw records: vLLM metric samples and Locust's user-count history."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
RUNNING = ("vllm:num_requests_running",)
WAITING = ("vllm:num_requests_waiting",)
PREEMPTIONS = ("vllm:num_preemptions_total", "vllm:num_preemptions")


def read_samples(path: Path) -> pd.DataFrame:
    """metrics.csv (ts, family, name, labels, value) -> a frame; empty if absent."""
    if not Path(path).exists():
        return pd.DataFrame(columns=["ts", "family", "name", "labels", "value"])
    df = pd.read_csv(path)
    return df[pd.to_numeric(df["value"], errors="coerce").notna()].astype({"ts": float, "value": float})


def metric(df: pd.DataFrame, names: tuple[str, ...]) -> pd.Series:
    """One series over time (summed over label sets at each scrape), the first name that is present."""
    for n in names:
        s = df[df["name"] == n]
        if len(s):
            return s.groupby("ts")["value"].sum().sort_index()
    return pd.Series(dtype=float)


def cache_config(df: pd.DataFrame) -> dict[str, str]:
    s = df[df["name"] == "vllm:cache_config_info"]
    return json.loads(s["labels"].iloc[-1]) if len(s) else {}


def kv_tokens_in_use(df: pd.DataFrame) -> pd.Series:
    """KV usage (fraction of the pool) times the pool's size in tokens (num_gpu_blocks x block_size)."""
    usage = metric(df, KV_USAGE)
    cfg = cache_config(df)
    try:
        tokens = int(cfg["num_gpu_blocks"]) * int(cfg["block_size"])
    except (KeyError, ValueError):
        return pd.Series(dtype=float)
    return usage * tokens


def first_preemption_ts(df: pd.DataFrame) -> float | None:
    s = metric(df, PREEMPTIONS)
    if s.empty:
        return None
    inc = s.diff().fillna(0)
    hit = inc[inc > 0]
    return float(hit.index[0]) if len(hit) else None


def locust_users(repeat_dir: Path) -> pd.Series:
    """Locust's user count over time (its --csv stats history), indexed by unix time."""
    files = sorted(Path(repeat_dir).glob("load/*stats_history.csv")) or sorted(Path(repeat_dir).glob("*stats_history.csv"))
    for f in files:
        try:
            h = pd.read_csv(f)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
            continue
        if {"Timestamp", "User Count"} <= set(h.columns):
            return h.groupby("Timestamp")["User Count"].max().sort_index().astype(float)
    return pd.Series(dtype=float)


def preemption_cliff(repeat_dir: Path) -> dict:
    """The most concurrent agent sessions before the first preemption, in one repeat."""
    df = read_samples(Path(repeat_dir) / "metrics.csv")
    users = locust_users(repeat_dir)
    t = first_preemption_ts(df)
    if users.empty:
        return {"first_preemption_ts": t, "sessions_before_first_preemption": None, "preempted": t is not None}
    if t is None:
        return {"first_preemption_ts": None, "sessions_before_first_preemption": float(users.max()),
                "preempted": False}
    before = users[users.index <= t]
    return {"first_preemption_ts": t, "sessions_before_first_preemption": float(before.max()) if len(before) else 0.0,
            "preempted": True}
