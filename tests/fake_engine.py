"""The `vllm-cpu` engine, with tests/fake_openai.py started in place of vLLM.

Everything else is kvlab's own code path: the launcher builds the CPU build's command line and
environment (VLLM_API_KEY, --host, --port, --served-model-name ...), runs it in its own process
group, waits for /health and /v1/models, reads the startup facts, and stops the group. Only the
program differs: `python tests/fake_openai.py` instead of `python -m vllm.entrypoints.openai.api_server`,
misbehaving as the JSON in $KVLAB_FAKE says.

In-process: `install(monkeypatch.setattr)`. As the `kvlab` command (for Ctrl-C tests):
`python tests/fake_engine.py experiment run SPEC --out DIR`, with $KVLAB_FAKE_PAUSE_AT naming a
stage (finalize, report) where it writes $KVLAB_FAKE_MARKER and waits, so a signal lands there.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

FAKE_SERVER = Path(__file__).resolve().parent / "fake_openai.py"
FAKE_ENV = "KVLAB_FAKE"
PAUSE_ENV = "KVLAB_FAKE_PAUSE_AT"
MARKER_ENV = "KVLAB_FAKE_MARKER"


def fake_cpu_command(real):
    real = getattr(real, "real", real)  # installed twice (a test's own install on top of a fixture's): wrap once

    def build(self, launch, config):
        cmd = real(self, launch, config)
        assert cmd.argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"], cmd.argv
        return replace(cmd, argv=[cmd.argv[0], str(FAKE_SERVER), *cmd.argv[3:]])

    build.real = real
    return build


def install(setattr) -> None:
    """Point the vllm-cpu engine at the fake (setattr: monkeypatch.setattr, or a plain setattr)."""
    from kvlab.deploy.engines import VllmCpuEngine

    setattr(VllmCpuEngine, "command", fake_cpu_command(VllmCpuEngine.command))
    setattr(VllmCpuEngine, "check_installed", lambda self: None)  # no vLLM import check
    setattr(VllmCpuEngine, "prepare_model", lambda self, resolved, model_arg: None)  # no twin to build


def _pause_at(stage: str, setattr) -> None:
    """Stop in `stage` long enough for the test to send its signal there."""
    from kvlab.analysis import report
    from kvlab.experiments import runner

    def pausing(fn):
        def wrapped(*a, **kw):
            marker = Path(os.environ[MARKER_ENV])
            if not marker.exists():  # once: the cleanup after the signal calls it again
                marker.write_text(stage)
                time.sleep(60)
            return fn(*a, **kw)
        return wrapped

    if stage == "finalize":  # the run's last stage: cell figures and the index
        setattr(runner, "finalize_cell", pausing(runner.finalize_cell))
    elif stage == "report":  # kvlab report, between the tables and the pages
        setattr(report.plots, "cost", pausing(report.plots.cost))


if __name__ == "__main__":
    signals = Path(os.environ.get(MARKER_ENV, "") + ".signals")
    if os.environ.get(MARKER_ENV) and signals.parent.is_dir():  # the signal state it inherited, for a failing test
        signals.write_text(f"SIGINT handler {signal.getsignal(signal.SIGINT)!r}; "
                           f"blocked {sorted(signal.pthread_sigmask(signal.SIG_BLOCK, []))}")
    install(setattr)
    if os.environ.get(PAUSE_ENV):
        _pause_at(os.environ[PAUSE_ENV], setattr)
    from kvlab.cli import main

    sys.argv[0] = "kvlab"
    main()
