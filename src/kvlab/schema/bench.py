"""The record of `kvlab sim bench`: `vllm bench serve`'s result fields, by vLLM's names, for a run on
kvlab's simulated engine, with the run's setup and the step-timing source the figures rest on."""

from __future__ import annotations

from typing import ClassVar, Literal

from kvlab.schema import Record, figure


def _ms(description: str) -> object:
    return figure("simulated", unit="ms", description=description, default=0.0)


class BenchResult(Record):
    """One `kvlab sim bench` run. The result names and definitions are vLLM's
    (`vllm/benchmarks/serve.py`); every result is simulated, in virtual time."""

    KIND: ClassVar[str] = "sim-bench"
    VERSION: ClassVar[int] = 1

    # setup, as `vllm bench serve` records it
    engine: Literal["sim"] = "sim"
    model_id: str
    gpu: str
    timing_source: str  # what priced the simulated steps (the cost model's label: kernel tables, composed, roofline)
    # what priced the time outside the GPU's steps (host time, API server, request latency) and where
    # each term comes from (SimConfig.host_source); records written before it: None
    host_source: str | None = None
    dataset_name: Literal["random", "sharegpt"]
    num_prompts: int
    request_rate: float | Literal["inf"]
    burstiness: float
    max_concurrency: int | None
    seed: int
    tensor_parallel_size: int
    # vLLM's --enable-expert-parallel as given (records written before it: False, which kvlab then priced
    # as tensor parallel)
    enable_expert_parallel: bool = False
    dtype: str
    quantization: str | None
    kv_cache_dtype: str
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    num_gpu_blocks: int
    block_size: int
    # kvlab's --vllm-version: the release whose kernel choice and memory profiling were simulated
    # (records written before it existed: kvlab's default release then, 0.32)
    vllm_version: str = "0.32"
    sampler: str = "pytorch"  # kvlab's --sampler: the profiling run's top-k/top-p sampler (records before it: pytorch)
    gpu_memory_utilization: float | None = None  # as resolved (None in records written before it)
    api_server_count: int = 1  # the API-server processes simulated (records written before it: 1)
    enable_prefix_caching: bool = True  # vLLM's flag, as resolved (records written before it: True)
    # vLLM's --scheduler-reserve-full-isl as resolved (the release's default: on from 0.19); records
    # written before it: None (kvlab's scheduler then admitted on the first chunk at every release)
    scheduler_reserve_full_isl: bool | None = None
    # vLLM's --async-scheduling as resolved (the release's default: on from 0.14); records written before
    # it: None (kvlab then scheduled synchronously at every release)
    async_scheduling: bool | None = None
    enforce_eager: bool = False  # vLLM's flag (records written before it: False)
    # kvlab's --warm-runs: earlier runs of the same requests on the same server (prefix cache warm);
    # 0: a freshly started server (records written before it: 0)
    warm_runs: int = 0
    # vllm bench serve's --endpoint-type (--backend): openai (/v1/completions) or openai-chat
    # (/v1/chat/completions; at the releases that parse the chat template on each request it costs the
    # API server that: kvlab.sim.timing.chat_template_cost). Records written before it: openai
    endpoint_type: Literal["openai", "openai-chat"] = "openai"
    # kvlab's --total-output-tokens / --total-input-tokens: the replies / prompts were scaled by one
    # share to this total (a published run's printed totals: its replies ended at EOS); None: the
    # drawn lengths (records written before them: None)
    replies_total: int | None = None
    prompts_total: int | None = None

    # results (vLLM's names and units)
    duration: float = figure("simulated", unit="s", default=0.0,
                             description="from the start (time 0) to the last request done")
    completed: int = figure("simulated", default=0)
    failed: int = figure("simulated", default=0)
    total_input_tokens: int = figure("simulated", default=0)
    total_output_tokens: int = figure("simulated", default=0)
    request_throughput: float = figure("simulated", unit="req/s", default=0.0)
    output_throughput: float = figure("simulated", unit="tok/s", default=0.0)
    total_token_throughput: float = figure("simulated", unit="tok/s", default=0.0)
    max_output_tokens_per_s: float = figure("simulated", unit="tok/s", default=0.0)
    max_concurrent_requests: int = figure("simulated", default=0)
    mean_ttft_ms: float = _ms("time to first token")
    median_ttft_ms: float = _ms("time to first token")
    std_ttft_ms: float = _ms("time to first token")
    p99_ttft_ms: float = _ms("time to first token")
    mean_tpot_ms: float = _ms("(latency - ttft) / (output tokens - 1), requests with > 1 output token")
    median_tpot_ms: float = _ms("time per output token")
    std_tpot_ms: float = _ms("time per output token")
    p99_tpot_ms: float = _ms("time per output token")
    mean_itl_ms: float = _ms("inter-token latency, over all gaps of all requests")
    median_itl_ms: float = _ms("inter-token latency")
    std_itl_ms: float = _ms("inter-token latency")
    p99_itl_ms: float = _ms("inter-token latency")
    mean_e2el_ms: float = _ms("end-to-end latency")
    median_e2el_ms: float = _ms("end-to-end latency")
    std_e2el_ms: float = _ms("end-to-end latency")
    p99_e2el_ms: float = _ms("end-to-end latency")
    num_preemptions: int = figure("simulated", default=0, description="kvlab: the engine's preemptions")
