"""What every stage's command line shares: the app's settings, the `--json` option, the console,
number formats, and the wrapper that turns a KvlabError into one line and its exit code.

Stage CLIs (`kvlab.<stage>.cli`) import from here, never from the root `kvlab.cli`, which only
assembles the app from them.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any, Callable

import typer
from rich.console import Console

from kvlab.errors import KvlabError
from kvlab.units import GiB

# Wide enough for the comparison tables when output goes to a file or a pipe.
console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)

JSON = typer.Option(False, "--json", help="Print one JSON object")


def new_app(help_text: str) -> typer.Typer:
    """A Typer app (or sub-app) with kvlab's settings: -h, no completion, no pretty tracebacks."""
    return typer.Typer(help=help_text, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                       context_settings={"help_option_names": ["-h", "--help"]})


def emit_json(obj: Any) -> None:
    """One JSON object on stdout (what `--json` prints)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def fmt_int(n: int | float) -> str:
    return f"{int(n):,}"


def fmt_gib(n_bytes: int | float) -> str:
    return f"{n_bytes / GiB:,.2f}"


def run_one_line_errors(app: Callable[..., Any], argv: list[str] | None, prog_name: str = "kvlab") -> None:
    """Run the app; a KvlabError (bad input) prints `kvlab: error: ...` on one line and exits with
    its code (2), never a traceback; so does an OSError about a path (a file that is not there, a
    folder that cannot be written), with the path and the system's reason."""
    try:
        app(args=argv, prog_name=prog_name)
    except KvlabError as e:
        sys.stderr.write(f"{prog_name}: error: {e}\n")
        sys.exit(e.exit_code)
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a bug, with its traceback
            raise
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
        sys.stderr.write(f"{prog_name}: error: {where}: {e.strerror or e}\n")
        sys.exit(2)


def progress_shown(as_json: bool = False) -> bool:
    """Whether a command shows live progress: only on a terminal (stdout and stderr both), never
    with --json; logs, pipes and records get none of it."""
    return not as_json and sys.stdout.isatty() and sys.stderr.isatty()


def live_progress(as_json: bool = False, *, bar: bool = False, count: bool = True, elapsed: bool = True,
                  transient: bool = True):
    """A rich Progress on stderr (description, [bar[, done/total]], [elapsed]) that is live on a
    terminal and prints nothing elsewhere or with --json (`progress_shown`). Use it as a context
    manager; `add_task`/`update` are no-ops where it is off."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if bar:
        columns += [BarColumn(), MofNCompleteColumn()] if count else [BarColumn()]
    if elapsed:
        columns.append(TimeElapsedColumn())
    return Progress(*columns, console=Console(stderr=True), transient=transient,
                    disable=not progress_shown(as_json))


def throttled(update: Callable[..., None], every_s: float = 0.1) -> Callable[..., None]:
    """`update`, called at most every `every_s` wall seconds (a hot loop's progress hook)."""
    import time

    last = [0.0]

    def call(*args: Any) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            update(*args)

    return call


def hear_ctrl_c() -> None:
    """Make Ctrl-C (SIGINT) raise KeyboardInterrupt here, whatever this process inherited: a
    non-interactive shell starts background commands with SIGINT ignored, and a parent thread that
    blocked it (Ray's workers do) passes the block on. A command's own KeyboardInterrupt handling
    then runs."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
