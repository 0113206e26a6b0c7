"""The samples file: one CSV row per metric sample, `ts, family, name, labels, value`.

Rows are appended and flushed after every scrape, so a run that is killed keeps every scrape
written before it. `ts` is Unix time in seconds (the clock of the load records). `labels` is a
JSON object. Rows that kvlab adds itself are named `kvlab:*`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Iterable

import pandas as pd

from kvlab.errors import KvlabError

COLUMNS = ("ts", "family", "name", "labels", "value")
SAMPLES_FILE = "metrics.csv"
# A scrape that returned nothing usable: labels say the URL, the kind of failure and the error.
GAP = "kvlab:scrape_gap"
# Written once when GPU telemetry cannot be sampled: labels say why.
GPU_ABSENT = "kvlab:gpu_telemetry_absent"


def labels_json(labels: dict[str, str]) -> str:
    return json.dumps(labels, sort_keys=True, separators=(",", ":"))


def format_rows(rows: Iterable[tuple[float, str, str, dict[str, str], float]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for ts, family, name, labels, value in rows:
        w.writerow((repr(float(ts)), family, name, labels_json(labels), repr(float(value))))
    return buf.getvalue()


class SampleWriter:
    """Appends rows to the samples file; each batch is one write followed by a flush."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._f = open(self.path, "a", encoding="utf-8", newline="")
        if new:
            self._write(",".join(COLUMNS) + "\n")
        self.rows_written = 0

    def append(self, rows: list[tuple[float, str, str, dict[str, str], float]]) -> None:
        if rows:
            self._write(format_rows(rows))
            self.rows_written += len(rows)

    def _write(self, text: str) -> None:
        self._f.write(text)
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def resolve_samples_path(path: str | os.PathLike) -> Path:
    """A run directory (holding metrics.csv) or the samples file itself."""
    p = Path(path)
    if p.is_dir():
        p = p / SAMPLES_FILE
    if not p.is_file():
        raise KvlabError(f"no samples file at {p} (expected a run directory with {SAMPLES_FILE}, or the file)")
    return p


def read_samples(path: str | os.PathLike) -> pd.DataFrame:
    """The samples file as a frame; a torn last row (a killed writer) is skipped."""
    p = resolve_samples_path(path)
    text = p.read_bytes().decode("utf-8", errors="replace")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # every batch ends in a newline: the rest was torn
    try:
        df = pd.read_csv(io.StringIO(text), dtype={"family": str, "name": str, "labels": str},
                         keep_default_na=False, on_bad_lines="skip")
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise KvlabError(f"{p} is not a kvlab samples file: {e}") from None
    return checked_frame(df, str(p))


def checked_frame(df: pd.DataFrame, where: str = "samples") -> pd.DataFrame:
    """Columns present, numeric ts/value, parseable labels; malformed rows dropped."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise KvlabError(f"{where}: missing column(s) {', '.join(missing)} (expected {', '.join(COLUMNS)})")
    df = df.loc[:, list(COLUMNS)].copy()
    df["ts"] = pd.to_numeric(df["ts"], errors="coerce")
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    good_labels = df["labels"].map({s: _is_label_json(s) for s in df["labels"].unique()})
    df = df[df["ts"].notna() & good_labels.astype(bool) & (df["name"].astype(str) != "")]
    return df.sort_values("ts", kind="stable").reset_index(drop=True)


def _is_label_json(s) -> bool:
    try:
        return isinstance(json.loads(s), dict)
    except (TypeError, ValueError):
        return False
