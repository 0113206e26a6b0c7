"""DeepSeek-V2-Lite's MLA attention from aiconfigurator's measured vLLM MLA module (kvlab.sim.mla_module):
DeepSeek-V3's attention block at V2-Lite's 16 heads, less that block's projections."""

import pytest

from kvlab import hardware
from kvlab.models.cards import card
from kvlab.models.weights import weight_format
from kvlab.sim import gemm_tables, kernels, mla_module, timing
from kvlab.sim.timing import StepWork, step_timing

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="aiconfigurator-core is not installed (pip install aiconfigurator-core==0.12.0)")

V2_LITE = card("deepseek-v2-lite").arch


def _row(system: str, kv: str, batch: int, step: int) -> float:
    """The generation module table's row (ms) at 16 heads, bf16 GEMMs."""
    gen, _ = kernels._mla_tables(system, "bfloat16", kv)
    row = gen[(gen.num_heads == 16) & (gen.batch_size == batch) & (gen.step == step)]
    assert len(row) == 1
    return float(row.latency.iloc[0])


def test_where_the_module_rows_price_the_attention():
    assert mla_module.supports(V2_LITE, "h100", 1, "bfloat16") and mla_module.supports(V2_LITE, "h200", 1, "fp8")
    assert not mla_module.supports(V2_LITE, "h100", 2, "bfloat16")  # 8 heads a rank, but -tp > 1 is not composed
    assert not mla_module.supports(V2_LITE, "a100-80gb", 1, "bfloat16")  # no GEMM tables used there
    assert not mla_module.supports(card("llama-3.1-8b").arch, "h100", 1, "bfloat16")  # not MLA
    assert mla_module.mla_attention(V2_LITE, "h100", 1, "fp8_e5m2") is None  # no such KV rows


def test_the_module_model_s_projections():
    # DeepSeek-V3's block at 16 heads: fused_qkv_a_proj (1,536 + 512 + 64 from 7,168), q_b_proj
    # (16 x 192 from 1,536), o_proj (7,168 from 16 x 128); prefill adds kv_b_proj (16 x 256 from 512)
    assert mla_module._projections(16, False) == ((2112, 7168), (3072, 1536), (7168, 2048))
    assert mla_module._projections(16, True)[-1] == (4096, 512)


def test_a_measured_row_is_the_tables_value_and_the_core_is_the_rest():
    # H100, 128 decode rows at 4,096 tokens of context, bf16 KV (FLASH_ATTN_MLA): a measured point
    # (the estimator's context s of a module row is its step + 1, as kernels.KernelTiming notes)
    ms = _row("h100_sxm", "bfloat16", 128, 4096)
    assert mla_module.module_s("h100_sxm", "bfloat16", 16, False, 128, 4097) * 1e3 == pytest.approx(ms, rel=1e-6)
    core = mla_module.decode_core_s("h100_sxm", "bfloat16", 16, 128, 4097)
    proj = mla_module.projections_s("h100_sxm", 16, 128, False)
    assert core + proj == pytest.approx(ms / 1e3, rel=1e-9)
    assert 0.25e-3 < core < 0.32e-3 and 0.03e-3 < proj < 0.045e-3


def test_the_core_against_a_flashmla_kernel_timing():
    # deepseek-ai/FlashMLA's benchmark (tests/test_flash_mla.py) run on an H100 (ai-bot-pro/achatbot
    # pull request #123, 2025-02-24): b=128, s_q=1, mean_sk=4096, h_q=16, d=576, dv=512, not varlen:
    # 0.215 ms, 2,826 GB/s. V2-Lite's decode attention at that point (kernel, W_UK/W_UV products,
    # rotary, cache write, norms) is the kernel and a few small launches more: above it, under 1.5x.
    core_ms = mla_module.decode_core_s("h100_sxm", "bfloat16", 16, 128, 4096) * 1e3
    assert 0.215 < core_ms < 1.5 * 0.215


