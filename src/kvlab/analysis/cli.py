"""`kvlab report DIR... [--out DIR] [--baseline MODEL/QUANT] [--compare A B]`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer


def report_cmd(
    results: list[Path] = typer.Argument(None, metavar="DIR", help="Folders holding results: every results folder at or below them is read (`kvlab experiment run`'s results/<spec>, `make experiment`'s results/one/<model>-<quant>/<digest>, plans)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default: <first DIR>/report)"),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="MODEL/QUANT to compare against (default: the first GQA model at bf16, else the config of the oldest run)"),
    gpu_price: Optional[float] = typer.Option(None, "--gpu-price", help="$ per GPU-hour for the cost table (default: the spec's)"),
    compare: Optional[tuple[Path, Path]] = typer.Option(None, "--compare", metavar="A B", help="Two results folders: per metric, B's delta against A's repeats' 95 % interval"),
) -> None:
    """One comparison report over every run found: index.html (plots embedded), summary.md and the
    tables as CSV and JSON. The last line printed is the report's index.html."""
    from kvlab.analysis.report import build_report
    from kvlab.clikit import hear_ctrl_c, live_progress
    from kvlab.errors import KvlabError

    if compare:
        if results:
            raise KvlabError("--compare A B takes the two results folders itself; give no other folder")
        a, b = compare
        folders, out, compare_with = [b], out or Path(b) / "report", [a]
    else:
        if not results:
            raise KvlabError("give one or more folders holding results, e.g. results/ (or --compare A B)")
        folders, out, compare_with = list(results), out or Path(results[0]) / "report", None
    hear_ctrl_c()  # Ctrl-C leaves the report marked incomplete (below)
    try:
        with live_progress() as progress:
            task = progress.add_task("report", total=None)
            rep = build_report(folders, out=out, baseline=baseline, gpu_price=gpu_price, compare_with=compare_with,
                               on_step=lambda what: progress.update(task, description=f"report: {what}"))
    except KeyboardInterrupt:
        sys.stderr.write(f"interrupted: the report in {out} is incomplete (its report.json says so); "
                         "the results are untouched: rerun the same command\n")
        raise typer.Exit(130)
    for s in rep.headline:
        sys.stderr.write(f"  {s}\n")
    for m in rep.missing:
        sys.stderr.write(f"  missing: {m}\n")
    sys.stdout.write(f"{rep.html}\n")


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)
