"""A fleet of N agents on one config: GPUs, HBM, dollars, from the sessions one replica serves.

An agent runs closed-loop sessions of the workload (what one Locust user plays) and calls at
`calls_per_agent_hour`; the planner's default is the rate of one session of the baseline config at
its SLO load, so every config serves the same calls. A config whose sessions call more slowly
needs more concurrent sessions: N x rate / (calls one of its sessions makes per hour at the SLO).
A replica (one GPU, or `-tp` GPUs) serves the searched number of sessions within the SLO; a fleet
is whole replicas. Per GPU, vLLM holds the weights and its KV pool (the memory model's blocks);
the KV actually in use is the simulated mean over the probe's window.
"""

from __future__ import annotations

from itertools import combinations
from math import ceil, factorial

from kvlab.loadtest.workload import Workload
from kvlab.plan.search import SearchResult
from kvlab.units import GiB

SECONDS_PER_DAY = 86400
FACTOR_NAMES = {"model": "model (attention)", "kv_cache_dtype": "KV dtype", "weights": "weight quantization"}


def mean_final_context_tokens(workload: Workload, seed: int, n: int = 2000) -> float:
    """The workload's sessions' context at their last reply, averaged over its first n sessions."""
    from kvlab.plan.probe import workload_plans

    total = 0
    for i, plan in enumerate(workload_plans(workload, seed)):
        if i == n:
            break
        total += plan.context_tokens_at_end
    return total / n


def calls_per_session_hour(res: SearchResult) -> float:
    """Calls one session makes per hour at the searched load (simulated)."""
    return 3600 * res.probe.figures()["calls_per_s"] / res.users


def fleet_figures(res: SearchResult, agents: int, calls_per_agent_hour: float,
                  gpu_price_per_hour: float | None, final_context_tokens: float) -> dict:
    """Every figure of one config's fleet, with where each comes from."""
    cfg, c = res.config, res.users
    sim = cfg.sim_config()
    cap, gpu = sim.capacity, sim.gpu
    f = res.probe.figures()
    tp = cfg.tp
    per_session_hour = calls_per_session_hour(res)
    sessions = agents * calls_per_agent_hour / per_session_hour
    replicas = ceil(sessions / c - 1e-9)
    gpus = replicas * tp
    kv_pool_gpu = cap.num_blocks * cap.bytes_per_block  # what vLLM allocates per GPU
    kv_in_use_session = f["kv_in_use_bytes_mean"] * tp / c  # all ranks of the replica
    calls_per_day = sessions * per_session_hour * 24
    out_per_call = f["output_tokens_per_s"] / f["calls_per_s"]
    prompt_per_call = f["prompt_tokens_per_s"] / f["calls_per_s"]
    usd_day = gpus * gpu_price_per_hour * 24 if gpu_price_per_hour is not None else None
    out_tokens_day = calls_per_day * out_per_call
    all_tokens_day = calls_per_day * (out_per_call + prompt_per_call)
    return {
        "sessions_per_replica": c,
        "sessions_per_gpu": c / tp,
        "gpus_per_replica": tp,
        "calls_per_session_hour": per_session_hour,
        "concurrent_sessions": sessions,
        "replicas": replicas,
        "gpus": gpus,
        "gpu_demand": sessions / c * tp,  # before rounding up to whole replicas
        "gpu_seconds_per_call": gpus * SECONDS_PER_DAY / calls_per_day,
        "weights_gib_per_gpu": cap.weight_bytes_per_gpu / GiB,
        "kv_pool_gib_per_gpu": kv_pool_gpu / GiB,
        "hbm_per_gpu_gib": (cap.weight_bytes_per_gpu + kv_pool_gpu) / GiB,
        "hbm_weights_gib": gpus * cap.weight_bytes_per_gpu / GiB,
        "hbm_kv_gib": gpus * kv_pool_gpu / GiB,
        "hbm_total_gib": gpus * (cap.weight_bytes_per_gpu + kv_pool_gpu) / GiB,
        "hbm_provisioned_gib": gpus * gpu.memory_bytes / GiB,
        "kv_in_use_gib": sessions * kv_in_use_session / GiB,
        "kv_in_use_mib_per_session": kv_in_use_session / 2**20,
        "kv_final_context_mib_per_session": final_context_tokens * cap.kv_bytes_per_token_model / 2**20,
        "kv_bytes_per_token": cap.kv_bytes_per_token_model,
        "kv_cache_tokens_per_gpu": cap.kv_cache_tokens,
        "calls_per_day": calls_per_day,
        "output_tokens_per_day": out_tokens_day,
        "tokens_per_day": all_tokens_day,
        "prompt_tokens_cached_share": f["cached_tokens_per_s"] / f["prompt_tokens_per_s"] if f["prompt_tokens_per_s"] else None,
        "usd_per_day": usd_day,
        "usd_per_1m_output_tokens": usd_day / out_tokens_day * 1e6 if usd_day is not None else None,
        "usd_per_1m_tokens": usd_day / all_tokens_day * 1e6 if usd_day is not None else None,
        "usd_per_call": usd_day / calls_per_day if usd_day is not None else None,
        "probe": {**f, "attainment": res.verdict.attainment, "requests_judged": res.verdict.judged},
        "provenance": {
            "sessions_per_replica": "simulated (kvlab sim offline, largest load within the SLO)",
            "calls_per_session_hour": "simulated", "kv_in_use_gib": "simulated (mean vllm:kv_cache_usage_perc)",
            "weights_gib_per_gpu": "predicted (kvlab memory model)", "kv_pool_gib_per_gpu": "predicted (kvlab memory model)",
            "kv_final_context_mib_per_session": "computed (workload plans x KV bytes per token)",
            "gpus": "computed", "hbm_total_gib": "computed", "usd_per_day": "computed (--gpu-price)",
        },
    }


