"""`kvlab report`: one self-contained index.html (plots embedded), summary.md, and the tables as
CSV and JSON, rebuilt from the run records alone."""

from __future__ import annotations

import base64
import math
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from kvlab import __version__
from kvlab.analysis import fleet, plots, series, tables
from kvlab.analysis.runs import RunSet, config_label, load_runs
from kvlab.deploy.engines import served_source
from kvlab.io import atomic_path, write_json_atomic, write_text_atomic
from kvlab.schema.report import RepeatRow, ReportRecord, resolved
from kvlab.schema.validation import error_band


@dataclass
class Report:
    out: Path
    html: Path
    summary_md: Path
    baseline: str | None
    headline: list[str]
    missing: list[str]


def _clean(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


def _records(df: pd.DataFrame) -> list[dict]:
    return [{k: _clean(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


def fmt(v: Any, spec: str = "{:,.3g}") -> str:
    v = _clean(v)
    if v is None:
        return "—"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and v.is_integer() and abs(v) >= 1000:
            return f"{int(v):,}"
        s = spec.format(v)
        return s[1:] if s.startswith("-") and not any(c in s for c in "123456789") else s  # "-0 %" is "0 %"
    return str(v)


def _write_table(out: Path, name: str, df: pd.DataFrame) -> None:
    with atomic_path(out / f"{name}.csv") as tmp:
        df.to_csv(tmp, index=False)
    write_json_atomic(out / f"{name}.json", _records(df))


def _cliffs(rs: RunSet) -> pd.DataFrame:
    rows = []
    for _, r in rs.complete.iterrows():
        c = series.preemption_cliff(Path(r["folder"]))
        rows.append({"config": config_label(r["model"], r["quant"]), "users": r["users"], "repeat": r["repeat"], **c})
    if not rows:
        return pd.DataFrame(columns=["config", "sessions_before_first_preemption", "preempted"])
    df = pd.DataFrame(rows)
    # per config: the largest count of sessions seen before a first preemption (or without any)
    out = []
    for config, g in df.groupby("config", sort=False):
        pre = g[g["preempted"]]
        if len(pre):
            out.append({"config": config, "sessions_before_first_preemption": pre["sessions_before_first_preemption"].min(),
                        "preempted": True})
        else:
            out.append({"config": config, "sessions_before_first_preemption": g["sessions_before_first_preemption"].max(),
                        "preempted": False})
    return pd.DataFrame(out)


def simulated_label(rs: RunSet) -> str:
    """"simulated (timing: <source>[; <source>])": what priced the simulated repeats' steps
    (their records' timing source); "simulated" for records written before they said."""
    col = rs.repeats["timing_source"] if "timing_source" in rs.repeats else pd.Series(dtype=object)
    sources = list(dict.fromkeys(col.dropna()))
    return f"simulated (timing: {'; '.join(sources)})" if sources else "simulated"


def host_label(sources) -> str | None:
    """"outside the steps: <source>[; <source>]": what priced the simulated time outside the engine's
    steps (host time, API server, request latency: SimConfig.host_source); None where no record says."""
    said = list(dict.fromkeys(s for s in sources if isinstance(s, str) and s))
    return f"outside the steps: {'; '.join(said)}" if said else None


def step_check_label(rs: RunSet) -> str | None:
    """The repeats' step checks in words (a real vLLM's own stats lines against kvlab's simulated engine
    of the same configuration: step_check.json), or None where no repeat has one."""
    df = rs.repeats
    if "step_check_lines" not in df:
        return None
    checks = df[df["step_check_lines"] > 0]  # (NaN: no step check)
    if checks.empty:
        return None
    per = "; ".join(f"{config_label(m, q)} (repeat {int(k)}) {100 * e:+.1f} %" for m, q, k, e in zip(
        checks["model"], checks["quant"], checks["repeat"], checks["step_check_median_error"]))
    return (f"The simulator against these vLLM servers' own decode steps (their stats lines; step_check.json, "
            f"kvlab sim check-log): {int(checks['step_check_lines'].sum())} lines priced in {len(checks)} repeat(s), "
            f"{int(checks['step_check_within_25pct'].sum())} within ±25 %; median error (simulated generation "
            f"throughput over measured, less 1) {per}")


def _plans(rs: RunSet, out: Path) -> list[dict]:
    """The fleet plans found in the results folders, as tables (also written as fleet-plan*.csv/json)."""
    plans = []
    for name, (folder, plan) in rs.plans.items():
        suffix = "" if len(rs.plans) == 1 else f"-{name}"
        table, reb = fleet.fleet_table(plan), fleet.rebound_table(plan)
        _write_table(out, f"fleet-plan{suffix}", table)
        _write_table(out, f"rebound{suffix}", reb)
        png = folder / "rebound.png"
        plans.append({"spec": name, "summary": fleet.summary(plan), "provenance": plan.provenance,
                      "timing": fleet.timing_label(plan),
                      "host": host_label(c.host_source for c in plan.configs),
                      "validation": error_band((c.gpu, c.weights, c.kv_cache_dtype) for c in plan.configs),
                      "rows": _records(table), "rebound": _records(reb),
                      "rebound_columns": [c for c in reb.columns if c.startswith("K=")],
                      "image": "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
                      if png.is_file() else None,
                      "file": str(folder / "plan.json")})
    return plans


def build_report(folders: list[Path], out: Path | None = None, baseline: str | None = None,
                 gpu_price: float | None = None, compare_with: list[Path] | None = None,
                 on_step: Callable[[str], None] | None = None) -> Report:
    """The report over every results folder at or below `folders` (kvlab.analysis.runs.find_runs).
    on_step: called with what is being done (reading a folder, a table, a plot), for progress."""
    step = on_step or (lambda what: None)
    rs = load_runs(folders, on_folder=lambda f: step(f"reading {f}"))
    out = Path(out) if out else Path(folders[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    # report.json is written first marked incomplete and last marked complete: a report cut short
    # (Ctrl-C, a full disk) says so, whatever mix of old and new files it holds.
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    ReportRecord(complete=False, started=started, kvlab_version=__version__).write(out / "report.json")
    missing = list(rs.missing)

    step(f"tables of {len(rs.repeats)} repeat(s)")
    cfg = tables.configs(rs)
    base = tables.pick_baseline(cfg, baseline) if not cfg.empty else None
    head = tables.headline(cfg, base) if base else pd.DataFrame()
    sentences = tables.headline_sentences(head, base) if base else []
    mem = tables.memory_breakdown(cfg) if not cfg.empty else pd.DataFrame()
    load = tables.under_load(rs)
    costs = tables.cost(load, rs, gpu_price)
    repro = tables.reproducibility(rs)
    cliffs = _cliffs(rs)
    cmp = None
    if compare_with:
        cmp = tables.compare(load_runs(compare_with), rs)
    if cfg.empty:
        missing.append("no server reported its KV capacity: the headline and memory tables are empty")
    if load.empty:
        missing.append("no repeat completed under load: the load, latency and cost tables are empty")
    elif costs["gpu_price_per_hour"].isna().all():
        missing.append("no GPU price per hour (spec gpu_price_per_hour or --gpu-price): costs are not computed")

    for name, df in (("headline", head), ("configs", cfg), ("memory", mem), ("under_load", load), ("cost", costs),
                     ("cliff", cliffs), ("reproducibility", repro), ("repeats", rs.repeats)):
        _write_table(out, name, df)
    if cmp is not None:
        _write_table(out, "compare", cmp)

    # What each column of each table is, from its row type (`served`: said for the engines run).
    served = " / ".join(sorted({served_source(e) for e in rs.engines} or {served_source(None)}))
    src = {name: resolved(row_type, served) for name, row_type in (
        ("headline", tables.HeadlineRow), ("configs", tables.ConfigRow), ("memory", tables.MemoryRow),
        ("under_load", tables.LoadRow), ("cost", tables.CostRow), ("repeats", RepeatRow))}
    kind = src["repeats"]["kv_cache_tokens_reported"]  # what the servers' figures are: measured / simulated
    # Figures under load on the simulator also say what priced its steps, and how far to trust it.
    load_kind = kind.replace("simulated", simulated_label(rs))
    sim = rs.repeats[rs.repeats["source"] == "simulated"]  # RepeatRow's columns, rows or none
    validation = error_band(zip(sim["gpu"], sim["weight_format"], sim["kv_cache_dtype"])) if "simulated" in kind else None
    load_host = host_label(sim["host_source"]) if "host_source" in sim else None
    src["under_load"] = {k: load_kind if v == kind else v for k, v in src["under_load"].items()}
    plot_kind = "\n".join(textwrap.wrap(load_kind, 70))  # a plot title's line stays within the figure
    colours = plots.Colours(list(cfg["model"]) if not cfg.empty else list(rs.repeats.get("model", [])))
    rep = rs.complete.assign(config=[config_label(m, q) for m, q in zip(rs.complete["model"], rs.complete["quant"])])
    figures = [
        ("kv-bytes", "KV bytes per token", lambda: plots.kv_bytes_per_token(head, colours)),
        ("kv-capacity", "KV capacity", lambda: plots.kv_capacity(head, colours, kind)),
        ("memory", "Memory breakdown", lambda: plots.memory_breakdown(mem, colours)),
        ("kv-time", "KV usage over time", lambda: plots.kv_over_time(rep, colours, plot_kind)),
        ("cliff", "Preemption cliff", lambda: plots.cliff(cliffs, colours, plot_kind)),
        ("throughput", "Throughput", lambda: plots.throughput(load, colours, plot_kind)),
        ("ttft", "TTFT", lambda: plots.ttft(load, colours, plot_kind)),
        ("itl", "ITL", lambda: plots.itl(load, colours, plot_kind)),
        ("goodput", "Goodput", lambda: plots.goodput(load, colours, plot_kind)),
        ("preemptions", "Preemptions", lambda: plots.preemptions(load, colours, plot_kind)),
        ("prefix", "Prefix cache", lambda: plots.prefix_hits(load, colours, plot_kind)),
        ("cost", "Cost", lambda: plots.cost(costs, colours)),
    ]
    images = {}
    for i, (key, title, draw) in enumerate(figures, 1):
        step(f"plot {i}/{len(figures)}: {title}")
        png = draw()
        if png:
            images[key] = {"title": title, "src": "data:image/png;base64," + base64.b64encode(png).decode()}
    plans = _plans(rs, out)

    step(f"writing {out / 'index.html'}")
    env = Environment(loader=PackageLoader("kvlab.analysis", "templates"), autoescape=select_autoescape(["html"]))
    env.filters["fmt"] = fmt
    ctx = dict(
        title="kvlab report: " + ", ".join(rs.specs) if rs.specs else "kvlab report",
        generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"), kvlab_version=__version__,
        folders=[str(f) for f in rs.folders], baseline=base, sentences=sentences,
        head=_records(head), mem=_records(mem), load=_records(load), costs=_records(costs),
        cliffs=_records(cliffs), repro=_records(repro), compare=_records(cmp) if cmp is not None else None,
        images=images, missing=missing, specs=rs.specs, kind=kind, load_kind=load_kind, validation=validation, load_host=load_host,
        plans=plans, factors=fleet.FACTORS, step_check=step_check_label(rs),
        n_repeats=len(rs.repeats), n_complete=len(rs.complete), src=src,
    )
    html = out / "index.html"
    write_text_atomic(html, env.get_template("report.html.j2").render(**ctx))
    md = out / "summary.md"
    write_text_atomic(md, env.get_template("summary.md.j2").render(**ctx))
    ReportRecord(complete=True, started=started, baseline=base, headline=sentences, missing=missing,
                 images=sorted(images), kvlab_version=__version__, columns=src).write(out / "report.json")
    return Report(out=out, html=html, summary_md=md, baseline=base, headline=sentences, missing=missing)
