"""Step times from measured vLLM kernel data: NVIDIA's aiconfigurator-core (Apache-2.0).

aiconfigurator-core ships per-GPU tables of vLLM kernel times (GEMM per quant mode, context and
generation attention per KV dtype, MoE, all-reduce; vLLM 0.24 on H100/H200/B200/L40S, 0.14 on
A100) and a compiled estimator (`AicEngine`) that walks a model's op list over them. Its own
mixed-step call ties the decode rows' context to the prefill prompt, so kvlab composes one
continuous-batching step from its per-op terms, as its `mixed_step_breakdown` does:

- a step with prefill chunks: the non-attention ops (GEMMs, MoE, norms, all-reduces) at all of the
  step's tokens (prefill plus decode), plus context attention for the chunks (chunks of the same
  (new, cached) length as one batch), plus generation attention for the decode rows. For MLA models
  the tables' context op is the whole MLA block, its projections and per-layer fixed work with the
  attention: a step's fresh prompts (no cached context) of several lengths are one batch of it at
  their mean length, as the estimator's own mixed step averages a batch's prompts, so they pay those
  once, as vLLM's one GEMM per projection and one varlen attention call over the step do (the tables'
  batch axis agrees: two prompts of n/2 tokens cost what one of n does); a chunk with cached context
  (a long prompt's continuation) keeps its own batch;
- a pure decode step of B rows: the generation ops at B rows and the rows' mean context (what
  `decode_step_latency` computes; generation attention is near-linear in context, and Dynamo's
  mocker prices a step from the same sums: decode rows and their summed KV tokens).

Plus the host time of `kvlab.sim.timing` (the release's measured engine-core time, `host_time`): the
tables hold GPU time only.

Every priced step has a provenance, the worst of its terms: `measured` (every varying coordinate
on a measured grid point, and the model's fixed shapes in the tables), `interpolated` (inside the
grid), `extrapolated` (beyond it: the estimator extrapolates silently, kvlab checks the ranges), or
`roofline` (the estimator could not answer; the step is priced by the roofline). `KernelTiming`
counts steps per provenance. Models, GPUs and formats without tables get no KernelTiming of their
own: `kernel_support` names the reason and `kvlab.sim.timing.step_timing` prices a weight-only
format from the BF16 tables scaled by the roofline's ratio (`ScaledTiming`), or falls back to the
roofline.

Calls cost 4-40 us inside the grid and up to several ms outside it, so every term is memoised:
non-attention on the step's token count (asked at the tables' measured token counts only and
interpolated linearly between them, as the estimator itself does), generation attention on (rows, context bucket) with
linear interpolation between bucket edges 1/64 of an octave apart, context attention on
(chunks, new, cached). The memo tables are cleared when they reach MEMO_LIMIT entries each.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from kvlab.hardware import GPU
from kvlab.io import write_text_atomic
from kvlab.models import memory
from kvlab.models.arch import ModelArch
from kvlab.models.weights import WeightFormat

PACKAGE = "aiconfigurator-core"
BACKEND = "vllm"
# kvlab GPU preset -> aiconfigurator system with vLLM tables (the H100 PCIe and NVL and the A100 80GB
# PCIe and 40GB: TABLE_TWINS; the L4, A10, RTX 4090 and MI300X have none).
SYSTEMS = {"h100": "h100_sxm", "h200": "h200_sxm", "a100-80gb": "a100_sxm", "l40s": "l40s", "b200": "b200_sxm"}
# GPUs without tables of their own whose die, compute capability and so vLLM kernels are those of a
# GPU with tables (the H100 PCIe and NVL: GH100 like the H100 SXM; fewer SMs or a lower power cap,
# other HBM; the A100 80GB PCIe: the A100 SXM's GA100, its HBM2e slower, a 300 W cap; the A100 40GB
# SXM: the same GA100 and NVLink 3, HBM2 at 1.555 against 2.039 TB/s): priced as the twin's step times
# the roofline's ratio of this GPU's step to the twin's, from their data sheets
# (`kvlab.sim.timing.step_timing`, labelled).
TABLE_TWINS = {"h100-pcie": "h100", "h100-nvl": "h100", "a100-pcie": "a100-80gb", "a100-40gb": "a100-80gb"}
# kvlab weight format -> aiconfigurator GEMM/MoE quant mode. No dense int4 (AWQ/GPTQ/NF4) or INT8
# W8A8 GEMM table exists for vLLM.
GEMM_QUANT_MODES = {"auto": "bfloat16", "fp8": "fp8", "fp8-block": "fp8_block"}
# The rows that price a format's DENSE GEMMs where they are not its own: a block-FP8 checkpoint's
# linear layers from the per-tensor FP8 rows. The tables' fp8_block GEMM rows (vLLM 0.24's DeepGEMM,
# FlashInfer and CUTLASS block-scaled kernels) hold a per-call cost that does not grow with the work:
# per kernel, about the same from 8 rows to 1,024 and for every (n, k) up to 4096 x 4096, about 60 us
# on an H100/H200 (FlashInfer, up to 16 rows), 90 us (DeepGEMM), 175 us (CUTLASS, the smallest shapes)
# and 160-240 us on a B200 (DeepGEMM: a 2048 x 4096 GEMM takes 172-188 us at every row count from 8 to
# 8,192); where a GEMM's own time is well above it (the per-tensor row over 3x the floor) block over
# per-tensor has a median of 0.91 on the H100, 0.98 on the H200, 0.94 on the B200. Time that does not
# grow with the work is the host's launch path timed without a CUDA graph (vLLM PR #13917's own DeepGEMM
# microbenchmark shows the same flat 68-70 us at 8-128 rows on an H100), which vLLM's CUDA graphs
# remove in serving. The kernels' own time at small batch is a memory-bound GEMM's: DeepGEMM on Hopper
# 13-16 us at 1-64 rows for 7168 x 2304 and at 1-512 rows for 512 x 7168, 56-64 us at 1-128 rows for
# 7168 x 16384 (sgl-project/sglang PRs #5820 and #5207); vLLM's CUTLASS block path with its activation
# quantisation 9-28 us at 1-512 rows for Qwen3-8B's and Llama-3.1-8B's layers, one CUDA graph per layer
# (kvlab's H200 measurement, data/kernels/quant_gemm_perf.csv), where the H100/H200 tables hold 60-90
# us. The MLA module rows of a block-FP8 DeepSeek model have no such floor (fp8_block over bfloat16 at
# 1-128 rows on the H200: median +0.2 %), so MLA models keep their block rows; MoE experts keep the
# format's MoE rows.
DENSE_GEMM_ROWS = {"fp8-block": "fp8"}


def dense_gemm_mode(fmt_name: str, mla: bool) -> str:
    """The GEMM rows that price a format's dense linear layers (DENSE_GEMM_ROWS, not for MLA models,
    whose projections are priced inside the MLA module rows of the format's own mode)."""
    return GEMM_QUANT_MODES[fmt_name] if mla else DENSE_GEMM_ROWS.get(fmt_name, GEMM_QUANT_MODES[fmt_name])
