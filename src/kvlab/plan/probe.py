"""One probe: a config serving N closed-loop agent sessions on the simulator, judged against an SLO.

A probe is `kvlab.replay.run.run_offline(model, gpu, workload, sim_s, concurrency=N, seed=seed)`,
the same run as `kvlab sim run MODEL --gpu G --workload W --users N --duration-s S --seed s`. Its
first `warmup_s` simulated seconds fill the KV cache and mix the sessions' phases; requests sent
after that are judged. Probes are cached on disk by everything they depend on (the simulator's
replay's and memory model's source and the step-time source included), so rerunning a plan, or changing only its SLO, costs nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from math import ceil
from pathlib import Path

import numpy as np

from kvlab.io import write_bytes_atomic
from kvlab.loadtest.workload import Workload
from kvlab.plan.configs import PlanConfig
from kvlab.schema.slo import SLO

OK, ERROR, INCOMPLETE = 0, 1, 2
SCRAPE_INTERVAL_S = 2.0
# SLO thresholds (kvlab.schema.slo.SLO fields) and the per-request figure each bounds.
THRESHOLDS = ("ttft_s", "itl_p95_s", "tpot_s", "e2e_s")


@dataclass(frozen=True)
class Window:
    sim_s: float  # simulated seconds the probe runs
    warmup_s: float  # requests sent before this are not judged


@dataclass(frozen=True)
class Verdict:
    users: int
    judged: int  # requests sent in the window whose outcome is known
    met: int
    attainment: float  # met / judged
    margin: float  # the attainment target's quantile of each request's worst threshold ratio: <= 1 meets
    passed: bool
    reached: dict[str, float]  # per threshold: the value that the target share of requests stays within


class Probe:
    """The per-request outcomes and KV-cache samples of one simulated run."""

    def __init__(self, users: int, window: Window, arrays: dict[str, np.ndarray], meta: dict):
        self.users, self.window, self.a, self.meta = users, window, arrays, meta

    # -- judging

    def _in_window(self) -> np.ndarray:
        s = self.a["start_s"]
        return (s >= self.window.warmup_s) & (s < self.window.sim_s)

    def _ratios(self, slo: SLO) -> np.ndarray:
        """Each judged request's worst value/threshold ratio (inf for errors); NaN where not judged."""
        a, sel = self.a, self._in_window()
        state = a["state"][sel]
        elapsed = self.window.sim_s - a["start_s"][sel]
        values = {"ttft_s": a["ttft_s"][sel], "itl_p95_s": a["itl_p95_s"][sel], "tpot_s": a["tpot_s"][sel],
                  "e2e_s": a["e2e_s"][sel]}
        worst = np.zeros(len(state))
        for name in THRESHOLDS:
            bound = getattr(slo, name)
            if bound is None:
                continue
            v = values[name].copy()
            if name == "ttft_s":  # no first token yet: at least the time it has waited so far
                v = np.where(np.isnan(v) & (state == INCOMPLETE), elapsed, v)
            elif name == "e2e_s":
                v = np.where(state == INCOMPLETE, elapsed, v)
            worst = np.fmax(worst, np.nan_to_num(v, nan=0.0) / bound)
        worst[state == ERROR] = np.inf
        worst[(state == INCOMPLETE) & (worst <= 1.0)] = np.nan  # not over any bound yet: outcome unknown
        return worst

    def judge(self, slo: SLO, target: float) -> Verdict:
        r = self._ratios(slo)
        judged = r[~np.isnan(r)]
        n = len(judged)
        met = int(np.count_nonzero(judged <= 1.0))
        if n == 0:
            return Verdict(self.users, 0, 0, 0.0, float("inf"), False, {})
        k = max(1, ceil(target * n))
        margin = float(np.sort(judged)[k - 1])  # attainment >= target  <=>  the k-th smallest ratio <= 1
        return Verdict(self.users, n, met, met / n, margin, margin <= 1.0, self._reached(target))

    def _reached(self, target: float) -> dict[str, float]:
        """The target quantile of each figure over the window's finished and failed requests."""
        a, sel = self.a, self._in_window()
        done = sel & (a["state"] != INCOMPLETE)
        out = {}
        for name in THRESHOLDS:
            if np.isnan(a[name][done]).all():
                continue  # a figure these requests do not have (e.g. TPOT of one-token replies)
            v = np.where(a["state"][done] == ERROR, np.inf, np.nan_to_num(a[name][done], nan=0.0))
            if len(v):
                k = max(1, ceil(target * len(v)))
                out[name] = float(np.sort(v)[k - 1])
        return out

    # -- throughput and KV figures over the window

    def figures(self) -> dict:
        a, w = self.a, self.window
        span = w.sim_s - w.warmup_s
        end = a["start_s"] + a["e2e_s"]
        done = (a["state"] == OK) & (end >= w.warmup_s) & (end <= w.sim_s)
        ts, usage = a["kv_ts"], a["kv_usage"]
        in_w = (ts >= w.warmup_s) & (ts <= w.sim_s)
        usage_mean = float(usage[in_w].mean()) if in_w.any() else 0.0
        pre_ts, pre = a["preempt_ts"], a["preemptions"]
        preempted = float(np.interp(w.sim_s, pre_ts, pre) - np.interp(w.warmup_s, pre_ts, pre)) if len(pre) else 0.0
        kv_pool = self.meta["usable_blocks"] * self.meta["bytes_per_block"]
        calls = int(done.sum())
        ok = a["state"] == OK
        prompt, output = float(a["prompt_tokens"][done].sum()), float(a["completion_tokens"][done].sum())
        return {
            "requests_completed": int(ok.sum()),  # the whole run, as `kvlab sim run` counts them
            "output_tokens": int(a["completion_tokens"][ok].sum()),
            "calls_per_s": calls / span,
            "prompt_tokens_per_s": prompt / span,
            "output_tokens_per_s": output / span,
            "cached_tokens_per_s": float(a["cached_tokens"][done].sum()) / span,
            "calls_in_window": calls,
            "kv_usage_mean": usage_mean,
            "kv_usage_max": float(usage[in_w].max()) if in_w.any() else 0.0,
            "kv_in_use_bytes_mean": usage_mean * kv_pool,
            "running_mean": float(a["running"][in_w].mean()) if in_w.any() else 0.0,
            "preemptions": preempted,
            "ttft_p50_s": _pct(a["ttft_s"][done], 50), "ttft_p95_s": _pct(a["ttft_s"][done], 95),
            "itl_p95_p50_s": _pct(a["itl_p95_s"][done], 50), "tpot_p50_s": _pct(a["tpot_s"][done], 50),
            "api_server_load": self.api_server_load(calls, prompt, output, span),
        }

    def api_server_load(self, calls: int, prompt_tokens: float, output_tokens: float, span_s: float) -> float | None:
        """Seconds of one simulated API-server process's work per second of the window: the window's
        calls, their prompt tokens and streamed outputs (one per output token) at the front end's
        per-unit costs as one of `--api-server-count` processes takes them (SimConfig.frontend_costs),
        and its per-step cost over the run's average step rate; above 1, it cannot keep up. None for a
        probe cached without the costs."""
        fe = self.meta.get("frontend")
        if not fe:
            return None
        per_request, per_prompt_token, per_output, per_step = fe
        steps = self.meta["engine_steps"] * span_s / self.window.sim_s
        return (calls * per_request + prompt_tokens * per_prompt_token + output_tokens * per_output
                + steps * per_step) / span_s


