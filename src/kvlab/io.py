"""Record files, written atomically: a temporary name in the same folder, then a rename.

A reader, or a rerun after a crash, Ctrl-C or a full disk, sees the previous version of a record
or the new one, never half a file. A write that fails removes its temporary file and raises
RecordWriteError (a KvlabError: one line, exit 2) naming the file and why.

    write_json_atomic(path, obj)      write_text_atomic(path, text)
    with atomic_path(path) as tmp:    # for writers that take a path: to_parquet, to_csv, SQLite
        df.to_parquet(tmp)

Input files (specs, workloads, cards, serve profiles, config.json) are read by one helper too,
read_mapping(path, what): the mapping at the top of a YAML or JSON file, or a one-line
KvlabError naming the file (not readable, not UTF-8, not valid YAML/JSON, not a mapping).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Iterator

import yaml

from kvlab.errors import KvlabError

TMP_SUFFIX = ".tmp"


class RecordWriteError(KvlabError):
    """A record could not be written (disk full, no permission): the previous version is kept."""


def _error(path: Path, e: OSError) -> RecordWriteError:
    why = e.strerror or str(e)
    return RecordWriteError(f"cannot write {path}: {why}" + (f" (errno {e.errno})" if e.errno else "")
                            + "; what was written before is kept")


def temp_name(path: Path) -> Path:
    """A hidden, unique sibling of `path` (same folder, so the rename stays on one file system)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write `path` through; renamed over it when the block succeeds and
    removed when it fails (an OSError becomes RecordWriteError)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _error(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_dir(path: str | os.PathLike, exist_ok: bool = True) -> Path:
    """mkdir -p; a full disk or a missing permission is a RecordWriteError."""
    try:
        Path(path).mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        raise
    except OSError as e:
        raise _error(Path(path), e) from None
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def finite(obj: Any) -> Any:
    """obj with NaN and infinities as None: a figure that could not be computed is empty (JSON
    null), never a bare NaN that strict JSON readers refuse."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """JSON (indented, NaN as null, other types by str()); serialized before anything is written."""
    text = json.dumps(finite(obj), indent=2, default=str, allow_nan=False) + "\n"
    return write_text_atomic(path, text)


def read_mapping(path: str | os.PathLike, what: str, *, where: str | None = None,
                 text: str | None = None) -> dict:
    """The mapping at the top of a YAML file (JSON when the name ends in .json), or a KvlabError
    that starts with `where` (default: the path) and says what is wrong: "cannot read (...)",
    "not UTF-8 text (byte N)", "not valid YAML (...)" / "not valid JSON (...)", or "`what` must
    be a mapping". `text` is the file's text when the caller already has it."""
    path = Path(path)
    where = where or str(path)
    as_json = path.suffix == ".json"
    try:
        if text is None:
            text = path.read_text(encoding="utf-8")
        data = json.loads(text) if as_json else yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise KvlabError(f"{where}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise KvlabError(f"{where}: cannot read {path} ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise KvlabError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except yaml.YAMLError as e:
        raise KvlabError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise KvlabError(f"{where}: {what} must be a {'JSON object' if as_json else 'YAML mapping'}")
    return data
