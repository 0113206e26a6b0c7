"""The KV-cache memory model: one module, mirroring vLLM V1's own accounting.

Per layer vLLM keeps a page of `block_size` tokens (`vllm/v1/kv_cache_interface.py`):
- full attention (MHA/GQA/MQA): page = block_size x num_kv_heads x (head_size + head_size_v) x dtype bytes,
  KV heads split across tensor-parallel ranks;
- MLA (DeepSeek-V2/V3): one latent "head" of kv_lora_rank + qk_rope_head_dim, no separate V,
  replicated on every TP rank; `fp8_ds_mla` is a fixed 656 bytes per token.
A block holds that page for every layer of a KV-cache group, so `num_blocks = floor(budget /
(page_size x layers))` (`vllm/v1/core/kv_cache_utils.py`, `get_kv_cache_config_from_groups`), and
the reported capacity is `max_concurrency = num_blocks / cdiv(max_model_len, block_size)` per
group, `kv_cache_tokens = int(max_concurrency x max_model_len)` (vLLM >= 0.21). With pipeline
stages each stage divides its own budget by its own layers and vLLM keeps the smallest block count
(`get_kv_cache_configs`); a speculative draft's layers join the last stage's pool
(`kvlab.models.speculative`).
Everything else in kvlab (simulator, reports, planner) calls this module.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from math import ceil
from typing import Sequence

from kvlab import hardware
from kvlab.errors import KvlabError
from kvlab.models.arch import ModelArch, normalize_dtype
from kvlab.models.budget import (  # noqa: F401  (re-exported: the budget estimate lives in budget.py)
    DEFAULT_VLLM_VERSION, MemoryEstimate, default_sampler, activation_estimate_bytes, estimate_kv_budget, model_runner,
    OLDEST_VLLM_VERSION, nccl_transport, parse_vllm_version, release_of)
from kvlab.models.speculative import SpeculativeDraft, drafter_rope_arch, drafter_tensors, speculative_draft
from kvlab.models.weights import (DTYPE_BYTES, WeightFormat, mla_dequant_copy_bytes, rope_cache_bytes, rope_cache_fp32,
                                  tensor_bytes_by_role, weight_bytes_by_role, weight_format)
from kvlab.units import GiB
# vLLM's default --gpu-memory-utilization from 0.20 on (0.9 before): what `capacity` assumes for
# kvlab's default release (DEFAULT_VLLM_VERSION); `default_gpu_memory_utilization` for any release.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92
UTILIZATION_092_FROM = (0, 20)


def default_gpu_memory_utilization(vllm_version: str = DEFAULT_VLLM_VERSION) -> float:
    """vLLM's default --gpu-memory-utilization in release `vllm_version` (CacheConfig): 0.9 up to
    0.19, 0.92 from 0.20; KvlabError for a version kvlab cannot read."""
    return DEFAULT_GPU_MEMORY_UTILIZATION if release_of(vllm_version) >= UTILIZATION_092_FROM else 0.9

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
    """A KV-cache group: layers sharing one block table (vLLM hybrid allocator). `layers` are
    indexes into the list of layer specs given to `kv_groups`."""

    specs: tuple[KVCacheSpec, ...]
    layers: tuple[int, ...]

    @property
    def spec(self) -> KVCacheSpec:
        return self.specs[0]

    @property
    def num_layers(self) -> int:
        return len(self.specs)

    @property
    def bytes_per_block(self) -> int:
        """One block across the group's layers (vLLM `UniformTypeKVCacheSpecs.page_size_bytes`)."""
        return sum(s.page_size_bytes for s in self.specs)

    def blocks_per_request(self, max_model_len: int, max_num_batched_tokens: int) -> int:
        return max(ceil(s.max_memory_usage_bytes(max_model_len, max_num_batched_tokens) / s.page_size_bytes)
                   for s in self.specs)

    def on(self, layers: set[int], specs: list[KVCacheSpec]) -> "KVGroup":
        """This group restricted to some layers (one pipeline stage's)."""
        mine = tuple(i for i in self.layers if i in layers)
        return KVGroup(tuple(specs[i] for i in mine), mine)


