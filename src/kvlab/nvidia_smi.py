"""The one reader of `nvidia-smi`: `--query-gpu=FIELDS --format=csv,noheader,nounits`, one row a GPU.

Used by the host facts and the engine choice (`kvlab.deploy.host`), the run manifest's
environment (`kvlab.experiments.records`) and the GPU telemetry beside each scrape
(`kvlab.metrics.gpu`); each keeps its own record shape, the running and parsing are here.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

EXECUTABLE = "nvidia-smi"


class NvidiaSmiError(RuntimeError):
    """nvidia-smi is there but failed, timed out or printed what is not the asked-for table."""


def find() -> str | None:
    """nvidia-smi's path, or None where it is not on PATH."""
    return shutil.which(EXECUTABLE)


def parse_csv(text: str, fields: Sequence[str]) -> list[dict[str, str]]:
    """Rows of `--format=csv,noheader,nounits` output as {field: cell}; ValueError on a row with
    another number of cells."""
    rows = []
    for line in text.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(fields):
            raise ValueError(f"expected {len(fields)} fields, got {len(cells)}: {line!r}")
        rows.append(dict(zip(fields, cells)))
    return rows


def number(cell: str) -> float | None:
    """A cell as a number; None for what nvidia-smi reports as "[N/A]" or "[Not Supported]"."""
    try:
        return float(cell)
    except ValueError:
        return None


def query_gpus(fields: Sequence[str], executable: str | None = None, timeout_s: float = 10.0) -> list[dict[str, str]]:
    """One {field: cell} per GPU. NvidiaSmiError (the reason in the message) when nvidia-smi
    cannot be run, exits non-zero or prints something else; FileNotFoundError without one."""
    exe = executable or find()
    if exe is None:
        raise FileNotFoundError(f"{EXECUTABLE} not found on PATH")
    cmd = [exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NvidiaSmiError(f"{EXECUTABLE}: {e}") from None
    if proc.returncode != 0:
        raise NvidiaSmiError(f"{EXECUTABLE} exited {proc.returncode}: {proc.stderr.strip()[:200]}")
    try:
        return parse_csv(proc.stdout, fields)
    except ValueError as e:
        raise NvidiaSmiError(f"{EXECUTABLE} output: {e}") from None
