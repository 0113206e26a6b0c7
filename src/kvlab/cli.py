"""The `kvlab` command line: the app, assembled from each stage's `cli.py` (`register(app)`).

The commands live with their stage (the memory model's `kv`, `capacity`, ... in `kvlab.models.cli`);
what they share (`--json`, the console, one-line errors) is `kvlab.clikit`.
"""

from __future__ import annotations

import sys

import typer

from kvlab import __version__, resources
from kvlab.analysis import cli as analysis_cli
from kvlab.clikit import new_app, run_one_line_errors
from kvlab.deploy import cli as deploy_cli
from kvlab.experiments import cli as experiments_cli
from kvlab.loadtest import cli as loadtest_cli
from kvlab.metrics import cli as metrics_cli
from kvlab.models import cli as models_cli
from kvlab.plan import cli as plan_cli
from kvlab.replay import cli as replay_cli
from kvlab.sim import cli as sim_cli

app = new_app("kvlab: how much GPU memory MLA, KV-cache and weight quantization save, measured on vLLM.")

# In the order `kvlab --help` lists their commands. Keep heavy imports inside the commands.
STAGES = (models_cli, deploy_cli, loadtest_cli, metrics_cli, sim_cli, experiments_cli, analysis_cli)


def _version_callback(value: bool) -> None:
    if value:
        sys.stdout.write(f"kvlab {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Print the version and exit")) -> None:
    pass


def _load_spec(path: str):
    from kvlab.experiments.spec import load_spec

    return load_spec(path)


def _kernel_data(gpu: str) -> str | None:
    from kvlab.sim.timing import gpu_kernel_data

    return gpu_kernel_data(gpu)


def _parse_log(text: str):
    from kvlab.deploy.facts import parse_log

    return parse_log(text)


# Commands that join stages are wired here, so that no stage imports one above it:
# `kvlab sim run` is the offline replay (above sim and loadtest); `kvlab plan --spec` reads an
# experiment spec (experiments imports plan, to plan after its cells); `kvlab gpus` says which
# presets the simulator has measured kernel data for; `kvlab explain` (the memory model's) reads a
# server log with the deploy stage's log parser.
for _stage in STAGES:
    _stage.register(app, kernel_data=_kernel_data) if _stage is models_cli else _stage.register(app)
replay_cli.register(sim_cli.sim_app)
plan_cli.register(app, load_spec=_load_spec)
app.command("explain")(models_cli.explain_command(parse_log=_parse_log))
app.command("locustfile")(resources.locustfile_command)


def main(argv: list[str] | None = None) -> None:
    run_one_line_errors(app, argv)