# The MoE rows that price a format's routed experts are those of the kernel vLLM runs for it. For
# `-q fp8` that is vLLM's Triton fused-MoE kernel: `Fp8MoEMethod` (quantization/fp8.py) asks the FP8
# MoE oracle (vllm/model_executor/layers/fused_moe/oracle/fp8.py, `select_fp8_moe_backend`) for
# per-tensor weights with DYNAMIC activation scales and allow_vllm_cutlass=False; FlashInfer TRT-LLM
# and FlashInfer CUTLASS take per-tensor FP8 only with static activation scales
# (flashinfer_cutlass_moe.py, `_supports_quant_scheme`), DeepGEMM only block scales, so Triton it is.
# The tables' per-tensor "fp8" MoE rows were measured on ModelOpt checkpoints (static scales): on
# Hopper and Blackwell that is FlashInfer's path (kernel_source vllm_modeloptfp8moe_flashinfer_...),
# a kernel `-q fp8` does not run; on the L40S it is Triton. `moe_quant_mode` picks, for `-q fp8`, the
# per-tensor rows where they are Triton's, else the block-scaled Triton rows
# (vllm_fp8moe_triton_tritonexperts: the same Fp8MoEMethod and Triton experts, 128-block weight
# scales and per-token-group activation quantization instead of per-tensor), else the per-tensor
# rows as they are, and says which.
KV_QUANT_MODES = {"auto": "bfloat16", "bfloat16": "bfloat16", "float16": "bfloat16", "half": "bfloat16",
                  "fp8": "fp8", "fp8_e4m3": "fp8"}
# Architectures priced op by op. Mistral (no sliding window: kvlab's simulator refuses those) has
# Llama's layer shapes and is priced as Llama.
ARCHITECTURES = {"LlamaForCausalLM": "LlamaForCausalLM", "MistralForCausalLM": "LlamaForCausalLM",
                 "Qwen2ForCausalLM": "Qwen2ForCausalLM", "Qwen3ForCausalLM": "Qwen3ForCausalLM",
                 "Qwen3MoeForCausalLM": "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM": "Qwen2MoeForCausalLM",
                 "MixtralForCausalLM": "MixtralForCausalLM", "DeepseekV3ForCausalLM": "DeepseekV3ForCausalLM"}
# The estimator's attention ops (context-dependent: priced per chunk group and per decode context);
# for MLA models the whole MLA block (its projections with the attention), measured as one module.
ATTENTION_OPS = ("context_attention", "generation_attention", "context_mla_block", "generation_mla_block")
PROVENANCE = ("measured", "interpolated", "extrapolated", "roofline")
MEASURED, INTERPOLATED, EXTRAPOLATED, ROOFLINE = range(4)
MEMO_LIMIT = 200_000
BUCKETS_PER_OCTAVE_LOG2 = 6  # generation-attention context buckets: 64 per octave (above 128 tokens)


def context_bucket(s: float) -> int:
    """The low edge of the decode-context bucket of a mean context `s` (exact below 128 tokens,
    BUCKETS_PER_OCTAVE_LOG2 octave slices above): what the decode memos are keyed on."""
    si = int(s)
    return si if si < 128 else si - si % (1 << (si.bit_length() - 1 - BUCKETS_PER_OCTAVE_LOG2))


def bucket_width(lo: int) -> int:
    """The width of the decode-context bucket whose low edge is `lo` (`context_bucket`)."""
    return 1 if lo < 128 else 1 << (lo.bit_length() - 1 - BUCKETS_PER_OCTAVE_LOG2)


def bound_memo(memo: dict) -> None:
    """Clear a memo table that has reached MEMO_LIMIT entries."""
    if len(memo) >= MEMO_LIMIT:
        memo.clear()


def available() -> bool:
    try:
        import aiconfigurator_core  # noqa: F401
    except ImportError:
        return False
    return True


def package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return None


def data_root() -> Path:
    import aiconfigurator_core
    return Path(aiconfigurator_core.__file__).parent / "systems" / "data"


@lru_cache(maxsize=None)
def table_version(system: str) -> str | None:
    """The newest vLLM version with a GEMM table for `system` (the one the estimator loads)."""
    from packaging.version import Version
    d = data_root() / system / "gemm" / BACKEND
    versions = [p.name for p in d.iterdir() if (p / "gemm_perf.parquet").is_file()] if d.is_dir() else []
    return max(versions, key=Version) if versions else None


def gpu_tables(gpu: str) -> str | None:
    """Which measured tables a kvlab GPU preset has, e.g. "h100_sxm, vLLM 0.24.0" (for `kvlab
    gpus`), and kvlab's own measured rows for it ("; kvlab: MoE of deepseek-v2-lite, ...; int4/block-FP8
    layers of ..."), or None."""
    from kvlab.sim import measured_moe, quant_gemms

    twin = TABLE_TWINS.get(gpu)
    if twin is not None:
        theirs = gpu_tables(twin)
        return f"{twin}'s, scaled by the data sheets' ratio: {theirs}" if theirs else None
    system = SYSTEMS.get(gpu)
    own = measured_moe.measured_models(gpu)
    int4 = quant_gemms.measured_models() if gpu in quant_gemms.GPUS else ()
    tables = (f"{system}, vLLM {table_version(system)}" if system is not None and available()
              and table_version(system) is not None else None)
    mine = [f"MoE of {', '.join(own)}"] if own else []
    mine += [f"int4/block-FP8 layers of {', '.join(int4)}"] if int4 else []
    return "; ".join(x for x in (tables, "kvlab: " + "; ".join(mine) if mine else None) if x) or None


