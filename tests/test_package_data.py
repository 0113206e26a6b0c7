"""The files kvlab ships (serve profiles, workloads, the locustfile, specs, dashboard, Prometheus
config) are package data with one copy, found in one order: explicit, the working directory, the
package (kvlab.resources). The wheel itself is built and installed in tests/test_wheel.py."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kvlab import resources
from kvlab.deploy.profiles import all_profiles, model_profiles
from kvlab.errors import KvlabError
from kvlab.experiments.spec import load_spec
from kvlab.loadtest.workload import load_workload, profile_names, resolve_profile

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "src" / "kvlab"


def test_the_top_level_folders_are_the_package_data():
    """One copy: deploy/, loadtest/ and experiments/ are symlinks into src/kvlab/data."""
    for folder in ("deploy", "loadtest", "experiments"):
        assert (REPO / folder).is_symlink(), folder
        assert (REPO / folder).resolve() == (PKG / "data" / folder).resolve()
    assert resources.DATA == (PKG / "data").resolve()


def test_every_data_file_is_in_the_wheels_package_data():
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["kvlab"]
    shipped = {p for g in globs for p in PKG.glob(g)}
    data = {p for p in (PKG / "data").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert data - shipped == set(), "add these to [tool.setuptools.package-data] in pyproject.toml"
    for kind in resources.KINDS:
        assert any((PKG / "data" / kind.folder).iterdir()), kind


def test_no_module_looks_for_files_outside_the_package():
    """`Path(__file__).parents[N]` reaching above src/kvlab is what broke the wheel."""
    escapes = []
    for path in PKG.rglob("*.py"):
        depth = len(path.relative_to(PKG).parts) - 1  # parents[depth] is src/kvlab itself
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "parents" and isinstance(node.slice, ast.Constant)
                    and node.slice.value > depth):
                escapes.append(f"{path.relative_to(PKG)}:{node.lineno}")
    assert escapes == []


def test_from_an_empty_folder_everything_comes_from_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KVLAB_PROFILES", raising=False)
    data = resources.DATA
    assert resources.find(resources.PROFILES, "llama-3.1-8b.yaml") == data / "deploy/profiles/llama-3.1-8b.yaml"
    assert resolve_profile("agent") == data / "loadtest/agent.yaml"
    assert resources.locustfile() == data / "loadtest/locustfile.py"
    assert load_spec("cpu-smoke").name == "cpu-smoke"
    assert resources.find(resources.GRAFANA, "vllm-kvlab.json").is_file()
    assert resources.find(resources.PROMETHEUS, "prometheus.yml").is_file()
    assert {"agent", "agent-smoke", "random", "shared-prefix"} <= set(profile_names())
    assert {"_default", "llama-3.1-8b", "deepseek-v2-lite"} <= set(all_profiles())


def test_the_working_directory_comes_before_the_package_file_by_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KVLAB_PROFILES", raising=False)
    (tmp_path / "deploy/profiles").mkdir(parents=True)
    (tmp_path / "deploy/profiles/llama-3.1-8b.yaml").write_text(
        "model: llama-3.1-8b\nprofiles:\n  bf16: {description: x}\n  mine: {description: my own level}\n")
    (tmp_path / "loadtest").mkdir()
    (tmp_path / "loadtest/agent.yaml").write_text("name: agent\napps: {count: 3}\n")
    (tmp_path / "loadtest/locustfile.py").write_text("# a user's own\n")
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments/mine.yaml").write_text((resources.DATA / "experiments/cpu-smoke.yaml").read_text()
                                                    .replace("name: cpu-smoke", "name: mine"))
    assert list(model_profiles("llama-3.1-8b").profiles) == ["bf16", "mine"]  # the user's file wins...
    assert "bf16" in model_profiles("qwen2.5-7b").profiles  # ...and the package fills in the rest
    assert load_workload("agent").apps.count == 3
    assert resolve_profile("agent-smoke") == resources.DATA / "loadtest/agent-smoke.yaml"
    assert resources.locustfile() == tmp_path / "loadtest/locustfile.py"
    assert load_spec("mine").name == "mine" and load_spec("cpu-smoke").name == "cpu-smoke"


def test_kvlab_profiles_is_the_only_folder_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_PROFILES", str(tmp_path / "p"))
    with pytest.raises(KvlabError) as e:
        model_profiles("llama-3.1-8b")
    assert str(e.value) == (f"no serve profiles for llama-3.1-8b (add llama-3.1-8b.yaml, like llama-3.1-8b.yaml): "
                            f"searched {tmp_path / 'p'} ($KVLAB_PROFILES)")
    assert all_profiles() == {}


def test_errors_are_one_line_and_name_the_places_searched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    places = f"{tmp_path / 'loadtest'} (the working directory), {resources.DATA / 'loadtest'} (the package)"
    with pytest.raises(KvlabError) as e:
        load_workload("nope")
    assert str(e.value).startswith("unknown workload 'nope': give a YAML path or one of agent, agent-smoke")
    assert str(e.value).endswith(f": searched {places}") and "\n" not in str(e.value)
    with pytest.raises(KvlabError, match=r"^no experiment spec at nope, nor one by that name \(.*cpu-smoke.*\): "
                                         r"searched .*experiments \(the working directory\), .* \(the package\)$"):
        load_spec("nope")
    with pytest.raises(KvlabError, match=r"^no experiment spec at experiments/nope.yaml$"):
        load_spec("experiments/nope.yaml")
    with pytest.raises(KvlabError, match="is not a file name"):
        resources.find(resources.SPECS, "../cpu-smoke.yaml")


def _kvlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "kvlab", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def test_kvlab_locustfile_prints_the_one_found(tmp_path):
    r = _kvlab("locustfile", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{resources.DATA / 'loadtest' / 'locustfile.py'}\n"
    r = _kvlab("locustfile", cwd=REPO)
    assert r.stdout == f"{REPO / 'loadtest' / 'locustfile.py'}\n"  # the checkout's, through its symlink


def test_python_m_kvlab_resources_lists_the_folders(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvlab.resources"], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"Grafana dashboards: {resources.DATA / 'deploy/grafana'}\n" in r.stdout


def test_gpu_constraints_pin_the_mirrored_vllm_and_leave_the_cuda_stack_to_it():
    """requirements/constraints-gpu.txt (what `make setup` installs on a GPU node) pins vLLM to the
    release the memory model mirrors and every requirement of kvlab and its gpu/dev/ray extras, but no torch
    or CUDA library (those come from vLLM's own pins and the CUDA build of torch on the node)."""
    import re
    import tomllib

    from kvlab.models.budget import DEFAULT_VLLM_VERSION

    root = Path(__file__).resolve().parents[1]
    pins = {}
    for line in (root / "requirements" / "constraints-gpu.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    assert pins["vllm"].rsplit(".", 1)[0] == DEFAULT_VLLM_VERSION
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for req in project["dependencies"] + extras["gpu"] + extras["dev"] + extras["ray"]:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0]).lower()
        assert name in pins, f"{name} is not pinned in constraints-gpu.txt"
    assert not [n for n in pins if re.match(r"(torch|triton|nvidia-|cuda-|nccl)", n)]
