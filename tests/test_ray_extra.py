"""`--ray` without the optional extra, and an ADDRESS without `--ray`: one line each, nothing started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def kvlab_without_ray(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    code = ("import sys; sys.modules['ray'] = None; from kvlab.cli import main; "
            f"sys.argv = ['kvlab', *{list(args)!r}]; main()")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})


def test_without_the_extra_ray_is_a_one_line_error(tmp_path):
    r = kvlab_without_ray(tmp_path, "experiment", "run", "sim-ladder", "--ray")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--ray needs Ray, an optional extra: pip install 'kvlab[ray]'" in r.stderr
    assert not (tmp_path / "results").exists()


def test_an_address_without_ray_is_refused(tmp_path):
    r = kvlab_without_ray(tmp_path, "experiment", "run", "sim-ladder", "10.0.0.1:6379")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "10.0.0.1:6379: an ADDRESS after SPEC is the Ray cluster of --ray; add --ray" in r.stderr