def _table(system: str, op: str, name: str):
    import pandas as pd
    path = data_root() / system / op / BACKEND / table_version(system) / name
    return pd.read_parquet(path) if path.is_file() else None


@dataclass(frozen=True)
class Grid:
    """Measured coordinates along one axis: on a point, between points, or beyond them."""

    points: tuple[int, ...]

    def label(self, x: float) -> int:
        if not self.points or x > self.points[-1] or x < self.points[0]:
            return EXTRAPOLATED
        i = bisect.bisect_left(self.points, x)
        return MEASURED if self.points[i] == x else INTERPOLATED


@dataclass(frozen=True)
class Tables:
    """The grids of one model's ops in one system's tables."""

    tokens: Grid  # token counts measured in every GEMM (and MoE) table of the model
    knots: tuple[int, ...]  # token counts measured in any of them: where the estimator's interpolation bends
    decode_batch: Grid
    decode_max_context: dict  # batch on the grid -> longest measured context
    decode_context: Grid
    prefill_batch: Grid
    prefill_len: Grid
    static: int  # the worst label of the model's fixed shapes (heads, GEMM n x k)
    notes: tuple[str, ...]


def _hf_config(arch: ModelArch, architecture: str) -> dict:
    cfg = {
        "architectures": [architecture], "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size, "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads, "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim, "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings or 131072,
        "tie_word_embeddings": arch.tie_word_embeddings, "torch_dtype": "bfloat16",
    }
    if arch.moe is not None:
        m = arch.moe
        cfg.update(num_experts=m.num_experts, num_local_experts=m.num_experts, num_experts_per_tok=m.num_experts_per_tok,
                   moe_intermediate_size=m.moe_intermediate_size)
        if m.shared_expert_intermediate_size:
            cfg["shared_expert_intermediate_size"] = m.shared_expert_intermediate_size
    if arch.mla is not None:  # DeepSeek-V3's config.json names
        a, m = arch.mla, arch.moe
        cfg.update(model_type="deepseek_v3", kv_lora_rank=a.kv_lora_rank, q_lora_rank=a.q_lora_rank,
                   qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim)
        if m is not None:
            cfg.update(n_routed_experts=m.num_experts, n_shared_experts=m.num_shared_experts,
                       first_k_dense_replace=min(m.moe_layers) if m.moe_layers else 0, moe_layer_freq=1)
    return cfg


def kernel_support(arch: ModelArch, fmt: WeightFormat, dtype: str, kv_cache_dtype: str, gpu: GPU | str,
                   tp: int, expert_parallel: bool = False) -> str | None:
    """Why this configuration has no measured kernel data (None: it has). `expert_parallel`: vLLM's
    --enable-expert-parallel (`moe_parallel`)."""
    name = gpu if isinstance(gpu, str) else gpu.name
    if not available():
        return f"{PACKAGE} is not installed"
    system = SYSTEMS.get(name)
    if system is None or table_version(system) is None:
        return f"no vLLM kernel tables for GPU {name} (tables exist for: {', '.join(SYSTEMS)})"
    if arch.architecture not in ARCHITECTURES:
        if arch.architecture == "DeepseekV2ForCausalLM":
            return ("DeepseekV2ForCausalLM is not an aiconfigurator architecture: its MLA tables are DeepSeek-V3 "
                    "attention blocks (hidden 7168, q_lora_rank 1536), and its MoE shape (hidden "
                    f"{arch.hidden_size}, {arch.moe.num_experts if arch.moe else 0} experts of "
                    f"{arch.moe.moe_intermediate_size if arch.moe else 0}, top-"
                    f"{arch.moe.num_experts_per_tok if arch.moe else 0}) is in no MoE table")
        return f"architecture {arch.architecture} is not priced from kernel tables"
    if arch.num_sliding_layers:
        return "sliding-window attention is not priced from kernel tables"
    if fmt.name not in GEMM_QUANT_MODES:
        return f"no vLLM GEMM table for {fmt.name} weights (dense int4/int8 kernels were not measured)"
    gemm = dense_gemm_mode(fmt.name, arch.mla is not None)
    if dtype not in ("bfloat16", "float16"):
        return f"no kernel tables for {dtype} activations"
    if KV_QUANT_MODES.get(kv_cache_dtype) is None:
        return f"no attention table for --kv-cache-dtype {kv_cache_dtype}"
    if arch.mla is not None:
        gen, ctx = _mla_tables(system, gemm, KV_QUANT_MODES[kv_cache_dtype])
        per_rank = arch.num_attention_heads // tp if arch.num_attention_heads % tp == 0 else None
        if per_rank is None or not (gen.num_heads == per_rank).any() or not (ctx.num_heads == per_rank).any():
            return (f"no MLA module rows for {arch.num_attention_heads} heads over -tp {tp}, {gemm} GEMMs, "
                    f"{KV_QUANT_MODES[kv_cache_dtype]} KV on {system}")
    missing = [op for op in ("context", "generation") if KV_QUANT_MODES[kv_cache_dtype] not in _attention_kv_modes(system, op)]
    if arch.mla is None and missing:
        return (f"no {' or '.join(missing)} attention rows for {KV_QUANT_MODES[kv_cache_dtype]} KV on {system} "
                f"(vLLM {table_version(system)})")
    gemm_rows = _gemm_modes(system)
    if gemm not in gemm_rows:
        return f"no {gemm} GEMM rows for {system} (vLLM {table_version(system)}: {', '.join(sorted(gemm_rows))})"
    shape = _moe_shape(arch, tp, expert_parallel)
    moe_mode = moe_quant_mode(system, fmt.name, shape)[0] if arch.moe is not None else None
    if arch.moe is not None and not _moe_kernels(system, moe_mode, shape):
        m = arch.moe
        return (f"MoE shape (hidden {arch.hidden_size}, {m.num_experts} experts of {m.moe_intermediate_size}, "
                f"top-{m.num_experts_per_tok}, {moe_mode}, moe_tp {shape[4]}, moe_ep {shape[5]}) is in no {system} "
                "MoE table")
    if arch.num_attention_heads % tp or arch.num_key_value_heads % tp and tp % arch.num_key_value_heads:
        return f"{arch.num_attention_heads} heads do not split over -tp {tp}"
    if tp > 1 and not _allreduce_rows(system, tp):
        return f"no all-reduce table for {tp} GPUs on {system}"
    return None


