"""What a server said about itself and what the memory model predicted for it, as embedded in a
repeat's results.json and prediction.json, and the record `kvlab serve` writes (Server.record()).

ServerFacts mirrors kvlab.deploy.facts.StartupFacts.to_dict(); Prediction mirrors
kvlab.models.memory.CapacityResult.to_dict(). Both refuse a key they do not know, so a field added
on one side without the other fails the round-trip tests instead of vanishing."""

from __future__ import annotations

from typing import Any

from kvlab.schema import Part, Record, figure
from kvlab.serve_config import ServeConfig


class ServerFacts(Part):
    """Startup facts of one server (its log and vllm:cache_config_info); None where it did not say."""

    vllm_version: str | None = None
    attention_backend: str | None = None
    block_size: int | None = figure("served", unit="tokens")
    num_gpu_blocks: int | None = figure("served", unit="blocks")
    kv_cache_tokens: int | None = figure("served", unit="tokens")
    max_concurrency: float | None = figure("served", unit="requests")
    max_model_len: int | None = figure("served", unit="tokens")
    available_kv_memory_gib: float | None = figure("served", unit="GiB")
    kv_cache_memory_bytes: int | None = figure("served", unit="bytes")
    cache_dtype: str | None = figure("served")
    enable_prefix_caching: bool | None = None
    model_weights_gib: float | None = figure("served", unit="GiB")
    kv_device: str | None = None
    timing_source: str | None = None  # kvlab's simulator: where its step times come from; None on vLLM
    host_source: str | None = None  # kvlab's simulator: what prices its time outside the steps; None on vLLM
    sampler: str | None = None  # the top-k/top-p sampler the log says vLLM took (flashinfer, pytorch); None: not said
    model_runner: str | None = None  # the model runner the log shows (v1, v2); None: not said
    # the profiling run's split from vLLM's "Actual usage is ..." line (deploy.facts): records before it: None
    peak_activation_gib: float | None = figure("served", unit="GiB")
    consumed_memory_gib: float | None = figure("served", unit="GiB")  # weights + non-torch (vLLM 0.27+)
    non_torch_memory_gib: float | None = figure("served", unit="GiB")  # (vLLM 0.10.2-0.26)
    cudagraph_memory_gib: float | None = figure("served", unit="GiB")
    source: str | None = None  # in words: where the facts were read
    pool_source: str | None = None  # in words: where the KV pool (blocks, tokens) was read
    launched_by_kvlab: bool | None = None  # False: a server kvlab did not start (engine external)

    @classmethod
    def from_facts(cls, facts: Any, source: str | None = None, **said: Any) -> "ServerFacts":
        """From a StartupFacts (or its dict); None -> all unknown; said: pool_source, launched_by_kvlab."""
        data = facts.to_dict() if hasattr(facts, "to_dict") else dict(facts or {})
        return cls.model_validate({**data, "source": source, **said})


class MemorySplit(Part):
    """How vLLM splits one GPU's memory (models.memory.MemoryEstimate): an estimate."""

    total_bytes: int = figure("predicted", unit="bytes")
    gpu_memory_utilization: float
    requested_bytes: int = figure("predicted", unit="bytes")
    weight_bytes: int = figure("predicted", unit="bytes")
    activation_bytes: int = figure("predicted", unit="bytes")
    non_torch_bytes: int = figure("predicted", unit="bytes")
    cudagraph_bytes: int = figure("predicted", unit="bytes")
    kv_budget_bytes: int = figure("predicted", unit="bytes")
    sampler: str = "pytorch"  # the profiling run's top-k/top-p sampler assumed (records before it: pytorch)
    # the model runner whose profiling run the budget mirrors: v1, or v2 (Model Runner V2, vLLM's default
    # for more models from 0.22, every generate model from 0.29); records before it: v1
    model_runner: str = "v1"
    # the model runner's persistent per-request state the budget counts (Model Runner V2's penalty state,
    # from vLLM 0.27); records before it: 0
    runner_buffer_bytes: int = figure("predicted", unit="bytes", default=0)


