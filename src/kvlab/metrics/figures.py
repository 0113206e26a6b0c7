"""Per-run figures in absolute units from vLLM's metric samples.

vLLM's counters are cumulative since server start and `vllm:kv_cache_usage_perc` is a fraction of
a pool whose size differs per model and quantization. The figures here are what can be compared
across configurations: deltas over the run, KV usage in blocks, tokens and GiB (the pool read
from `vllm:cache_config_info`), token rates, and latency quantiles from histogram deltas.
Each figure that could not be computed is None and `missing[figure]` names the absent inputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from kvlab.errors import KvlabError
from kvlab.metrics.series import histogram_quantile, quantile_linear
from kvlab.metrics.window import RunWindow, load_frame, models_in, with_labels
from kvlab.units import GiB

QUANTILES = (0.5, 0.9, 0.95, 0.99)
KV_USAGE = "vllm:kv_cache_usage_perc"
CACHE_CONFIG = "vllm:cache_config_info"
# Latency figure -> vLLM histogram family (current names; old ones are renamed on reading).
LATENCY_FAMILIES = {
    "ttft": "vllm:time_to_first_token_seconds",
    "itl": "vllm:inter_token_latency_seconds",
    "e2e": "vllm:e2e_request_latency_seconds",
    "queue_time": "vllm:request_queue_time_seconds",
}
# The counters the figures read; the rows of PromQL fetches too.
COUNTERS = {
    "preemptions": "vllm:num_preemptions_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "generation_tokens": "vllm:generation_tokens_total",
    "prefix_cache_queries_tokens": "vllm:prefix_cache_queries_total",
    "prefix_cache_hits_tokens": "vllm:prefix_cache_hits_total",
    "requests_finished": "vllm:request_success_total",
}
GAUGES = {"running": "vllm:num_requests_running", "waiting": "vllm:num_requests_waiting", "kv": KV_USAGE}
INPUT_FAMILIES = (*COUNTERS.values(), *GAUGES.values(), CACHE_CONFIG,
                  *(f + s for f in LATENCY_FAMILIES.values() for s in ("_bucket", "_count", "_sum")))
GPU_PREFIX = "nvidia_smi_"
NO_BYTES = (f"kv_cache_memory_bytes of {CACHE_CONFIG} (absent, or num_gpu_blocks_override set): "
            "pass kv_bytes_per_token (kvlab kv MODEL)")


@dataclass(frozen=True)
class Latency:
    """Server-side latency quantiles of one histogram over the run (seconds)."""

    family: str
    count: float | None = None  # observations (requests, or tokens for ITL) in the run
    mean_s: float | None = None
    p50_s: float | None = None
    p90_s: float | None = None
    p95_s: float | None = None
    p99_s: float | None = None


@dataclass(frozen=True)
class RunFigures:
    model_name: str | None
    engines: tuple[str, ...] = ()
    start_ts: float | None = None
    end_ts: float | None = None
    duration_s: float | None = None
    scrapes: int = 0  # successful scrapes inside the window
    scrape_gaps: int = 0  # failed scrapes inside the window
    counter_resets: int = 0  # counter drops seen (a server restart), handled as Prometheus does
    # The KV pool (vllm:cache_config_info, summed over engines).
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    kv_cache_size_tokens: int | None = None
    kv_bytes_per_block: float | None = None
    # KV cache in use over the scrapes in the window.
    kv_usage_peak_frac: float | None = None
    kv_usage_mean_frac: float | None = None
    kv_usage_p95_frac: float | None = None
    kv_blocks_peak: float | None = None
    kv_blocks_mean: float | None = None
    kv_blocks_p95: float | None = None
    kv_tokens_peak: float | None = None
    kv_tokens_mean: float | None = None
    kv_tokens_p95: float | None = None
    kv_gib_peak: float | None = None
    kv_gib_mean: float | None = None
    kv_gib_p95: float | None = None
    # Scheduler.
    running_peak: float | None = None
    running_mean: float | None = None
    waiting_peak: float | None = None
    waiting_mean: float | None = None
    preemptions: float | None = None
    requests_finished: float | None = None
    # Prefix cache (tokens; blocks before vLLM 0.9) and throughput.
    prefix_cache_queries_tokens: float | None = None
    prefix_cache_hits_tokens: float | None = None
    prefix_cache_hit_rate: float | None = None
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    prompt_tokens_per_s: float | None = None
    generation_tokens_per_s: float | None = None
    # Server-side latency.
    ttft: Latency = Latency(LATENCY_FAMILIES["ttft"])
    itl: Latency = Latency(LATENCY_FAMILIES["itl"])
    e2e: Latency = Latency(LATENCY_FAMILIES["e2e"])
    queue_time: Latency = Latency(LATENCY_FAMILIES["queue_time"])
    # How many sessions' contexts the KV cache held (KV tokens in use / mean session context).
    mean_session_context_tokens: float | None = None
    resident_sessions_peak: float | None = None
    resident_sessions_mean: float | None = None
    # GPU telemetry (nvidia-smi), summed over GPUs.
    gpu_count: int | None = None
    gpu_memory_used_peak_gib: float | None = None
    gpu_utilization_mean_ratio: float | None = None
    gpu_power_mean_w: float | None = None
    provenance: dict[str, str] = field(default_factory=dict)
    missing: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["engines"] = list(self.engines)
        d["missing"] = {k: list(v) for k, v in self.missing.items()}
        return d


def summarize(samples_path_or_df, *, start_ts: float | None = None, end_ts: float | None = None,
              mean_session_context_tokens: float | None = None, model_name: str | None = None,
              kv_bytes_per_token: float | None = None, provenance: str = "measured") -> RunFigures:
    """The run's figures for one model (the only one in the samples unless `model_name` says).

    `samples_path_or_df`: a run directory, a samples CSV, or a frame with its columns.
    `start_ts`/`end_ts`: the run window in Unix seconds (default: the first and last scrape).
    `kv_bytes_per_token`: the memory model's figure, for exact GiB (default: from cache_config_info).
    `provenance`: "measured" for a real vLLM, "simulated" for kvlab's simulated engine.
    """
    if mean_session_context_tokens is not None and not mean_session_context_tokens > 0:
        raise KvlabError(f"mean_session_context_tokens must be positive, got {mean_session_context_tokens}")
    df = _input_rows(samples_path_or_df)
    models = models_in(df)
    if model_name is None and len(models) > 1:
        raise KvlabError(f"the samples hold several models ({', '.join(models)}): choose one with model_name")
    if model_name is not None and model_name not in models:
        raise KvlabError(f"no samples for model_name {model_name!r}; the samples hold: {', '.join(models) or 'none'}")
    name = model_name or (models[0] if models else None)
    window = RunWindow.select(df, name, start_ts, end_ts)
    return FigureBuilder(window, mean_session_context_tokens, kv_bytes_per_token, provenance).build()


def summarize_all(samples_path_or_df, **kw) -> dict[str, RunFigures]:
    """`summarize` for every model_name in the samples."""
    df = _input_rows(samples_path_or_df)
    models = models_in(df)
    if not models:
        return {"": summarize(df, **kw)}
    return {m: summarize(df, model_name=m, **kw) for m in models}


def _input_rows(samples_path_or_df) -> pd.DataFrame:
    """The rows the figures read (a samples file holds ~90 families), labels parsed."""
    if isinstance(samples_path_or_df, pd.DataFrame) and "lab" in samples_path_or_df:
        return samples_path_or_df  # already prepared (summarize_all)
    df = load_frame(samples_path_or_df)
    keep = df["name"].isin(INPUT_FAMILIES) | df["name"].str.startswith(("kvlab:", GPU_PREFIX))
    return with_labels(df[keep])


class FigureBuilder:
    """Fills RunFigures from a RunWindow, one group of figures per method."""

    def __init__(self, window: RunWindow, mean_session_context_tokens: float | None,
                 kv_bytes_per_token: float | None, provenance: str):
        self.w = window
        self.mean_ctx = mean_session_context_tokens
        self.kv_bytes_per_token = kv_bytes_per_token
        self.source = provenance
        self.f: dict[str, Any] = {}
        self.missing: dict[str, tuple[str, ...]] = {}
        self.prov: dict[str, str] = {}
        self.resets = 0
        self.pools: dict[str, _Pool] = {}
        self.kv_tokens: pd.Series | None = None

    def build(self) -> RunFigures:
        w = self.w
        if w.empty:
            why = (f"no vllm:* samples for model {w.model_name!r}" if w.model_name else "no vllm:* samples")
            for fld in dataclasses.fields(RunFigures):
                if (fld.default is None and fld.name != "model_name") or fld.name in LATENCY_FAMILIES:
                    self.missing[fld.name] = (why,)
        else:
            self.capacity()
            self.kv_usage()
            self.scheduler()
            self.tokens()
            self.latencies()
        self.resident_sessions()
        self.gpu()
        return RunFigures(
            model_name=w.model_name, engines=w.engines, start_ts=w.start_ts, end_ts=w.end_ts,
            duration_s=w.duration_s, scrapes=w.scrapes, scrape_gaps=w.gaps, counter_resets=self.resets,
            provenance=self.prov, missing=self.missing, **self.f)

    def _set(self, names: tuple[str, ...], values: tuple | None, missing: tuple[str, ...], prov: str) -> None:
        for n, v in zip(names, values or (None,) * len(names)):
            self.f[n] = v
            if v is None and missing:
                self.missing[n] = missing
            elif v is not None:
                self.prov[n] = prov

    # -- the KV pool ---------------------------------------------------------------------------
    def capacity(self) -> None:
        pools = {t: _pool(lab, self.kv_bytes_per_token) for t, lab in self.w.cache_config().items()}
        self.pools = {t: p for t, p in pools.items() if p is not None}
        targets = self.w.engine_targets
        complete = targets and targets <= set(self.pools)
        pools = [self.pools[t] for t in targets if t in self.pools] if complete else []
        miss = () if complete else (CACHE_CONFIG,)
        block = pools[0].block_size if pools and len({p.block_size for p in pools}) == 1 else None
        src = f"{self.source} ({CACHE_CONFIG})"
        self._set(("num_gpu_blocks", "block_size"),
                  (sum(p.num_blocks for p in pools), block) if pools else None, miss, src)
        tokens = [p.size_tokens for p in pools]
        self._set(("kv_cache_size_tokens",), (sum(tokens),) if pools and None not in tokens else None,
                  miss or ("kv_cache_size_tokens label of " + CACHE_CONFIG,), src)
        per_block = [p.bytes_per_block for p in pools]
        self._set(("kv_bytes_per_block",), (per_block[0],) if pools and None not in per_block and len(set(per_block)) == 1 else None,
                  miss or (NO_BYTES,), self._bytes_prov())

    def _bytes_prov(self) -> str:
        if self.kv_bytes_per_token is not None:
            return "computed (kv_bytes_per_token given x block_size)"
        return (f"{self.source} (blocks x kv_cache_memory_bytes / num_gpu_blocks from {CACHE_CONFIG}: "
                "the budget, above the blocks' bytes by less than one block)")

    def kv_usage(self) -> None:
        usage = self.w.gauge(KV_USAGE)
        stat_names = lambda unit: tuple(f"kv_{unit}_{s}" for s in ("peak", "mean", "p95"))
        frac_names = ("kv_usage_peak_frac", "kv_usage_mean_frac", "kv_usage_p95_frac")
        if usage is None:
            for names in (frac_names, stat_names("blocks"), stat_names("tokens"), stat_names("gib")):
                self._set(names, None, (KV_USAGE,), "")
            return
        pools = {t: self.pools.get(t) for t in usage.columns}
        blocks = frac = tokens = gib = None
        if None not in pools.values():
            # usage = 1 - free / (num_gpu_blocks - 1): vLLM leaves its null block out.
            used = {t: (usage[t] * (p.num_blocks - 1)).round() for t, p in pools.items()}
            blocks = sum(used.values())
            frac = blocks / sum(p.num_blocks - 1 for p in pools.values())
            tokens = sum(used[t] * p.block_size for t, p in pools.items())
            if all(p.bytes_per_block for p in pools.values()):
                gib = sum(used[t] * p.bytes_per_block for t, p in pools.items()) / GiB
        else:
            frac = usage.mean(axis=1)  # pools unknown: engines weighted equally
        no_pool = () if blocks is not None else (CACHE_CONFIG,)
        src = f"{self.source} ({KV_USAGE} x the pool in {CACHE_CONFIG})"
        self._set(frac_names, _stats(frac), (), f"{self.source} ({KV_USAGE})")
        self._set(stat_names("blocks"), _stats(blocks), no_pool, src)
        self._set(stat_names("tokens"), _stats(tokens), no_pool, src)
        self._set(stat_names("gib"), _stats(gib), no_pool or (NO_BYTES,),
                  self._bytes_prov())
        self.kv_tokens = tokens

    # -- scheduler, tokens, latency ------------------------------------------------------------
    def scheduler(self) -> None:
        for fig in ("running", "waiting"):
            g = self.w.gauge(GAUGES[fig])
            stats = _stats(g.sum(axis=1)) if g is not None else None
            self._set((f"{fig}_peak", f"{fig}_mean"), stats[:2] if stats else None, (GAUGES[fig],),
                      f"{self.source} ({GAUGES[fig]})")

    def _counter(self, fig: str) -> float | None:
        got = self.w.counter(COUNTERS[fig])
        if got is None:
            self._set((fig,), None, (COUNTERS[fig],), "")
            return None
        self.resets += got[1]
        self._set((fig,), (got[0],), (), f"{self.source} (increase of {COUNTERS[fig]})")
        return got[0]

    def tokens(self) -> None:
        for fig in ("preemptions", "requests_finished"):
            self._counter(fig)
        queries, hits = self._counter("prefix_cache_queries_tokens"), self._counter("prefix_cache_hits_tokens")
        rate = hits / queries if queries and hits is not None else None
        why = tuple(COUNTERS[k] for k, v in (("prefix_cache_queries_tokens", queries), ("prefix_cache_hits_tokens", hits)) if v is None)
        self._set(("prefix_cache_hit_rate",), (rate,) if rate is not None else None,
                  why or ("no prefix-cache queries in the run",), f"{self.source} (hits / queries, increases)")
        dur = self.w.duration_s
        for fig in ("prompt_tokens", "generation_tokens"):
            n = self._counter(fig)
            per_s = n / dur if n is not None and dur else None
            self._set((f"{fig}_per_s",), (per_s,) if per_s is not None else None,
                      (COUNTERS[fig],) if n is None else ("a window longer than one scrape",),
                      f"{self.source} (increase of {COUNTERS[fig]} / window)")

    def latencies(self) -> None:
        for fig, family in LATENCY_FAMILIES.items():
            buckets = self.w.bucket_increases(family + "_bucket")
            if buckets is None:
                self.f[fig] = Latency(family)
                self.missing[fig] = (family,)
                continue
            count = self.w.counter(family + "_count")
            total = self.w.counter(family + "_sum")
            n = count[0] if count else sum(v for le, v in buckets.items() if le == float("inf"))
            qs = [histogram_quantile(q, list(buckets.items())) for q in QUANTILES]
            mean = total[0] / n if total and n else None
            self.f[fig] = Latency(family, n, mean, *qs)
            if n == 0:
                self.missing[fig] = ("no observations in the run",)
            else:
                self.prov[fig] = f"{self.source} (histogram increases; quantiles interpolated in buckets as PromQL histogram_quantile)"

    # -- derived -------------------------------------------------------------------------------
    def resident_sessions(self) -> None:
        tokens = self.kv_tokens
        self.f["mean_session_context_tokens"] = self.mean_ctx
        if self.mean_ctx is None or tokens is None:
            why = ("mean_session_context_tokens (not given)",) if self.mean_ctx is None else ("kv_tokens",)
            self._set(("resident_sessions_peak", "resident_sessions_mean"), None, why, "")
            return
        s = _stats(tokens / self.mean_ctx)
        self._set(("resident_sessions_peak", "resident_sessions_mean"), s[:2], (),
                  "estimate (KV tokens in use / mean session context)")

    def gpu(self) -> None:
        names = ("gpu_count", "gpu_memory_used_peak_gib", "gpu_utilization_mean_ratio", "gpu_power_mean_w")
        rows = self.w.other_in_window(GPU_PREFIX)
        if rows.empty:
            reason = self.w.gpu_absent_reason() or "no nvidia_smi_* samples"
            self._set(names, None, (f"GPU telemetry: {reason}",), "")
            return
        n_gpu = int(rows["labels"].nunique())
        per_ts = rows.pivot_table(index="ts", columns="name", values="value", aggfunc="sum")  # over GPUs
        col = lambda n: per_ts[GPU_PREFIX + n].dropna() if GPU_PREFIX + n in per_ts else None
        mem, util, power = col("memory_used_bytes"), col("utilization_gpu_ratio"), col("power_draw_watts")
        values = (n_gpu,
                  float(mem.max()) / GiB if mem is not None else None,
                  float(util.mean()) / n_gpu if util is not None else None,
                  float(power.mean()) if power is not None else None)
        for n, v in zip(names, values):
            self._set((n,), (v,) if v is not None else None, ("not reported by nvidia-smi",),
                      "measured (nvidia-smi, summed over GPUs; utilisation averaged)")


@dataclass(frozen=True)
class _Pool:
    num_blocks: int
    block_size: int
    size_tokens: int | None
    bytes_per_block: float | None


def _pool(labels: dict[str, str], kv_bytes_per_token: float | None) -> _Pool | None:
    num_blocks, block_size = _int(labels.get("num_gpu_blocks")), _int(labels.get("block_size"))
    if not num_blocks or not block_size:
        return None
    mem = _int(labels.get("kv_cache_memory_bytes"))
    if kv_bytes_per_token is not None:
        per_block = float(kv_bytes_per_token) * block_size
    elif mem and _int(labels.get("num_gpu_blocks_override")) is None:
        # The budget split into whole blocks: above the true block size by less than 1/num_blocks.
        per_block = mem / num_blocks
    else:
        per_block = None  # no budget, or the block count was overridden and no longer fills it
    return _Pool(num_blocks, block_size, _int(labels.get("kv_cache_size_tokens")), per_block)


def _int(s: str | None) -> int | None:
    try:
        return int(float(s)) if s not in (None, "", "None") else None
    except ValueError:
        return None


def _stats(series: pd.Series | None) -> tuple[float, float, float] | None:
    if series is None or len(series) == 0:
        return None
    v = [float(x) for x in series]
    return max(v), sum(v) / len(v), quantile_linear(0.95, v)