@lru_cache(maxsize=None)
def _attention_kv_modes(system: str, op: str) -> frozenset[str]:
    """The KV dtypes of the system's full-attention rows for `op` (context or generation)."""
    df = _table(system, "attention", f"{op}_attention_perf.parquet")
    if df is None:
        return frozenset()
    return frozenset(str(kv) for kv in df.kv_cache_dtype.unique() if not _full_attention(df, kv).empty)


@lru_cache(maxsize=None)
def moe_quant_mode(system: str, fmt_name: str, shape: tuple) -> tuple[str, str | None]:
    """The MoE rows' quant mode that prices format `fmt_name`'s experts on `system` for MoE `shape`
    (`_moe_shape`), and a note where those rows are not the format's own (see above)."""
    gemm = GEMM_QUANT_MODES[fmt_name]
    if fmt_name != "fp8":
        return gemm, None
    own = _moe_kernels(system, "fp8", shape)
    if own and all("triton" in k for k in own):
        return "fp8", None
    block = _moe_kernels(system, "fp8_block", shape)
    if block and all("triton" in k for k in block):
        return "fp8_block", ("MoE experts from the block-FP8 Triton rows (vLLM runs -q fp8 experts on its Triton "
                             f"kernel; the per-tensor FP8 MoE rows are {', '.join(sorted(own)) or 'absent'})")
    if own:
        return "fp8", (f"MoE experts from the per-tensor FP8 rows, measured on {', '.join(sorted(own))} (vLLM runs "
                       "-q fp8 experts on its Triton kernel, of which these tables have no FP8 rows)")
    return "fp8", None


def _moe_frame(system: str, mode: str, shape: tuple):
    """`system`'s MoE rows in quant mode `mode` for `shape` (`_moe_shape`: hidden, inter, top-k,
    experts, moe_tp, moe_ep), or None where the system has no MoE table."""
    df = _table(system, "moe", "moe_perf.parquet")
    if df is None:
        return None
    hidden, inter, topk, experts, tp, ep = shape
    return df[(df.moe_dtype == mode) & (df.hidden_size == hidden) & (df.inter_size == inter) & (df.topk == topk)
              & (df.num_experts == experts) & (df.moe_tp_size == tp) & (df.moe_ep_size == ep)]


@lru_cache(maxsize=None)
def _moe_kernels(system: str, mode: str, shape: tuple) -> frozenset[str]:
    """The kernel sources of those rows (empty: the shape is in no MoE table of `system`)."""
    df = _moe_frame(system, mode, shape)
    return frozenset() if df is None else frozenset(str(k) for k in df.kernel_source.unique())


def _gemm_modes(system: str) -> frozenset[str]:
    df = _table(system, "gemm", "gemm_perf.parquet")
    return frozenset(df.gemm_dtype.unique()) if df is not None else frozenset()


def _allreduce_rows(system: str, tp: int) -> bool:
    d = data_root() / system / "comm" / BACKEND
    if not d.is_dir():
        return False
    import pandas as pd
    for path in d.glob("*/custom_allreduce_perf.parquet"):
        if tp in set(pd.read_parquet(path, columns=["num_gpus"]).num_gpus):
            return True
    return False


@lru_cache(maxsize=64)
def _tables(system: str, gemm: str, kv: str, heads: int, kv_heads: int, head_dim: int,
            gemm_shapes: tuple[tuple[int, int], ...], moe_shape: tuple | None, mla: bool = False,
            moe_mode: str | None = None) -> Tables:
    """The grids of measured points for one configuration (`moe_shape` and `moe_mode`, the MoE
    rows' quant mode, for an MoE model)."""
    notes: list[str] = []
    static = MEASURED
    g = _table(system, "gemm", "gemm_perf.parquet")
    g = g[g.gemm_dtype == gemm]
    tokens = set(int(x) for x in g.m.unique())
    knots = set(tokens)
    if moe_shape is not None:  # a MoE model's token grid: where both GEMM and MoE tables have rows
        m = _moe_frame(system, moe_mode, moe_shape)
        tokens &= set(int(x) for x in m.num_tokens.unique())
        knots |= set(int(x) for x in m.num_tokens.unique())
    pairs = set(zip(g.n, g.k))
    off = [s for s in gemm_shapes if s not in pairs]
    if off:
        static = INTERPOLATED
        notes.append(f"GEMM (n, k) {off} between measured shapes")
    if mla:  # DeepSeek-V3's MLA module tables: per-rank heads, GEMM and KV dtypes
        gen, ctx = _mla_tables(system, gemm, kv)
        gs, cs = gen[gen.num_heads == heads], ctx[ctx.num_heads == heads]
    else:
        gen = _table(system, "attention", "generation_attention_perf.parquet")
        ctx = _table(system, "attention", "context_attention_perf.parquet")
        gen, ctx = _full_attention(gen, kv), _full_attention(ctx, kv)
        gs = gen[(gen.num_heads == heads) & (gen.num_key_value_heads == kv_heads) & (gen.head_dim == head_dim)]
        cs = ctx[(ctx.num_heads == heads) & (ctx.num_key_value_heads == kv_heads) & (ctx.head_dim == head_dim)]
    if (gs.empty or cs.empty) and mla:
        raise ValueError(f"no MLA module rows for {heads} heads per GPU, {gemm} GEMMs, {kv} KV on {system}")
    if gs.empty or cs.empty:
        beyond = kv_heads > gen.num_key_value_heads.max() or heads > gen.num_heads.max()
        static = max(static, EXTRAPOLATED if beyond else INTERPOLATED)
        notes.append(f"attention ({heads} heads, {kv_heads} KV heads, head_dim {head_dim}) "
                     f"{'beyond' if beyond else 'between'} measured shapes")
        gs = gen if gs.empty else gs
        cs = ctx if cs.empty else cs
    # Generation rows: `step` tokens decoded after a 1-token prompt; the estimator's context s of
    # a row is step + 2 (checked against the rows of H100's table).
    # MLA module rows: a 1-token prompt plus `step` tokens, context isl + step (checked against H200's).
    offset = 1 if mla else 2
    max_ctx = (gs.groupby("batch_size").step.max() + offset).to_dict()
    return Tables(
        tokens=Grid(tuple(sorted(tokens))), knots=tuple(sorted(knots)),
        decode_batch=Grid(tuple(sorted(int(x) for x in gs.batch_size.unique()))),
        decode_max_context={int(b): int(s) for b, s in max_ctx.items()},
        decode_context=Grid(tuple(sorted(int(x) + offset for x in gs.step.unique()))),
        prefill_batch=Grid(tuple(sorted(int(x) for x in cs.batch_size.unique()))),
        prefill_len=Grid(tuple(sorted(int(x) for x in cs.isl.unique()))),
        static=static, notes=tuple(notes),
    )