class Prediction(Part):
    """The memory model's figures for one server (CapacityResult.to_dict())."""

    model: str
    attention: str
    kv_cache_dtype: str
    quantization: str
    block_size: int = figure("predicted", unit="tokens")
    attention_backend: str | None = None
    tensor_parallel_size: int
    pipeline_parallel_size: int
    max_model_len: int = figure("predicted", unit="tokens")
    layers_per_stage: list[int]
    kv_bytes_per_token_per_layer: int = figure("predicted", unit="bytes")
    kv_bytes_per_token: int = figure("predicted", unit="bytes")
    kv_bytes_per_token_model: int = figure("predicted", unit="bytes")
    page_size_bytes: int = figure("predicted", unit="bytes")
    num_kv_cache_groups: int
    bytes_per_block: int = figure("predicted", unit="bytes")
    kv_budget_bytes: int = figure("predicted", unit="bytes")
    kv_budget_source: str
    num_blocks: int = figure("predicted", unit="blocks")
    kv_cache_tokens: int = figure("predicted", unit="tokens")
    max_concurrency: float = figure("predicted", unit="requests")
    weight_bytes: int = figure("predicted", unit="bytes")
    weight_bytes_per_gpu: int = figure("predicted", unit="bytes")
    num_gpus: int
    memory: MemorySplit | None = None
    gpu: str | None = None
    warnings: list[str] = []
    kv_budget_gib: float = figure("predicted", unit="GiB")
    kv_cache_gib: float = figure("predicted", unit="GiB")
    kv_budget_bytes_per_stage: list[int] = []
    num_blocks_per_stage: list[int] = []
    limiting_stage: int = 0
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    speculative: dict[str, Any] | None = None
    num_draft_layers: int = 0
    rope_cache_bytes: int = figure("predicted", unit="bytes", default=0)  # in weight_bytes_per_gpu
    drafter_weight_bytes: int = figure("predicted", unit="bytes", default=0)  # in weight_bytes_per_gpu
    mla_dequant_bytes: int = figure("predicted", unit="bytes", default=0)  # in weight_bytes_per_gpu
    source: str | None = None  # in words: how it was predicted

    @classmethod
    def from_capacity(cls, cap: Any, **extra: Any) -> "Prediction | None":
        """From a CapacityResult (None stays None); extra overrides (source, attention_backend)."""
        if cap is None:
            return None
        data = cap.to_dict() if hasattr(cap, "to_dict") else dict(cap)
        return cls.model_validate({**data, **extra})


class PredictionRecord(Record):
    """prediction.json of a repeat: the memory model's prediction for its server (None: none made)."""

    KIND = "prediction"
    prediction: Prediction | None
    provenance: str = "predicted by the kvlab memory model"

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        if version != 0:
            return super().upgrade(data, version)
        provenance = data.pop("provenance", cls.model_fields["provenance"].default)
        data.pop("schema_version", None)
        return {"prediction": data or None, "provenance": provenance}


class ComparisonRow(Part):
    """One quantity, predicted against reported (deploy.compare.Comparison)."""

    quantity: str
    predicted: int | float | str | None = figure("predicted")
    reported: int | float | str | None = figure("served")
    match: bool | None
    note: str = ""


class ServerRecord(Record):
    """Everything about one server as `kvlab serve` records it (no secrets: argv and env redacted)."""

    KIND = "server"
    model: str
    served_model_name: str
    quant: str  # the profile level
    profile: dict[str, Any]
    serve_config: ServeConfig | None = None  # the level parsed once (kvlab.serve_config); None in older records
    engine: str
    engine_reason: str | None
    allocation_only: bool
    refusal: str | None
    argv: list[str]
    env: dict[str, str]
    command: str
    base_url: str
    log_path: str
    facts: ServerFacts
    prediction: Prediction | None
    comparison: list[ComparisonRow]
    exit_code: int | None
    allocation_error: str | None
    stop: dict[str, Any] | None
    host: dict[str, Any]
