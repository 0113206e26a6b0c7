"""One model's samples over one run window, ready for the figures.

A *target* is one KV pool: `instance#engine`. `instance` is Prometheus's target label (empty in a
kvlab samples file, which holds one server); `engine` is vLLM's data-parallel rank.

Counters and histograms are read between bracketing scrapes: the last scrape at or before the
window's start and the first at or after its end, so every event inside the window is counted
(events in those two scrape intervals but outside the window are counted too: none when the
server is idle outside the run, as when the window is the load's). Gauges are read from the
scrapes inside the window.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pandas as pd

from kvlab.errors import KvlabError
from kvlab.metrics.exposition import VLLM_PREFIX, canonical_rows
from kvlab.metrics.samples import GAP, GPU_ABSENT, checked_frame, read_samples
from kvlab.metrics.series import counter_increase

CACHE_CONFIG = "vllm:cache_config_info"
Target = str  # "instance#engine"


def load_frame(samples) -> pd.DataFrame:
    """A samples file, run directory or frame -> checked frame with current vLLM names."""
    df = samples if isinstance(samples, pd.DataFrame) else read_samples(samples)
    if isinstance(samples, pd.DataFrame):
        df = checked_frame(df)
    return canonical_rows(df)


def with_labels(df: pd.DataFrame) -> pd.DataFrame:
    """Adds `lab` (dict), `model_name`, `target` and `series` (name + labels) columns."""
    parsed = {s: json.loads(s) for s in df["labels"].unique()}
    df = df.copy()
    df["lab"] = df["labels"].map(parsed)
    df["model_name"] = df["lab"].map(lambda d: d.get("model_name"))
    df["target"] = df["lab"].map(lambda d: f"{d.get('instance', '')}#{d.get('engine', '')}")
    df["series"] = df["name"] + df["labels"]
    return df


def models_in(df: pd.DataFrame) -> list[str]:
    vllm = df[df["family"].str.startswith(VLLM_PREFIX)]
    return sorted(set(vllm["model_name"].dropna()))


@dataclass
class RunWindow:
    model_name: str | None
    start_ts: float | None
    end_ts: float | None
    rows: pd.DataFrame  # this model's vllm:* rows (and its targets' cache_config_info)
    other: pd.DataFrame  # gap, GPU and kvlab rows
    brackets: dict[Target, tuple[float, float]]

    @classmethod
    def select(cls, df: pd.DataFrame, model_name: str | None, start_ts: float | None,
               end_ts: float | None) -> "RunWindow":
        if start_ts is not None and end_ts is not None and start_ts > end_ts:
            raise KvlabError(f"start_ts {start_ts} is after end_ts {end_ts}")
        is_vllm = df["family"].str.startswith(VLLM_PREFIX)
        rows = cls._model_rows(df[is_vllm], model_name)
        other = df[~is_vllm]
        if rows.empty:
            return cls(model_name, start_ts, end_ts, rows, other, {})
        ts = rows["ts"]
        start = float(ts.min()) if start_ts is None else float(start_ts)
        end = float(ts.max()) if end_ts is None else float(end_ts)
        brackets = {t: _bracket(sorted(g.unique()), start, end) for t, g in ts.groupby(rows["target"])}
        return cls(model_name, start, end, rows, other, brackets)

    @staticmethod
    def _model_rows(vllm: pd.DataFrame, model_name: str | None) -> pd.DataFrame:
        if model_name is None:
            return vllm
        targets = set(vllm.loc[vllm["model_name"] == model_name, "target"])
        # cache_config_info carries no model_name: it belongs to the targets that serve the model.
        keep = (vllm["model_name"] == model_name) | (vllm["model_name"].isna() & vllm["target"].isin(targets))
        return vllm[keep]

    # -- what the window holds -----------------------------------------------------------------
    @property
    def empty(self) -> bool:
        return self.rows.empty

    def has(self, name: str) -> bool:
        return bool((self.rows["name"] == name).any()) if not self.rows.empty else False

    def in_window(self, df: pd.DataFrame) -> pd.DataFrame:
        lo = -math.inf if self.start_ts is None else self.start_ts
        hi = math.inf if self.end_ts is None else self.end_ts
        return df[(df["ts"] >= lo) & (df["ts"] <= hi)]

    @property
    def engine_targets(self) -> set[Target]:
        """Targets with an engine label: the KV pools (front-end series carry no engine)."""
        return {t for t in self.brackets if t.rpartition("#")[2]}

    @property
    def engines(self) -> tuple[str, ...]:
        return tuple(sorted({t.rpartition("#")[2] for t in self.engine_targets}))

    @property
    def scrapes(self) -> int:
        return int(self.in_window(self.rows)["ts"].nunique()) if not self.rows.empty else 0

    @property
    def gaps(self) -> int:
        g = self.in_window(self.other)
        g = g[g["name"] == GAP]
        return int(sum(1 for lab in g["labels"] if json.loads(lab).get("kind") != "gpu"))

    @property
    def duration_s(self) -> float | None:
        """The window, cut to the time the bracketing scrapes cover."""
        if not self.brackets:
            return None
        first = min(b0 for b0, _ in self.brackets.values())
        last = max(b1 for _, b1 in self.brackets.values())
        return min(self.end_ts, last) - max(self.start_ts, first)

    def gpu_absent_reason(self) -> str | None:
        g = self.other[self.other["name"] == GPU_ABSENT]
        return json.loads(g["labels"].iloc[-1]).get("reason", "absent") if not g.empty else None

    # -- readings ------------------------------------------------------------------------------
    def counter(self, name: str) -> tuple[float, int] | None:
        """Increase of a counter (summed over its series) between the brackets, and resets seen."""
        rows = self.rows[self.rows["name"] == name] if not self.rows.empty else self.rows
        if rows.empty:
            return None
        total, resets = 0.0, 0
        for (target, _), g in rows.groupby(["target", "series"], sort=False):
            b0, b1 = self.brackets[target]
            inc, r = counter_increase(g.loc[(g["ts"] >= b0) & (g["ts"] <= b1), "value"].tolist())
            total += inc
            resets += r
        return total, resets

    def bucket_increases(self, name: str) -> dict[float, float] | None:
        """Histogram `name` (the `_bucket` series): increase per upper bound, summed over series."""
        rows = self.rows[self.rows["name"] == name] if not self.rows.empty else self.rows
        if rows.empty:
            return None
        out: dict[float, float] = {}
        for (target, _), g in rows.groupby(["target", "series"], sort=False):
            b0, b1 = self.brackets[target]
            inc, _ = counter_increase(g.loc[(g["ts"] >= b0) & (g["ts"] <= b1), "value"].tolist())
            le = float(g["lab"].iloc[0].get("le", "nan"))
            out[le] = out.get(le, 0.0) + inc
        return out

    def gauge(self, name: str) -> pd.DataFrame | None:
        """Gauge `name` at each scrape in the window, one column per target (last known value)."""
        rows = self.in_window(self.rows[self.rows["name"] == name]) if not self.rows.empty else self.rows
        if rows.empty:
            return None
        wide = rows.pivot_table(index="ts", columns="target", values="value", aggfunc="sum")
        # Prometheus scrapes targets at different instants: carry each one's last value forward.
        return wide.sort_index().ffill().dropna()

    def cache_config(self) -> dict[Target, dict[str, str]]:
        """The last vllm:cache_config_info labels of each target."""
        rows = self.rows[self.rows["name"] == CACHE_CONFIG] if not self.rows.empty else self.rows
        return {t: g["lab"].iloc[-1] for t, g in rows.groupby("target", sort=False)}

    def other_in_window(self, prefix: str) -> pd.DataFrame:
        o = self.in_window(self.other)
        return o[o["family"].astype(str).str.startswith(prefix)]


def _bracket(ts: list[float], start: float, end: float) -> tuple[float, float]:
    before = [t for t in ts if t <= start]
    after = [t for t in ts if t >= end]
    return (before[-1] if before else ts[0], after[0] if after else ts[-1])