def test_the_latent_read_rate_and_the_floor_the_roofline_lacks():
    # From 16k tokens of context a step the latent (576 values of 2 bytes a token a layer) is read at
    # 88-95 % of the H100's HBM (the roofline's MEMORY_EFFICIENCY was 0.9, now 0.8), while a layer with one
    # decode row costs 50-80 us, where the roofline's attention term is under a microsecond.
    h100 = hardware.gpu("h100")
    t0 = mla_module.decode_core_s("h100_sxm", "bfloat16", 16, 128, 16384)
    t1 = mla_module.decode_core_s("h100_sxm", "bfloat16", 16, 128, 65536)
    rate = 128 * (65536 - 16384) * 576 * 2 / (t1 - t0)
    assert 0.88 < rate / (h100.bandwidth_tb_s * 1e12) < 0.95
    assert 50e-6 < mla_module.decode_core_s("h100_sxm", "bfloat16", 16, 1, 2) < 80e-6
    # an FP8 cache (FLASHMLA) halves the bytes but not the time: 0.55-0.75 of bf16's at 512 x 4,096
    fp8 = mla_module.decode_core_s("h100_sxm", "fp8", 16, 512, 4096)
    bf16 = mla_module.decode_core_s("h100_sxm", "bfloat16", 16, 512, 4096)
    assert 0.55 < fp8 / bf16 < 0.75


def test_decode_buckets_and_prefill_chunks():
    a = mla_module.mla_attention(V2_LITE, "h200", 1, "auto")
    assert a.layers == 27 and "FLASH_ATTN_MLA" in a.source and "h200_sxm" in a.source
    # at a bucket's edge the decode attention is the module's core x 27 layers; inside, linear
    assert a.decode_s(64, 64 * 2048) == pytest.approx(27 * mla_module.decode_core_s("h200_sxm", "bfloat16", 16, 64, 2048))
    lo, hi = a.decode_s(64, 64 * 2048), a.decode_s(64, 64 * 2080)
    assert lo < a.decode_s(64, 64 * 2064) < hi
    # a chunk over cached context costs at least the same chunk without it, and grows with the context
    assert a.chunk_s(1, 2048, 4096) >= a.chunk_s(1, 2048, 0) > 0
    assert a.chunk_s(1, 2048, 16384) > a.chunk_s(1, 2048, 4096)
    assert a.step_s(0, 0, ((2048, 0), (2048, 0))) == pytest.approx(a.chunk_s(2, 2048, 0))
    assert a.decode_s(0, 0) == 0.0


def test_v2_lites_step_with_the_module():
    arch = V2_LITE
    t = step_timing(arch, weight_format(None, arch), "bfloat16", "auto", hardware.gpu("h100"), 1, "auto")
    a, g = t.mla_attention, t.gemm_curves
    assert "MLA module rows" in t.timing_source and "by the roofline" not in t.timing_source
    # a decode step: attention, experts, and the per-token GEMMs; no kv_b_proj GEMM (in the module)
    assert t.decode_gpu_s(32, 32 * 3000) == pytest.approx(a.decode_s(32, 32 * 3000) + 26 * t.moe_curve.at(32)
                                                          + g.per_token.at(32) + g.head.at(32), rel=1e-12)
    w = StepWork(32, 32, 32, 32 * 3000, 32 * 3000, 0, 0, 32, ())
    assert t.step_time_s(w) == pytest.approx(t.decode_step_s(32, 32 * 3000), rel=1e-12)
    # no part is left to the roofline: the label and the steps say "composed"
    assert t.timing_source.startswith("composed (no kernel data: DeepseekV2ForCausalLM")
    assert t.provenance_counts == {"composed": 2}
    # ... nor the roofline's time per request (ROOFLINE_PER_SEQ_S): the step is its parts plus the host time,
    # as a kernel-table step is; the roofline's -tp 2 step keeps it
    assert t.roofline_per_seq_s() == 0.0
    assert t.decode_step_s(32, 32 * 3000) == pytest.approx(t.decode_gpu_s(32, 32 * 3000) + t.host_s(32), rel=1e-12)
    roof = step_timing(arch, weight_format(None, arch), "bfloat16", "auto", hardware.gpu("h100"), 2, "auto")
    assert roof.roofline_per_seq_s() == timing.ROOFLINE_PER_SEQ_S > 0
    assert roof.decode_step_s(32, 32 * 3000) == pytest.approx(
        roof.decode_gpu_s(32, 32 * 3000) + 32 * timing.ROOFLINE_PER_SEQ_S + roof.host_s(32), rel=1e-12)
    # the fp8-KV configuration reads FLASHMLA's rows
    f = step_timing(arch, weight_format(None, arch), "bfloat16", "fp8", hardware.gpu("h100"), 1, "auto")
    assert "FLASHMLA" in f.mla_attention.source and "fp8 KV" in f.mla_attention.source
    # -tp 2 is not composed: the roofline, as before
    assert step_timing(arch, weight_format(None, arch), "bfloat16", "auto", hardware.gpu("h100"), 2,
                       "auto").mla_attention is None


