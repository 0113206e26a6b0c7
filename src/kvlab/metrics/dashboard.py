"""Check a Grafana dashboard's PromQL against the metric names a vLLM server really exports.

Every panel target's `expr` and every query variable's `label_values(...)` is read; the metric
names in them (PromQL functions, keywords, label matchers, ranges, grouping labels and Grafana
variables stripped) must be sample names of the exposition, e.g. `vllm:prompt_tokens_total` or
`vllm:time_to_first_token_seconds_bucket`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from kvlab.errors import KvlabError

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan", "start", "end"}
IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


@dataclass(frozen=True)
class Query:
    where: str  # panel title and refId, or the variable's name
    expr: str


def load_dashboard(path: str | Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise KvlabError(f"cannot read the dashboard {path}: {e}") from None
    if not isinstance(d, dict) or "panels" not in d:
        raise KvlabError(f"{path} is not a Grafana dashboard (no 'panels')")
    return d


def queries(dashboard: dict) -> list[Query]:
    """Every PromQL expression of the dashboard (rows' nested panels included)."""
    out = []
    for panel in _panels(dashboard.get("panels", [])):
        for t in panel.get("targets", []):
            if t.get("expr"):
                out.append(Query(f"panel {panel.get('title')!r} {t.get('refId', '')}".strip(), t["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var.get("query")
            q = q.get("query", "") if isinstance(q, dict) else q or ""
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", q, re.S)
            out.append(Query(f"variable {var.get('name')!r}", m.group(1) if m else q))
    return out


def _panels(panels: list[dict]):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    e = re.sub(r"\$\{?\w+\}?", " ", e)  # Grafana variables
    e = re.sub(r"\b(\d+(ms|s|m|h|d|w|y))+\b", " ", e)  # durations (offset 5m)
    e = re.sub(r"\b\d+(\.\d+)?([eE][-+]?\d+)?\b", " ", e)  # numbers
    names = set()
    for m in IDENT.finditer(e):
        followed_by_call = e[m.end():].lstrip().startswith("(")
        if not followed_by_call and m.group(0).lower() not in KEYWORDS:
            names.add(m.group(0))
    return names


def unknown_metrics(dashboard: dict, exported: set[str]) -> dict[str, set[str]]:
    """Query location -> names it uses that `exported` lacks (empty when all are exported)."""
    out = {}
    for q in queries(dashboard):
        missing = metric_names(q.expr) - exported
        if missing:
            out[q.where] = missing
    return out
