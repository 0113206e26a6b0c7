"""The plan as rich tables: the fleet per config, the savings and their factors, the rebound grid."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.table import Table

from kvlab.plan.fleet import FACTOR_NAMES


def _n(v, fmt: str = "{:,.0f}") -> str:
    return "—" if v is None else fmt.format(v)


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)


def fleet_table(result: dict) -> Table:
    i = result["inputs"]
    rate = f"{i['calls_per_agent_hour']:,.0f} calls per agent-hour" + (
        "" if i["calls_per_agent_hour_source"] == "given" else " as the baseline's busy sessions make")
    slo = ", ".join(f"{k} {v:g}" for k, v in i["slo"].items() if v is not None)
    t = Table(title=f"{i['agents']:,} agents ({i['workload']['name']}, {rate}) on {i['gpu']}: SLO {slo} for "
                    f"{i['slo_attainment']:.0%} of requests")
    cols = ("config", "attention", "KV dtype", "weights", "sessions / GPU\n(simulated)", "GPUs",
            "HBM GiB\nweights + KV", "of it KV cache\nGiB", "KV in use GiB\n(simulated)", "KV per session\nMiB in use",
            "concurrent\nsessions", "$ / day", "$ / 1M tokens\n(out | all)")
    for c in cols:
        t.add_column(c, justify="left" if c in ("config", "attention", "KV dtype", "weights") else "right")
    for row in result["configs"]:
        f = row.get("figures")
        if f is None:
            continue
        base = " (baseline)" if row["config"] == result["baseline"] else ""
        usd = "—" if f["usd_per_1m_output_tokens"] is None else \
            f"{f['usd_per_1m_output_tokens']:.3g} | {f['usd_per_1m_tokens']:.3g}"
        t.add_row(row["config"] + base, row["attention"], row["kv_cache_dtype"], row["weights"],
                  _n(f["sessions_per_gpu"], "{:,.4g}"), _n(f["gpus"]), _n(f["hbm_total_gib"]), _n(f["hbm_kv_gib"]),
                  _n(f["kv_in_use_gib"]), _n(f["kv_in_use_mib_per_session"], "{:,.1f}"), _n(f["concurrent_sessions"]),
                  _n(f["usd_per_day"]), usd)
    return t


def _configs_by(result: dict, key: str) -> dict[str, list[str]]:
    """The planned configs grouped by their `key` (a source label), in order; configs without one left out."""
    by: dict[str, list[str]] = {}
    for row in result["configs"]:
        if row.get(key):
            by.setdefault(row[key], []).append(row["config"])
    return by


def timing_lines(result: dict) -> list[str]:
    """What priced each planned config's simulated steps, one line per timing source, what priced the
    time outside them (host time, API server, request latency: `host_source`), and the
    validation error band (kvlab.schema.validation), with the ratio rows' word on each quantization
    factor the planned configs have on their GPU."""
    from kvlab.schema.validation import error_band

    lines = [f"simulated (timing: {src}): {', '.join(configs)}"
             for src, configs in _configs_by(result, "timing_source").items()]
    hosts = _configs_by(result, "host_source")
    lines += [f"outside the steps ({'every config' if len(hosts) == 1 else ', '.join(configs)}): {h}"
              for h, configs in hosts.items()]
    shown = [(row.get("gpu"), row.get("weights"), row.get("kv_cache_dtype")) for row in result["configs"]]
    return lines + [error_band(shown)] if lines else []


API_SERVER_NEAR_LIMIT = 0.8  # seconds of work per second at which the line names the configs near the limit


def api_server_loads(result: dict) -> list[tuple[str, float]]:
    """(config, ProbeFigures.api_server_load) of each planned config whose probe has the figure."""
    loads = [(row["config"], ((row.get("figures") or {}).get("probe") or {}).get("api_server_load"))
             for row in result["configs"]]
    return [(c, x) for c, x in loads if x is not None]


def api_server_line(result: dict) -> str | None:
    """The simulated API server's load at each planned config's answer (ProbeFigures.api_server_load),
    naming those near one process's limit; None where no probe has the figure."""
    from kvlab.sim import timing as sim_timing

    loads = api_server_loads(result)
    if not loads:
        return None
    per_output_s, per_step_s, release = sim_timing.frontend_streaming(result["inputs"].get("vllm_version"))
    costs = ", ".join(f"{scale * value:g} {unit}" for value, scale, unit in (
        (sim_timing.FRONTEND_PER_PROMPT_TOKEN_S, 1e6, "us per prompt token"),
        (per_output_s, 1e6, "us per streamed output"),
        (per_step_s, 1e3, "ms per engine step"),
        (sim_timing.FRONTEND_PER_REQUEST_S, 1e3, "ms per request")) if value)
    costs += f"; streaming measured on vLLM {release}"
    near = [c for c, x in loads if x >= API_SERVER_NEAR_LIMIT]
    tail = (f"; near one process's limit: {', '.join(near)} (vLLM's --api-server-count N in serve_args runs N "
            f"API-server processes, each taking 1/N of the work)" if near else "")
    return (f"API server (per process), seconds of work per second at the planned load (computed: {costs}): "
            + ", ".join(f"{c} {x:.2f}" for c, x in loads) + tail)


