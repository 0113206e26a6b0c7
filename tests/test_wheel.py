"""The built wheel runs outside any checkout: it is installed into a fresh venv in a temporary
folder, and from another empty folder `kvlab profiles`, `kvlab load --workload agent`,
`kvlab experiment run cpu-smoke` and `locust -f $(kvlab locustfile)` find their files in it.

Offline and quick: the wheel is built from a copy of the source without build isolation, and the
fresh venv sees this venv's installed dependencies through one .pth file naming its site-packages
(Python does not process the .pth files in a folder named that way, so this venv's editable kvlab
stays invisible); `import kvlab` is checked to be the wheel's copy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

from fake_openai import FakeConfig, FakeOpenAI

REPO = Path(__file__).resolve().parents[1]


def _setuptools_builds_wheels_itself() -> bool:
    """setuptools >= 70.1 has bdist_wheel built in: no `wheel` package, no download, to build."""
    try:
        major, minor = (int(x) for x in metadata.version("setuptools").split(".")[:2])
    except metadata.PackageNotFoundError:
        return False
    return (major, minor) >= (70, 1)


def _run(argv: list, cwd: Path, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**env, "COLUMNS": "250"}  # tables wide enough to show whole names, whatever the terminal
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh venv's bin folder, the environment to run it with, an empty working folder)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "source"  # a copy: the build writes build/ and *.egg-info, not into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "KVLAB_PROFILES")}
    isolation = ["--no-build-isolation"] if _setuptools_builds_wheels_itself() else []  # else pip fetches setuptools
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", *isolation,
              "-w", root / "dist", src], root, env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = (root / "dist").glob("kvlab-*.whl")

    venv = root / "venv"
    r = _run([sys.executable, "-m", "venv", "--without-pip", venv], root, env)
    assert r.returncode == 0, r.stderr
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    fresh_site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # this venv's dependencies
    (Path(fresh_site) / "kvlab-test-deps.pth").write_text("".join(f"{p}\n" for p in ours))
    r = _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
              "--disable-pip-version-check", wheel], root, env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    work = root / "elsewhere"  # no deploy/, loadtest/ or experiments/ here
    work.mkdir()
    r = _run([python, "-c", "import kvlab; print(kvlab.__file__)"], work, env)
    assert Path(r.stdout.strip()).is_relative_to(venv), r.stdout + r.stderr
    return bin_dir, env, work


def test_the_wheel_holds_every_shipped_file(installed):
    bin_dir, env, work = installed
    r = _run([bin_dir / "python", "-m", "kvlab.resources"], work, env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 5 and all("site-packages" in line and str(REPO) not in line for line in lines), r.stdout


def test_kvlab_profiles(installed):
    bin_dir, env, work = installed
    r = _run([bin_dir / "kvlab", "profiles"], work, env)
    assert r.returncode == 0, r.stderr
    assert all(f"│ {name} " in r.stdout for name in ("_default", "deepseek-v2-lite", "llama-3.1-8b", "qwen3-8b")), r.stdout


def test_kvlab_load_with_a_named_workload(installed, tmp_path):
    bin_dir, env, work = installed
    r = _run([bin_dir / "kvlab", "load", "--workload", "agent", "--help"], work, env)
    assert r.returncode == 0 and "--workload" in r.stdout, r.stderr
    # and for real: the named workload and the locustfile, both from the wheel, against a fake server
    with FakeOpenAI(FakeConfig(itl_s=0.01)) as srv:
        r = _run([bin_dir / "kvlab", "load", "--host", srv.url, "--workload", "agent-smoke", "--users", "2",
                  "--duration", "3s", "--out", tmp_path / "run", "--json"], work, env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["summary"]["requests"] >= 1  # the only locustfile and agent-smoke.yaml around are the wheel's


def test_kvlab_experiment_run_with_a_shipped_spec(installed):
    bin_dir, env, work = installed
    r = _run([bin_dir / "kvlab", "experiment", "run", "cpu-smoke", "--help"], work, env)
    assert r.returncode == 0 and "SPEC" in r.stdout, r.stderr
    code = "from kvlab.experiments.spec import load_spec; s = load_spec('cpu-smoke'); print(s.name, s.workloads)"
    r = _run([bin_dir / "python", "-c", code], work, env)
    assert r.returncode == 0 and r.stdout == "cpu-smoke ['agent-smoke']\n", r.stderr
    r = _run([bin_dir / "kvlab", "experiment", "run", "no-such-spec"], work, env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "(the package)" in r.stderr, r.stderr


def test_locust_finds_the_locustfile(installed):
    bin_dir, env, work = installed
    r = _run([bin_dir / "kvlab", "locustfile"], work, env)
    assert r.returncode == 0, r.stderr
    locustfile = Path(r.stdout.strip())
    assert locustfile.is_file() and "site-packages" in locustfile.parts
    r = _run([bin_dir / "python", "-m", "locust", "-f", locustfile, "--list"], work, env)  # imports the locustfile
    assert r.returncode == 0 and "AgentUser" in r.stdout, r.stderr[-3000:]
    r = _run([bin_dir / "python", "-m", "locust", "-f", locustfile, "--help"], work, env)
    assert r.returncode == 0 and "Usage: locust" in r.stdout, r.stderr[-3000:]