def _mla_tables(system: str, gemm: str, kv: str):
    """The MLA module tables' rows (generation, context) for these GEMM and KV dtypes (empty frames
    where the system has none)."""
    import pandas as pd
    out = []
    for op in ("generation", "context"):
        df = _table(system, "mla", f"mla_{op}_module_perf.parquet")
        out.append(pd.DataFrame(columns=["num_heads"]) if df is None
                   else df[(df.gemm_type == gemm) & (df.kv_cache_dtype == kv)])
    return out[0], out[1]


def _full_attention(df, kv: str):
    """Rows of full (not sliding-window) attention with this KV dtype (A100's vLLM 0.14 tables
    have no window column)."""
    keep = df.kv_cache_dtype == kv
    if "window_size" in df.columns:
        keep &= df.window_size == 0
    return df[keep]


def moe_parallel(tp: int, expert_parallel: bool) -> tuple[int, int]:
    """(moe_tp, moe_ep): how vLLM splits a MoE layer's routed experts over one engine's `tp` GPUs.
    Without --enable-expert-parallel every GPU holds a 1/tp slice of every expert. With it (and tp >
    1) every GPU holds tp-th of the experts whole: `FusedMoEParallelConfig.make` sets the experts'
    tp_size 1 and ep_size tp (vllm/model_executor/layers/fused_moe/config.py). Without data parallelism
    vLLM runs no all-to-all kernels there (`use_all2all_kernels` needs dp, pcp or sequence parallelism):
    the experts' partial outputs are summed by the same all-reduce as under tensor parallelism, so only
    the experts' own time changes, which the MoE tables measure per (moe_tp, moe_ep)."""
    return memory.expert_split(tp, expert_parallel)


def _moe_shape(arch: ModelArch, tp: int, expert_parallel: bool = False) -> tuple | None:
    m = arch.moe
    return None if m is None else (arch.hidden_size, m.moe_intermediate_size, m.num_experts_per_tok, m.num_experts,
                                   *moe_parallel(tp, expert_parallel))


