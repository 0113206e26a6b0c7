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


def test_a_repeat_from_a_task_is_installed_whole_and_never_over_a_complete_one(tmp_path):
    """Unpacked beside the results folder's repeat, then moved in: an unfinished one there is set
    aside (.partial-*), a complete one is kept; nothing temporary is left."""
    import io
    import tarfile

    from kvlab.experiments import runner
    from kvlab.experiments.ray_runner import install_repeat
    from kvlab.experiments.spec import Cell

    cell, out = Cell("llama-3.1-8b", "bf16", "agent-smoke", 2), tmp_path / "r"

    def packed(status: str) -> bytes:
        src = tmp_path / f"node-{status}" / "repeat-1"
        src.mkdir(parents=True)
        runner._set_status(src, cell, 1, status)
        (src / "results.json").write_text("{}")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(src, arcname="repeat-1")
        return buf.getvalue()

    unfinished = runner.repeat_dir(out, cell, 1)
    unfinished.mkdir(parents=True)
    runner._set_status(unfinished, cell, 1, "running")
    dest = install_repeat(out, cell, 1, packed("complete"))
    assert runner.is_complete(dest) and list(dest.parent.glob("repeat-1.partial-*"))
    install_repeat(out, cell, 1, packed("failed"))  # a complete repeat is never overwritten
    assert runner.is_complete(dest)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