def test_v2_lites_int4_weights_are_its_composed_bf16_step_scaled_by_the_roofline_ratio():
    """AWQ int4 on DeepSeek-V2-Lite (no table of its own, Marlin on an H100): the composed BF16 step
    (MoE rows, GEMM tables, MLA module) times the roofline's Marlin/BF16 ratio for the same step, so that
    AWQ over BF16 is the roofline's ratio on one base, not a roofline set against a measurement; where
    BF16 has no measured part (an A100), the labelled roofline as before."""
    from kvlab.sim import timing
    from kvlab.sim.timing import CostModel, ScaledTiming, weight_kernel

    arch, h100 = V2_LITE, hardware.gpu("h100")
    fmt = weight_format("awq", arch)
    kernel = weight_kernel(fmt, h100, moe=True)  # an MoE model's int4 experts: Marlin (as sim.config picks it)
    awq = step_timing(arch, fmt, "bfloat16", "auto", h100, 1, "auto", kernel)
    bf16 = step_timing(arch, weight_format(None, arch), "bfloat16", "auto", h100, 1, "auto")
    assert isinstance(awq, ScaledTiming) and awq.fallback_reason.startswith("DeepseekV2ForCausalLM")
    assert awq.timing_source.startswith("composed (no kernel data: DeepseekV2ForCausalLM")
    assert "scaled by the roofline's marlin/BF16 ratio (weights on the Marlin GEMM path" in awq.timing_source
    roof_awq = step_timing(arch, fmt, "bfloat16", "auto", h100, 1, "roofline", kernel)
    roof_bf16 = step_timing(arch, weight_format(None, arch), "bfloat16", "auto", h100, 1, "roofline")
    host = timing.STEP_OVERHEAD_S + timing.PER_SEQ_OVERHEAD_S * 16
    ratio = roof_awq.decode_gpu_s(16, 16 * 1100) / roof_bf16.decode_gpu_s(16, 16 * 1100)
    assert awq.decode_step_s(16, 16 * 1100) == pytest.approx((bf16.decode_step_s(16, 16 * 1100) - host) * ratio + host,
                                                            rel=1e-9)
    assert ratio < 0.5  # a quarter of the weights' bytes at 16 streams: memory-bound
    assert awq.provenance_counts == {"scaled": 1}
    a100 = step_timing(arch, fmt, "bfloat16", "auto", hardware.gpu("a100-80gb"), 1, "auto",
                       weight_kernel(fmt, hardware.gpu("a100-80gb"), moe=True))
    assert isinstance(a100, CostModel) and a100.timing_source.startswith("roofline (no kernel data")


def test_the_module_rows_cover_the_gemm_systems():
    for gpu, system in gemm_tables.SYSTEMS.items():
        for kv in ("bfloat16", "fp8"):
            gen, ctx = kernels._mla_tables(system, "bfloat16", kv)
            assert (gen.num_heads == 16).any() and (ctx.num_heads == 16).any(), (gpu, kv)


def test_the_module_is_evaluated_as_the_estimator_s_own_single_op_call():
    # _module_ms builds the estimator's probe engine and the op's JSON once and evaluates them with
    # engine._evaluate_single_op's defaults: the same milliseconds, to the bit, in and beyond the grid
    from aiconfigurator_core.sdk import engine
    from aiconfigurator_core.sdk import operations as ops
    from aiconfigurator_core.sdk.common import FMHAQuantMode, GEMMQuantMode, KVCacheQuantMode

    for system, kv in (("h100_sxm", "bfloat16"), ("h200_sxm", "fp8")):
        for context in (False, True):
            op = ops.MLAModule("kvlab_mla_module", 1, context, 16, getattr(KVCacheQuantMode, kv),
                               FMHAQuantMode.bfloat16, GEMMQuantMode.bfloat16, native_num_heads=128)
            for batch, s in ((1, 1), (3, 777), (128, 4097), (7, 40_000), (1024, 131_072)):
                own = float(engine._evaluate_single_op(gemm_tables._database(system), op, is_context=context,
                                                       batch_size=batch, s=s))
                assert mla_module._module_ms.__wrapped__(system, kv, 16, context, batch, s) == own
