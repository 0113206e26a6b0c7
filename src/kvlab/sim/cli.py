"""`kvlab sim serve`: a simulated vLLM server. (`kvlab sim run`, the offline replay, is `kvlab.replay.cli`.)"""

from __future__ import annotations

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
    from kvlab.sim.config import build_config
    from kvlab.sim.server import serve

    args = parse_serve_args(list(ctx.args), os.environ.get(faults.FAULT_ENV))
    cfg = build_config(args.config, args.gpu, enable_prefix_caching=args.enable_prefix_caching,
                       enable_chunked_prefill=args.enable_chunked_prefill, timing=args.timing,
                       vllm_version=args.vllm_version, scheduler_reserve_full_isl=args.scheduler_reserve_full_isl,
                       async_scheduling=args.async_scheduling, sampler=args.sampler)
    fail = next((f for f in args.faults if f.kind == "fail-start"), None)
    logs.startup_lines(cfg, args.non_default, args.not_simulated, faults=args.faults, stop_before_kv=fail is not None)
    if fail is not None:
        faults.fail_start(fail, cfg)
    try:
        asyncio.run(serve(cfg, args))
    except OSError as e:
        raise KvlabError(f"[Errno {e.errno}] error while attempting to bind on address "
                         f"('{args.host}', {args.port}): {e.strerror.lower() if e.strerror else e}") from None


def register(app: typer.Typer) -> None:
    app.add_typer(sim_app, name="sim")
