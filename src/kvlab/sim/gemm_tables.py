"""Dense GEMM time from aiconfigurator's measured GEMM tables, layer shape by layer shape, for an
MLA model whose attention block no table holds (DeepSeek-V2-Lite: no q_lora, hidden 2,048).

aiconfigurator's `mla` tables are DeepSeek-V3's whole attention blocks (hidden 7,168, q_lora 1,536),
so a DeepseekV2 model falls back to the roofline (`kernels.kernel_support`). Its linear layers are
plain GEMMs, though, and the GEMM tables (cuBLAS through `torch.nn.functional.linear` for bf16,
vLLM's CUTLASS kernel for FP8, measured by NVIDIA with vLLM 0.24) cover any (n, k) by the estimator's
own interpolation. Checked against kvlab's own H200 measurement of V2-Lite's exact layer shapes
(`data/kernels/gemm_perf.csv`, bench/gpu_kernels.py; tests/test_sim_gemm_tables.py).

A step's GEMMs, per `gemm_set`:
- per new token: q_proj and kv_a_proj_with_mqa (with a q_lora: vLLM's fused_qkv_a_proj and q_b_proj), o_proj;
  the MoE layers' shared experts and router, the dense layers' MLP;
- kv_b_proj over the new tokens and the cached context under prefill chunks (vLLM's MLA prefill
  decompresses that context; decode's absorbed W_UK/W_UV products have the same shape and FLOPs);
- the LM head per sampled token (bf16: vLLM does not quantize it).
Each is priced at the table's measured token counts (`GRID`, up to 32,768) and linearly between them;
the three sums are `GemmCurves`.
"""

from __future__ import annotations

import bisect
import functools
from typing import NamedTuple

from kvlab.models.arch import ModelArch
from kvlab.sim import kernels

GRID = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144,
        8192, 12288, 16384, 24576, 32768)
SYSTEMS = {gpu: kernels.SYSTEMS[gpu] for gpu in ("h100", "h200")}  # the GPUs whose tables the composition uses
# kvlab weight format -> the GEMM tables' quant mode for the quantized linear layers
MODES = {"auto": "bfloat16", "bf16": "bfloat16", "fp16": "bfloat16", "fp8": "fp8"}


def piecewise_linear(t: tuple[int, ...], s: tuple[float, ...], n: int) -> float:
    """`s` at `n` on the points (`t`, `s`) (`t` ascending, from 1): linear between them, along the
    last two beyond the last; 0 at no rows."""
    if n <= 0:
        return 0.0
    i = bisect.bisect_left(t, n)
    if i < len(t) and t[i] == n:
        return s[i]
    if i == 0:
        return s[0] * n / t[0]
    if i == len(t):
        i -= 1
    return s[i - 1] + (s[i] - s[i - 1]) * (n - t[i - 1]) / (t[i] - t[i - 1])


class Curve(NamedTuple):
    """Seconds at `tokens` rows (`piecewise_linear`)."""

    tokens: tuple[int, ...]
    seconds: tuple[float, ...]

    def at(self, n: int) -> float:
        return piecewise_linear(self.tokens, self.seconds, n)


class GemmCurves(NamedTuple):
    per_token: Curve  # every GEMM with one row per new token, summed over layers
    kv_b: Curve  # kv_b_proj, summed over layers: rows = new tokens + cached context under prefill chunks
    head: Curve  # the LM head: rows = sampled tokens
    shapes: tuple  # (name, n, k, layers, rows, quant mode) of each GEMM priced
    source: str