def _slot_type(spec: KVCacheSpec) -> tuple:
    """Layers of one slot type need the same token slots per request (vLLM `is_uniform_type`)."""
    return (spec.attention == "sliding", spec.sliding_window if spec.attention == "sliding" else None,
            spec.block_size)


def kv_groups(specs: list[KVCacheSpec]) -> list[KVGroup]:
    """Group layers as vLLM 0.32 does (`get_kv_cache_groups`).

    One slot type (all full attention or MLA, e.g. a model with its draft's layers): one group of
    all layers, pages summed (`UniformTypeKVCacheSpecs`). Several types with one page size:
    groups of `group_size` layers each, the smallest type's count (or the largest's, when within
    1.5x), layers i, i + n, ... of a type in its i-th group
    (`_get_kv_cache_groups_uniform_page_size`)."""
    indexed = list(enumerate(specs))
    if len({_slot_type(s) for s in specs}) == 1:
        return [KVGroup(tuple(specs), tuple(range(len(specs))))]
    if len({s.page_size_bytes for s in specs}) > 1:
        raise KvlabError("layers of different attention types and different page sizes (e.g. a sliding-window "
                         "model with a draft of another geometry): kvlab does not size vLLM's page unification")
    buckets: dict[KVCacheSpec, list[int]] = {}
    for i, s in indexed:
        buckets.setdefault(s, []).append(i)
    counts = [len(v) for v in buckets.values()]
    group_size = min(counts)
    if max(counts) < min(counts) * 1.5:
        group_size = max(counts)
    groups = []
    for spec, layers in buckets.items():
        num_groups = ceil(len(layers) / group_size)
        for i in range(num_groups):
            mine = tuple(layers[i::num_groups])
            groups.append(KVGroup((spec,) * len(mine), mine))
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
    # Per pipeline stage: its KV budget and the blocks it fits; vLLM keeps the smallest count.
    kv_budget_bytes_per_stage: list[int] = field(default_factory=list)
    num_blocks_per_stage: list[int] = field(default_factory=list)
    limiting_stage: int = 0
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    speculative: dict | None = None  # method, model, draft layers (on the last stage)
    num_draft_layers: int = 0
    rope_cache_bytes: int = 0  # the rotary cos/sin cache, in weight_bytes_per_gpu (`rope_cache_bytes`)
    drafter_weight_bytes: int = 0  # a speculative drafter's resident weights, in weight_bytes_per_gpu
    mla_dequant_bytes: int = 0  # MLA's 16-bit kv_b_proj copy beside a quantized one, in weight_bytes_per_gpu

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kv_budget_gib"] = self.kv_budget_bytes / GiB
        d["kv_cache_gib"] = self.num_blocks * self.bytes_per_block / GiB
        return d


def expert_split(gpus: int, expert_parallel: bool) -> tuple[int, int]:
    """(tp, ep) of a MoE layer's routed experts over the `gpus` GPUs that share them (tp x dp): vLLM's
    `FusedMoEParallelConfig.make` gives each a 1/gpus slice of every expert, or, with
    --enable-expert-parallel and more than one GPU, 1/gpus of the experts whole."""
    return (1, gpus) if expert_parallel and gpus > 1 else (gpus, 1)


def check_block_fp8_experts(arch: ModelArch, fmt: WeightFormat, tp: int, dp: int, expert_parallel: bool) -> None:
    """vLLM refuses a block-FP8 MoE checkpoint whose routed experts' per-GPU slice is not a whole number
    of scale blocks (`validate_fp8_block_shape_moe`, vllm/model_executor/layers/quantization; the same
    check in 0.11.0's `Fp8MoEMethod.create_weights`): without --enable-expert-parallel each expert's
    intermediate size is split over tp x dp GPUs (FusedMoEParallelConfig flattens TP across DP), with
    it the experts stay whole. KvlabError with vLLM's message and what would start. (vLLM also checks the
    down projection's input against block_k; kvlab's blocks are square, so the one check covers both.)"""
    if fmt.name != "fp8-block" or arch.moe is None or not fmt.group_size:
        return
    inter = arch.moe.moe_intermediate_size
    moe_tp = expert_split(tp * dp, expert_parallel)[0]
    per = inter // moe_tp
    block = fmt.group_size
    hint = (f" (vLLM refuses to start: -tp {tp}{f' x -dp {dp}' if dp > 1 else ''} splits each routed expert's "
            f"{inter} columns {moe_tp} ways; --enable-expert-parallel keeps them whole)")
    if per % block:
        raise KvlabError(f"The output_size of gate's and up's weight = {per} is not divisible by weight "
                         f"quantization block_n = {block}.{hint}")


