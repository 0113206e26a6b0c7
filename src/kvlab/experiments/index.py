"""An SQLite index across run records, rebuilt from the files (the files are the truth)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from kvlab.experiments.records import read_json
from kvlab.io import atomic_path

SCHEMA = """
CREATE TABLE IF NOT EXISTS repeats (
    spec TEXT, cell_id TEXT, model TEXT, quant TEXT, workload TEXT, users INTEGER, repeat INTEGER,
    engine TEXT, status TEXT, started_ts REAL, ended_ts REAL, dir TEXT,
    kv_cache_tokens_reported INTEGER, kv_cache_tokens_predicted INTEGER,
    output_tokens_per_s REAL, ttft_p50_s REAL, ttft_p95_s REAL, itl_p95_s REAL,
    requests INTEGER, errors INTEGER, preemptions REAL, kv_usage_peak REAL, goodput_requests_per_min REAL,
    results_json TEXT,
    PRIMARY KEY (dir)
);
"""


def _get(d: dict | None, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def row_for(repeat_dir: Path, spec_name: str) -> dict[str, Any] | None:
    status = read_json(repeat_dir / "status.json") or {}
    results = read_json(repeat_dir / "results.json") or {}
    cell = status.get("cell") or results.get("cell")
    if not cell:
        return None
    return {
        "spec": spec_name,
        "cell_id": status.get("cell_id"),
        "model": cell.get("model"),
        "quant": cell.get("quant"),
        "workload": cell.get("workload"),
        "users": cell.get("users"),
        "repeat": status.get("repeat"),
        "engine": status.get("engine"),
        "status": status.get("status"),
        "started_ts": status.get("started_ts"),
        "ended_ts": status.get("ended_ts"),
        "dir": str(repeat_dir),
        "kv_cache_tokens_reported": _get(results, "server", "kv_cache_tokens"),
        "kv_cache_tokens_predicted": _get(results, "prediction", "kv_cache_tokens"),
        "output_tokens_per_s": _get(results, "client", "output_tokens_per_s"),
        "ttft_p50_s": _get(results, "client", "ttft_s", "p50"),
        "ttft_p95_s": _get(results, "client", "ttft_s", "p95"),
        "itl_p95_s": _get(results, "client", "itl_s", "p95"),
        "requests": _get(results, "client", "requests"),
        "errors": _get(results, "client", "errors"),
        "preemptions": _get(results, "metrics", "preemptions"),
        "kv_usage_peak": _get(results, "metrics", "kv_usage", "peak_fraction"),
        "goodput_requests_per_min": _get(results, "client", "goodput", "requests_per_min"),
        "results_json": json.dumps(results) if results else None,
    }


def rebuild(results_dir: Path) -> Path:
    """(Re)write <results_dir>/index.sqlite from every repeat folder below it."""
    results_dir = Path(results_dir)
    db_path = results_dir / "index.sqlite"
    spec = (read_json(results_dir / "run.json") or {}).get("spec_name", results_dir.name)
    with atomic_path(db_path) as tmp:
        con = sqlite3.connect(tmp)
        try:
            con.executescript(SCHEMA)
            for status in sorted(results_dir.glob("*/repeat-*/status.json")):
                if ".partial-" in status.parent.name:  # set aside by a rerun, not a result
                    continue
                row = row_for(status.parent, spec)
                if row:
                    cols = ", ".join(row)
                    con.execute(f"INSERT OR REPLACE INTO repeats ({cols}) VALUES ({', '.join('?' * len(row))})",
                                list(row.values()))
            con.commit()
        except sqlite3.OperationalError as e:  # "database or disk is full": an OSError for the caller
            raise OSError(28 if "full" in str(e) else 5, str(e)) from None
        finally:
            con.close()
    return db_path


FILTER_COLUMNS = ("model", "quant", "workload", "users", "status", "engine", "spec")


def query(results_dir: Path, filters: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows of the index, filtered by equality on FILTER_COLUMNS (values bound, never spliced)."""
    db = Path(results_dir) / "index.sqlite"
    if not db.exists():
        rebuild(Path(results_dir))
    filters = filters or {}
    bad = [k for k in filters if k not in FILTER_COLUMNS]
    if bad:
        from kvlab.errors import KvlabError

        raise KvlabError(f"cannot filter on {bad[0]!r}; use one of {', '.join(FILTER_COLUMNS)}")
    where = " AND ".join(f"{k} = ?" for k in filters)
    sql = "SELECT * FROM repeats" + (f" WHERE {where}" if where else "") + " ORDER BY cell_id, repeat"
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, list(filters.values()))]
    finally:
        con.close()