def savings_table(result: dict) -> Table:
    t = Table(title=f"Savings against {result['baseline']} (share of each factor: changed one at a time, averaged "
                    "over the orders of change)")
    for c in ("config", "GPUs saved", "HBM GiB saved", "$ / day saved", *(f"{n}\nshare of HBM saved" for n in FACTOR_NAMES.values())):
        t.add_column(c, justify="left" if c == "config" else "right")
    for row in result["configs"]:
        s = row.get("savings")
        if not s or row["config"] == result["baseline"]:
            continue
        hbm = s["hbm_total_gib"]
        shares = hbm.get("by_factor_pct")
        share_cells = [("—" if not shares or k not in shares or shares[k] is None else f"{shares[k]:.0f} %")
                       for k in FACTOR_NAMES]
        if shares is None and s["factors_changed"] and hbm.get("by_factor") is None:
            share_cells = ["n/a (a config between them misses the SLO)"] + [""] * (len(FACTOR_NAMES) - 1)
        usd = s.get("usd_per_day")
        t.add_row(row["config"], f"{s['gpus']['saved']:,.0f} ({s['gpus']['saved_pct']:.0f} %)",
                  f"{hbm['saved']:,.0f} ({hbm['saved_pct']:.0f} %)",
                  "—" if usd is None else f"{usd['saved']:,.0f} ({usd['saved_pct']:.0f} %)", *share_cells)
    return t


def rebound_table(result: dict) -> Table:
    reb = result["rebound"]
    today = reb["today"]
    t = Table(title=f"Rebound: HBM demand against today's ({today['config']}: {today['gpus']:,} GPUs, "
                    f"{today['hbm_gib']:,.0f} GiB) when the cost per call falls X % and calls grow K-fold")
    t.add_column("cost per call", justify="left")
    for k in reb["volume_x"]:
        t.add_column(f"K = {k:g}x calls", justify="right")
    t.add_column("break-even K", justify="right")
    by = {(c["cost_drop_pct"], c["volume_x"]): c for c in reb["grid"]}
    for x in reb["cost_drops_pct"]:
        cells = [by[(x, k)] for k in reb["volume_x"]]
        t.add_row(f"-{x:g} %", *(f"{c['hbm_vs_today']:.2f}x ({c['gpus']:,})" for c in cells), f"{1 / (1 - x / 100):.2f}x")
    for row in reb["configs"]:
        be = row["break_even_volume_x"]
        t.add_row(f"{row['config']}: {-row['cost_drop_pct']:+.0f} %",
                  *(f"{c['hbm_vs_today']:.2f}x ({c['gpus']:,})" for c in row["cells"]),
                  "—" if be is None or be < 0 else f"{be:.2f}x")
    return t


def print_plan(result: dict) -> None:
    console = _console()
    console.print(fleet_table(result))
    for line in timing_lines(result):
        console.print(f"[dim]{line}[/dim]")
    api = api_server_line(result)
    if api:
        near = any(x >= API_SERVER_NEAR_LIMIT for _, x in api_server_loads(result))
        console.print(f"[yellow]{api}[/yellow]" if near else f"[dim]{api}[/dim]")
    console.print(savings_table(result))
    console.print(rebound_table(result))
    console.print("[dim]Cells: HBM demand (weights + KV pool) against today's, and GPUs. Rows 'config: -X %' are the "
                  "planned configs at their own cost per call against the baseline.[/dim]")
    for row in result["configs"]:
        if row.get("refusal"):
            near = f" Nearest config that works: {row['nearest']}." if row.get("nearest") else ""
            console.print(f"[yellow]{row['config']}: not planned: {row['refusal']}.{near}[/yellow]")
    run = result["run"]
    console.print(f"[dim]{result['provenance']}. {run['probes']} probes ({run['probes_cached']} cached, "
                  f"{run['simulated_cpu_s']:.0f} CPU s simulated), {run['wall_s']:.0f} s. Per-config searches and "
                  f"the reproducing `kvlab sim run` commands: --json or {result['out_dir']}/plan.json.[/dim]")
    console.print(f"rebound plot: {result['rebound']['plot']}")
    console.print(f"plan: {result['out_dir']}/plan.json")
