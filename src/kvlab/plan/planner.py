"""The fleet planner: for each model x quantization, the GPUs and HBM N agents need within an SLO.

    plan(PlanRequest(workload="agent", agents=10_000, gpu="h100",
                     models=["deepseek-v2-lite", "llama-3.1-8b"], quants=["bf16", "fp8-kv"]))

1. Every config resolves to the simulated engine as `kvlab serve --engine sim` would start it; one
   the GPU cannot start (weights, or one request of the workload's longest context, do not fit) is
   reported with the nearest config that can.
2. Sessions per replica within the SLO come from searches on the simulator's offline mode
   (`kvlab.plan.search`), one process per config, probes cached on disk.
   Each config says what priced its simulated steps (`timing_source`: measured kernel tables or the
   roofline, `kvlab.sim.timing.step_timing`) and its chosen probe's steps per provenance.
3. Fleet figures (`kvlab.plan.fleet`), savings against the baseline with each factor's share
   (the configs between baseline and config, one factor changed at a time, are planned as well),
   and the rebound scenario (`kvlab.plan.rebound`).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import combinations
from math import ceil
from pathlib import Path
from typing import Callable

from kvlab.errors import KvlabError
from kvlab.io import finite  # finite: a margin with failed requests is null in JSON
from kvlab.loadtest.workload import Workload, load_workload, resolve_profile
from kvlab.models.cards import resolve_model
from kvlab.plan import fleet
from kvlab.plan.configs import PlanConfig, nearest_working, resolve_config, with_factors
from kvlab.plan.probe import host_source, run_probe, timing_source
from kvlab.plan.request import PlanRequest, request_from_spec  # noqa: F401  (request_from_spec: kvlab experiment run's)
from kvlab.plan.rebound import plot, rebound
from kvlab.plan.search import ProbeLog, SearchResult, SearchSettings, search
from kvlab.schema.plan import PlanRecord
from kvlab.schema.slo import SLO

PROVENANCE = ("sessions per GPU, calls and KV in use: simulated (kvlab sim, offline, virtual time; step times "
              "from each config's timing_source); weights and KV pool per GPU: predicted (kvlab memory model); "
              "GPUs, HBM and $: computed from those")


def _log(req: PlanRequest, msg: str) -> None:
    if req.verbose:
        print(msg, file=sys.stderr, flush=True)


def default_max_model_len(workload: Workload) -> int:
    """Room for the workload's longest session (plan tokens), in whole 4,096-token steps."""
    return ceil(workload.limits.max_context_tokens / 4096) * 4096


def slo_of(workload: Workload, overrides: dict[str, float | None]) -> SLO:
    unknown = set(overrides) - set(SLO.model_fields)
    if unknown:
        raise KvlabError(f"--slo: unknown threshold {sorted(unknown)[0]!r}; use {', '.join(SLO.model_fields)}")
    slo = SLO.model_validate({**workload.slo.model_dump(), **overrides})
    if all(v is None for v in slo.model_dump().values()):
        raise KvlabError("--slo: every threshold is off; set at least one (ttft_s, itl_p95_s, tpot_s, e2e_s)")
    return slo


# -- configs ---------------------------------------------------------------------------------------


@dataclass
class Planned:
    """One requested config: resolved, and either searched or refused with a reason."""

    model: str
    quant: str
    config: PlanConfig | None = None
    refusal: str | None = None
    nearest: str | None = None
    result: SearchResult | None = None

    @property
    def label(self) -> str:
        return self.config.label if self.config else f"{self.model}/{self.quant}"