def _weights_per_gpu(roles: dict[str, float], tp: int, pp: int, dp: int) -> int:
    """One GPU's weights (`roles`: `weight_bytes_by_role`). Routed experts are split over tp x dp GPUs
    with or without --enable-expert-parallel (vLLM `FusedMoEParallelConfig.make` flattens TP across
    DP, and with EP each of those ranks owns whole experts); the rest is split by -tp and replicated
    across -dp."""
    expert = roles.get("expert", 0.0)
    rest = sum(roles.values()) - expert
    return ceil((rest / tp + expert / (tp * dp)) / pp)


def _drafter_bytes(draft: SpeculativeDraft | None, target: ModelArch, fmt: WeightFormat, dtype: str,
                   version: tuple[int, int], tp: int, pp: int, dp: int, max_model_len: int) -> int:
    """One last-stage GPU's bytes of a speculative drafter's resident weights
    (`speculative.drafter_tensors`) and of its own rope cache, if it has one: the MTP layers in the
    target's weight format, a draft checkpoint's layers in its own (`--speculative-config`'s draft
    runs in the target's dtype)."""
    if draft is None or draft.arch is None:
        return 0
    split, replicated, id_map = drafter_tensors(draft, target, version, pp)
    draft_fmt = fmt if draft.method == "mtp" else weight_format(None, draft.arch)
    dtp = draft.draft_tensor_parallel_size or tp
    db = DTYPE_BYTES[dtype]
    total = _weights_per_gpu(tensor_bytes_by_role(split, draft_fmt, db), dtp, 1, dp)
    total += ceil(sum(tensor_bytes_by_role(replicated, draft_fmt, db).values())) + id_map
    if draft.method == "mtp":  # its MLA layers keep the same 16-bit kv_b_proj copy as the target's
        total += mla_dequant_copy_bytes(target, fmt, dtype, dtp, num_layers=draft.num_layers)
    rope_arch = drafter_rope_arch(draft, target, version, max_model_len)
    return total + (rope_cache_bytes(rope_arch, dtype) if rope_arch is not None else 0)


def check_max_model_len(arch: ModelArch, max_model_len: int, allow_long: bool | None = None) -> str | None:
    """vLLM's check of --max-model-len against the config (`vllm/config/model.py`,
    `_get_and_verify_max_len`): beyond max_position_embeddings x the RoPE scaling factor (and any
    model_max_length) only with VLLM_ALLOW_LONG_MAX_MODEL_LEN=1. Returns vLLM's warning when allowed."""
    derived = arch.derived_max_model_len
    if derived is None or max_model_len <= derived:
        return None
    if arch.model_max_length is not None and max_model_len <= arch.model_max_length:
        return None
    if allow_long is None:
        allow_long = os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0").strip().lower() in ("1", "true")
    msg = (f"User-specified max_model_len ({max_model_len}) is greater than the derived max_model_len "
           f"(max_position_embeddings={float(derived)} or model_max_length={arch.model_max_length} in model's "
           "config.json).")
    if not allow_long:
        raise KvlabError(f"{msg} To allow overriding this maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1.")
    return f"{msg} VLLM_ALLOW_LONG_MAX_MODEL_LEN is set: positions beyond the model's context may give nan"