def gemm_set(arch: ModelArch, quant: str) -> tuple[tuple[str, int, int, int, str, str], ...]:
    """(name, n, k, layers, rows, quant mode) of an MLA model's GEMMs at tensor parallelism 1."""
    m, moe, h = arch.mla, arch.moe, arch.hidden_size
    heads, layers = arch.num_attention_heads, arch.num_layers
    moe_layers = len(moe.moe_layers) if moe else 0
    dense_layers = layers - moe_layers
    qk_head = m.qk_nope_head_dim + m.qk_rope_head_dim
    out = []
    kv_a = m.kv_lora_rank + m.qk_rope_head_dim
    if m.q_lora_rank:  # vLLM's MLA attention (models/deepseek_v2.py) fuses q_a and kv_a into one GEMM
        out += [("fused_qkv_a_proj", m.q_lora_rank + kv_a, h, layers, "tokens", quant),
                ("q_b_proj", heads * qk_head, m.q_lora_rank, layers, "tokens", quant)]
    else:
        out += [("q_proj", heads * qk_head, h, layers, "tokens", quant),
                ("kv_a_proj_with_mqa", kv_a, h, layers, "tokens", quant)]
    out += [("kv_b_proj", heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank, layers, "kv_b", quant),
            ("o_proj", h, heads * m.v_head_dim, layers, "tokens", quant)]
    if moe_layers:
        shared = moe.num_shared_experts * moe.moe_intermediate_size
        if shared:
            out += [("shared_experts.gate_up_proj", 2 * shared, h, moe_layers, "tokens", quant),
                    ("shared_experts.down_proj", h, shared, moe_layers, "tokens", quant)]
        out.append(("gate", moe.num_experts, h, moe_layers, "tokens", "bfloat16"))  # vLLM: not quantized
    if dense_layers:
        out += [("mlp.gate_up_proj", 2 * arch.intermediate_size, h, dense_layers, "tokens", quant),
                ("mlp.down_proj", h, arch.intermediate_size, dense_layers, "tokens", quant)]
    out.append(("lm_head", arch.vocab_size, h, 1, "sampled", "bfloat16"))
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _database(system: str):
    with kernels._quiet_stderr():
        from aiconfigurator_core.sdk import perf_database
        return perf_database.get_database(system, "vllm", kernels.table_version(system))


@functools.lru_cache(maxsize=256)
def gemm_seconds(system: str, mode: str, n: int, k: int) -> tuple[float, ...]:
    """One GEMM's seconds at each `GRID` token count, from the estimator's own GEMM op over the
    system's tables (its interpolation between measured shapes). aiconfigurator-core 0.12.0's
    single-op evaluation (`sdk.engine._evaluate_single_op`)."""
    from aiconfigurator_core.sdk import engine
    from aiconfigurator_core.sdk import operations as ops
    from aiconfigurator_core.sdk.common import GEMMQuantMode

    db = _database(system)
    op = ops.GEMM("kvlab_gemm", 1, n, k, getattr(GEMMQuantMode, mode))
    with kernels._quiet_stderr():
        return tuple(float(engine._evaluate_single_op(db, op, is_context=True, batch_size=1, s=m)) / 1e3 for m in GRID)


def gemm_curves(arch: ModelArch, fmt_name: str, gpu: str, tp: int) -> GemmCurves | None:
    """The step's GEMMs from the GEMM tables for an MLA model on an H100/H200 at `-tp 1` in a format
    the tables have (bf16, FP8), or None."""
    if arch.mla is None or tp != 1 or gpu not in SYSTEMS or fmt_name not in MODES or not kernels.available():
        return None
    system = SYSTEMS[gpu]
    shapes = gemm_set(arch, MODES[fmt_name])
    sums = {"tokens": [0.0] * len(GRID), "kv_b": [0.0] * len(GRID), "sampled": [0.0] * len(GRID)}
    for _name, n, k, layers, rows, mode in shapes:
        for i, s in enumerate(gemm_seconds(system, mode, n, k)):
            sums[rows][i] += layers * s
    curve = {key: Curve(GRID, tuple(v)) for key, v in sums.items()}
    return GemmCurves(curve["tokens"], curve["kv_b"], curve["sampled"], shapes,
                      f"dense GEMMs from aiconfigurator-core {kernels.package_version()}'s {system} vLLM "
                      f"{kernels.table_version(system)} GEMM tables ({MODES[fmt_name]}) at the model's layer shapes")