def _pct(v: np.ndarray, q: float) -> float | None:
    v = v[~np.isnan(v)]
    return float(np.percentile(v, q)) if len(v) else None


# -- running and caching -------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("KVLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvlab")
    return Path(base) / "plan"


def digest_files() -> list[Path]:
    """What a probe's outcome rests on besides its key's own fields: the simulator, offline replay,
    memory model, GPU presets and workload model's sources, and the kernel data the simulator prices
    steps from (kvlab/data/kernels: kvlab's own measurements beside aiconfigurator's tables)."""
    root = Path(__file__).resolve().parents[1]
    return sorted([*root.glob("sim/*.py"), *root.glob("replay/*.py"), *root.glob("models/*.py"),
                   *root.glob("models/cards/*.yaml"), *root.glob("data/kernels/*"), root / "hardware.py",
                   root / "units.py", root / "loadtest/workload.py", root / "loadtest/dists.py", root / "loadtest/plan.py"])


@lru_cache(maxsize=1)
def code_digest() -> str:
    """The digest of `digest_files`: a change in any of them invalidates probes."""
    h = hashlib.sha256()
    for f in digest_files():
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=256)
def _sources(cfg: PlanConfig) -> tuple[str, str]:
    """(timing_source, host_source) of the config's simulated engine, built once for both."""
    sim = cfg.sim_config()
    return sim.cost.timing_source, sim.host_source()


def timing_source(cfg: PlanConfig) -> str:
    """What prices the config's simulated steps (kvlab.sim.timing.step_timing's label: the kernel
    tables' package and version, or the roofline and why)."""
    return _sources(cfg)[0]


def host_source(cfg: PlanConfig) -> str:
    """What prices the config's simulated time outside the steps (SimConfig.host_source)."""
    return _sources(cfg)[1]


def probe_key(cfg: PlanConfig, workload: Workload, seed: int, users: int, window: Window) -> str:
    ident = {"code": code_digest(), "model": cfg.model, "gpu": cfg.gpu, "serve": cfg.simulated,
             "timing": timing_source(cfg), "host": host_source(cfg),
             "workload": workload.model_dump(mode="json"), "seed": seed, "users": users,
             "sim_s": float(window.sim_s), "scrape_s": SCRAPE_INTERVAL_S}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:24]


