import os
import subprocess
import sys

import pytest

# A test must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_kvlab(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the CLI as a user would (a new process), capturing output."""
    return subprocess.run([sys.executable, "-m", "kvlab", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def run_sim_cell(root, spec: dict, cell_id: str):
    """Run a one-cell spec on the simulated engine under `root` (a new process, as a user would);
    (results folder, the cell's first repeat folder, its typed results.json), the repeat complete."""
    import yaml

    from kvlab.schema.experiment import RepeatResults

    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = root / "out"
    r = run_kvlab("experiment", "run", str(root / "spec.yaml"), "--engine", "sim", "--out", str(out), timeout=240)
    assert r.returncode == 0, r.stderr
    rdir = out / cell_id / "repeat-1"
    res = RepeatResults.read(rdir / "results.json")
    assert res.status == "complete", res.failure
    return out, rdir, res


try:  # `make test` runs two pytest-xdist workers
    from xdist.scheduler import LoadFileScheduling
except ImportError:  # plain pytest: nothing to schedule
    LoadFileScheduling = None

if LoadFileScheduling is not None:
    class _Scheduling(LoadFileScheduling):
        """Each test file runs whole on one worker (its module fixtures, a server or a plan, are set
        up once), and the files that start real vLLM run one after another on the same worker: they
        share the twins and would only slow each other down on a small machine."""

        def _split_scope(self, nodeid: str) -> str:
            return "real-vllm" if nodeid.startswith("tests/integration/") else super()._split_scope(nodeid)

    def pytest_xdist_make_scheduler(config, log):
        return _Scheduling(config, log) if config.getvalue("dist") == "loadfile" else None


@pytest.fixture
def kvlab():
    return run_kvlab
