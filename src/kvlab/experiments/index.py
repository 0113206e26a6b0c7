"""An SQLite index across run records, rebuilt from the files (the files are the truth)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from kvlab.io import atomic_path
from kvlab.schema.experiment import IndexRow, RepeatResults, RunFolder, Status

_SQL_TYPES = {int: "INTEGER", float: "REAL", str: "TEXT"}


def _sql_type(annotation) -> str:
    for t, name in _SQL_TYPES.items():
        if annotation is t or t in getattr(annotation, "__args__", ()):
            return name
    return "TEXT"


def schema_sql() -> str:
    """The repeats table (its columns are IndexRow's fields) and the table that says, per figure
    column, where it comes from (`served`: measured on vLLM, simulated on the sim engine) and its unit."""
    cols = ",\n    ".join(f"{name} {_sql_type(f.annotation)}" for name, f in IndexRow.model_fields.items())
    return (f"CREATE TABLE IF NOT EXISTS repeats (\n    {cols},\n    PRIMARY KEY (dir)\n);\n"
            "CREATE TABLE IF NOT EXISTS columns (name TEXT PRIMARY KEY, source TEXT, unit TEXT);\n")


def row_for(repeat_dir: Path, spec_name: str) -> IndexRow | None:
    """The index row of one repeat folder, from its status.json and results.json."""
    status = Status.read_optional(repeat_dir / "status.json")
    results = RepeatResults.read_optional(repeat_dir / "results.json")
    if status is None and results is None:
        return None
    head = status or results
    server, pred, met, cli = (getattr(results, k, None) for k in ("server", "prediction", "metrics", "client"))
    goodput = cli.goodput if cli else None
    return IndexRow(
        spec=spec_name, cell_id=head.cell_id, **head.cell.model_dump(), repeat=head.repeat,
        engine=(status.engine if status else None) or (results.engine if results else None),
        status=head.status, started_ts=status.started_ts if status else None,
        ended_ts=status.ended_ts if status else None, dir=str(repeat_dir),
        kv_cache_tokens_reported=server.kv_cache_tokens if server else None,
        kv_cache_tokens_predicted=pred.kv_cache_tokens if pred else None,
        output_tokens_per_s=cli.output_tokens_per_s if cli else None,
        ttft_p50_s=cli.ttft_s.p50 if cli and cli.ttft_s else None,
        ttft_p95_s=cli.ttft_s.p95 if cli and cli.ttft_s else None,
        itl_p95_s=cli.itl_s.p95 if cli and cli.itl_s else None,
        requests=cli.requests if cli else None, errors=cli.errors if cli else None,
        preemptions=met.preemptions if met else None,
        kv_usage_peak_frac=met.kv_usage_peak_frac if met else None,
        requests_per_min=goodput.requests_per_min if goodput else None,
        goodput_requests_per_min=goodput.request_goodput_per_min if goodput else None,
        slo_from=goodput.slo_from if goodput else None,
        results_json=json.dumps(results.to_data()) if results else None,
    )


def rebuild(results_dir: Path) -> Path:
    """(Re)write <results_dir>/index.sqlite from every repeat folder below it."""
    results_dir = Path(results_dir)
    db_path = results_dir / "index.sqlite"
    run = RunFolder.read_optional(results_dir / "run.json")
    spec = run.spec_name if run else results_dir.name
    with atomic_path(db_path) as tmp:
        con = sqlite3.connect(tmp)
        try:
            con.executescript(schema_sql())
            con.executemany("INSERT INTO columns VALUES (?, ?, ?)",
                            [(n, src, IndexRow.unit_of(n)) for n, src in IndexRow.figure_sources().items()])
            for status in sorted(results_dir.glob("*/repeat-*/status.json")):
                if ".partial-" in status.parent.name:  # set aside by a rerun, not a result
                    continue
                found = row_for(status.parent, spec)
                if found:
                    row = found.model_dump()
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


def column_sources(results_dir: Path) -> dict[str, tuple[str, str | None]]:
    """Per figure column of the index: (source, unit), as the index says (`served` per row engine)."""
    con = sqlite3.connect(Path(results_dir) / "index.sqlite")
    try:
        return {n: (src, unit) for n, src, unit in con.execute("SELECT name, source, unit FROM columns")}
    finally:
        con.close()


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
