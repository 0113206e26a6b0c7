"""The run figures from an existing Prometheus (the one a GPU cluster already runs), over its HTTP API.

PromQL's `increase()`/`rate()` extrapolate to the window's edges and `query_range` resamples on a
step grid, so neither gives the figures a direct scrape gives. Instead the raw samples of the
families the figures need are read with PromQL range selectors (`{__name__=~"..."}[range]` at
`/api/v1/query`), turned into the samples frame, and summarised by the same code as a direct
scrape. Failed scrapes are Prometheus's `up == 0`. `query` and `query_range` are exposed for
everything else (the Grafana dashboard's expressions, for example).
"""

from __future__ import annotations

import math
import re
from typing import Any

import httpx
import pandas as pd

from kvlab.errors import KvlabError
from kvlab.metrics.exposition import RENAMED_FAMILIES, canonical_name
from kvlab.metrics.figures import INPUT_FAMILIES, RunFigures, summarize
from kvlab.metrics.samples import COLUMNS, GAP, labels_json

HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
DROPPED_LABELS = ("__name__",)


class Prometheus:
    """A Prometheus HTTP API client (`/api/v1/query`, `/api/v1/query_range`)."""

    def __init__(self, url: str, timeout_s: float = 30.0):
        u = url.rstrip("/")
        if not re.match(r"https?://", u):
            raise KvlabError(f"not an http(s) URL for Prometheus: {url!r} (expected e.g. http://127.0.0.1:9090)")
        self.url = u
        self.timeout_s = timeout_s

    def query(self, expr: str, time_s: float) -> list[dict]:
        return self._get("/api/v1/query", {"query": expr, "time": f"{time_s:.3f}"})

    def query_range(self, expr: str, start_s: float, end_s: float, step_s: float) -> list[dict]:
        return self._get("/api/v1/query_range",
                         {"query": expr, "start": f"{start_s:.3f}", "end": f"{end_s:.3f}", "step": f"{step_s:g}"})

    def _get(self, path: str, params: dict[str, str]) -> list[dict]:
        try:
            r = httpx.get(self.url + path, params=params, timeout=self.timeout_s, trust_env=False)
        except httpx.HTTPError as e:
            raise KvlabError(f"cannot reach Prometheus at {self.url}: {type(e).__name__}: {e}") from None
        try:
            body = r.json()
        except ValueError:
            raise KvlabError(f"Prometheus at {self.url} answered HTTP {r.status_code} without JSON") from None
        if body.get("status") != "success":
            raise KvlabError(f"Prometheus rejected {params['query']!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]


def family_of(name: str) -> str:
    """The exposition family of a series name, as prometheus_client's parser names it."""
    for suffix in HISTOGRAM_SUFFIXES + ("_total", "_created"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def fetch_samples(prom: Prometheus, start_ts: float, end_ts: float, model_name: str | None = None,
                  selector: str | None = None, margin_s: float = 60.0) -> pd.DataFrame:
    """Raw samples of the figures' families from `start_ts - margin_s` to `end_ts + margin_s`.

    The margin must exceed Prometheus's scrape interval: the figures bracket the window with the
    scrapes just outside it. `selector`: extra label matchers, e.g. `job="vllm"`.
    """
    if selector and re.search(r"[{}]", selector):
        raise KvlabError(f"selector takes label matchers only, e.g. job=\"vllm\"; got {selector!r}")
    at = end_ts + margin_s
    span = f"{math.ceil((end_ts - start_ts + 2 * margin_s) * 1000)}ms"
    matchers = [selector] if selector else []
    model = [f'model_name="{_escape(model_name)}"'] if model_name else []
    names = sorted({n for n in INPUT_FAMILIES if n != "vllm:cache_config_info"} | set(_old_names()))
    series = prom.query(_selector(["__name__=~" + _quoted("|".join(map(re.escape, names)))] + matchers + model) + f"[{span}]", at)
    if not series:
        return _frame([], [])
    # cache_config_info has no model_name, `up` no vLLM labels: take the instances that serve it.
    instances = sorted({s["metric"].get("instance", "") for s in series})
    owners = ["instance=~" + _quoted("|".join(map(re.escape, instances)))] if instances else []
    series += prom.query(_selector(['__name__="vllm:cache_config_info"'] + matchers + owners) + f"[{span}]", at)
    up = prom.query(_selector(['__name__="up"'] + matchers + owners) + f"[{span}]", at)
    return _frame(series, up)


def summarize_from_prometheus(prom_url: str, start_ts: float, end_ts: float, model_name: str | None = None, *,
                              selector: str | None = None, mean_session_context_tokens: float | None = None,
                              kv_bytes_per_token: float | None = None, margin_s: float = 60.0,
                              timeout_s: float = 30.0) -> RunFigures:
    """RunFigures for the window [start_ts, end_ts] from the samples Prometheus holds."""
    if not end_ts > start_ts:
        raise KvlabError(f"end_ts must be after start_ts (got {start_ts} .. {end_ts})")
    frame = fetch_samples(Prometheus(prom_url, timeout_s), start_ts, end_ts, model_name, selector, margin_s)
    if frame.empty:
        where = f" for model_name {model_name!r}" if model_name else ""
        raise KvlabError(f"Prometheus at {prom_url} holds no vllm:* samples{where} around {start_ts:.0f}..{end_ts:.0f}")
    return summarize(frame, start_ts=start_ts, end_ts=end_ts, model_name=model_name,
                     mean_session_context_tokens=mean_session_context_tokens,
                     kv_bytes_per_token=kv_bytes_per_token)


def _frame(series: list[dict], up: list[dict]) -> pd.DataFrame:
    rows: list[tuple[Any, ...]] = []
    for s in series:
        metric = dict(s["metric"])
        name = metric["__name__"]
        labels = labels_json({k: v for k, v in metric.items() if k not in DROPPED_LABELS})
        rows += [(float(t), family_of(name), name, labels, float(v)) for t, v in s.get("values", [])]
    for s in up:
        labels = {"url": s["metric"].get("instance", ""), "kind": "prometheus_up_0", "error": "up == 0"}
        rows += [(float(t), GAP, GAP, labels_json(labels), 1.0) for t, v in s.get("values", []) if float(v) == 0]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _old_names() -> list[str]:
    out = []
    for old in RENAMED_FAMILIES:
        out += [old, old + "_total"] + [old + s for s in HISTOGRAM_SUFFIXES]
    return [n for n in out if canonical_name(n) in INPUT_FAMILIES]


def _selector(matchers: list[str]) -> str:
    return "{" + ",".join(matchers) + "}"


def _quoted(s: str) -> str:
    return '"' + _escape(s) + '"'


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')