def _resolve(req: PlanRequest, max_model_len: int) -> list[Planned]:
    from kvlab.deploy.profiles import model_profiles

    out = []
    for model in req.models:
        for quant in req.quants:
            p = Planned(model, quant)
            try:
                p.config = resolve_config(model, quant, req.gpu, req.tensor_parallel_size, max_model_len,
                                          tuple(req.serve_args), req.vllm_version)
                p.config.sim_config()
            except KvlabError as e:
                p.refusal = str(e)
                if p.config is not None:  # resolved, but vLLM would not start it on this GPU
                    levels = list(model_profiles(p.config.model).profiles)
                    near = nearest_working(p.config, levels)
                    p.nearest = f"{near[0].label} on {near[0].gpu} ({near[1]})" if near else None
                    p.refusal = (f"{req.gpu} cannot hold it with one session of the workload (up to "
                                 f"{max_model_len:,} tokens): {e}")
                    p.config = None
            out.append(p)
    return out


def _baseline(req: PlanRequest, planned: list[Planned]) -> Planned:
    ok = [p for p in planned if p.config is not None]
    if req.baseline:
        for p in planned:
            if req.baseline in (p.label, f"{p.model}/{p.quant}"):
                if p.config is None:
                    raise KvlabError(f"--baseline {req.baseline} cannot be planned: {p.refusal}")
                return p
        raise KvlabError(f"--baseline {req.baseline!r} is not one of the planned configs: "
                         f"{', '.join(p.label for p in planned)}")
    gqa = [p for p in ok if p.config.attention != "MLA"]
    return (gqa or ok)[0]


def _quant_names(req: PlanRequest, max_model_len: int) -> dict[tuple[str, str, str], str]:
    """(model, KV dtype, weights) -> the serve profile level with those flags, for every level of
    the planned models (the configs between baseline and config are named after them)."""
    from kvlab.deploy.profiles import model_profiles

    names: dict[tuple[str, str, str], str] = {}
    for model in req.models:
        try:
            levels = model_profiles(resolve_model(model).name).profiles
        except KvlabError:
            continue
        for level in levels:
            try:
                cfg = resolve_config(model, level, req.gpu, req.tensor_parallel_size, max_model_len,
                                     tuple(req.serve_args), req.vllm_version)
            except KvlabError:
                continue
            names.setdefault((cfg.model, cfg.kv_cache_dtype, cfg.weights), level)
    return names


def _corners(base: PlanConfig, target: PlanConfig, quant_names: dict) -> dict[frozenset, PlanConfig]:
    """The configs between baseline and target with any subset of the changed factors taken from the target."""
    b, t = base.factors, target.factors
    changed = fleet.changed_factors(b, t)
    out = {}
    for r in range(len(changed) + 1):
        for subset in combinations(changed, r):
            f = fleet.corner_factors(b, t, subset)
            if f == b:
                out[frozenset(subset)] = base
            elif f == t:
                out[frozenset(subset)] = target
            else:
                out[frozenset(subset)] = with_factors(base, f["model"], f["kv_cache_dtype"], f["weights"], quant_names)
    return out


def _key(cfg: PlanConfig) -> tuple:
    return (cfg.model, cfg.gpu, cfg.tp, cfg.simulated)


# -- searches --------------------------------------------------------------------------------------


# A search's probes go to `on_probe(config label, line, ProbeLog)`; in a worker process through this
# queue (given to each worker when the pool starts), to the parent that shows them.
_PROBE_QUEUE = None


def _set_probe_queue(queue) -> None:
    global _PROBE_QUEUE
    _PROBE_QUEUE = queue


def _search_job(args: tuple) -> SearchResult:
    cfg, workload, settings = args
    log = None
    if _PROBE_QUEUE is not None:
        log = lambda msg, entry: _PROBE_QUEUE.put((cfg.label, msg, entry))  # noqa: E731
    return search(cfg, workload, settings, log)


