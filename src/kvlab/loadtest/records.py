"""Per-request records: one JSON line per request, written by every Locust process as it goes.

Each process appends to `requests-<host>-<pid>-<time>-<n>.jsonl.part` and renames it to `.jsonl` when
the test stops. The Locust client writes lines in batches (every FLUSH_RECORDS records or
FLUSH_EVERY_S seconds, whichever comes first: a crash loses at most that), as one write per request
costs CPU the streams need; a writer made without `batch_s` writes each line as it comes.
`read_requests` reads a file or a folder of them (finished or not) into one DataFrame; the runner
also writes that frame to `requests.parquet` (temp name, then rename).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import orjson

from kvlab.errors import KvlabError
from kvlab.io import atomic_path, write_json_atomic


@dataclass(frozen=True)
class RequestRecord:
    """One request as the client measured it. Times in seconds; `start_ts` is unix time (the
    clock a Prometheus scraper on this machine stamps its samples with)."""

    start_ts: float
    kind: str  # "turn": a workload request; "probe": calibration (max_tokens=1)
    probe: str | None  # which probe: "A", "B", "C" (render.py), "app" (an app's prefix), "models" (GET /v1/models),
    # "fit" (the calibration on A, B, C could not fit: error_kind "calibration")
    session_id: str | None
    app_id: str | None
    turn: int  # 0-based; -1 for probes
    turns_planned: int
    status_code: int | None  # None: no HTTP response (connect error, timeout before headers)
    error_kind: str | None  # None when OK; else one of stream.ERROR_KINDS
    error_detail: str | None
    ttft_s: float | None
    itl_s: list[float]
    tpot_s: float | None
    e2e_s: float | None
    prompt_tokens: int | None  # measured: usage.prompt_tokens
    completion_tokens: int | None  # measured: usage.completion_tokens
    cached_tokens: int | None  # measured: usage.prompt_tokens_details.cached_tokens (if the server reports it)
    planned_prompt_tokens: int | None  # what the calibrated plan aimed at
    system_tokens: int | None  # measured tokens the app's shared prefix adds (probe), for cache analysis
    max_tokens: int
    finish_reason: str | None
    chunks: int
    start_lag_s: float | None  # open loop: how late the session's first turn started
    worker: str = field(default_factory=lambda: _worker_name())


_WORKER: str | None = None


def _worker_name() -> str:
    """host:pid of this process (asked once per process, not per record: a child made by fork asks
    again)."""
    global _WORKER
    if _WORKER is None:
        _WORKER = f"{socket.gethostname()}:{os.getpid()}"
    return _WORKER


def _forget_worker_name() -> None:
    global _WORKER
    _WORKER = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker_name)


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(RequestRecord))
_writer_ids = itertools.count()
FLUSH_RECORDS = 64
FLUSH_EVERY_S = 1.0


class RecordWriter:
    """Appends records of one process; `close()` makes the file final."""

    def __init__(self, folder: Path | str, batch_s: float = 0.0) -> None:
        """batch_s > 0: lines are written every FLUSH_RECORDS records or batch_s seconds (and on
        flush() / close()); 0: each line as it comes."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        # One file per process and test: a web-UI session may run several tests in one process.
        stem = f"requests-{socket.gethostname()}-{os.getpid()}-{time.strftime('%Y%m%d-%H%M%S')}-{next(_writer_ids)}"
        self.final_path = self.folder / f"{stem}.jsonl"
        self.part_path = self.folder / f"{stem}.jsonl.part"
        self._fh: IO[bytes] | None = open(self.part_path, "ab")
        self._pending: list[bytes] = []
        self._flushed_at = time.monotonic()
        self.batch_s = batch_s
        self.count = 0

    def write(self, rec: RequestRecord) -> None:
        if self._fh is None:
            raise RuntimeError("record writer is closed")
        # orjson writes a dataclass as an object, NaN and infinities as null (json.dumps would
        # write NaN, which is not JSON)
        self._pending.append(orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE))
        self.count += 1
        if not self.batch_s or len(self._pending) >= FLUSH_RECORDS or \
                time.monotonic() - self._flushed_at >= self.batch_s:
            self.flush()

    def flush(self) -> None:
        """Write the pending lines now (whole lines only: a reader never sees half a batch)."""
        if self._fh is not None and self._pending:
            self._fh.write(b"".join(self._pending))
            self._fh.flush()
        self._pending = []
        self._flushed_at = time.monotonic()

    def close(self) -> Path:
        if self._fh is not None:
            self.flush()
            self._fh.close()
            self._fh = None
            os.replace(self.part_path, self.final_path)
        return self.final_path


def record_files(path: Path | str) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted([*p.glob("requests-*.jsonl"), *p.glob("requests-*.jsonl.part")])
    raise KvlabError(f"no request records at {p}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete lines only: the last line of a file still being written may be cut short."""
    rows = []
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                break
            try:
                row = json.loads(line)
            except ValueError:  # not JSON, or not UTF-8
                raise KvlabError(f"{path}: line {len(rows) + 1} is not a JSON record") from None
            if not isinstance(row, dict):
                raise KvlabError(f"{path}: line {len(rows) + 1} is not a JSON object")
            rows.append(row)
    return rows


def read_requests(path: Path | str):
    """All requests under `path` (a records folder, one .jsonl file, a .parquet file, or a run
    folder holding requests.parquet) as a pandas DataFrame with one row per request, sorted by
    `start_ts`; columns are `COLUMNS`."""
    import pandas as pd

    p = Path(path)
    if p.is_dir() and not record_files(p) and (p / "requests.parquet").is_file():
        p = p / "requests.parquet"
    if p.suffix == ".parquet":
        df = pd.read_parquet(p)
    else:
        rows = [r for f in record_files(p) for r in read_jsonl(f)]
        df = pd.DataFrame(rows, columns=list(COLUMNS))
    for col in ("prompt_tokens", "completion_tokens", "cached_tokens", "planned_prompt_tokens",
                "system_tokens", "status_code"):
        df[col] = df[col].astype("Int64")
    df["itl_s"] = df["itl_s"].apply(lambda v: [float(x) for x in v] if v is not None else [])
    return df.sort_values("start_ts", kind="stable").reset_index(drop=True)


def write_parquet(df, path: Path | str) -> Path:
    """Atomically: a temp name in the same folder, then rename."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


@dataclass(frozen=True)
class LiveCounts:
    """What one Locust process of a running `kvlab load` has now: its users and the turns it has in
    flight (sent, not ended). A progress file the locustfile rewrites every second (--kvlab-live) and
    `kvlab load` deletes after the run; not a record of the run."""

    users: int
    in_flight: int

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, {"users": self.users, "in_flight": self.in_flight})

    @classmethod
    def read_all(cls, folder: Path | str) -> "LiveCounts | None":
        """The sum over every process's file in `folder` (None where none is there yet)."""
        found = []
        for path in sorted(Path(folder).glob("process-*.json")):
            try:
                data = json.loads(path.read_text())
                found.append(cls(int(data["users"]), int(data["in_flight"])))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        if not found:
            return None
        return cls(sum(c.users for c in found), sum(c.in_flight for c in found))
