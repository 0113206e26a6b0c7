"""Where kvlab finds the files it ships: serve profiles, workload profiles, the locustfile,
experiment specs, the Grafana dashboard and the Prometheus config.

They are package data (`kvlab/data/`, in the wheel) under the same relative folders as in a
checkout: `deploy/profiles/`, `loadtest/`, `experiments/`, `deploy/grafana/`, `deploy/prometheus/`.
In a checkout the top-level `deploy`, `loadtest` and `experiments` are symlinks into
`src/kvlab/data/`, so there is one copy of each file.

One lookup order for every kind, the first place that has the file wins:
1. an explicit place: a path given as such (a workload or spec YAML, `locust -f FILE`), or, for
   serve profiles, the folder in $KVLAB_PROFILES, which is then the only folder searched;
2. the working directory's folder of that kind: ./deploy/profiles, ./loadtest, ./experiments, ...;
3. the package's: kvlab/data/deploy/profiles, kvlab/data/loadtest, ...
Named files (a card's profiles, a workload, a spec) are looked up one by one, so a working-directory
folder may hold only the files a user added or changed. `python -m kvlab.resources` prints the
folders searched for each kind.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from kvlab.errors import KvlabError

DATA = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Kind:
    """A kind of shipped file: its folder (relative to the working directory and to kvlab/data)."""

    folder: str
    what: str
    env: str | None = None  # a variable naming the one folder to search instead


PROFILES = Kind("deploy/profiles", "serve profiles", env="KVLAB_PROFILES")
LOADTEST = Kind("loadtest", "workload profiles and the locustfile")
SPECS = Kind("experiments", "experiment specs")
GRAFANA = Kind("deploy/grafana", "Grafana dashboards")
PROMETHEUS = Kind("deploy/prometheus", "Prometheus config")
KINDS = (PROFILES, LOADTEST, SPECS, GRAFANA, PROMETHEUS)


def places(kind: Kind) -> list[tuple[Path, str]]:
    """The places searched for kind, in order, each with where it comes from; missing ones included."""
    if kind.env and os.environ.get(kind.env):
        return [(Path(os.environ[kind.env]), f"${kind.env}")]
    return [(Path.cwd() / kind.folder, "the working directory"), (DATA / kind.folder, "the package")]


def folders(kind: Kind) -> list[Path]:
    """The folders that exist among `places(kind)`, in order, each only once (a checkout's
    ./loadtest is the package's loadtest through its symlink)."""
    out: list[Path] = []
    for folder, _ in places(kind):
        if folder.is_dir() and not any(folder.samefile(o) for o in out):
            out.append(folder)
    return out


def searched(kind: Kind) -> str:
    """The places searched, for an error message: 'A (the working directory), B (the package)'."""
    return ", ".join(f"{folder} ({source})" for folder, source in places(kind))


def find(kind: Kind, filename: str, missing: str | None = None) -> Path:
    """The first `filename` in kind's folders; else a one-line KvlabError that starts with
    `missing` (default: 'no FILENAME') and names the places searched."""
    if Path(filename).name != filename or filename in ("", ".", ".."):
        raise KvlabError(f"{filename!r} is not a file name among the {kind.what}")
    for folder in folders(kind):
        if (folder / filename).is_file():
            return folder / filename
    raise KvlabError(f"{missing or f'no {filename}'}: searched {searched(kind)}")


def names(kind: Kind, pattern: str = "*.yaml") -> list[str]:
    """The stems of the files matching `pattern` in any of kind's folders, sorted."""
    return sorted({p.stem for folder in folders(kind) for p in folder.glob(pattern) if p.is_file()})


def locustfile() -> Path:
    """The locustfile: ./loadtest/locustfile.py, else the package's."""
    return find(LOADTEST, "locustfile.py", "no locustfile.py")


def locustfile_command() -> None:
    """Print the locustfile's path, for `locust -f $(kvlab locustfile)` (./loadtest's, else the package's)."""
    sys.stdout.write(f"{locustfile()}\n")


def main() -> None:
    for kind in KINDS:
        found = ", ".join(str(f) for f in folders(kind)) or "(none)"
        sys.stdout.write(f"{kind.what}: {found}\n")


if __name__ == "__main__":
    main()
