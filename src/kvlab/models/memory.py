"""The KV-cache memory model: one module, mirroring vLLM V1's own accounting.

Per layer vLLM keeps a page of `block_size` tokens (`vllm/v1/kv_cache_interface.py`):
- full attention (MHA/GQA/MQA): page = block_size x num_kv_heads x (head_size + head_size_v) x dtype bytes,
  KV heads split across tensor-parallel ranks;
- MLA (DeepSeek-V2/V3): one latent "head" of kv_lora_rank + qk_rope_head_dim, no separate V,
  replicated on every TP rank; `fp8_ds_mla` is a fixed 656 bytes per token.
A block holds that page for every layer of a KV-cache group, so `num_blocks = floor(budget /
(page_size x layers))` (`vllm/v1/core/kv_cache_utils.py`, `get_kv_cache_config_from_groups`), and
the reported capacity is `max_concurrency = num_blocks / cdiv(max_model_len, block_size)` per
group, `kv_cache_tokens = int(max_concurrency x max_model_len)` (vLLM >= 0.21).
Everything else in kvlab (simulator, reports, planner) calls this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from math import ceil

from kvlab import hardware
from kvlab.errors import KvlabError
from kvlab.models.arch import ModelArch, normalize_dtype
from kvlab.models.budget import (  # noqa: F401  (re-exported: the budget estimate lives in budget.py)
    DEFAULT_SAMPLER, DEFAULT_VLLM_VERSION, MemoryEstimate, activation_estimate_bytes, estimate_kv_budget)
from kvlab.models.weights import DTYPE_BYTES, WeightFormat, weight_bytes, weight_format
from kvlab.units import GiB
# vLLM's default --gpu-memory-utilization from 0.20 on (0.9 before): what `capacity` assumes.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92

# --kv-cache-dtype values -> bytes per element (None: the model dtype).
KV_CACHE_DTYPES: dict[str, int | None] = {
    "auto": None,
    "bfloat16": 2,
    "float16": 2,
    "half": 2,
    "float32": 4,
    "float": 4,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "fp8_ds_mla": 1,
}
FP8_DS_MLA_BYTES_PER_TOKEN = 656  # 512 fp8 latent + 4 fp32 scales + 64 bf16 RoPE dims

# Default block size and which --kv-cache-dtype values each attention backend takes
# (vLLM 0.32 `get_supported_kernel_block_sizes` / `supported_kv_cache_dtypes`).
# vLLM starts from block size 16 and takes the backend's smallest size when 16 is not supported.
ATTENTION_BACKENDS: dict[str, dict] = {
    "FLASH_ATTN": {"mla": False, "block_size": 16, "kv_dtypes": None},
    "FLASHINFER": {"mla": False, "block_size": 16, "kv_dtypes": None},
    "TRITON_ATTN": {"mla": False, "block_size": 16, "kv_dtypes": None},
    "CPU_ATTN": {"mla": False, "block_size": 128, "kv_dtypes": None},
    "FLASH_ATTN_MLA": {"mla": True, "block_size": 16, "kv_dtypes": ("auto", "bfloat16", "float16")},
    "FLASHMLA": {"mla": True, "block_size": 64, "kv_dtypes": ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_ds_mla")},
    "FLASHINFER_MLA": {"mla": True, "block_size": 32, "kv_dtypes": ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3")},
    "CUTLASS_MLA": {"mla": True, "block_size": 128, "kv_dtypes": ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3")},
    "TRITON_MLA": {"mla": True, "block_size": 16, "kv_dtypes": ("auto", "bfloat16", "float16", "fp8", "fp8_e4m3")},
    # The CPU build sizes (and logs) an fp8 MLA cache, then its CPU_MLA kernel fails at the first
    # request: the size is still a real allocation, so it is predicted; kvlab.deploy refuses to serve
    # it. AMX CPUs run MLA on AMX_MLA with 128-token blocks.
    "CPU_MLA": {"mla": True, "block_size": 16, "kv_dtypes": None},
    "AMX_MLA": {"mla": True, "block_size": 128, "kv_dtypes": None},
}


def default_backend(mla: bool, kv_cache_dtype: str, compute_capability: float | None) -> str:
    """The attention backend vLLM 0.32 picks first on a device (`vllm/platforms/cuda.py`).

    compute_capability None means the CPU build."""
    if compute_capability is None:
        return "CPU_MLA" if mla else "CPU_ATTN"
    major = int(compute_capability)
    if not mla:
        return "FLASHINFER" if major == 10 else "FLASH_ATTN"
    if major == 10:
        order = ["FLASHINFER_MLA", "CUTLASS_MLA", "FLASHMLA", "TRITON_MLA"]
    elif major == 9:
        order = ["FLASH_ATTN_MLA", "FLASHMLA", "FLASHINFER_MLA", "TRITON_MLA"]
    else:  # Ampere, Ada, consumer Blackwell: FlashMLA and FA-MLA need Hopper
        order = ["TRITON_MLA"]
    for name in order:
        allowed = ATTENTION_BACKENDS[name]["kv_dtypes"]
        if allowed is None or kv_cache_dtype in allowed:
            return name
    return order[-1]


@dataclass(frozen=True)
class KVCacheSpec:
    """One layer's KV cache on one rank (vLLM's AttentionSpec / MLAAttentionSpec)."""

    block_size: int
    num_kv_heads: int
    head_size: int
    head_size_v: int
    dtype_bytes: int
    attention: str  # "full", "sliding" or "mla"
    sliding_window: int | None = None
    fixed_bytes_per_token: int | None = None  # fp8_ds_mla

    @property
    def bytes_per_token(self) -> int:
        if self.fixed_bytes_per_token is not None:
            return self.fixed_bytes_per_token
        return self.num_kv_heads * (self.head_size + self.head_size_v) * self.dtype_bytes

    @property
    def page_size_bytes(self) -> int:
        return self.block_size * self.bytes_per_token

    def max_memory_usage_bytes(self, max_model_len: int, max_num_batched_tokens: int) -> int:
        """Bytes one request of max_model_len tokens can hold (vLLM `max_memory_usage_bytes`)."""
        if self.attention == "sliding" and self.sliding_window:
            tokens = min(self.sliding_window - 1 + max_num_batched_tokens, max_model_len)
            return (ceil(tokens / self.block_size) + 1) * self.page_size_bytes
        return ceil(max_model_len / self.block_size) * self.page_size_bytes


def kv_dtype_bytes(arch: ModelArch, kv_cache_dtype: str, dtype: str | None) -> int:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise KvlabError(
            f"unknown --kv-cache-dtype {kv_cache_dtype!r}; use one of: {', '.join(KV_CACHE_DTYPES)}"
        )
    if kv_cache_dtype == "fp8_ds_mla" and arch.mla is None:
        raise KvlabError(f"--kv-cache-dtype fp8_ds_mla is for MLA models only; {arch.architecture} uses {arch.attention}")
    fixed = KV_CACHE_DTYPES[kv_cache_dtype]
    return fixed if fixed is not None else DTYPE_BYTES[normalize_dtype(dtype or arch.dtype)]


def layer_specs(
    arch: ModelArch,
    kv_cache_dtype: str = "auto",
    block_size: int = 16,
    tensor_parallel_size: int = 1,
    dtype: str | None = None,
) -> list[KVCacheSpec]:
    """The KV-cache spec of every layer on one tensor-parallel rank."""
    tp = tensor_parallel_size
    if tp < 1:
        raise KvlabError(f"-tp must be at least 1, got {tp}")
    if block_size < 1:
        raise KvlabError(f"--block-size must be at least 1, got {block_size}")
    if arch.num_attention_heads % tp:
        raise KvlabError(
            f"-tp {tp} does not divide the {arch.num_attention_heads} attention heads of {arch.architecture}"
        )
    nbytes = kv_dtype_bytes(arch, kv_cache_dtype, dtype)
    if arch.mla is not None:
        fixed = FP8_DS_MLA_BYTES_PER_TOKEN if kv_cache_dtype == "fp8_ds_mla" else None
        spec = KVCacheSpec(block_size, 1, arch.mla.latent_dim, 0, nbytes, "mla", fixed_bytes_per_token=fixed)
        return [spec] * arch.num_layers
    kv = arch.num_key_value_heads
    if tp >= kv:
        if tp % kv:
            raise KvlabError(f"-tp {tp} is not a multiple of the {kv} KV heads of {arch.architecture}")
        heads_per_rank = 1  # KV heads are replicated across ranks
    else:
        if kv % tp:
            raise KvlabError(f"-tp {tp} does not divide the {kv} KV heads of {arch.architecture}")
        heads_per_rank = kv // tp
    full = KVCacheSpec(block_size, heads_per_rank, arch.head_dim, arch.head_dim, nbytes, "full")
    sliding = KVCacheSpec(block_size, heads_per_rank, arch.head_dim, arch.head_dim, nbytes, "sliding",
                          sliding_window=arch.sliding_window)
    types = arch.layer_types or ("full_attention",) * arch.num_layers
    return [sliding if t == "sliding_attention" and arch.sliding_window else full for t in types]


def pp_partition(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage (vLLM `get_pp_indices`: the remainder goes to the stages before the last)."""
    if pp < 1:
        raise KvlabError(f"-pp must be at least 1, got {pp}")
    if pp > num_layers:
        raise KvlabError(f"-pp {pp} exceeds the model's {num_layers} layers")
    parts = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        parts[-i] += 1
    return parts


