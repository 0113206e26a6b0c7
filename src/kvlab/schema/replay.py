"""The record of `kvlab sim run` (kvlab.replay.run): a run folder's results.json, with the run's
manifest inside it (the command line, the workload as played, the predicted users before the first
preemption).

Figures the simulated engine produced are `simulated`; rates and shares derived from them are
`computed`; the KV pool the memory model sized is `predicted`; the host's wall time `measured`."""

from __future__ import annotations

from typing import Any, Literal

from kvlab.schema import Part, Record, figure


def _required(source: str, unit: str | None = None, description: str | None = None) -> Any:
    """A figure every such record has (figure() alone defaults to None)."""
    return figure(source, unit=unit, description=description, default=...)  # type: ignore[arg-type]


class SimRunManifest(Part):
    """What ran: the command, the seed, the closed-loop users and the workload (its profile as
    played, `source` its file)."""

    command: list[str]
    engine: Literal["sim"] = "sim"
    seed: int
    users: int
    workload: dict[str, Any]  # kvlab.loadtest.workload.Workload as JSON, plus its `source`
    spawn_rate: float | None = None
    duration_s: float
    predicted_max_users_without_preemption: int = _required("predicted", unit="sessions")


class SimCapacity(Part):
    """The simulated engine's KV cache, as the memory model sized it, and its batch limits."""

    num_gpu_blocks: int = _required("predicted", unit="blocks")
    block_size: int = _required("predicted", unit="tokens")
    kv_cache_tokens: int = _required("predicted", unit="tokens")
    max_concurrency: float = _required("predicted", unit="requests")
    kv_bytes_per_token: int = _required("predicted", unit="bytes")
    kv_budget_bytes: int = _required("predicted", unit="bytes")
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int


class Percentiles(Part):
    """Mean, p50, p90, p99 and max of one latency over the completed requests (seconds)."""

    mean: float = _required("simulated", unit="s")
    p50: float = _required("simulated", unit="s")
    p90: float = _required("simulated", unit="s")
    p99: float = _required("simulated", unit="s")
    max: float = _required("simulated", unit="s")


class SimRunResults(Record):
    """results.json of `kvlab sim run` (and `OfflineResult.results` of kvlab.replay.run.run_offline)."""

    KIND = "sim-run-results"
    engine: Literal["sim"] = "sim"
    provenance: str
    timing_source: str | None = None  # what priced the simulated steps (kvlab.sim.timing)
    host_source: str | None = None  # and the time outside them (SimConfig.host_source; results before it: None)
    timing_provenance: dict[str, int] | None = None  # steps priced by each source
    model: str
    gpu: str
    tensor_parallel_size: int
    enable_expert_parallel: bool = False  # vLLM's flag as given (results written before it: False)
    kv_cache_dtype: str
    quantization: str | None
    vllm_version: str | None = None  # kvlab's --vllm-version: the release whose kernels and memory were simulated
    sampler: str = "pytorch"  # kvlab's --sampler: the profiling run's sampler (results written before it: pytorch)
    api_server_count: int = 1  # vLLM's --api-server-count simulated (results written before it: 1)
    users: int | None  # closed-loop users; None: open-loop arrivals
    duration_s: float = _required("simulated", unit="s")
    wall_s: float = _required("measured", unit="s", description="host seconds the simulation took")
    engine_steps: int = _required("simulated", unit="steps")
    capacity: SimCapacity
    requests_completed: int = _required("simulated", unit="requests")
    errors: dict[str, int] = figure("simulated", unit="requests", default={})
    output_tokens: int = _required("simulated", unit="tokens")
    prompt_tokens: int = _required("simulated", unit="tokens")
    output_tokens_per_s: float = _required("computed", unit="tok/s")
    total_tokens_per_s: float = _required("computed", unit="tok/s")
    requests_per_s: float = _required("computed", unit="req/s")
    ttft_s: Percentiles | None = _required("simulated", unit="s")
    tpot_s: Percentiles | None = _required("simulated", unit="s")
    e2e_s: Percentiles | None = _required("simulated", unit="s")
    num_preemptions: int = _required("simulated")
    prefix_cache_queries: int = _required("simulated", unit="tokens")
    prefix_cache_hits: int = _required("simulated", unit="tokens")
    prefix_cache_hit_rate: float = _required("computed")
    kv_cache_usage_max: float = _required("simulated", description="largest fraction of the KV cache in use")
    manifest: SimRunManifest | None = None  # `kvlab sim run` says what ran; run_offline's callers may not

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        return data if version == 0 else super().upgrade(data, version)  # the same keys before schema_version
