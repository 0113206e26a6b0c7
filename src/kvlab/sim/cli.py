"""`kvlab sim serve`: a simulated vLLM server; `kvlab sim check-log`: the simulator against a real server's
own stats lines (`kvlab.sim.stepcheck`). (`kvlab sim run` and `sim bench`, in virtual time, are `kvlab.replay.cli`.)"""

from __future__ import annotations

import json

import typer

from kvlab.errors import KvlabError

sim_app = typer.Typer(help="The simulated vLLM: vLLM's API and metrics on GPUs you do not have.",
                      no_args_is_help=True)

_SERVE_HELP = ("Serve MODEL like `vllm serve`, simulated on --gpu (all vllm serve flags; --speedup X runs the "
               "clock X times faster; --timing auto|kernels|roofline picks the step-time backend; --fault SPEC injects a fault, a kvlab testing option). -h lists the flags.")


@sim_app.command("serve", help=_SERVE_HELP, add_help_option=False,
                 context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve_cmd(ctx: typer.Context) -> None:
    import asyncio
    import os

    from kvlab.sim import faults, logs
    from kvlab.sim.args import parse_serve_args
    from kvlab.sim.server import serve

    args = parse_serve_args(list(ctx.args), os.environ.get(faults.FAULT_ENV))
    cfg = _sim_config(args)
    fail = next((f for f in args.faults if f.kind == "fail-start"), None)
    logs.startup_lines(cfg, args.non_default, args.not_simulated, faults=args.faults, stop_before_kv=fail is not None)
    if fail is not None:
        faults.fail_start(fail, cfg)
    try:
        asyncio.run(serve(cfg, args))
    except OSError as e:
        raise KvlabError(f"[Errno {e.errno}] error while attempting to bind on address "
                         f"('{args.host}', {args.port}): {e.strerror.lower() if e.strerror else e}") from None


_CHECK_LOG_HELP = (
    "Check the simulator against a vLLM server's own log: LOG's periodic stats lines (generation throughput at "
    "the Running requests and KV cache usage they show), each decode-dominated 10 s interval priced by the "
    "simulated engine of MODEL on --gpu with the vllm serve flags the server ran with. The log's KV cache size, "
    "vLLM version and top-k/top-p sampler are used unless given. Usage: kvlab sim check-log LOG MODEL --gpu G, then vllm serve's "
    "flags; --since/--until \"MM-DD HH:MM:SS\" take the lines stamped in that window (one run of a server that "
    "served several); --json prints one JSON object. Measured (vLLM's lines) beside simulated, per line, and the share "
    "within ±25 %.")


@sim_app.command("check-log", help=_CHECK_LOG_HELP, add_help_option=False,
                 context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def check_log_cmd(ctx: typer.Context) -> None:
    argv = list(ctx.args)
    if argv and argv[0] in ("-h", "--help"):
        typer.echo(_CHECK_LOG_HELP)
        raise typer.Exit(0)
    as_json = "--json" in argv
    argv, window = _take_window([a for a in argv if a != "--json"])
    if len(argv) < 2:
        raise KvlabError("the following arguments are required: LOG MODEL (and --gpu G)")
    result = check_log(argv[0], argv[1:], window)
    if as_json:
        typer.echo(json.dumps(result.to_data(), indent=2))
    else:
        typer.echo(check_log_text(result))


def _take_window(argv: list[str]) -> tuple[list[str], tuple[str | None, str | None]]:
    """check-log's own --since/--until (the rest is kvlab sim serve's arguments), checked."""
    from kvlab.sim.stepcheck import log_stamp

    rest, bounds = [], {"--since": None, "--until": None}
    it = iter(argv)
    for a in it:
        name, eq, value = a.partition("=")
        if name in bounds:
            if not eq:
                value = next(it, None)
                if value is None:
                    raise KvlabError(f"{name} takes a time, MM-DD HH:MM:SS")
            bounds[name] = log_stamp(value, name)
        else:
            rest.append(a)
    return rest, (bounds["--since"], bounds["--until"])


def check_log(log: str, serve_argv: list[str], window: tuple[str | None, str | None] = (None, None)):
    """LOG's stats lines (those stamped within `window`, where it gives a bound) priced by the simulated
    engine `serve_argv` (kvlab sim serve's arguments) describes; the log's vLLM version and profiling sampler
    unless --vllm-version or --sampler is given."""
    from pathlib import Path

    from kvlab.sim import stepcheck
    from kvlab.sim.args import parse_serve_args

    try:
        server_log = stepcheck.read_log(Path(log).read_text(encoding="utf-8", errors="replace"), window=window)
    except OSError as e:
        raise KvlabError(f"{log}: cannot read ({e.strerror or e})") from None
    if not server_log.lines:
        if any(window):
            raise KvlabError(f"{log}: no V1 stats line stamped from {window[0] or 'the start'} to "
                             f"{window[1] or 'the end'}")
        raise KvlabError(f"{log}: " + ("its stats lines are a V0 engine's (Swapped/Pending): kvlab simulates V1"
                                       if server_log.v0 else
                                       "no vLLM stats line ('Engine 000: Avg prompt throughput: ...'; vLLM logs one every "
                                       "10 s unless --disable-log-stats)"))
    for flag, value in server_log.engine_args().items():  # what the log states, unless given
        option = "--" + flag.replace("_", "-")
        if not any(a == option or a.startswith(option + "=") for a in serve_argv):
            serve_argv = [*serve_argv, option, value]
    return stepcheck.check(server_log, _sim_config(parse_serve_args(serve_argv)), log)


def check_log_text(r) -> str:
    from kvlab.sim import stepcheck

    out = [f"{r.log}: {r.stats_lines} stats lines of vLLM (measured) against kvlab's simulated engine: {r.model} on "
           f"{r.gpu}, vLLM {r.vllm_version} (simulated; steps: {r.timing_source}; {r.host_source})",
           f"KV cache {r.kv_cache_tokens:,} tokens: {r.kv_cache_source}", ""]
    if r.lines:
        out += ["| time | running | waiting | KV usage | measured gen tok/s | simulated | error | context / request "
                "(computed) | simulated step | note |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        out += [f"| {c.stamp or '—'} | {c.running} | {c.waiting} | {100 * c.kv_cache_usage:.1f} % | "
                f"{c.measured_gen_tok_s:,.1f} | {c.simulated_gen_tok_s:,.1f} | {100 * c.error:+.1f} % | "
                f"{c.context_per_request:,} | {c.simulated_step_ms:.1f} ms | {c.note} |" for c in r.lines]
        out += ["", f"decode steps priced: {len(r.lines)}; {stepcheck.summary([c.error for c in r.lines])}"]
    else:
        out.append(f"no decode-dominated interval to price (at least {stepcheck.MIN_RUNNING} requests running and "
                   f"prompt throughput at most {stepcheck.DECODE_DOMINATED:.0%} of the generation throughput)")
    if r.unscored:
        out.append("not priced: " + "; ".join(f"{n} {why}" for why, n in sorted(r.unscored.items(), key=lambda x: -x[1])))
    return "\n".join(out)


def _sim_config(args):
    """The simulated engine `kvlab sim serve`'s arguments (a ServeArgs) describe."""
    from kvlab.sim.config import build_config

    return build_config(args.config, args.gpu, enable_prefix_caching=args.enable_prefix_caching,
                        enable_chunked_prefill=args.enable_chunked_prefill, timing=args.timing,
                        vllm_version=args.vllm_version, scheduler_reserve_full_isl=args.scheduler_reserve_full_isl,
                        async_scheduling=args.async_scheduling, sampler=args.sampler)


def register(app: typer.Typer) -> None:
    app.add_typer(sim_app, name="sim")
