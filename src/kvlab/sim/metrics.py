"""vLLM 0.32's Prometheus metrics, kept as plain numbers and exposed in vLLM's exact form.

Names, help texts, label sets, histogram buckets and family order follow
`vllm/v1/metrics/loggers.py` (PrometheusStatLogger) and a real /metrics of vLLM 0.32
(tests/fixtures/*.metrics.txt). kvlab's own series, prefixed `kvlab:`, follow vLLM's (where a
step-time model is attached as `EngineMetrics.timing`): `kvlab:sim_timing_info{timing_source,host_source}` (the
step-time source, `kvlab.sim.timing.step_timing`, and, where `EngineMetrics.host_source` is set, what
prices the time outside the steps, `SimConfig.host_source`) and `kvlab:sim_steps_priced_total{provenance}`
(engine steps priced per provenance: measured, interpolated, extrapolated, scaled, roofline).
`EngineMetrics.collect()` yields prometheus_client families,
so `generate_latest` writes the same text as vLLM (counters with `_total`, `_created` gauges);
`EngineMetrics.samples()` gives the tidy rows a scraper would parse from that text
(prometheus_client's parser), without the `_created` timestamps.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

# Bucket families (`vllm/v1/metrics/buckets.py`).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
NUM_PREEMPTIONS_BUCKETS = (1, 2, 3, 4, 5, 10, 20)
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
CACHED_SOURCES = ("device", "host", "p2p", "disk", "external_unspecified")
WAITING_REASONS = ("capacity", "deferred")
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")
ADMISSION_REASONS = ("max_num_queued_reqs", "max_num_queued_tokens")


def request_tokens_buckets(max_model_len: int) -> tuple[int, ...]:
    """vLLM `build_1_2_5_buckets(max_model_len)`."""
    out, exponent = [], 0
    while True:
        for m in (1, 2, 5):
            value = m * 10 ** exponent
            if value > max_model_len:
                return tuple(out)
            out.append(value)
        exponent += 1


class Histogram:
    __slots__ = ("bounds", "counts", "sum", "les")

    def __init__(self, bounds: tuple):
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum = 0.0
        # The `le` label of each bucket, formatted once (every scrape reports every bucket).
        self.les = tuple(floatToGoString(b) for b in self.bounds + (float("inf"),))

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def cumulative(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for le, count in zip(self.les, self.counts):
            total += count
            out.append((le, float(total)))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


# (name, type, help, extra label name or None); counters are named without `_total`.
HELP = {
    "vllm:estimated_flops_per_gpu": "Estimated number of floating point operations per GPU (for Model Flops Utilization calculations).",
    "vllm:estimated_read_bytes_per_gpu": "Estimated number of bytes read from memory per GPU (for Model Flops Utilization calculations).",
    "vllm:estimated_write_bytes_per_gpu": "Estimated number of bytes written to memory per GPU (for Model Flops Utilization calculations).",
    "vllm:num_requests_running": "Number of requests in model execution batches.",
    "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
    "vllm:num_requests_waiting_by_reason": "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
    "vllm:engine_sleep_state": "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
    "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
    "vllm:prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
    "vllm:prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
    "vllm:external_prefix_cache_queries": "External prefix cache queries from KV connector cross-instance cache sharing, in terms of number of queried tokens.",
    "vllm:external_prefix_cache_hits": "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of cached tokens.",
    "vllm:mm_cache_queries": "Multi-modal cache queries, in terms of number of queried items.",
    "vllm:mm_cache_hits": "Multi-modal cache hits, in terms of number of cached items.",
    "vllm:num_preemptions": "Cumulative number of preemption from the engine.",
    "vllm:prompt_tokens": "Number of prefill tokens processed.",
    "vllm:prompt_tokens_by_source": "Number of prompt tokens by source.",
    "vllm:prompt_tokens_cached": "Number of cached prompt tokens (local + external).",
    "vllm:prompt_tokens_cached_by_source": "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), host (offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + vllm:external_prefix_cache_hits.",
    "vllm:generation_tokens": "Number of generation tokens processed.",
    "vllm:request_success": "Count of successfully processed requests.",
    "vllm:admission_rejections": "Number of admission attempts rejected by a queue limit, by reason.",
    "vllm:request_prompt_tokens": "Number of prefill tokens processed.",
    "vllm:request_generation_tokens": "Number of generation tokens processed.",
    "vllm:iteration_tokens_total": "Histogram of number of tokens per engine_step.",
    "vllm:request_max_num_generation_tokens": "Histogram of maximum number of requested generation tokens.",
    "vllm:request_params_n": "Histogram of the n request parameter.",
    "vllm:request_params_max_tokens": "Histogram of the max_tokens request parameter.",
    "vllm:time_to_first_token_seconds": "Histogram of time to first token in seconds.",
    "vllm:inter_token_latency_seconds": "Histogram of inter-token latency in seconds.",
    "vllm:request_time_per_output_token_seconds": "Histogram of time_per_output_token_seconds per request.",
    "vllm:e2e_request_latency_seconds": "Histogram of e2e request latency in seconds.",
    "vllm:request_queue_time_seconds": "Histogram of time spent in WAITING phase for request.",
    "vllm:request_inference_time_seconds": "Histogram of time spent in RUNNING phase for request.",
    "vllm:request_prefill_time_seconds": "Histogram of time spent in PREFILL phase for request.",
    "vllm:request_decode_time_seconds": "Histogram of time spent in DECODE phase for request.",
    "vllm:request_num_preemptions": "Histogram of the number of times a request was preempted.",
    "vllm:request_prefill_kv_computed_tokens": "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
    "vllm:cache_config_info": "Information of the LLMEngine CacheConfig",
    "kvlab:sim_timing_info": "kvlab simulated engine: where its step times come from (timing_source label) and "
                             "its time outside them (host_source label).",
    "kvlab:sim_steps_priced": "kvlab simulated engine: engine steps priced, by provenance of their step time.",
}
TIMING_INFO = "kvlab:sim_timing_info"
STEPS_PRICED = "kvlab:sim_steps_priced"
# "scaled": a weight-only format priced from the BF16 tables times a format/BF16 ratio, the roofline's or the
# one kvlab measured on vLLM's kernels (timing.ScaledTiming, timing.MeasuredRatioTiming);
# "composed": a model no table holds whole, every part of its step from measured data (timing.with_measured_ops)
PROVENANCES = ("measured", "interpolated", "extrapolated", "scaled", "composed", "roofline")

# CacheConfig fields vLLM 0.32 exports in vllm:cache_config_info that the simulator has no use for,
# with the values vLLM reports by default (from a real /metrics).
CACHE_CONFIG_DEFAULTS = {
    "_block_size_resolved": "True", "cache_hit_alignment_tokens": "None",
    "enable_mamba_shared_prefix_checkpoint": "False", "hash_block_size": "None",
    "is_attention_free": "False", "kv_cache_dtype_skip_layers": "[]", "kv_cache_layout": "None",
    "kv_offloading_backend": "native", "kv_offloading_size": "None", "kv_sharing_fast_prefill": "False",
    "mamba_block_size": "None", "mamba_cache_dtype": "auto", "mamba_cache_mode": "none",
    "mamba_page_size_padded": "None", "mamba_ssm_cache_dtype": "auto", "num_cpu_blocks": "None",
    "prefix_cache_retention_interval": "0", "prefix_caching_hash_algo": "sha256", "prefix_match_unit": "None",
    "replayssm_buffer_len": "16", "skip_page_size_padded": "None", "sliding_window": "None",
    "swa_bounded_replay": "True", "use_kda_recoverssm": "False", "use_replayssm": "False",
}

LATENCY_HISTOGRAMS = ("e2e_request_latency", "request_queue_time", "request_inference_time",
                      "request_prefill_time", "request_decode_time")


class EngineMetrics:
    """Everything /metrics reports, updated by the engine in simulated seconds."""

    def __init__(self, model_name: str, max_model_len: int, cache_config: dict[str, str],
                 created_s: float = 0.0):
        self.labels = {"engine": "0", "model_name": model_name}
        self.cache_config = {**CACHE_CONFIG_DEFAULTS, **cache_config}
        self.created_s = created_s
        self.timing = None  # the step-time model (timing_source, provenance_counts): kvlab's own series
        self.host_source = None  # what prices the time outside the steps (SimConfig.host_source): a label of it
        self.num_running = 0
        self.num_waiting = 0
        self.kv_cache_usage = 0.0
        self.counters = {name: 0.0 for name in (
            "vllm:estimated_flops_per_gpu", "vllm:estimated_read_bytes_per_gpu", "vllm:estimated_write_bytes_per_gpu",
            "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions",
            "vllm:prompt_tokens", "vllm:prompt_tokens_cached", "vllm:generation_tokens")}
        self.prompt_by_source = dict.fromkeys(PROMPT_SOURCES, 0.0)
        self.request_success = dict.fromkeys(FINISH_REASONS, 0.0)
        tokens = request_tokens_buckets(max_model_len)
        self.hist = {
            "vllm:request_prompt_tokens": Histogram(tokens),
            "vllm:request_generation_tokens": Histogram(tokens),
            "vllm:iteration_tokens_total": Histogram(ITERATION_TOKENS_BUCKETS),
            "vllm:request_max_num_generation_tokens": Histogram(tokens),
            "vllm:request_params_n": Histogram(PARAMS_N_BUCKETS),
            "vllm:request_params_max_tokens": Histogram(tokens),
            "vllm:time_to_first_token_seconds": Histogram(TTFT_BUCKETS),
            "vllm:inter_token_latency_seconds": Histogram(ITL_BUCKETS),
            "vllm:request_time_per_output_token_seconds": Histogram(ITL_BUCKETS),
            **{f"vllm:{h}_seconds": Histogram(REQUEST_LATENCY_BUCKETS) for h in LATENCY_HISTOGRAMS},
            "vllm:request_num_preemptions": Histogram(NUM_PREEMPTIONS_BUCKETS),
            "vllm:request_prefill_kv_computed_tokens": Histogram(tokens),
        }

    # -- updates (called by the engine)

    def inc(self, name: str, value: float) -> None:
        self.counters[name] += value

    def observe(self, name: str, value: float, n: int = 1) -> None:
        self.hist[name].observe(value, n)

    def on_prefill_done(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        """A request's first token: its prompt counts once, split by source (vLLM IterationStats)."""
        self.counters["vllm:prompt_tokens"] += num_prompt_tokens
        self.counters["vllm:prompt_tokens_cached"] += num_cached_tokens
        self.prompt_by_source["local_compute"] += num_prompt_tokens - num_cached_tokens
        self.prompt_by_source["local_cache_hit"] += num_cached_tokens

    # -- exposition

    def _families(self) -> Iterator[tuple[str, str, list[tuple[str, dict, float]]]]:
        """(family, type, [(sample name, labels, value)]) in vLLM's order, `_created` samples left
        out: what `collect` exposes and what `samples` returns without building Metric objects
        (the offline runner scrapes every few simulated seconds)."""
        lab = self.labels
        for name in ("vllm:estimated_flops_per_gpu", "vllm:estimated_read_bytes_per_gpu",
                     "vllm:estimated_write_bytes_per_gpu"):
            yield self._counter_rows(name, [(lab, self.counters[name])])
        yield self._gauge_rows("vllm:num_requests_running", [(lab, self.num_running)])
        yield self._gauge_rows("vllm:num_requests_waiting", [(lab, self.num_waiting)])
        yield self._gauge_rows("vllm:num_requests_waiting_by_reason",
                               [({**lab, "reason": "capacity"}, self.num_waiting), ({**lab, "reason": "deferred"}, 0)])
        yield self._gauge_rows("vllm:engine_sleep_state",
                               [({**lab, "sleep_state": s}, 1 if s == "awake" else 0) for s in SLEEP_STATES])
        yield self._gauge_rows("vllm:kv_cache_usage_perc", [(lab, self.kv_cache_usage)])
        c = self.counters
        yield self._counter_rows("vllm:prefix_cache_queries", [(lab, c["vllm:prefix_cache_queries"])])
        yield self._counter_rows("vllm:prefix_cache_hits", [(lab, c["vllm:prefix_cache_hits"])])
        for name in ("vllm:external_prefix_cache_queries", "vllm:external_prefix_cache_hits",
                     "vllm:mm_cache_queries", "vllm:mm_cache_hits"):
            yield self._counter_rows(name, [(lab, 0.0)])
        yield self._counter_rows("vllm:num_preemptions", [(lab, c["vllm:num_preemptions"])])
        yield self._counter_rows("vllm:prompt_tokens", [(lab, c["vllm:prompt_tokens"])])
        yield self._counter_rows("vllm:prompt_tokens_by_source",
                                 [({**lab, "source": s}, v) for s, v in self.prompt_by_source.items()])
        yield self._counter_rows("vllm:prompt_tokens_cached", [(lab, c["vllm:prompt_tokens_cached"])])
        yield self._counter_rows("vllm:prompt_tokens_cached_by_source",
                                 [({**lab, "source": s}, c["vllm:prefix_cache_hits"] if s == "device" else 0.0)
                                  for s in CACHED_SOURCES])
        yield self._counter_rows("vllm:generation_tokens", [(lab, c["vllm:generation_tokens"])])
        yield self._counter_rows("vllm:request_success",
                                 [({**lab, "finished_reason": r}, v) for r, v in self.request_success.items()])
        yield self._counter_rows("vllm:admission_rejections",
                                 [({"model_name": lab["model_name"], "reason": r}, 0.0) for r in ADMISSION_REASONS])
        for name, h in self.hist.items():
            yield self._histogram_rows(name, h)
        yield self._gauge_rows("vllm:cache_config_info", [({**self.cache_config, "engine": "0"}, 1.0)])
        if self.timing is not None:
            host = {"host_source": self.host_source} if self.host_source else {}
            yield self._gauge_rows(TIMING_INFO, [({**lab, "timing_source": self.timing.timing_source, **host}, 1.0)])
            counts = self.timing.provenance_counts
            yield self._counter_rows(STEPS_PRICED, [({**lab, "provenance": p}, counts.get(p, 0)) for p in PROVENANCES])

    def collect(self) -> Iterator[Metric]:
        """prometheus_client families in vLLM's order (a custom collector's `collect`): counters
        with a `_created` sample after each series, histograms with one at the end."""
        for name, kind, rows in self._families():
            m = Metric(name, HELP[name], kind)
            for sample, labels, value in rows:
                m.add_sample(sample, labels, value)
                if kind == "counter":
                    m.add_sample(name + "_created", labels, self.created_s)
            if kind == "histogram":
                m.add_sample(name + "_created", self.labels, self.created_s)
            yield m

    @staticmethod
    def _counter_rows(name: str, series: list[tuple[dict, float]]) -> tuple[str, str, list]:
        return name, "counter", [(name + "_total", labels, float(value)) for labels, value in series]

    @staticmethod
    def _gauge_rows(name: str, series: list[tuple[dict, float]]) -> tuple[str, str, list]:
        return name, "gauge", [(name, labels, float(value)) for labels, value in series]

    def _histogram_rows(self, name: str, h: Histogram) -> tuple[str, str, list]:
        lab = self.labels
        rows = [(name + "_bucket", {**lab, "le": le}, total) for le, total in h.cumulative()]
        rows.append((name + "_count", lab, float(h.count)))
        rows.append((name + "_sum", lab, h.sum))
        return name, "histogram", rows

    def samples(self) -> Iterator[tuple[str, str, dict[str, str], float]]:
        """(family, sample name, labels, value) as prometheus_client's text parser returns them."""
        for family, _, rows in self._families():
            for sample, labels, value in rows:
                yield family, sample, labels, value