@dataclass(frozen=True)
class KVGroup:
    """A KV-cache group: layers sharing one block table (vLLM hybrid allocator)."""

    spec: KVCacheSpec
    num_layers: int


def kv_groups(specs: list[KVCacheSpec]) -> list[KVGroup]:
    """Group layers as vLLM 0.32 does (`_get_kv_cache_groups_uniform_page_size`).

    One type: one group of all layers. Several types: groups of `group_size` layers each, the
    smallest type's count (or the largest's, when within 1.5x), padding the last group of a type."""
    buckets: dict[KVCacheSpec, int] = {}
    for s in specs:
        buckets[s] = buckets.get(s, 0) + 1
    if len(buckets) == 1:
        (spec, n), = buckets.items()
        return [KVGroup(spec, n)]
    counts = list(buckets.values())
    group_size = min(counts)
    if max(counts) < min(counts) * 1.5:
        group_size = max(counts)
    groups = []
    for spec, n in buckets.items():
        num_groups = ceil(n / group_size)
        for i in range(num_groups):
            groups.append(KVGroup(spec, len(range(i, n, num_groups))))
    return groups


@dataclass(frozen=True)
class KVFootprint:
    """KV bytes per token of a model under one --kv-cache-dtype, on one rank and in all."""

    kv_cache_dtype: str
    dtype_bytes: int
    kv_bytes_per_token_per_layer: int
    kv_bytes_per_token: int  # all layers, one rank (what one GPU holds)
    kv_bytes_per_token_all_ranks: int  # summed over TP ranks (MLA replicates, GQA splits)