def _run_searches(configs: list[PlanConfig], workload: Workload, settings: SearchSettings, workers: int,
                  on_probe: Callable[[str, str, ProbeLog], None] | None = None,
                  on_done: Callable[[SearchResult], None] | None = None) -> dict:
    """One search per config (in a process pool where there are workers); on_probe(config label,
    line, probe) after each probe, on_done(result) after each search (else the lines go to stderr)."""
    from kvlab.plan.search import initial_guess

    # Longest first: the guess is a fair proxy of a search's cost.
    order = sorted(configs, key=lambda c: -initial_guess(c, workload, settings.seed))
    workers = min(workers or os.cpu_count() or 1, len(order))
    done = on_done or (lambda r: None)
    if workers <= 1:
        results = []
        for c in order:
            log = (lambda msg, entry, label=c.label: on_probe(label, msg, entry)) if on_probe else None
            results.append(search(c, workload, settings, log))
            done(results[-1])
    elif on_probe is None:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_search_job, [(c, workload, settings) for c in order]))
        for r in results:
            done(r)
    else:
        ctx = multiprocessing.get_context()
        queue = ctx.Queue()
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_set_probe_queue,
                                 initargs=(queue,)) as pool:
            futures = [pool.submit(_search_job, (c, workload, settings)) for c in order]
            pending = set(futures)
            while pending:
                _drain(queue, on_probe, wait_s=0.2)
                for f in [f for f in pending if f.done()]:
                    pending.discard(f)
                    _drain(queue, on_probe, wait_s=0)
                    if f.exception() is None:
                        done(f.result())
            results = [f.result() for f in futures]
        _drain(queue, on_probe, wait_s=0)  # the workers are gone: what their queue threads sent last
    return {_key(r.config): r for r in results}


def _drain(queue, on_probe: Callable[[str, str, ProbeLog], None], wait_s: float) -> None:
    """Every probe line the workers have queued (waiting up to wait_s for the first)."""
    import queue as queue_mod

    try:
        item = queue.get(timeout=wait_s) if wait_s > 0 else queue.get_nowait()
    except queue_mod.Empty:
        return
    while True:
        on_probe(*item)
        try:
            item = queue.get_nowait()
        except queue_mod.Empty:
            return


def _nearest_for_slo(cfg: PlanConfig, workload: Workload, settings: SearchSettings) -> str | None:
    """The first faster GPU preset, or -tp, on which one session of the config meets the SLO."""
    from dataclasses import replace

    from kvlab import hardware
    from kvlab.plan.configs import TP_SIZES

    here = hardware.gpu(cfg.gpu)
    faster = sorted((g for g in hardware.PRESETS if g.bandwidth_tb_s > here.bandwidth_tb_s), key=lambda g: g.bandwidth_tb_s)
    alternatives = [(replace(cfg, gpu=g.name), f"--gpu {g.name}") for g in faster]
    alternatives += [(cfg.at(tp=tp), f"-tp {tp}") for tp in TP_SIZES if tp > cfg.tp]
    for alt, change in alternatives:
        try:
            alt.sim_config()
        except KvlabError:
            continue
        probe, _, _ = run_probe(alt, workload, settings.seed, 1, settings.fine, settings.use_cache)
        if probe.judge(settings.slo, settings.attainment).passed:
            return f"{alt.label} on {alt.gpu} ({change})"
    return None


# -- the plan --------------------------------------------------------------------------------------