# -- savings against a baseline, one factor at a time ---------------------------------------------

SAVED_METRICS = ("gpus", "hbm_total_gib", "usd_per_day")


def changed_factors(base: dict[str, str], target: dict[str, str]) -> list[str]:
    return [k for k in FACTOR_NAMES if base[k] != target[k]]


def corner_factors(base: dict[str, str], target: dict[str, str], subset: tuple[str, ...]) -> dict[str, str]:
    """`base` with the factors in `subset` taken from `target`."""
    return {k: (target[k] if k in subset else base[k]) for k in FACTOR_NAMES}


def shapley(values: dict[frozenset, float], factors: list[str]) -> dict[str, float]:
    """Each factor's share of values[{}] - values[all]: its saving averaged over every order of
    changing the factors one at a time (the Shapley value; the shares add up to the saving)."""
    n = len(factors)
    out = {}
    for f in factors:
        others = [g for g in factors if g != f]
        share = 0.0
        for r in range(n):
            w = factorial(r) * factorial(n - r - 1) / factorial(n)
            for subset in combinations(others, r):
                s = frozenset(subset)
                share += w * (values[s] - values[s | {f}])
        out[f] = share
    return out


def savings(base_fig: dict, target_fig: dict, corner_figs: dict[frozenset, dict] | None, factors: list[str]) -> dict:
    """What the target saves against the baseline, and each factor's share (None where a config
    between them could not be planned)."""
    out = {}
    for m in SAVED_METRICS:
        b, t = base_fig[m], target_fig[m]
        if b is None or t is None:
            continue
        saved = b - t
        row = {"baseline": b, "config": t, "saved": saved, "saved_pct": 100 * saved / b if b else None}
        if corner_figs is not None and factors:
            shares = shapley({k: v[m] for k, v in corner_figs.items()}, factors)
            row["by_factor"] = shares
            row["by_factor_pct"] = {k: (100 * v / saved if saved else None) for k, v in shares.items()}
        out[m] = row
    return out