# -- HTTP request families (prometheus-fastapi-instrumentator, as vLLM 0.32 attaches it)

# `Instrumentator(excluded_handlers=...)` in vllm/entrypoints/serve/instrumentator/metrics.py:
# regular expressions searched in the route template (or, for a path no route matches, the path).
HTTP_EXCLUDED_HANDLERS = ("/metrics", "/health", "/load", "/ping", "/version", "/server_info")
# `metrics.default()`'s buckets.
HTTP_HIGHR_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 7.5,
                      10, 30, 60)
HTTP_LOWR_BUCKETS = (0.1, 0.5, 1)


class HttpMetrics:
    """The five `http_*` families real vLLM exports, with the instrumentator's names, help texts,
    labels and buckets: status grouped as `2xx`, a path no route matches as handler `none`, sizes
    from the Content-Length headers only (a stream has none: 0)."""

    def __init__(self, registry):
        from prometheus_client import Counter, Histogram, Summary

        sizes = "Only value of header is respected. Otherwise ignored. No percentile calculated. "
        self.requests = Counter("http_requests_total", "Total number of requests by method, status and handler.",
                                ("method", "status", "handler"), registry=registry)
        self.request_size = Summary("http_request_size_bytes", "Content length of incoming requests by handler. "
                                    + sizes, ("handler",), registry=registry)
        self.response_size = Summary("http_response_size_bytes", "Content length of outgoing responses by handler. "
                                     + sizes, ("handler",), registry=registry)
        self.duration_highr = Histogram(
            "http_request_duration_highr_seconds",
            "Latency with many buckets but no API specific labels. Made for more accurate percentile calculations. ",
            buckets=HTTP_HIGHR_BUCKETS, registry=registry)
        self.duration = Histogram(
            "http_request_duration_seconds",
            "Latency with only few buckets by handler. Made to be only used if aggregation by handler is important. ",
            ("method", "handler"), buckets=HTTP_LOWR_BUCKETS, registry=registry)

    @staticmethod
    def excluded(handler: str) -> bool:
        return any(re.search(pattern, handler) for pattern in HTTP_EXCLUDED_HANDLERS)

    def observe(self, method: str, handler: str, status: int, duration_s: float, request_bytes: int,
                response_bytes: int) -> None:
        """One finished request; `handler`: its route template, or "none" when no route matched."""
        self.requests.labels(method, f"{str(status)[0]}xx", handler).inc()
        self.request_size.labels(handler).observe(request_bytes)
        self.response_size.labels(handler).observe(response_bytes)
        self.duration_highr.observe(duration_s)
        self.duration.labels(method, handler).observe(duration_s)
