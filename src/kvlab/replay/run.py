"""Play agent sessions on the simulated engine in virtual time, without HTTP.

`run_offline(model, gpu, sessions, duration_s, ...)` takes `SessionPlan`s (the token-level
workload contract of `kvlab.loadtest.plan`), or a workload (`kvlab.loadtest.workload.Workload`, a
profile name such as "agent", or a YAML path) whose seeded plans are the ones Locust plays, and
writes what a real run records:

- `requests.parquet`: one row per request: start_ts, session_id, app_id, turn, ttft_s, itl_s
  (list), tpot_s, e2e_s, prompt_tokens, completion_tokens, cached_tokens, num_preemptions,
  finish_reason, error_kind (None, "context_length", "max_tokens", "incomplete").
- `metrics.parquet`: the engine's /metrics every `scrape_interval_s` in the tidy form a scraper
  parses (ts, family, name, labels as JSON, value), `_created` series left out.
- `results.json`: the run's summary (throughput, latency percentiles, preemptions, cache hits), a
  `kvlab.schema.replay.SimRunResults` record (with the run's manifest where one is given).

Times are simulated seconds from the start of the run. How sessions are played (shared prefixes,
closed-loop users with `concurrency=N`, else open-loop arrivals of a workload's poisson shape):
`kvlab.replay.player` and `kvlab.replay.sessions`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kvlab.errors import KvlabError
from kvlab.io import atomic_path
from kvlab.loadtest.plan import SessionPlan
from kvlab.loadtest.workload import Workload, load_workload
from kvlab.replay.player import RECORD_COLUMNS, Player
from kvlab.replay.sessions import session_stream
from kvlab.schema.replay import SimRunManifest, SimRunResults
from kvlab.sim.config import SimConfig, build_config
from kvlab.sim.engine import Engine


@dataclass
class OfflineResult:
    config: SimConfig
    records: list[dict]
    samples: list[tuple[float, str, str, str, float]]
    results: SimRunResults
    engine: Engine = field(repr=False)
    out_dir: Path | None = None

    def requests_frame(self):
        import pandas as pd

        return pd.DataFrame(self.records, columns=list(RECORD_COLUMNS))

    def metrics_frame(self):
        import pandas as pd

        return pd.DataFrame(self.samples, columns=["ts", "family", "name", "labels", "value"])



def run_offline(
    model: str,
    gpu: str,
    sessions: Iterable[SessionPlan] | Workload | str | Path,
    duration_s: float,
    *,
    concurrency: int | None = None,
    seed: int = 0,
    spawn_rate: float | None = None,
    out_dir: str | Path | None = None,
    scrape_interval_s: float = 5.0,
    config: SimConfig | None = None,
    check_blocks: bool = False,
    fast_decode: bool = True,
    manifest: SimRunManifest | None = None,
    max_in_flight: int | None = None,
    max_requests: int | None = None,
    on_progress: Callable[[float, int], None] | None = None,
    chat: bool | None = None,
    **engine_args,
) -> OfflineResult:
    """Play `sessions` (SessionPlans, or a workload's stream of `seed`) for `duration_s` simulated
    seconds on MODEL served by the simulated vLLM on GPU preset `gpu`; `engine_args` are vLLM's
    flags as `build_config` keywords. Open loop (no `concurrency`): `max_in_flight` caps the sessions
    running at once (later arrivals wait for a slot); `max_requests` stops sending after that many.
    on_progress(simulated s, requests ended) is called as each request ends (for a progress line).
    `chat`: the requests go to /v1/chat/completions (a release that parses the chat template on each
    costs them that: kvlab.sim.engine); None: as the workload's endpoint says (SessionPlans: no)."""
    if duration_s <= 0:
        raise KvlabError(f"duration must be positive, got {duration_s}")
    if scrape_interval_s <= 0:
        raise KvlabError(f"--scrape-interval-s must be positive, got {scrape_interval_s}")
    if concurrency is not None and concurrency < 1:
        raise KvlabError(f"--users must be at least 1, got {concurrency}")
    if max_in_flight is not None and (concurrency is not None or max_in_flight < 1):
        raise KvlabError(f"max_in_flight caps open-loop arrivals and must be at least 1, got {max_in_flight}"
                         + (" with closed-loop users" if concurrency is not None else ""))
    if max_requests is not None and max_requests < 1:
        raise KvlabError(f"max_requests must be at least 1, got {max_requests}")
    if isinstance(sessions, (str, Path)):
        sessions = load_workload(sessions)
    if chat is None:
        chat = isinstance(sessions, Workload) and sessions.request.chat
    plans = session_stream(sessions, seed, concurrency, spawn_rate)
    cfg = config or build_config(model, gpu, **engine_args)
    cfg.cost.reset_counts()  # timing_provenance counts this run's steps only
    wall0 = time.perf_counter()
    player = Player(cfg, plans, duration_s, concurrency, scrape_interval_s, check_blocks, fast_decode,
                    max_in_flight=max_in_flight, max_requests=max_requests, chat=chat)
    player.on_progress = on_progress
    player.run()
    wall_s = time.perf_counter() - wall0
    results = SimRunResults.model_validate({**summarize(cfg, player, duration_s, wall_s, concurrency),
                                            "manifest": manifest})
    out = OfflineResult(cfg, player.records, player.samples, results, player.engine)
    if out_dir is not None:
        out.out_dir = write_run(out, Path(out_dir))
    return out


def _percentiles(values: list[float]) -> dict | None:
    import numpy as np

    if not values:
        return None
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def summarize(cfg: SimConfig, player: Player, duration_s: float, wall_s: float, concurrency: int | None) -> dict:
    """The run's figures, by SimRunResults' field names (run_offline validates them into that record)."""
    recs = player.records
    done = [r for r in recs if r["error_kind"] is None]
    errors: dict[str, int] = {}
    for r in recs:
        if r["error_kind"]:
            errors[r["error_kind"]] = errors.get(r["error_kind"], 0) + 1
    m = player.engine.metrics
    c = m.counters
    cap = cfg.capacity
    out_tokens = sum(r["completion_tokens"] for r in done)
    prompt_tokens = sum(r["prompt_tokens"] for r in done)
    return {
        "engine": "sim",
        "provenance": "simulated (kvlab memory model + step times from timing_source; virtual time)",
        "model": cfg.model,
        "gpu": cfg.gpu.name,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "enable_expert_parallel": cfg.expert_parallel,
        "kv_cache_dtype": cfg.kv_cache_dtype,
        "quantization": cap.quantization,
        "vllm_version": cfg.vllm_version,
        "sampler": cfg.sampler,
        "users": concurrency,
        "api_server_count": cfg.api_server_count,
        "duration_s": duration_s,
        "wall_s": wall_s,
        "engine_steps": player.engine.num_steps,
        "capacity": {"num_gpu_blocks": cap.num_blocks, "block_size": cap.block_size,
                     "kv_cache_tokens": cap.kv_cache_tokens, "max_concurrency": cap.max_concurrency,
                     "kv_bytes_per_token": cap.kv_bytes_per_token, "kv_budget_bytes": cap.kv_budget_bytes,
                     "max_model_len": cfg.max_model_len, "max_num_seqs": cfg.max_num_seqs,
                     "max_num_batched_tokens": cfg.max_num_batched_tokens},
        "requests_completed": len(done),
        "errors": errors,
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,
        "output_tokens_per_s": out_tokens / duration_s,
        "total_tokens_per_s": (out_tokens + prompt_tokens) / duration_s,
        "requests_per_s": len(done) / duration_s,
        "ttft_s": _percentiles([r["ttft_s"] for r in done]),
        "tpot_s": _percentiles([r["tpot_s"] for r in done if r["tpot_s"] is not None]),
        "e2e_s": _percentiles([r["e2e_s"] for r in done]),
        "num_preemptions": int(c["vllm:num_preemptions"]),
        "prefix_cache_queries": int(c["vllm:prefix_cache_queries"]),
        "prefix_cache_hits": int(c["vllm:prefix_cache_hits"]),
        "prefix_cache_hit_rate": c["vllm:prefix_cache_hits"] / c["vllm:prefix_cache_queries"]
        if c["vllm:prefix_cache_queries"] else 0.0,
        "kv_cache_usage_max": player.max_kv_usage,
        "timing_source": cfg.cost.timing_source,
        "host_source": cfg.host_source(),
        "timing_provenance": dict(cfg.cost.provenance_counts),  # engine steps priced per provenance
    }


def write_run(result: OfflineResult, out_dir: Path) -> Path:
    """requests.parquet, metrics.parquet and results.json, each written to a temporary name first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    recs = result.records
    cols = {c: [r[c] for r in recs] for c in RECORD_COLUMNS}
    cols["itl_s"] = pa.array(cols["itl_s"], type=pa.list_(pa.float64()))
    table = pa.table(cols)
    with atomic_path(out_dir / "requests.parquet") as tmp:
        pq.write_table(table, tmp)
    # rows -> columns, a list each: 4 ms over a 128-user sim_speed run's 41,745 rows, where zip(*rows) took 9-95 ms
    samples = result.samples
    ts, family, name, labels, value = ([row[k] for row in samples] for k in range(5))
    mtable = pa.table({"ts": pa.array(ts, pa.float64()), "family": pa.array(family, pa.string()),
                       "name": pa.array(name, pa.string()), "labels": pa.array(labels, pa.string()),
                       "value": pa.array(value, pa.float64())})
    with atomic_path(out_dir / "metrics.parquet") as tmp:
        pq.write_table(mtable, tmp)
    result.results.write(out_dir / "results.json")
    return out_dir