def kv_footprint(arch: ModelArch, kv_cache_dtype: str = "auto", tensor_parallel_size: int = 1,
                 dtype: str | None = None) -> KVFootprint:
    specs = layer_specs(arch, kv_cache_dtype, 16, tensor_parallel_size, dtype)
    per_rank = sum(s.bytes_per_token for s in specs)
    return KVFootprint(
        kv_cache_dtype=kv_cache_dtype,
        dtype_bytes=specs[0].dtype_bytes,
        kv_bytes_per_token_per_layer=specs[0].bytes_per_token,
        kv_bytes_per_token=per_rank,
        kv_bytes_per_token_all_ranks=per_rank * tensor_parallel_size,
    )


# ---------------------------------------------------------------------------------------------
# Capacity


@dataclass(frozen=True)
class CapacityResult:
    model: str
    attention: str
    kv_cache_dtype: str
    quantization: str
    block_size: int
    attention_backend: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    max_model_len: int
    layers_per_stage: list[int]
    kv_bytes_per_token_per_layer: int
    kv_bytes_per_token: int  # one GPU: its pipeline stage's layers, its TP share of KV heads
    kv_bytes_per_token_model: int  # the whole model on one GPU-equivalent (all layers, no TP split)
    page_size_bytes: int  # one layer's page
    num_kv_cache_groups: int
    bytes_per_block: int  # one block across the group's layers (the divisor of the budget)
    kv_budget_bytes: int  # per rank
    kv_budget_source: str  # "given" or "estimate"
    num_blocks: int
    kv_cache_tokens: int
    max_concurrency: float
    weight_bytes: int  # whole model
    weight_bytes_per_gpu: int
    num_gpus: int
    memory: MemoryEstimate | None = None
    gpu: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kv_budget_gib"] = self.kv_budget_bytes / GiB
        d["kv_cache_gib"] = self.num_blocks * self.bytes_per_block / GiB
        return d


def _weights_per_gpu(total_weight_bytes: int, tp: int, pp: int) -> int:
    return ceil(total_weight_bytes / (tp * pp))


