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


@pytest.fixture
def kvlab():
    return run_kvlab