def _gemm_shapes(arch: ModelArch, tp: int) -> tuple[tuple[int, int], ...]:
    """(n, k) of the dense GEMMs of one layer on one rank (vLLM's merged QKV and gate/up)."""
    h, hd = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads // tp, max(arch.num_key_value_heads // tp, 1)
    if arch.mla is not None:  # the projections are inside the measured MLA module; the dense layers' MLP
        return ((2 * arch.intermediate_size // tp, h), (h, arch.intermediate_size // tp))
    shapes = [((q + 2 * kv) * hd, h), (h, q * hd)]
    if arch.moe is None:
        shapes += [(2 * arch.intermediate_size // tp, h), (h, arch.intermediate_size // tp)]
    return tuple(shapes)


@contextlib.contextmanager
def _quiet_stderr():
    """The estimator's Rust loader prints table-loading notes on fd 2; keep the simulator's log clean."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)


@contextlib.contextmanager
def _libyaml():
    """The estimator's compile reads its tables' YAML metadata with `yaml.safe_load`, PyYAML's
    pure-Python parser (about 1.2 of the 2.2 CPU seconds the first compile takes); while it runs,
    `yaml.safe_load` parses with libyaml where PyYAML has it (`CSafeLoader`: the same safe
    constructor, a C scanner and parser), and is put back after."""
    import yaml
    if not getattr(yaml, "__with_libyaml__", False):
        yield
        return
    plain = yaml.safe_load
    yaml.safe_load = lambda stream: yaml.load(stream, Loader=yaml.CSafeLoader)
    try:
        yield
    finally:
        yaml.safe_load = plain


@lru_cache(maxsize=16)
def _engine(config_json: str, system: str, tp: int, gemm: str, kv: str, moe: str | None, expert_parallel: bool = False):
    """Compile the estimator for a model config (JSON) once per process (`moe`: the MoE rows'
    quant mode, None for a dense model; `expert_parallel`: its experts split as `moe_parallel` says)."""
    from aiconfigurator_core.sdk.engine import EngineHandle
    kwargs = dict(tp_size=tp, gemm_quant_mode=gemm, kvcache_quant_mode=kv)
    if moe:
        moe_tp, moe_ep = moe_parallel(tp, expert_parallel)
        kwargs.update(moe_tp_size=moe_tp, moe_ep_size=moe_ep, moe_quant_mode=moe)
    with tempfile.TemporaryDirectory(prefix="kvlab-aic-") as d, _quiet_stderr(), _libyaml():
        write_text_atomic(Path(d) / "config.json", config_json)
        handle = EngineHandle.compile(d, system, BACKEND, **kwargs)
    return handle._engine


class KernelTiming:
    """Prices simulated engine steps from aiconfigurator-core's measured vLLM kernel tables (the
    same interface as `kvlab.sim.timing.CostModel`: `step_time_s`, `decode_step_s`)."""

    def __init__(self, arch: ModelArch, fmt: WeightFormat, dtype: str, kv_cache_dtype: str, gpu: GPU, tp: int,
                 roofline, host_step_s: float, host_per_seq_s: float, expert_parallel: bool = False):
        reason = kernel_support(arch, fmt, dtype, kv_cache_dtype, gpu, tp, expert_parallel)
        if reason:
            raise ValueError(reason)
        self.system = SYSTEMS[gpu.name]
        self.gemm_quant_mode = dense_gemm_mode(fmt.name, arch.mla is not None)
        moe_shape = _moe_shape(arch, tp, expert_parallel)
        self.moe_quant_mode, moe_note = (moe_quant_mode(self.system, fmt.name, moe_shape)
                                         if arch.moe is not None else (None, None))
        if moe_shape is not None and moe_shape[5] > 1:
            ep_note = f"expert parallel: experts from the moe_tp 1 x moe_ep {moe_shape[5]} rows"
            ep_kernels = _moe_kernels(self.system, self.moe_quant_mode, moe_shape)
            tp_kernels = _moe_kernels(self.system, self.moe_quant_mode, _moe_shape(arch, tp))
            if ep_kernels != tp_kernels:  # the tables measured another kernel there (or none at moe_ep 1)
                ep_note += f", measured on {', '.join(sorted(ep_kernels))}" + (
                    f" (the tensor-parallel rows: {', '.join(sorted(tp_kernels))})" if tp_kernels else
                    " (no tensor-parallel rows for this shape)")
            moe_note = "; ".join(filter(None, [ep_note, moe_note]))
        self.kvcache_quant_mode = KV_QUANT_MODES[kv_cache_dtype]
        self.tp = tp
        self.roofline = roofline  # fallback for steps the estimator cannot answer, and FLOP/byte counts
        self.host_step_s, self.host_per_seq_s = host_step_s, host_per_seq_s
        self.version = table_version(self.system)
        self.timing_source = (f"{PACKAGE} {package_version()}: {self.system} vLLM {self.version} kernel tables, "
                              f"{self.gemm_quant_mode} GEMMs, {self.kvcache_quant_mode} KV"
                              + (f"; {fmt.name} linear layers from the per-tensor {self.gemm_quant_mode} GEMM rows "
                                 f"(the {GEMM_QUANT_MODES[fmt.name]} rows hold a per-call launch cost that CUDA "
                                 "graphs remove)" if self.gemm_quant_mode != GEMM_QUANT_MODES[fmt.name] else "")
                              + (f"; {moe_note}" if moe_note else ""))
        cfg = json.dumps(_hf_config(arch, ARCHITECTURES[arch.architecture]), sort_keys=True)
        self._eng = _engine(cfg, self.system, tp, self.gemm_quant_mode, self.kvcache_quant_mode, self.moe_quant_mode,
                            moe_shape is not None and moe_shape[5] > 1)
        ctx, gen = self._eng.run_static_per_op(1, 1, 16, 2, 0, 1.0, 1.0)
        ctx_names, gen_names = [op[0] for op in ctx], [op[0] for op in gen]
        self._ctx_attn = [i for i, n in enumerate(ctx_names) if n in ATTENTION_OPS]
        self._ctx_other = [i for i, n in enumerate(ctx_names) if n not in ATTENTION_OPS]
        self._gen_attn = [i for i, n in enumerate(gen_names) if n in ATTENTION_OPS]
        self._gen_other = [i for i, n in enumerate(gen_names) if n not in ATTENTION_OPS]
        kv_heads = max(arch.num_key_value_heads // tp, 1)
        self.tables = _tables(self.system, self.gemm_quant_mode, self.kvcache_quant_mode,
                              arch.num_attention_heads // tp, kv_heads, arch.head_dim, _gemm_shapes(arch, tp),
                              moe_shape, arch.mla is not None, self.moe_quant_mode)
        self._counts = [0, 0, 0, 0]
        self._memo_ctx_other: dict[int, tuple[float, int]] = {}
        self._memo_gen_other: dict[int, tuple[float, int]] = {}
        self._memo_gen_attn: dict[tuple[int, int], float] = {}
        self._memo_decode: dict[tuple[int, int], tuple | bool] = {}
        self._memo_knots: dict[int, float] = {}
        self._memo_ctx_attn: dict[tuple[int, int, int], tuple[float, int]] = {}
        # MLA: the context op is the whole MLA block (`mla_batches`)
        self._mla = any(ctx_names[i] == "context_mla_block" for i in self._ctx_attn)
        self.calls = 0  # estimator calls (memo misses)
        self.lookups = 0  # steps priced
        self.misses = 0  # steps that needed at least one estimator call

    # -- what the simulator calls

    def host_s(self, requests: int) -> float:
        """The host time added to a step of `requests` scheduled requests (this backend's own
        constants, fixed when it was built)."""
        return self.host_step_s + self.host_per_seq_s * requests

    def step_time_s(self, w) -> float:
        decodes, chunks = _decodes_and_chunks(w)
        if not chunks:
            return self.decode_step_s(decodes, w.decode_pairs)
        self.lookups += 1
        calls = self.calls
        try:
            ms, label = self._step_ms(w.tokens, decodes, w.decode_pairs, chunks)
        except ValueError:  # the estimator has no answer for a coordinate: price this step by roofline
            self._counts[ROOFLINE] += 1
            return self.roofline.step_time_s(w)
        if self.calls != calls:
            self.misses += 1
        self._counts[label] += 1
        return ms / 1000 + self.host_step_s + self.host_per_seq_s * w.requests

    def decode_step_s(self, num_seqs: int, kv_tokens: int) -> float:
        """A step of `num_seqs` decodes over `kv_tokens` of context (the engine's hot path: one
        memo lookup per (rows, context bucket), linear inside the bucket)."""
        self.lookups += 1
        s = kv_tokens / num_seqs
        lo = context_bucket(s)
        hit = self._memo_decode.get((num_seqs, lo))
        if hit is None:
            self.misses += 1
            hit = self._decode_bucket(num_seqs, lo)
        if hit is False:  # the estimator has no answer here
            self._counts[ROOFLINE] += 1
            return self.roofline.decode_step_s(num_seqs, kv_tokens)
        base_ms, slope, label_at_lo, label_inside, _, _, _ = hit
        if s == lo:
            self._counts[label_at_lo] += 1
            return base_ms / 1000 + self.host_step_s + self.host_per_seq_s * num_seqs
        self._counts[label_inside] += 1
        return (base_ms + slope * (s - lo)) / 1000 + self.host_step_s + self.host_per_seq_s * num_seqs

    def _decode_bucket(self, batch: int, lo: int):
        """(a pure decode step's GPU ms at context `lo`, ms per token of context up to the bucket's
        top, the step's labels at `lo` and inside the bucket, the non-attention ms, the attention's
        labels at `lo` and inside), or False where the estimator has no answer."""
        width = bucket_width(lo)
        try:
            other, label = self._gen_other_ms(batch)
            a, b = self._gen_attn_at(batch, lo), self._gen_attn_at(batch, lo + width)
        except ValueError:
            hit = False
        else:
            static = max(label, self.tables.static)
            at_lo = self._decode_label(batch, lo)
            inside = max(self._decode_label(batch, lo + 0.5), self._decode_label(batch, lo + width))
            hit = (other + a, (b - a) / width, max(static, at_lo), max(static, inside), other, at_lo, inside)
        self._memo_decode[(batch, lo)] = hit
        self._bound(self._memo_decode)
        return hit

    @property
    def provenance_counts(self) -> dict[str, int]:
        """Steps priced so far per provenance (measured / interpolated / extrapolated / roofline)."""
        return {p: n for p, n in zip(PROVENANCE, self._counts) if n}

    def reset_counts(self) -> None:
        self._counts = [0, 0, 0, 0]

    @property
    def memo_entries(self) -> int:
        return (len(self._memo_ctx_other) + len(self._memo_gen_other) + len(self._memo_gen_attn)
                + len(self._memo_ctx_attn) + len(self._memo_decode) + len(self._memo_knots))

    # MFU metrics (vllm:estimated_*) count the model's FLOPs and bytes: the roofline's counts.
    def compute_s(self, w) -> float:
        return self.roofline.compute_s(w)

    def memory_s(self, w) -> float:
        return self.roofline.memory_s(w)

    @property
    def flops_per_s(self) -> float:
        return self.roofline.flops_per_s

    @property
    def bytes_per_s(self) -> float:
        return self.roofline.bytes_per_s

    @property
    def kv_bytes_per_token(self) -> int:
        return self.roofline.kv_bytes_per_token

    # -- the terms, in milliseconds of GPU time, with their provenance

    def breakdown_ms(self, w) -> dict[str, float]:
        """One step's GPU terms: non-attention, context attention, generation attention."""
        decodes, chunks = _decodes_and_chunks(w)
        if not chunks:
            return {"non_attention": self._gen_other_ms(decodes)[0], "context_attention": 0.0,
                    "generation_attention": self._decode_terms(decodes, w.decode_pairs)[1]}
        return {"non_attention": self._ctx_other_ms(w.tokens)[0],
                "context_attention": self._chunks_ms(chunks)[0],
                "generation_attention": self._decode_terms(decodes, w.decode_pairs)[1] if decodes else 0.0}

    def gpu_ms(self, w) -> float:
        """One step's GPU time in milliseconds (memoised terms; no host time)."""
        decodes, chunks = _decodes_and_chunks(w)
        return self._step_ms(w.tokens, decodes, w.decode_pairs, chunks)[0]

    def op_times_ms(self, w) -> list[tuple[str, float, str]]:
        """One step's ops as the estimator prices them (name, ms over all layers, its source
        label), not memoised: for inspection and tests."""
        decodes, chunks = _decodes_and_chunks(w)
        e = self._eng
        if not chunks:
            s = max(round(w.decode_pairs / decodes), 1)
            ops = e.evaluate_generation_ops(self._gen_other + self._gen_attn, decodes, s, 1.0, 0, None)
        else:
            ops = list(e.evaluate_context_ops(self._ctx_other, 1, w.tokens, 0, 1.0, None))
            for (n, c), k in self._context_batches(chunks).items():
                ops += e.evaluate_context_ops(self._ctx_attn, k, n, c, 1.0, None)
            if decodes:
                s = max(round(w.decode_pairs / decodes), 1)
                ops += e.evaluate_generation_ops(self._gen_attn, decodes, s, 1.0, 0, None)
        return [(op[0], op[1], op[3]) for op in ops]

    def label(self, w) -> str:
        decodes, chunks = _decodes_and_chunks(w)
        try:
            return PROVENANCE[self._step_ms(w.tokens, decodes, w.decode_pairs, chunks)[1]]
        except ValueError:
            return "roofline"

    def _step_ms(self, tokens: int, decodes: int, decode_kv: int, chunks: tuple) -> tuple[float, int]:
        if not chunks:
            return self._decode_ms(decodes, decode_kv)
        ms, label = self._ctx_other_ms(tokens)
        a, lab = self._chunks_ms(chunks)
        ms += a
        label = max(label, lab)
        if decodes:
            attn_ms, attn_label = self._decode_terms(decodes, decode_kv)[1:]
            ms += attn_ms
            label = max(label, attn_label)
        return ms, max(label, self.tables.static)

    def _chunks_ms(self, chunks: tuple) -> tuple[float, int]:
        """The context attention of a step's prefill chunks (milliseconds, label): each group of
        chunks of one (new, cached) length as one batch; for an MLA model, its fresh prompts of
        several lengths as one batch at their mean length (`mla_batches`)."""
        ms, label = 0.0, MEASURED
        for (n, c), k in self._context_batches(chunks).items():
            a, lab = self._ctx_attn_ms(k, n, c)
            ms += a
            label = max(label, lab)
        return ms, label

    def _context_batches(self, chunks: tuple) -> dict:
        """A step's prefill chunks as the context op's batches ((new, cached) -> chunks): chunks of one
        length as one batch; for an MLA model, `mla_batches`."""
        groups = Counter(chunks) if len(chunks) > 1 else {chunks[0]: 1}
        return mla_batches(groups) if self._mla else groups

    def _decode_ms(self, num_seqs: int, kv_tokens: int) -> tuple[float, int]:
        """decode_step_s's GPU milliseconds and label (ValueError where the estimator has none)."""
        ms, _, label = self._decode_terms(num_seqs, kv_tokens, whole_step=True)
        return ms, label

    def _decode_terms(self, num_seqs: int, kv_tokens: int, whole_step: bool = False) -> tuple[float, float, int]:
        """(a pure decode step's GPU ms, its generation attention's ms, the label of the step, or
        of the attention alone unless `whole_step`) from the (rows, context bucket) memo."""
        s = kv_tokens / num_seqs
        lo = context_bucket(s)
        hit = self._memo_decode.get((num_seqs, lo))
        if hit is None:
            hit = self._decode_bucket(num_seqs, lo)
        if hit is False:
            raise ValueError(f"no estimate for {num_seqs} decodes at context {s:.0f}")
        base_ms, slope, label_at_lo, label_inside, other_ms, attn_label_at_lo, attn_label_inside = hit
        ms = base_ms if s == lo else base_ms + slope * (s - lo)
        if whole_step:
            return ms, ms - other_ms, label_at_lo if s == lo else label_inside
        return ms, ms - other_ms, attn_label_at_lo if s == lo else attn_label_inside

    def _decode_label(self, batch: int, s: float) -> int:
        t = self.tables
        label = max(t.decode_batch.label(batch), t.decode_context.label(s))
        if label < EXTRAPOLATED:  # the measured context shrinks as the batch grows
            pts = t.decode_batch.points
            above = pts[bisect.bisect_left(pts, batch)]
            if s > t.decode_max_context[above]:
                label = EXTRAPOLATED
        return label

    def _ctx_other_ms(self, tokens: int) -> tuple[float, int]:
        """The non-attention ops at `tokens` tokens. The estimator interpolates its GEMM (and MoE)
        rows linearly between measured token counts, so kvlab asks it only at those counts and
        interpolates the same way (within 0.15 % of asking it at every count)."""
        hit = self._memo_ctx_other.get(tokens)
        if hit is None:
            knots = self.tables.knots
            i = bisect.bisect_left(knots, tokens)
            if i == 0 or i == len(knots) or knots[i] == tokens:
                ms = self._ctx_other_at(tokens)
            else:
                lo, hi = knots[i - 1], knots[i]
                a = self._ctx_other_at(lo)
                ms = a + (self._ctx_other_at(hi) - a) * (tokens - lo) / (hi - lo)
            hit = self._memo_ctx_other[tokens] = (ms, self.tables.tokens.label(tokens))
            self._bound(self._memo_ctx_other)
        return hit

    def _ctx_other_at(self, tokens: int) -> float:
        ms = self._memo_knots.get(tokens)
        if ms is None:
            ms = self._memo_knots[tokens] = self._sum(
                self._eng.evaluate_context_ops(self._ctx_other, 1, tokens, 0, 1.0, None))
            self._bound(self._memo_knots)
        return ms

    def _gen_other_ms(self, batch: int) -> tuple[float, int]:
        hit = self._memo_gen_other.get(batch)
        if hit is None:
            ms = self._sum(self._eng.evaluate_generation_ops(self._gen_other, batch, 2, 1.0, 0, None))
            hit = self._memo_gen_other[batch] = (ms, self.tables.tokens.label(batch))
            self._bound(self._memo_gen_other)
        return hit

    def _gen_attn_at(self, batch: int, s: int) -> float:
        key = (batch, s)
        hit = self._memo_gen_attn.get(key)
        if hit is None:
            hit = self._memo_gen_attn[key] = self._sum(
                self._eng.evaluate_generation_ops(self._gen_attn, batch, max(s, 1), 1.0, 0, None))
            self._bound(self._memo_gen_attn)
        return hit

    def _ctx_attn_ms(self, chunks: int, new: int, cached: int) -> tuple[float, int]:
        """Context attention of `chunks` chunks of `new` tokens each over `cached` tokens of context."""
        key = (chunks, new, cached)
        hit = self._memo_ctx_attn.get(key)
        if hit is None:
            ms = self._sum(self._eng.evaluate_context_ops(self._ctx_attn, chunks, new, cached, 1.0, None))
            t = self.tables
            label = max(t.prefill_batch.label(chunks), t.prefill_len.label(new + cached))
            if cached and label == MEASURED:
                label = INTERPOLATED  # the tables hold prompts without cached context
            hit = self._memo_ctx_attn[key] = (ms, label)
            self._bound(self._memo_ctx_attn)
        return hit

    def _sum(self, ops) -> float:
        self.calls += 1
        return sum(op[1] for op in ops)

    _bound = staticmethod(bound_memo)


def mla_batches(groups: dict) -> dict:
    """A step's prefill chunk groups ((new, cached) -> chunks) as the MLA block's batches: the fresh
    prompts (no cached context) of several lengths as one batch at their mean new length (rounded;
    its tokens within half a token a chunk of theirs), each chunk group with cached context as it is."""
    fresh = {n: k for (n, c), k in groups.items() if c == 0}
    if len(fresh) < 2:
        return groups
    out = {key: k for key, k in groups.items() if key[1] != 0}
    chunks = sum(fresh.values())
    out[(max(round(sum(n * k for n, k in fresh.items()) / chunks), 1), 0)] = chunks
    return out


def _decodes_and_chunks(w) -> tuple[int, tuple]:
    """(decode rows, prefill chunks as (new, cached) pairs) of a StepWork. A StepWork built without
    them (num_decodes < 0) is read as: no prefill pairs = all requests decode; else one chunk."""
    if w.num_decodes >= 0:
        return w.num_decodes, w.chunks
    if not w.prefill_pairs:
        return w.requests, ()
    decodes = w.requests - 1
    return decodes, ((w.tokens - decodes, w.prefill_context_tokens),)
