"""`kvlab plan`: GPUs, HBM and dollars for a fleet of agents, per model x quantization."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import typer

from kvlab.clikit import emit_json
from kvlab.errors import KvlabError
from kvlab.models.budget import DEFAULT_VLLM_VERSION
from kvlab.sim.timing import VLLM_VERSION_HELP


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KvlabError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise KvlabError(f"{flag} is empty")
    return values


def _names(text: str, flag: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise KvlabError(f"{flag} is empty")
    return list(dict.fromkeys(names))


def parse_slo(text: str | None) -> dict[str, float | None]:
    """--slo ttft_s=2,itl_p95_s=0.1,e2e_s=off -> {"ttft_s": 2.0, "itl_p95_s": 0.1, "e2e_s": None}."""
    if not text:
        return {}
    out: dict[str, float | None] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise KvlabError(f"--slo: {part!r} is not THRESHOLD=VALUE (e.g. ttft_s=2,itl_p95_s=0.1)")
        if value.lower() in ("off", "none"):
            out[key] = None
            continue
        try:
            out[key] = float(value)
        except ValueError:
            raise KvlabError(f"--slo: {key}={value!r} is not a number (or off)") from None
        if out[key] <= 0:
            raise KvlabError(f"--slo: {key} must be positive, got {value}")
    return out


def run_plan(req, as_json: bool = False) -> dict:
    """Plan (plan.json goes next to rebound.png) and print the tables (or the JSON); on a terminal
    with live progress: searches done / planned, and per config its probes so far and the last one."""
    from kvlab.clikit import progress_shown
    from kvlab.plan.planner import plan

    result = _plan_showing_progress(req) if progress_shown(as_json) else plan(req)
    if as_json:
        emit_json(result)
        return result
    from kvlab.plan.tables import print_plan

    print_plan(result)
    return result


def _plan_showing_progress(req) -> dict:
    from rich.markup import escape

    from kvlab.clikit import live_progress
    from kvlab.plan.planner import plan

    with live_progress(bar=True, transient=False) as progress:
        tasks: dict[str, Any] = {}

        def on_event(kind: str, data: dict) -> None:
            if kind == "searches":
                tasks[""] = progress.add_task("plan: config searches done", total=len(data["configs"]))
                for label in data["configs"]:  # probes per search: as many as the bracket needs (total unknown)
                    tasks[label] = progress.add_task(f"  {label} probes (waiting for a worker)", total=None)
            elif kind == "probe":
                label, line, probe = data["config"], data["line"], data["probe"]
                task = tasks[label]
                progress.advance(task)
                last = f"{probe.users} sessions, {probe.stage}: {'pass' if probe.passed else 'miss'}"
                progress.update(task, description=f"  {label} probes (last: {last})")
                if req.verbose:
                    progress.console.print(escape(line), soft_wrap=True, highlight=False)
            elif kind == "search_done":
                progress.advance(tasks[""])
                what = {"ok": f"{data['users']:,} sessions per replica", "at_cap": f"at the cap, {data['users']:,} sessions",
                        "slo_unmet": "one session already misses the SLO"}.get(data["status"], data["status"])
                progress.update(tasks[data["config"]], total=data["probes"], completed=data["probes"],
                                description=f"  {data['config']} probes (done: {what})")
                # drawn now, not at the next timed refresh: searches that end within one refresh
                # interval of each other would otherwise skip a count (1/2 straight to 2/2)
                progress.refresh()

        return plan(req, on_event)


def register(app: typer.Typer, load_spec: Callable[[str], Any]) -> None:
    """`kvlab plan`. `load_spec` reads `--spec` (kvlab.experiments.spec.load_spec: the app passes it in,
    so that kvlab.plan imports nothing from the experiments stage, which plans after its cells)."""

    @app.command("plan")
    def plan_cmd(
        workload: Optional[str] = typer.Option(None, "--workload", help="Agent workload: a profile in loadtest/ or a YAML path (default: agent, as for kvlab load and kvlab sim run; with --spec: its first workload)"),
        agents: Optional[int] = typer.Option(None, "--agents", help="Agents in the fleet (with --spec: its plan.agents)"),
        gpu: Optional[str] = typer.Option(None, "--gpu", help="GPU preset (kvlab gpus; with --spec: its gpu)"),
        models: Optional[str] = typer.Option(None, "--models", help="Comma-separated model cards (with --spec: its models)"),
        quants: Optional[str] = typer.Option(None, "--quants", help="Comma-separated serve-profile levels: bf16, fp8, fp8-kv, fp8+fp8-kv, awq, gptq, gptq-int8 (default bf16; with --spec: its quants)"),
        spec_path: Optional[str] = typer.Option(None, "--spec", help="Plan the configs of an experiment spec (its models, quants, first workload, gpu, slo, price, seed and plan: block); flags override it; the plan goes to results/<spec name>/plan, where `kvlab report` finds it"),
        calls_per_agent_hour: Optional[float] = typer.Option(None, "--calls-per-agent-hour", help="Calls each agent makes per hour (default: as many as one busy session of the baseline config at the SLO)"),
        slo: Optional[str] = typer.Option(None, "--slo", help="Thresholds over the workload's slo: ttft_s=2,itl_p95_s=0.1,tpot_s=..,e2e_s=.. (off disables one)"),
        slo_attainment: Optional[float] = typer.Option(None, "--slo-attainment", help="Share of requests that must meet the SLO (default 0.95)"),
        gpu_price: Optional[float] = typer.Option(None, "--gpu-price", help="$ per GPU-hour (no $ figures without it)"),
        baseline: Optional[str] = typer.Option(None, "--baseline", help="MODEL/QUANT the savings are against (default: the first GQA model at its first level)"),
        tp: Optional[int] = typer.Option(None, "--tensor-parallel-size", "-tp", help="GPUs per replica (default 1)"),
        max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="Default: the workload's longest session, rounded up to 4,096 tokens"),
        sim_s: Optional[float] = typer.Option(None, "--sim-s", help="Simulated seconds per probe (default 180; the first third warms up; coarse probes run half)"),
        tolerance: float = typer.Option(0.03, "--tolerance", help="Relative width at which the search for sessions per replica stops"),
        seed: Optional[int] = typer.Option(None, "--seed", help="Workload seed (default 0)"),
        cost_drop: Optional[str] = typer.Option(None, "--cost-drop", help="Rebound: cost per call falls by these % (default 25,50,75,90)"),
        volume_growth: Optional[str] = typer.Option(None, "--volume-growth", help="Rebound: call volume grows by these factors (default 1,2,5,10,20)"),
        workers: int = typer.Option(0, "--workers", help="Processes for the searches (default: one per CPU core)"),
        no_cache: bool = typer.Option(False, "--no-cache", help="Simulate every probe again (default: reuse $KVLAB_CACHE/plan)"),
        out: Optional[Path] = typer.Option(None, "--out", help="Folder for plan.json and rebound.png (default results/plan-<time>; with --spec results/<spec name>/plan)"),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
        vllm_version: Optional[str] = typer.Option(None, "--vllm-version", help=f"{VLLM_VERSION_HELP}; default "
                                                   f"{DEFAULT_VLLM_VERSION}"),
    ) -> None:
        """How many GPUs, and how much HBM, N agents need per model x quantization within the SLO, what
        MLA, KV-cache and weight quantization save, and whether a rebound in calls eats the saving.
        Sessions per GPU come from searches on the simulator (kvlab sim, offline)."""
        from kvlab.plan.request import PlanRequest, request_from_spec

        given = {
            "workload": workload, "agents": agents, "gpu": gpu,
            "models": _names(models, "--models") if models is not None else None,
            "quants": _names(quants, "--quants") if quants is not None else None,
            "calls_per_agent_hour": calls_per_agent_hour, "slo": parse_slo(slo) or None,
            "slo_attainment": slo_attainment, "gpu_price_per_hour": gpu_price, "baseline": baseline,
            "tensor_parallel_size": tp, "max_model_len": max_model_len, "sim_s": sim_s, "seed": seed,
            "cost_drop_pct": _floats(cost_drop, "--cost-drop") if cost_drop is not None else None,
            "volume_growth": _floats(volume_growth, "--volume-growth") if volume_growth is not None else None,
            "out": out, "vllm_version": vllm_version,
        }
        given = {k: v for k, v in given.items() if v is not None}
        given.update(tolerance=tolerance, workers=workers, use_cache=not no_cache)
        if spec_path is not None:
            spec = load_spec(spec_path)
            req = request_from_spec(spec, given.pop("out", Path("results") / spec.name / "plan"), **given)
        else:
            given.setdefault("workload", "agent")  # as kvlab load and kvlab sim run
            missing = [flag for flag, key in (("--agents", "agents"), ("--gpu", "gpu"),
                                              ("--models", "models")) if key not in given]
            if missing:
                raise KvlabError(f"kvlab plan needs {', '.join(missing)} (or --spec SPEC with a plan: block)")
            req = PlanRequest(**given)
        run_plan(req, as_json)