def plan(req: PlanRequest, on_event: Callable[[str, dict], None] | None = None) -> dict:
    """Plan the fleet; returns everything as plain data (what `kvlab plan --json` prints), the
    PlanRecord also written to `out/plan.json` beside `rebound.png`. on_event(kind, data), for
    progress: "searches" {configs: [labels]} before the searches, "probe" {config, line, probe: its ProbeLog} after each
    probe, "search_done" {config, status, users, probes} after each search (without it the probe
    lines go to stderr, where req.verbose)."""
    t0 = time.time()
    workload = load_workload(req.workload)
    slo = slo_of(workload, req.slo)
    mml = req.max_model_len or default_max_model_len(workload)
    settings = SearchSettings(slo, req.slo_attainment, req.sim_s, req.tolerance, req.seed, req.use_cache, req.verbose)

    planned = _resolve(req, mml)
    _refuse_if_none(planned, planned, "no config can be planned")
    base = _baseline(req, planned)
    names = _quant_names(req, mml)
    todo = _to_search(planned, base, names)
    _log(req, f"planning {len(todo)} config(s) ({len(todo) - len(_requested(planned))} of them to separate the "
              f"savings) with {req.workload}, SLO {slo.model_dump(exclude_none=True)} for {req.slo_attainment:.0%} of "
              f"requests; probes of {req.sim_s:g} simulated s")
    on_probe = on_done = None
    if on_event is not None:
        on_event("searches", {"configs": [c.label for c in todo.values()]})
        on_probe = lambda label, line, entry: on_event("probe", {"config": label, "line": line,  # noqa: E731
                                                                 "probe": entry})
        on_done = lambda r: on_event("search_done", {"config": r.config.label, "status": r.status,  # noqa: E731
                                                     "users": r.users, "probes": len(r.probes)})
    results = _run_searches(list(todo.values()), workload, settings, req.workers, on_probe, on_done)
    feasible = _judge_results(planned, results, workload, settings)
    _refuse_if_none(feasible, planned, "no config meets the SLO")
    if base not in feasible:
        _log(req, f"baseline {base.label} cannot be planned ({base.refusal}); using {feasible[0].label}")
        base = feasible[0]

    # Every config serves the same calls: by default, as many per agent as one baseline session makes.
    rate = req.calls_per_agent_hour or fleet.calls_per_session_hour(base.result)
    final_ctx = fleet.mean_final_context_tokens(workload, req.seed)
    figs = {k: fleet.fleet_figures(r, req.agents, rate, req.gpu_price_per_hour, final_ctx)
            for k, r in results.items() if r.status != "slo_unmet"}
    out_dir = Path(req.out) if req.out else Path("results") / f"plan-{time.strftime('%Y%m%d-%H%M%S')}"
    reb = rebound(base.label, figs[_key(base.config)], base.config.tp,
                  {p.label: (figs[_key(p.config)], p.config.tp) for p in feasible if p is not base},
                  req.cost_drop_pct, req.volume_growth)
    reb["plot"] = str(plot(reb, out_dir / "rebound.png"))
    probes = [lg for r in results.values() for lg in r.probes]
    result = finite({
        "provenance": PROVENANCE,
        "inputs": {"workload": {"name": workload.name, "source": str(resolve_profile(req.workload))},
                   "agents": req.agents, "calls_per_agent_hour": rate,
                   "calls_per_agent_hour_source": "given" if req.calls_per_agent_hour else
                   f"simulated: one session of the baseline ({base.label}) at its SLO load", "gpu": req.gpu,
                   "models": req.models, "quants": req.quants, "slo": slo.model_dump(), "slo_attainment": req.slo_attainment,
                   "gpu_price_per_hour": req.gpu_price_per_hour, "tensor_parallel_size": req.tensor_parallel_size,
                   "max_model_len": mml, "sim_s": req.sim_s, "warmup_s": settings.fine.warmup_s,
                   "tolerance": req.tolerance, "seed": req.seed, "serve_args": list(req.serve_args),
                   "vllm_version": req.vllm_version},
        "baseline": base.label,
        "configs": [_config_json(p, base, names, figs, req, feasible) for p in planned],
        "attribution_configs": [{"config": r.config.label, **_search_json(r, req), "figures": figs.get(k)}
                                for k, r in results.items() if k not in _requested(planned)],
        "rebound": reb,
        "out_dir": str(out_dir),
        "run": {"wall_s": time.time() - t0, "probes": len(probes), "probes_cached": sum(lg.cached for lg in probes),
                "simulated_cpu_s": sum(lg.cpu_s for lg in probes)},
    })
    record = PlanRecord.model_validate(result)
    record.write(out_dir / "plan.json")  # beside rebound.png
    return record.to_data()  # what --json prints is the file


def _requested(planned: list[Planned]) -> set[tuple]:
    return {_key(p.config) for p in planned if p.config is not None}