def _stage_budgets(kv_budget_bytes: int | Sequence[int], pp: int) -> list[int]:
    budgets = [int(kv_budget_bytes)] if isinstance(kv_budget_bytes, (int, float)) else [int(b) for b in kv_budget_bytes]
    if len(budgets) == 1:
        return budgets * pp
    if len(budgets) != pp:
        raise KvlabError(f"give one KV budget for all stages or one per pipeline stage (-pp {pp}), got {len(budgets)}")
    return budgets


def _draft_specs(draft: SpeculativeDraft | None, arch: ModelArch, kv_cache_dtype: str, block_size: int,
                 tp: int, dtype: str) -> list[KVCacheSpec]:
    """The KV-cache specs of the draft's layers (none for ngram and suffix drafts)."""
    if draft is None or draft.arch is None:
        return []
    dtp = draft.draft_tensor_parallel_size or tp
    if dtp not in (1, tp):
        raise KvlabError(f"--speculative-config draft_tensor_parallel_size={dtp} cannot be other value than 1 or "
                         f"target model tensor_parallel_size ({tp})")
    if (draft.arch.mla is None) != (arch.mla is None):
        raise KvlabError(f"a {draft.arch.attention} draft for an {arch.attention} model: its layers take another "
                         "attention backend, which kvlab does not size")
    return layer_specs(draft.arch, draft.kv_cache_dtype or kv_cache_dtype, block_size, dtp, dtype)


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
    kv_budget_bytes: int | Sequence[int] | None = None,
    gpu: str | None = None,
    gpu_memory_utilization: float | None = None,
    max_num_batched_tokens: int | None = None,
    max_num_seqs: int | None = None,
    num_gpu_blocks_override: int | None = None,
    cpu: bool = False,
    speculative_config: str | dict | SpeculativeDraft | None = None,
    data_parallel_size: int = 1,
    enable_expert_parallel: bool = False,
    allow_long_max_model_len: bool | None = None,
    vllm_version: str = DEFAULT_VLLM_VERSION,
    sampler: str | None = None,
    nnodes: int = 1,
    cuda_graphs: bool = True,
    torch_compile: bool = True,
) -> CapacityResult:
    """KV blocks, tokens and concurrency for one config, from an exact budget (one for all pipeline
    stages, or one per stage) or a GPU preset. allow_long_max_model_len None: read
    VLLM_ALLOW_LONG_MAX_MODEL_LEN from the environment, as vLLM does. gpu_memory_utilization None:
    the default of release `vllm_version` (`default_gpu_memory_utilization`). nnodes: the nodes the GPUs
    sit on (vLLM's --nnodes); it changes only the estimated budget (NCCL between nodes). cuda_graphs False
    (vLLM's --enforce-eager): no CUDA-graph memory is taken from the estimated budget. torch_compile
    False (--enforce-eager, -O0): vLLM's custom ops are on, which keeps DeepSeek's rope cache in fp32
    on CUDA from 0.14 (`rope_cache_fp32`)."""
    tp, pp, dp = tensor_parallel_size, pipeline_parallel_size, data_parallel_size
    if dp < 1:
        raise KvlabError(f"--data-parallel-size must be at least 1, got {dp}")
    nccl_transport(gpu or "", max(tp, 1), max(pp, 1), dp, nnodes)  # --nnodes as vLLM checks it
    fmt: WeightFormat = weight_format(quantization, arch)
    check_block_fp8_experts(arch, fmt, tp, dp, enable_expert_parallel)
    dtype = normalize_dtype(dtype or arch.dtype)
    warnings: list[str] = []
    if max_model_len is None:
        max_model_len = int(arch.derived_max_model_len or 4096)
    if max_model_len < 1:
        raise KvlabError(f"--max-model-len must be positive, got {max_model_len}")
    long_warning = check_max_model_len(arch, max_model_len, allow_long_max_model_len)
    if long_warning:
        warnings.append(long_warning)

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

    target_specs = layer_specs(arch, kv_cache_dtype, block_size, tp, dtype)
    speculative = (speculative_config if isinstance(speculative_config, SpeculativeDraft) or speculative_config is None
                   else speculative_draft(speculative_config, arch))
    draft_specs = _draft_specs(speculative, arch, kv_cache_dtype, block_size, tp, dtype)
    specs = target_specs + draft_specs  # the drafter's layers sit on the last pipeline stage
    stages = pp_partition(arch.num_layers, pp)

    roles = weight_bytes_by_role(arch, fmt, dtype)
    w_total = int(ceil(sum(roles.values())))  # = weight_bytes(arch, fmt, dtype)
    platform = None if cpu else (preset.platform if preset else "cuda")
    version = parse_vllm_version(vllm_version)
    rope = rope_cache_bytes(arch, dtype, rope_cache_fp32(arch, version, platform, torch_compile, dtype))
    drafter = _drafter_bytes(speculative, arch, fmt, dtype, version, tp, pp, dp, max_model_len)
    mla_copy = mla_dequant_copy_bytes(arch, fmt, dtype, tp, num_layers=max(stages))
    # every rank holds the whole rope cache; the drafter sits on the last stage, which vLLM's smallest
    # block count comes from (its KV layers are there too)
    w_gpu = _weights_per_gpu(roles, tp, pp, dp) + rope + drafter + mla_copy

    memory = None
    if kv_budget_bytes is not None:
        budgets, source = _stage_budgets(kv_budget_bytes, pp), "given"
    else:
        assert preset is not None
        util = default_gpu_memory_utilization(vllm_version) if gpu_memory_utilization is None else gpu_memory_utilization
        runner = model_runner(arch, vllm_version, quantized=fmt.key != "auto",
                              speculative_method=speculative.method if speculative else None, preset=preset)
        memory = estimate_kv_budget(arch, preset, util, w_gpu, max_num_batched_tokens,
                                    max_num_seqs, tp, pp, max(stages), vllm_version, sampler, dp, nnodes,
                                    cuda_graphs=cuda_graphs, runner=runner)
        budget, source = memory.kv_budget_bytes, "estimate"
        budgets = [budget] * pp

    mnbt_for_window = max_num_batched_tokens or (preset.default_max_num_batched_tokens if preset else 8192)
    # vLLM groups the whole model's layers (drafter included), gives each stage its share of every
    # group and its own budget, then keeps the smallest block count of all ranks
    # (`get_kv_cache_configs`).
    groups = kv_groups(specs)
    stage_layers = [set(range(sum(stages[:i]), sum(stages[:i + 1]))) for i in range(pp)]
    stage_layers[-1] |= set(range(arch.num_layers, len(specs)))
    bytes_per_stage = [max(g.on(layers, specs).bytes_per_block for g in groups) for layers in stage_layers]
    blocks_per_stage = [b // per_block for b, per_block in zip(budgets, bytes_per_stage)]
    limiting = min(range(pp), key=lambda i: blocks_per_stage[i])
    num_blocks, bytes_per_block, budget = blocks_per_stage[limiting], bytes_per_stage[limiting], budgets[limiting]
    if num_gpu_blocks_override is not None:
        num_blocks = num_gpu_blocks_override
    blocks_per_request = sum(g.blocks_per_request(max_model_len, mnbt_for_window) for g in groups)
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
        quantization=fmt.key,
        block_size=block_size,
        attention_backend=backend,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        max_model_len=max_model_len,
        layers_per_stage=stages,
        kv_bytes_per_token_per_layer=fp.kv_bytes_per_token_per_layer,
        kv_bytes_per_token=max(sum(specs[i].bytes_per_token for i in layers) for layers in stage_layers),
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
        rope_cache_bytes=rope,
        drafter_weight_bytes=drafter,
        mla_dequant_bytes=mla_copy,
        num_gpus=tp * pp * dp,
        memory=memory,
        gpu=preset.name if preset else None,
        warnings=warnings,
        kv_budget_bytes_per_stage=budgets,
        num_blocks_per_stage=blocks_per_stage,
        limiting_stage=limiting,
        data_parallel_size=dp,
        enable_expert_parallel=enable_expert_parallel,
        speculative=speculative.to_dict() if speculative else None,
        num_draft_layers=len(draft_specs),
    )