def run_probe(cfg: PlanConfig, workload: Workload, seed: int, users: int, window: Window,
              use_cache: bool = True) -> tuple[Probe, bool, float]:
    """(the probe, whether it came from the cache, CPU seconds it took to simulate)."""
    path = cache_dir() / f"{probe_key(cfg, workload, seed, users, window)}.npz"
    if use_cache and path.is_file():
        try:
            return _load(path, users, window), True, 0.0
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry is simulated again
    from kvlab.replay.run import run_offline
    from kvlab.replay.sessions import closed_loop

    cpu0 = time.process_time()
    sim_cfg = cfg.sim_config()
    sessions = closed_loop(workload, seed, users, plans=workload_plans(workload, seed))
    res = run_offline(cfg.model, cfg.gpu, sessions, window.sim_s, concurrency=users, config=sim_cfg,
                      scrape_interval_s=SCRAPE_INTERVAL_S,
                      chat=workload.request.chat)  # as `kvlab sim run` sends them
    arrays, meta = _arrays(res.records, res.samples), probe_meta(sim_cfg, res.results)
    cpu_s = time.process_time() - cpu0
    if use_cache:
        _save(path, arrays, meta)
    return Probe(users, window, arrays, meta), False, cpu_s


def probe_meta(sim_cfg, results) -> dict:
    """What `Probe.figures` reads beside the arrays: the KV pool, the run's steps and timing, and the
    front end's per-unit costs (`sim_cfg`: the SimConfig run; `results`: its SimRunResults)."""
    return {"usable_blocks": sim_cfg.num_blocks - 1, "bytes_per_block": sim_cfg.capacity.bytes_per_block,
            "engine_steps": results.engine_steps, "timing_source": results.timing_source,
            "timing_provenance": results.timing_provenance,
            "frontend": list(sim_cfg.frontend_costs())}


class _PlanStream:
    """A workload's session stream, generated once per process and replayed by every probe."""

    def __init__(self, workload: Workload, seed: int):
        self._gen = workload.sessions(seed)
        self._plans: list = []

    def __iter__(self):
        i = 0
        while True:
            if i == len(self._plans):
                self._plans.append(next(self._gen))
            yield self._plans[i]
            i += 1


_STREAMS: dict[tuple[str, int], _PlanStream] = {}


def workload_plans(workload: Workload, seed: int) -> _PlanStream:
    """The workload's sessions of `seed`, in order (memoized in this process)."""
    key = (workload.model_dump_json(), seed)
    if key not in _STREAMS:
        _STREAMS[key] = _PlanStream(workload, seed)
    return _STREAMS[key]


def _arrays(records: list[dict], samples: list[tuple]) -> dict[str, np.ndarray]:
    def col(key, default=np.nan):
        return np.array([default if r[key] is None else r[key] for r in records], dtype=float)

    state = np.array([OK if r["error_kind"] is None else INCOMPLETE if r["error_kind"] == "incomplete" else ERROR
                      for r in records], dtype=np.int8)
    itl95 = np.array([_p95(r["itl_s"]) if r["itl_s"] else np.nan for r in records], dtype=float)
    series: dict[str, list] = {"vllm:kv_cache_usage_perc": [], "vllm:num_requests_running": [],
                               "vllm:num_preemptions_total": []}
    for ts, _family, name, _labels, value in samples:
        if name in series:
            series[name].append((ts, value))
    kv = np.array(series["vllm:kv_cache_usage_perc"] or np.zeros((0, 2)), dtype=float).reshape(-1, 2)
    run = np.array(series["vllm:num_requests_running"] or np.zeros((0, 2)), dtype=float).reshape(-1, 2)
    pre = np.array(series["vllm:num_preemptions_total"] or np.zeros((0, 2)), dtype=float).reshape(-1, 2)
    return {"start_s": col("start_ts"), "ttft_s": col("ttft_s"), "itl_p95_s": itl95, "tpot_s": col("tpot_s"),
            "e2e_s": col("e2e_s"), "state": state, "prompt_tokens": col("prompt_tokens", 0),
            "completion_tokens": col("completion_tokens", 0), "cached_tokens": col("cached_tokens", 0),
            "kv_ts": kv[:, 0], "kv_usage": kv[:, 1], "running": run[:, 1], "preempt_ts": pre[:, 0],
            "preemptions": pre[:, 1]}


def _p95(values: list[float]) -> float:
    """numpy.percentile(values, 95) (linear, with numpy's interpolation formula), without numpy's
    per-call overhead: the p95 of one request's inter-token gaps, as kvlab.loadtest.slo takes it."""
    a = sorted(values)
    h = (len(a) - 1) * 0.95
    lo = int(h)
    if lo + 1 >= len(a):
        return float(a[-1])
    t, x, y = h - lo, a[lo], a[lo + 1]
    return y - (y - x) * (1 - t) if t >= 0.5 else x + (y - x) * t


def _save(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, meta=np.array(json.dumps(meta)), **arrays)
    write_bytes_atomic(path, buf.getvalue())


def _load(path: Path, users: int, window: Window) -> Probe:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "meta"}
        meta = json.loads(str(z["meta"]))
    return Probe(users, window, arrays, meta)