def _to_search(planned: list[Planned], base: Planned, names: dict) -> dict[tuple, PlanConfig]:
    """The requested configs and those between the baseline and each of them, once each."""
    todo: dict[tuple, PlanConfig] = {}
    for p in planned:
        if p.config is not None:
            todo.setdefault(_key(p.config), p.config)
    for p in planned:
        if p.config is not None:
            for cfg in _corners(base.config, p.config, names).values():
                todo.setdefault(_key(cfg), cfg)
    return todo


def _judge_results(planned: list[Planned], results: dict, workload: Workload, settings: SearchSettings) -> list[Planned]:
    """Attach each config's search; one that misses the SLO at one session says why. The plannable ones."""
    for p in planned:
        if p.config is None:
            continue
        p.result = results[_key(p.config)]
        if p.result.status == "slo_unmet":
            p.refusal = _unmet_reason(p.result, settings)
            p.nearest = _nearest_for_slo(p.config, workload, settings)
    return [p for p in planned if p.result is not None and p.result.status != "slo_unmet"]


def _refuse_if_none(ok: list[Planned], planned: list[Planned], what: str) -> None:
    if any(p.config is not None for p in ok):
        return
    raise KvlabError(f"{what}: " + "; ".join(
        f"{p.label}: {p.refusal}" + (f" (nearest that works: {p.nearest})" if p.nearest else "") for p in planned))


def _config_json(p: Planned, base: Planned, names: dict, figs: dict, req: PlanRequest, feasible: list[Planned]) -> dict:
    row = {"config": p.label, "model": p.model, "quant": p.quant, "refusal": p.refusal, "nearest": p.nearest}
    if p.config is not None:
        row.update({"gpu": p.config.gpu, "tp": p.config.tp, "attention": p.config.attention,
                    "kv_cache_dtype": p.config.kv_cache_dtype, "weights": p.config.weights,
                    "timing_source": timing_source(p.config), "host_source": host_source(p.config)})
    if p in feasible:
        row.update(_search_json(p.result, req))
        row["figures"] = figs[_key(p.config)]
        row["savings"] = _savings(base, p, _corners(base.config, p.config, names), figs)
    return row


def _unmet_reason(res: SearchResult, settings: SearchSettings) -> str:
    v = res.verdict
    reached = ", ".join(f"{k} {x:.3g}" for k, x in v.reached.items() if getattr(settings.slo, k) is not None)
    return (f"even one session misses the SLO ({v.attainment:.0%} of requests met it, {settings.attainment:.0%} "
            f"needed); at one session {settings.attainment:.0%} of requests stay within {reached}")


def _search_json(res: SearchResult, req: PlanRequest) -> dict:
    cfg = res.config
    argv = ["kvlab", "sim", "run", cfg.model, "--gpu", cfg.gpu, "--workload", req.workload, "--users",
            str(max(res.users, 1)), "--duration-s", f"{req.sim_s:g}", "--seed", str(req.seed), *cfg.sim_run_flags()]
    steps = res.probe.meta.get("timing_provenance") if res.probe is not None else None
    return {"timing_source": timing_source(cfg), "timing_provenance": steps,
            "search": {"status": res.status, "sessions_per_replica": res.users, "missed_at": res.fail_users,
                       "attainment": res.verdict.attainment if res.verdict else None,
                       "probes": [vars(lg) for lg in res.probes], "simulated_cpu_s": res.cpu_s,
                       "reproduce": " ".join(argv)}}


def _savings(base: Planned, p: Planned, corners: dict[frozenset, PlanConfig], figs: dict) -> dict:
    factors = fleet.changed_factors(base.config.factors, p.config.factors)
    corner_figs = {}
    for subset, cfg in corners.items():
        fig = figs.get(_key(cfg))
        if fig is None:  # a config between them misses the SLO: no attribution
            corner_figs = None
            break
        corner_figs[subset] = fig
    out = fleet.savings(figs[_key(base.config)], figs[_key(p.config)], corner_figs, factors)
    out["factors_changed"] = factors
    out["via"] = {"+".join(sorted(k)) or "baseline": cfg.label for k, cfg in corners.items()}
    return out