def capacity(
    arch: ModelArch,
    *,
    model_name: str = "",
    kv_cache_dtype: str = "auto",
    quantization: str | None = None,
    dtype: str | None = None,
    max_model_len: int | None = None,
    block_size: int | None = None,
    attention_backend: str | None = None,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    kv_budget_bytes: int | None = None,
    gpu: str | None = None,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    max_num_batched_tokens: int | None = None,
    max_num_seqs: int | None = None,
    num_gpu_blocks_override: int | None = None,
    cpu: bool = False,
    vllm_version: str = DEFAULT_VLLM_VERSION,
    sampler: str = DEFAULT_SAMPLER,
) -> CapacityResult:
    """KV blocks, tokens and concurrency for one config, from an exact budget or a GPU preset."""
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    fmt: WeightFormat = weight_format(quantization, arch)
    dtype = normalize_dtype(dtype or arch.dtype)
    warnings: list[str] = []
    if max_model_len is None:
        max_model_len = int(arch.max_position_embeddings or 4096)
    if max_model_len < 1:
        raise KvlabError(f"--max-model-len must be positive, got {max_model_len}")
    if arch.max_position_embeddings and max_model_len > arch.max_position_embeddings:
        raise KvlabError(
            f"--max-model-len {max_model_len} exceeds the model's max_position_embeddings "
            f"({arch.max_position_embeddings})"
        )

    preset = hardware.gpu(gpu) if gpu else None
    if kv_budget_bytes is None and preset is None:
        raise KvlabError("give a KV budget (--kv-memory-gib) or a GPU (--gpu NAME)")
    cc = None if cpu else (preset.compute_capability if preset else 9.0)
    backend = attention_backend or default_backend(arch.mla is not None, kv_cache_dtype, cc)
    if backend not in ATTENTION_BACKENDS:
        raise KvlabError(f"unknown attention backend {backend!r}; use one of: {', '.join(ATTENTION_BACKENDS)}")
    info = ATTENTION_BACKENDS[backend]
    if info["mla"] != (arch.mla is not None):
        raise KvlabError(f"attention backend {backend} does not serve {arch.attention} attention")
    if info["kv_dtypes"] is not None and kv_cache_dtype not in info["kv_dtypes"]:
        raise KvlabError(
            f"--kv-cache-dtype {kv_cache_dtype} is not supported by the {backend} backend "
            f"(it takes {', '.join(info['kv_dtypes'])})"
        )
    if block_size is None:
        block_size = info["block_size"]

    specs = layer_specs(arch, kv_cache_dtype, block_size, tp, dtype)
    stages = pp_partition(arch.num_layers, pp)

    w_total = weight_bytes(arch, fmt, dtype)
    w_gpu = _weights_per_gpu(w_total, tp, pp)

    memory = None
    if kv_budget_bytes is not None:
        budget, source = int(kv_budget_bytes), "given"
    else:
        assert preset is not None
        memory = estimate_kv_budget(arch, preset, gpu_memory_utilization, w_gpu, max_num_batched_tokens,
                                    max_num_seqs, tp, pp, max(stages), vllm_version, sampler)
        budget, source = memory.kv_budget_bytes, "estimate"

    mnbt_for_window = max_num_batched_tokens or (preset.default_max_num_batched_tokens if preset else 8192)
    # Each pipeline stage holds its own layers; vLLM takes the smallest block count of all ranks.
    per_stage = []
    start = 0
    for n in stages:
        groups = kv_groups(specs[start:start + n])
        start += n
        bytes_per_block = max(g.spec.page_size_bytes * g.num_layers for g in groups)
        per_stage.append((groups, bytes_per_block, budget // bytes_per_block))
    groups, bytes_per_block, num_blocks = min(per_stage, key=lambda s: s[2])
    if num_gpu_blocks_override is not None:
        num_blocks = num_gpu_blocks_override
    blocks_per_request = sum(
        ceil(g.spec.max_memory_usage_bytes(max_model_len, mnbt_for_window) / g.spec.page_size_bytes)
        for g in groups
    )
    max_concurrency = num_blocks / blocks_per_request
    kv_cache_tokens = int(max_concurrency * max_model_len)
    if num_blocks - 1 < blocks_per_request:
        warnings.append(
            f"the KV cache ({num_blocks} blocks) cannot hold one request of --max-model-len "
            f"{max_model_len} ({blocks_per_request} blocks): vLLM refuses to start; lower --max-model-len"
        )

    fp = kv_footprint(arch, kv_cache_dtype, tp, dtype)
    whole = kv_footprint(arch, kv_cache_dtype, 1, dtype)
    return CapacityResult(
        model=model_name or arch.architecture,
        attention=arch.attention,
        kv_cache_dtype=kv_cache_dtype,
        quantization=fmt.name,
        block_size=block_size,
        attention_backend=backend,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        max_model_len=max_model_len,
        layers_per_stage=stages,
        kv_bytes_per_token_per_layer=fp.kv_bytes_per_token_per_layer,
        kv_bytes_per_token=fp.kv_bytes_per_token_per_layer * max(stages),
        kv_bytes_per_token_model=whole.kv_bytes_per_token,
        page_size_bytes=specs[0].page_size_bytes,
        num_kv_cache_groups=len(groups),
        bytes_per_block=bytes_per_block,
        kv_budget_bytes=budget,
        kv_budget_source=source,
        num_blocks=num_blocks,
        kv_cache_tokens=kv_cache_tokens,
        max_concurrency=max_concurrency,
        weight_bytes=w_total,
        weight_bytes_per_gpu=w_gpu,
        num_gpus=tp * pp,
        memory=memory,
        gpu=preset.name if preset else None,
        warnings=warnings,
    )
