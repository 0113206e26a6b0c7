"""Step times from measured vLLM kernel tables (kvlab.sim.kernels over aiconfigurator-core): the
tables' own values, the composition against the estimator's own calls, provenance labels, the
roofline fallback, memo bounds, and a simulated run's step counts."""

import dataclasses

import pytest

from kvlab import hardware
from kvlab.errors import KvlabError
from kvlab.models.cards import card
from kvlab.models.weights import weight_format
from kvlab.sim import kernels
from kvlab.sim.timing import PER_SEQ_OVERHEAD_S, STEP_OVERHEAD_S, CostModel, StepWork, step_timing

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="aiconfigurator-core is not installed (pip install aiconfigurator-core==0.12.0)")


def timing(model: str, gpu: str = "h100", q: str | None = None, kv: str = "auto", tp: int = 1, source: str = "auto"):
    arch = card(model).arch
    return step_timing(arch, weight_format(q, arch), "bfloat16", kv, hardware.gpu(gpu), tp, source)


def decode(n: int, kv: int) -> StepWork:
    return StepWork(n, n, n, kv, kv, 0, 0, n, ())


def prefill(chunks: tuple, decodes: int = 0, decode_kv: int = 0) -> StepWork:
    tokens = sum(n for n, _ in chunks) + decodes
    pairs = sum(n * c + n * (n + 1) // 2 for n, c in chunks)
    return StepWork(tokens, len(chunks) + decodes, len(chunks) + decodes, decode_kv + sum(n + c for n, c in chunks),
                    decode_kv, pairs, sum(c for _, c in chunks), decodes, chunks)


@pytest.fixture(scope="module")
def llama():
    t = timing("llama-3.1-8b")
    assert isinstance(t, kernels.KernelTiming)
    return t


def _rows(system: str, op: str, name: str):
    return kernels._table(system, op, name)


def test_gemm_on_a_measured_shape_is_the_tables_value(llama):
    """A 256-token prefill step's QKV and output-projection GEMMs (m=256; n x k = 6144 x 4096 and
    4096 x 4096 are measured shapes) are the table's rows times 32 layers."""
    g = _rows("h100_sxm", "gemm", "gemm_perf.parquet")
    g = g[(g.gemm_dtype == "bfloat16") & (g.m == 256)]
    ops = {name: ms for name, ms, _ in llama.op_times_ms(prefill(((256, 0),)))}
    row = lambda n, k: float(g[(g.n == n) & (g.k == k)].latency.iloc[0])  # noqa: E731
    assert ops["context_qkv_gemm"] == pytest.approx(32 * row(6144, 4096), rel=1e-9)
    assert ops["context_proj_gemm"] == pytest.approx(32 * row(4096, 4096), rel=1e-9)


def test_decode_attention_on_a_measured_point_is_near_the_tables_value(llama):
    """Generation attention at 16 rows x 1,025 tokens (the row step=1023) against the table: the
    estimator smooths between rows, within 2 %."""
    g = _rows("h100_sxm", "attention", "generation_attention_perf.parquet")
    row = g[(g.batch_size == 16) & (g.num_heads == 32) & (g.num_key_value_heads == 8) & (g.head_dim == 128)
            & (g.kv_cache_dtype == "bfloat16") & (g.window_size == 0) & (g.step == 1023)]
    ops = {name: ms for name, ms, _ in llama.op_times_ms(decode(16, 16 * 1025))}
    assert ops["generation_attention"] == pytest.approx(32 * float(row.latency.iloc[0]), rel=0.02)


@pytest.mark.parametrize("batch,isl,osl", [(1, 100, 10), (16, 1024, 128), (64, 2000, 500), (200, 3000, 1000)])
def test_composed_pure_decode_equals_decode_step_latency(llama, batch, isl, osl):
    """A pure decode step composed from memoised terms (context bucketed, interpolated) equals the
    estimator's own decode step (its rows sit at context isl + osl // 2 + 1) within 0.1 %."""
    s = isl + osl // 2 + 1
    own = llama._eng.decode_step_latency(batch, isl, osl, 1.0)
    assert llama.gpu_ms(decode(batch, batch * s)) == pytest.approx(own, rel=1e-3)
    assert llama.decode_step_s(batch, batch * s) == pytest.approx(
        own / 1000 + STEP_OVERHEAD_S + PER_SEQ_OVERHEAD_S * batch, rel=1e-3)


@pytest.mark.parametrize("chunks,prefix", [(1, 0), (1, 2048), (4, 0), (2, 512)])
def test_composed_prefill_equals_predict_prefill_latency(llama, chunks, prefix):
    """Pure prefill: `chunks` chunks of 1,024 new tokens over `prefix` cached ones equal the
    estimator's predict_prefill_latency(chunks, 1024 + prefix, prefix): exact for one chunk; for
    several, the composition prices the LM-head GEMM at one row per step as `mixed_step_breakdown`
    does (the estimator's prefill at one row per chunk: 5 us of 85 ms here)."""
    w = prefill(((1024, prefix),) * chunks)
    own = llama._eng.predict_prefill_latency(chunks, 1024 + prefix, prefix)
    assert llama.gpu_ms(w) == pytest.approx(own, rel=1e-9 if chunks == 1 else 1e-4)


def test_composed_mixed_step_matches_mixed_step_breakdown(llama):
    """Where the estimator's mixed step applies (decode rows at context isl + osl // 2 + 1), the
    composition has the same non-attention and decode-attention terms; the chunk's attention is a
    chunk at its own length (the estimator averages a chunk over the prompt, so that term differs)."""
    isl, osl, batch = 1024, 128, 16
    total, other, ctx_attn, gen_attn = llama._eng.mixed_step_breakdown(isl, batch, isl, osl, 0, 1.0, 1.0)
    s = isl + osl // 2 + 1
    terms = llama.breakdown_ms(prefill(((isl, 0),), batch, batch * s))
    assert terms["non_attention"] == pytest.approx(other, rel=2e-3)  # 1,040 tokens: between measured counts
    assert terms["generation_attention"] == pytest.approx(gen_attn, rel=1e-3)
    assert terms["context_attention"] == pytest.approx(llama._eng.evaluate_context_ops(
        llama._ctx_attn, 1, isl, 0, 1.0, None)[0][1], rel=1e-9)


def test_online_fp8_moe_experts_are_priced_from_the_triton_rows():
    """`-q fp8` on an MoE model: vLLM's Fp8MoEMethod runs its experts on the Triton fused-MoE kernel
    (dynamic per-tensor activation scales, which FlashInfer CUTLASS does not take), so they are
    priced from the table's Triton FP8 MoE rows (block-scaled), not its per-tensor rows (ModelOpt's
    static-scale FlashInfer CUTLASS path); the dense GEMMs keep the per-tensor CUTLASS rows."""
    moe = _rows("h100_sxm", "moe", "moe_perf.parquet")
    shape = moe[(moe.hidden_size == 2048) & (moe.inter_size == 768) & (moe.num_experts == 128) & (moe.topk == 8)
                & (moe.moe_tp_size == 1) & (moe.moe_ep_size == 1)]
    assert set(shape[shape.moe_dtype == "fp8_block"].kernel_source) == {"vllm_fp8moe_triton_tritonexperts"}
    assert set(shape[shape.moe_dtype == "fp8"].kernel_source) == {"vllm_modeloptfp8moe_flashinfer_cutlass_flashinferexperts"}
    per_tensor, block, bf16 = (timing("qwen3-30b-a3b", q=q) for q in ("fp8", "fp8-block", None))
    assert per_tensor.moe_quant_mode == block.moe_quant_mode == "fp8_block" and bf16.moe_quant_mode == "bfloat16"
    assert "MoE experts from the block-FP8 Triton rows" in per_tensor.timing_source
    assert "MoE experts" not in block.timing_source and timing("llama-3.1-8b", q="fp8").moe_quant_mode is None
    step = decode(64, 64 * 2000)
    ops = {q: {name: ms for name, ms, _ in t.op_times_ms(step)} for q, t in (("fp8", per_tensor), ("block", block))}
    assert ops["fp8"]["generation_moe"] == ops["block"]["generation_moe"]  # the same MoE rows
    g = _rows("h100_sxm", "gemm", "gemm_perf.parquet")
    # the dense GEMMs of both from the per-tensor CUTLASS rows (block FP8's own rows: a launch floor, below)
    assert ops["fp8"]["generation_qkv_gemm"] == ops["block"]["generation_qkv_gemm"]
    assert block.gemm_quant_mode == "fp8" and "linear layers from the per-tensor fp8 GEMM rows" in block.timing_source
    assert set(g[g.gemm_dtype == "fp8"].kernel_source) == {"CutlassFP8ScaledMMLinearKernel"}
    # the L40S's per-tensor FP8 MoE rows are Triton's: used as they are; B200's tables have no Triton
    # FP8 MoE rows (FlashInfer TRT-LLM only): its per-tensor rows, labelled; -tp 4 on an H100 has no
    # Triton FP8 rows either
    l40s = timing("qwen3-30b-a3b", "l40s", q="fp8")
    assert l40s.moe_quant_mode == "fp8" and "MoE experts" not in l40s.timing_source
    b200 = timing("qwen3-30b-a3b", "b200", q="fp8")
    assert b200.moe_quant_mode == "fp8" and "trtllm" in b200.timing_source and "no FP8 rows" in b200.timing_source
    tp4 = timing("qwen3-30b-a3b", q="fp8", tp=4)
    assert tp4.moe_quant_mode == "fp8" and "flashinfer_cutlass" in tp4.timing_source


@pytest.mark.parametrize("system", ["h100_sxm", "h200_sxm", "b200_sxm"])
def test_block_fp8_gemm_rows_hold_a_per_call_floor_and_the_per_tensor_rows_price_them(system):
    """The tables' fp8_block GEMM rows cost each kernel about the same from 8 rows to 1,024 whatever
    the (n, k) (a per-call launch cost, which vLLM's CUDA graphs remove), several times the per-tensor
    FP8 rows there, which grow with the work; where a GEMM's own time is well above that floor, block
    FP8 is within 10 % of per-tensor FP8 (the median). So a block-FP8 model's dense layers are priced
    from the per-tensor rows (kernels.DENSE_GEMM_ROWS); its MoE experts keep the block rows, and an MLA
    model keeps its block MLA module rows, which have no such floor."""
    g = _rows(system, "gemm", "gemm_perf.parquet")
    piv = g.pivot_table(index=["m", "n", "k"], columns="gemm_dtype", values="latency").reset_index()
    piv = piv.merge(g[g.gemm_dtype == "fp8_block"][["m", "n", "k", "kernel_source"]], on=["m", "n", "k"])
    piv = piv.rename(columns={"kernel_source": "source"}).dropna(subset=["fp8", "fp8_block"])
    small = piv[(piv.m >= 8) & (piv.m <= 1024) & (piv.n * piv.k <= 4096 * 4096)]
    for _, rows in small.groupby("source"):  # flat: one kernel's rows within a narrow band
        assert rows.fp8_block.quantile(0.75) / rows.fp8_block.quantile(0.25) < 1.35
        assert rows.fp8_block.quantile(0.25) > 0.05  # ms: a floor of 50 us or more
    assert (small.fp8_block / small.fp8).median() > 3
    big = piv[piv.fp8 > 3 * small.fp8_block.median()]
    assert 0.9 < (big.fp8_block / big.fp8).median() < 1.0
    if system == "b200_sxm":  # B200's dense layers of a block-FP8 MoE checkpoint
        t = timing("qwen3-30b-a3b", "b200", q="fp8-block")
        assert (t.gemm_quant_mode, t.moe_quant_mode) == ("fp8", "fp8_block")
    mla, _ = kernels._mla_tables("h200_sxm", "fp8_block", "bfloat16")
    bf16, _ = kernels._mla_tables("h200_sxm", "bfloat16", "bfloat16")
    both = mla.merge(bf16, on=["num_heads", "batch_size", "step"], suffixes=("_block", "_bf16"))
    few = both[(both.num_heads == 16) & (both.batch_size <= 128)]
    assert len(few) and ((few.latency_block / few.latency_bf16 - 1).abs() < 0.1).all()


def test_provenance_labels():
    moe = timing("qwen3-30b-a3b")
    assert isinstance(moe, kernels.KernelTiming)
    assert moe.label(prefill(((1024, 0),))) == "measured"  # 1,024 tokens, batch 1: grid points
    assert moe.label(prefill(((1000, 0),))) == "interpolated"
    assert moe.label(prefill(((1024, 512),))) == "interpolated"  # cached context: no measured rows
    assert moe.label(decode(256, 256 * 5000)) == "extrapolated"  # measured to ~1k tokens at 256 rows
    assert moe.label(prefill(((20000, 0),))) == "extrapolated"  # beyond 16,384 tokens
    llama = timing("llama-3.1-8b")  # its 28672 x 4096 gate/up GEMM lies between measured shapes
    assert llama.label(prefill(((1024, 0),))) == "interpolated"
    assert llama.label(decode(2048, 2048 * 1000)) == "extrapolated"
    moe.reset_counts()
    moe.step_time_s(prefill(((1024, 0),)))
    moe.decode_step_s(256, 256 * 5000)
    moe.decode_step_s(256, 256 * 5000)
    assert moe.provenance_counts == {"measured": 1, "extrapolated": 2}


@pytest.mark.parametrize("model,gpu,q,kv,why", [
    ("llama-3.1-8b", "h100", "awq", "auto", "no vLLM GEMM table for awq"),
    ("qwen2.5-7b", "h100", "gptq", "auto", "no vLLM GEMM table for gptq"),
    ("llama-3.1-8b", "a100-80gb", "fp8", "auto", "no fp8 GEMM rows for a100_sxm"),
    ("llama-3.1-8b", "l4", None, "auto", "no vLLM kernel tables for GPU l4"),
    ("llama-3.1-8b", "mi300x", None, "auto", "no vLLM kernel tables for GPU mi300x"),
    # on an A100: no measured MoE rows there either (on an H100/H200 its experts are: test_sim_measured_moe)
    ("deepseek-v2-lite", "a100-80gb", None, "auto", "DeepseekV2ForCausalLM"),
])
def test_fallback_is_the_roofline_labelled(model, gpu, q, kv, why):
    # (an FP8 KV cache on an A100, whose tables lack its attention rows, is scaled from them:
    # test_an_fp8_kv_cache_without_attention_rows_is_the_bf16_kv_tables_scaled_by_the_roofline_ratio)
    t = timing(model, gpu, q, kv)
    assert isinstance(t, CostModel)
    assert why in t.fallback_reason and t.timing_source.startswith("roofline (no kernel data: ")
    plain = timing(model, gpu, q, kv, source="roofline")
    w = prefill(((512, 0),), 8, 8 * 700)
    assert t.step_time_s(w) == plain.step_time_s(w)  # the same roofline, bit for bit
    assert t.decode_step_s(8, 5600) == plain.decode_step_s(8, 5600)
    assert t.provenance_counts == {"roofline": 2}
    with pytest.raises(KvlabError, match="no measured kernel data"):
        timing(model, gpu, q, kv, source="kernels")


def test_deepseek_v2_lite_moe_shape_is_in_no_table():
    """V2-Lite's MoE (hidden 2048, 64 experts of 1408, top-6) has no rows on any GPU; its MLA rows are
    DeepSeek-V3 attention blocks only."""
    moe = _rows("h100_sxm", "moe", "moe_perf.parquet")
    moe = moe[moe.moe_ep_size == 1]
    shapes = set(zip(moe.hidden_size, moe.inter_size, moe.topk, moe.num_experts))
    assert (2048, 1408, 6, 64) not in shapes
    assert (2048, 768, 8, 128) in shapes  # Qwen3-30B-A3B's is there
    mla = _rows("h100_sxm", "mla", "mla_generation_module_perf.parquet")
    assert set(mla.model) == {"deepseek-ai/DeepSeek-V3"}
    assert "MoE shape" in kernels.kernel_support(card("deepseek-v2-lite").arch, weight_format(None), "bfloat16",
                                                 "auto", "h100", 1)


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen2.5-7b", "qwen3-30b-a3b"])
@pytest.mark.parametrize("q,kv", [(None, "auto"), ("fp8", "fp8")])
def test_cards_build_on_h100(model, q, kv):
    t = timing(model, "h100", q, kv)
    assert isinstance(t, kernels.KernelTiming) and "h100_sxm vLLM 0.24.0" in t.timing_source
    d, p = t.decode_step_s(16, 16 * 1100), t.step_time_s(prefill(((1024, 0),)))
    assert 0.001 < d < p < 0.2


def test_tensor_parallel_builds_and_is_faster():
    one, two = timing("llama-3.1-8b", tp=1), timing("llama-3.1-8b", tp=2)
    assert isinstance(two, kernels.KernelTiming)
    assert two.gpu_ms(prefill(((4096, 0),))) < one.gpu_ms(prefill(((4096, 0),)))


def test_memo_is_bounded(llama, monkeypatch):
    monkeypatch.setattr(kernels, "MEMO_LIMIT", 50)
    fresh = kernels.KernelTiming(card("llama-3.1-8b").arch, weight_format(None), "bfloat16", "auto",
                                 hardware.gpu("h100"), 1, llama.roofline, STEP_OVERHEAD_S, PER_SEQ_OVERHEAD_S)
    for n in range(1, 400):
        fresh.decode_step_s(8, 8 * (100 + 37 * n))
        fresh.step_time_s(prefill(((n, 0),)))
    assert fresh.memo_entries <= 6 * 50


def test_simulated_run_counts_every_step():
    from kvlab.sim.config import build_config
    from kvlab.replay.run import run_offline
    from test_sim_engine import AGENTS

    cfg = build_config("llama-3.1-8b", "h100", max_model_len=4096)
    kt = timing("llama-3.1-8b")
    kt.reset_counts()
    res = run_offline("llama-3.1-8b", "h100", AGENTS, 30.0, concurrency=8, seed=0,
                      config=dataclasses.replace(cfg, cost=kt))
    assert sum(kt.provenance_counts.values()) == res.engine.num_steps > 0
    assert res.results  # the run completed on kernel-table step times


def test_gpu_tables():
    assert kernels.gpu_tables("h200") == ("h200_sxm, vLLM 0.24.0; kvlab: MoE of deepseek-v2-lite, qwen3-30b-a3b; "
                                          "int4/block-FP8 layers of llama-3.1-8b, qwen2.5-7b, qwen3-8b")
    assert kernels.gpu_tables("h100") == "h100_sxm, vLLM 0.24.0; kvlab: int4/block-FP8 layers of llama-3.1-8b, qwen2.5-7b, qwen3-8b"
    assert kernels.gpu_tables("a100-80gb") == "a100_sxm, vLLM 0.14.0"
    assert kernels.gpu_tables("l4") is None and kernels.gpu_tables("mi300x") is None


@pytest.fixture(scope="module")
def deepseek_v3():
    from kvlab.serve_config import options_config
    from kvlab.sim.config import build_config
    return build_config(options_config("deepseek-v3", quantization="fp8_per_block", tensor_parallel_size=8,
                                       max_model_len=32768), "h200", timing="auto").cost


def test_deepseek_v3_mla_block_on_a_measured_point_is_the_tables_value(deepseek_v3):
    """DeepSeek-V3 (MLA + MoE) is priced from the MLA module tables: a decode at a measured (batch,
    context) is the table's per-layer latency x 61 layers, labelled measured."""
    t = deepseek_v3
    assert isinstance(t, kernels.KernelTiming)
    assert t.timing_source.endswith("h200_sxm vLLM 0.24.0 kernel tables, fp8_block GEMMs, bfloat16 KV")
    gen, _ = kernels._mla_tables("h200_sxm", "fp8_block", "bfloat16")
    row = gen[(gen.num_heads == 16) & (gen.batch_size == 64) & (gen.step == 1024)]  # 128 heads / -tp 8
    assert len(row) == 1
    assert t._gen_attn_at(64, 1 + 1024) == pytest.approx(61 * float(row.latency.iloc[0]), rel=1e-6)
    assert t._decode_label(64, 1025) == kernels.MEASURED
    assert t._decode_label(64, 1300) == kernels.INTERPOLATED  # between measured contexts
    assert t._decode_label(64, 200_000) == kernels.EXTRAPOLATED


def test_deepseek_v3_fresh_prompts_of_several_lengths_are_one_batch_of_the_mla_block(deepseek_v3, llama):
    """The MLA tables' context op is the whole block: projections, per-layer fixed work and attention.
    Its batch axis shows the block's cost is the step's tokens', not the prompts' count (two prompts of
    n/2 tokens cost about what one of n does), as vLLM runs one GEMM per projection and one varlen
    attention call over a step. So a step's fresh prompts of several lengths are one batch at their
    mean length, as the estimator's mixed step averages prompts; a chunk with cached context keeps its
    own batch; chunks of one length are one batch as before."""
    t = deepseek_v3
    for n in (200, 1000, 4000):  # the tables' batch axis
        assert t._ctx_attn_ms(2, n // 2, 0)[0] == pytest.approx(t._ctx_attn_ms(1, n, 0)[0], rel=0.1)
    assert t.breakdown_ms(prefill(((256, 0), (256, 0))))["context_attention"] == t._ctx_attn_ms(2, 256, 0)[0]
    assert t.breakdown_ms(prefill(((200, 0), (312, 0))))["context_attention"] == t._ctx_attn_ms(2, 256, 0)[0]
    step = prefill(((200, 0), (313, 0), (100, 0), (192, 3808)))  # three fresh prompts and a continuation
    assert kernels.mla_batches({(200, 0): 1, (313, 0): 1, (100, 0): 1, (192, 3808): 1}) == {(204, 0): 3, (192, 3808): 1}
    assert t.breakdown_ms(step)["context_attention"] == pytest.approx(
        t._ctx_attn_ms(3, 204, 0)[0] + t._ctx_attn_ms(1, 192, 3808)[0], rel=1e-12)
    # forty ShareGPT-like prompts in one 8,192-token step: a block per prompt would cost 4-5x more
    many = tuple((150 + 5 * i, 0) for i in range(40))
    per_prompt = sum(t._ctx_attn_ms(1, n, c)[0] for n, c in many)
    assert 3 < per_prompt / t.breakdown_ms(prefill(many))["context_attention"] < 6
    # a dense model's context op is attention alone: its groups stay as they are
    assert llama.breakdown_ms(prefill(((200, 0), (312, 0))))["context_attention"] == pytest.approx(
        llama._ctx_attn_ms(1, 200, 0)[0] + llama._ctx_attn_ms(1, 312, 0)[0], rel=1e-12)


def test_deepseek_v3_support_follows_the_mla_tables():
    arch = card("deepseek-v3").arch
    fp8 = weight_format("fp8-block", arch)
    assert kernels.kernel_support(arch, fp8, "bfloat16", "auto", hardware.gpu("h200"), 8) is None
    assert "no MLA module rows for 128 heads over -tp 3" in kernels.kernel_support(
        arch, fp8, "bfloat16", "auto", hardware.gpu("h200"), 3)
    assert kernels.kernel_support(arch, fp8, "bfloat16", "auto", hardware.gpu("a100-80gb"), 8) is not None
    # DeepSeek-V2(-Lite) stays on the roofline: its MoE shape and MLA block are in no table
    assert "DeepseekV2ForCausalLM" in kernels.kernel_support(
        card("deepseek-v2-lite").arch, weight_format(None, card("deepseek-v2-lite").arch), "bfloat16", "auto",
        hardware.gpu("h100"), 1)


def scaled(model: str, gpu: str, q: str, vllm_version: str = "0.18"):
    """The step timing `build_config` picks: the format's GEMM path for vLLM `vllm_version` passed
    along (0.18: Marlin for AWQ, also on an H100)."""
    from kvlab.sim.timing import weight_kernel

    arch = card(model).arch
    fmt = weight_format(q, arch)
    return step_timing(arch, fmt, "bfloat16", "auto", hardware.gpu(gpu), 1, "auto",
                       weight_kernel(fmt, hardware.gpu(gpu), vllm_version=vllm_version))


@pytest.fixture
def no_measured_int4(monkeypatch):
    """Without kvlab's measured int4 rows (data/kernels/quant_gemm_perf.csv, which cover Llama-3.1-8B's
    layers on Hopper: tests/test_sim_quant_gemms.py), as for a model or GPU they do not cover."""
    from kvlab.sim import quant_gemms

    monkeypatch.setattr(quant_gemms, "measured_delta", lambda *a, **k: None)


def test_weight_only_formats_are_the_bf16_tables_scaled_by_the_roofline_ratio(llama, no_measured_int4):
    """AWQ/GPTQ int4 (no GEMM table of their own) on a GPU with BF16 tables and no measured int4 rows
    for the model: each step is the BF16 tables' GPU time times the roofline's format/BF16 ratio for
    that step, plus the same host time; the label says so and the steps count as "scaled"."""
    from kvlab.sim.timing import ScaledTiming

    awq = scaled("llama-3.1-8b", "h100", "awq")
    assert isinstance(awq, ScaledTiming) and awq.fallback_reason is None
    assert "h100_sxm vLLM" in awq.timing_source and "scaled by the roofline's marlin/BF16 ratio" in awq.timing_source
    host = STEP_OVERHEAD_S + PER_SEQ_OVERHEAD_S * 64
    for w in (decode(64, 64 * 2000), prefill(((2048, 0),), decodes=62, decode_kv=62 * 2000)):
        host = STEP_OVERHEAD_S + PER_SEQ_OVERHEAD_S * w.requests
        ratio = awq.roof.gpu_s(w) / awq.roof_bf16.gpu_s(w)
        assert awq.step_time_s(w) == pytest.approx((llama.step_time_s(w) - host) * ratio + host, rel=1e-9)
    assert awq.decode_step_s(64, 64 * 2000) == pytest.approx(awq.step_time_s(decode(64, 64 * 2000)), rel=1e-9)
    # int4 weights: a small decode step reads a quarter of the bytes (faster); a 4,096-token prefill
    # is compute-bound on Marlin's slower GEMMs (0.61 of the BF16 rate on an H100, measured: slower)
    assert awq.decode_step_s(4, 4 * 500) < llama.decode_step_s(4, 4 * 500)
    assert awq.step_time_s(prefill(((4096, 0),))) > llama.step_time_s(prefill(((4096, 0),)))
    assert awq.provenance_counts == {"scaled": 6}
    # vLLM 0.19 on: AWQ on an H100 runs Machete, at the BF16 GEMM rate (published): the same compute-bound
    # prefill as BF16 (the int4 weights' fewer bytes aside), and a small decode step faster
    machete = scaled("llama-3.1-8b", "h100", "awq", "0.19")
    assert "scaled by the roofline's machete/BF16 ratio" in machete.timing_source
    big = prefill(((4096, 0),))
    assert machete.roof.gpu_s(big) == pytest.approx(machete.roof_bf16.gpu_s(big), rel=1e-9)
    assert machete.step_time_s(big) == pytest.approx(llama.step_time_s(big), rel=1e-9)
    assert machete.decode_step_s(4, 4 * 500) < llama.decode_step_s(4, 4 * 500)


def test_scaled_formats_and_their_fallbacks(no_measured_int4):
    """FP8 on an A100 (Marlin W8A16) is scaled from the A100's BF16 tables; `-q awq` names the legacy
    dequantize path; a GPU with no tables at all stays on the labelled roofline."""
    from kvlab.sim.timing import ScaledTiming

    fp8 = scaled("llama-3.1-8b", "a100-80gb", "fp8")
    assert isinstance(fp8, ScaledTiming) and "a100_sxm" in fp8.timing_source and "marlin/BF16" in fp8.timing_source
    arch = card("llama-3.1-8b").arch
    legacy = step_timing(arch, weight_format("awq", arch), "bfloat16", "auto", hardware.gpu("h100"), 1, "auto",
                         kernel="dequant")
    assert isinstance(legacy, ScaledTiming) and "dequant/BF16" in legacy.timing_source
    rtx = scaled("llama-3.1-8b", "rtx-4090", "awq")
    assert isinstance(rtx, CostModel) and rtx.fallback_reason.startswith("no vLLM kernel tables for GPU rtx-4090")


def test_an_fp8_kv_cache_without_attention_rows_is_the_bf16_kv_tables_scaled_by_the_roofline_ratio(no_measured_int4):
    """An A100's tables (vLLM 0.14) have no FP8-KV attention rows: a step with an FP8 cache is the
    tables' step with a BF16 cache times the roofline's FP8-KV/BF16-KV ratio for that step, so that
    the FP8-KV/BF16-KV ratio rests on the tables, not on a roofline set against them; with int4
    weights too, the BF16 tables are the base and the ratio takes both."""
    from kvlab.sim.timing import ScaledTiming, cost_model, weight_kernel

    arch, a100 = card("llama-3.1-8b").arch, hardware.gpu("a100-80gb")
    bf16 = weight_format(None, arch)
    assert "no context or generation attention rows for fp8 KV on a100_sxm" in kernels.kernel_support(
        arch, bf16, "bfloat16", "fp8", a100, 1)
    tables = step_timing(arch, bf16, "bfloat16", "auto", a100, 1, "auto")
    fp8kv = step_timing(arch, bf16, "bfloat16", "fp8", a100, 1, "auto")
    assert isinstance(fp8kv, ScaledTiming) and "a100_sxm vLLM 0.14.0 kernel tables" in fp8kv.timing_source
    assert "scaled by the roofline's fp8 KV/bfloat16 KV ratio" in fp8kv.timing_source
    roof_fp8 = cost_model(arch, bf16, "bfloat16", "fp8", a100, 1)
    roof_bf16 = cost_model(arch, bf16, "bfloat16", "auto", a100, 1)
    for w in (decode(16, 16 * 1100), prefill(((1024, 0),), decodes=15, decode_kv=15 * 1100)):
        host = STEP_OVERHEAD_S + PER_SEQ_OVERHEAD_S * w.requests
        ratio = roof_fp8.gpu_s(w) / roof_bf16.gpu_s(w)
        assert fp8kv.step_time_s(w) == pytest.approx((tables.step_time_s(w) - host) * ratio + host, rel=1e-9)
        assert ratio <= 1  # half the KV bytes read: faster where the step reads them, the same where compute binds
    assert fp8kv.decode_step_s(16, 16 * 1100) < tables.decode_step_s(16, 16 * 1100)
    awq = weight_format("awq", arch)
    both = step_timing(arch, awq, "bfloat16", "fp8", a100, 1, "auto", weight_kernel(awq, a100))
    assert isinstance(both, ScaledTiming) and "fp8 KV/bfloat16 KV and marlin/BF16" in both.timing_source
    w = decode(16, 16 * 1100)
    host = STEP_OVERHEAD_S + PER_SEQ_OVERHEAD_S * 16
    ratio = both.roof.gpu_s(w) / roof_bf16.gpu_s(w)
    assert both.step_time_s(w) == pytest.approx((tables.step_time_s(w) - host) * ratio + host, rel=1e-9)
    # where the tables have FP8-KV rows (an L40S's), int4 with an FP8 cache keeps them as its base
    l40s = hardware.gpu("l40s")
    int4 = step_timing(arch, awq, "bfloat16", "fp8", l40s, 1, "auto", weight_kernel(awq, l40s))
    assert isinstance(int4, ScaledTiming) and "l40s vLLM 0.24.0 kernel tables, bfloat16 GEMMs, fp8 KV" in int4.timing_source
    assert "fp8 KV/" not in int4.timing_source


def test_a_scaled_step_keeps_its_base_host_time_and_scales_only_the_gpu_time(llama, no_measured_int4):
    """With host time in the base (here 1 ms + 20 us a request, whatever the module's constants are
    now), the scaled step is the base's GPU time times the ratio, plus that same host time."""
    from kvlab.sim.timing import ScaledTiming

    awq = scaled("llama-3.1-8b", "h100", "awq")
    base = kernels.KernelTiming(card("llama-3.1-8b").arch, weight_format(None), "bfloat16", "auto",
                                hardware.gpu("h100"), 1, awq.roof_bf16, 0.001, 0.00002)
    s = ScaledTiming(base, awq.roof, awq.roof_bf16, "weights on the Marlin GEMM path")
    n, kv = 64, 64 * 2000
    gpu = base.decode_step_s(n, kv) - (0.001 + 0.00002 * n)
    ratio = awq.roof.decode_gpu_s(n, kv) / awq.roof_bf16.decode_gpu_s(n, kv)
    assert s.decode_step_s(n, kv) == pytest.approx(gpu * ratio + 0.001 + 0.00002 * n, rel=1e-9)
    w = prefill(((2048, 0),), decodes=62, decode_kv=62 * 2000)
    gpu = base.step_time_s(w) - (0.001 + 0.00002 * w.requests)
    assert s.step_time_s(w) == pytest.approx(gpu * awq.roof.gpu_s(w) / awq.roof_bf16.gpu_s(w)
                                             + 0.001 + 0.00002 * w.requests, rel=1e-9)


def test_compile_reads_the_tables_yaml_with_libyaml_to_the_same_objects():
    """While the estimator compiles, `yaml.safe_load` parses with libyaml (CSafeLoader): every
    YAML file of the H100 tables gives the same objects as PyYAML's pure-Python loader, and the
    loader is put back after."""
    import yaml
    plain = yaml.safe_load
    files = sorted((kernels.data_root() / "h100_sxm").rglob("*.yaml"))
    assert files
    expected = [plain(f.read_text()) for f in files]
    with kernels._libyaml():
        assert yaml.safe_load is not plain or not yaml.__with_libyaml__
        assert [yaml.safe_load(f.read_text()) for f in files] == expected
    assert yaml.safe_load is plain


def test_expert_parallel_experts_are_the_tables_moe_ep_rows():
    """--enable-expert-parallel over -tp 4 (one engine): each GPU holds a quarter of the experts whole
    (vLLM's FusedMoEParallelConfig: moe_tp 1, moe_ep 4), so the experts' time is the MoE table's
    moe_tp 1 x moe_ep 4 rows (the estimator's power-law 1.2 routing) x 48 layers, where tensor
    parallel's is its moe_tp 4 x moe_ep 1 rows; the rest of the step is the same op for op."""
    arch = card("qwen3-30b-a3b").arch
    moe = _rows("h100_sxm", "moe", "moe_perf.parquet")
    moe = moe[(moe.hidden_size == 2048) & (moe.inter_size == 768) & (moe.num_experts == 128) & (moe.topk == 8)
              & (moe.moe_dtype == "bfloat16") & (moe.distribution == "power_law_1.2")]
    row = lambda tp, ep, n: float(moe[(moe.moe_tp_size == tp) & (moe.moe_ep_size == ep)  # noqa: E731
                                      & (moe.num_tokens == n)].latency.iloc[0])
    tp4 = timing("qwen3-30b-a3b", tp=4)
    ep4 = step_timing(arch, weight_format(None, arch), "bfloat16", "auto", hardware.gpu("h100"), 4, "auto",
                      expert_parallel=True)
    assert isinstance(ep4, kernels.KernelTiming) and "experts from the moe_tp 1 x moe_ep 4 rows" in ep4.timing_source
    assert "moe_ep" not in tp4.timing_source
    for n in (64, 256):
        ops = {t: {name: ms for name, ms, _ in x.op_times_ms(decode(n, n * 2000))} for t, x in (("tp", tp4), ("ep", ep4))}
        assert ops["ep"]["generation_moe"] == pytest.approx(48 * row(1, 4, n), rel=1e-9)
        assert ops["tp"]["generation_moe"] == pytest.approx(48 * row(4, 1, n), rel=1e-9)
        assert {k: v for k, v in ops["ep"].items() if k != "generation_moe"} == \
               {k: v for k, v in ops["tp"].items() if k != "generation_moe"}
    # where the tables measured another kernel for expert parallel (block FP8 on an H100: FlashInfer's
    # CUTLASS MoE at moe_ep 4, Triton at moe_tp 4 for Qwen3-235B's shape), the timing source names both
    big = kernels.KernelTiming(arch, weight_format("fp8-block", arch), "bfloat16", "auto", hardware.gpu("h100"), 4,
                               tp4.roofline, STEP_OVERHEAD_S, PER_SEQ_OVERHEAD_S, expert_parallel=True)
    assert ("measured on vllm_fp8moe_flashinfer_cutlass_flashinferexperts (no tensor-parallel rows for this "
            "shape)") in big.timing_source  # Qwen3-30B-A3B's block-FP8 experts have no moe_tp 4 rows
    assert kernels._moe_kernels("h100_sxm", "fp8_block", (4096, 1536, 8, 128, 4, 1)) == {"vllm_fp8moe_triton_tritonexperts"}
    assert kernels._moe_kernels("h100_sxm", "fp8_block", (4096, 1536, 8, 128, 1, 4)) == {
        "vllm_fp8moe_flashinfer_cutlass_flashinferexperts"}
    assert "measured on" not in ep4.timing_source  # bf16: Triton's unquantized kernel either way
    assert kernels.moe_parallel(4, True) == (1, 4) and kernels.moe_parallel(1, True) == (1, 1)
    assert kernels.moe_parallel(8, False) == (8, 1)
    # -tp 1: the flag changes nothing in vLLM (use_ep needs more than one GPU), nor here
    one = step_timing(arch, weight_format(None, arch), "bfloat16", "auto", hardware.gpu("h100"), 1, "auto",
                      expert_parallel=True)
    assert one.timing_source == timing("qwen3-30b-a3b").timing_source


def test_expert_parallel_on_the_roofline_is_priced_as_tensor_parallel_and_says_so():
    """No kernel table holds DeepSeek-V2-Lite's experts: the roofline prices them per GPU as under
    tensor parallel (the same bytes and FLOPs on average) and its timing source says so."""
    arch = card("deepseek-v2-lite").arch
    args = (arch, weight_format(None, arch), "bfloat16", "auto", hardware.gpu("h100"), 2, "auto")
    tp, ep = step_timing(*args), step_timing(*args, expert_parallel=True)
    step = prefill(((2048, 0),), decodes=8, decode_kv=8 * 1000)
    assert ep.step_time_s(step) == tp.step_time_s(step)
    assert "expert parallel priced as tensor parallel by the roofline" in ep.timing_source
    assert "expert parallel" not in tp.timing_source


def test_an_h100_nvl_group_beyond_its_bridged_pair_all_reduces_over_pcie():
    """The H100 NVL's NVLink bridge joins two cards: -tp 2 all-reduces over it (300 GB/s a
    direction), -tp 4 and 8 cross PCIe Gen5 x16 between pairs (64), the ring's slowest hop."""
    for tp, gb_s in ((2, 300), (4, 64), (8, 64)):
        t = timing("llama-3.1-8b", "h100-nvl", tp=tp)
        assert t.roof.link_bytes_per_s == gb_s * 1e9 and t.roof_bf16.link_bytes_per_s == 450e9
        assert f"{gb_s:g} / 450 GB/s links" in t.timing_source


def test_an_a100_pcie_step_is_the_a100_sxm_step_scaled_by_the_data_sheets():
    """The A100 80GB PCIe (the SXM part's die, 312 TFLOPS, HBM2e at 1.935 TB/s, PCIe Gen4 x16 between
    cards) has no tables: priced from the A100 SXM's, by the roofline's ratio. A decode step (HBM-bound)
    is slower by at most the bandwidth ratio; over -tp 2 the all-reduces cross PCIe (32 GB/s) instead
    of NVLink 3 (300): slower still."""
    from kvlab.sim.timing import ScaledTiming

    pcie, sxm = hardware.gpu("a100-pcie"), hardware.gpu("a100-80gb")
    for tp in (1, 2):
        t, base = timing("qwen2.5-7b", "a100-pcie", tp=tp), timing("qwen2.5-7b", "a100-80gb", tp=tp)
        assert isinstance(t, ScaledTiming) and "a100_sxm vLLM 0.14.0" in t.timing_source
        assert "scaled by the roofline's a100-pcie/a100-80gb ratio" in t.timing_source
        assert t.roof.flops_per_s == t.roof_bf16.flops_per_s  # the same 312 TFLOPS
        assert t.roof.link_bytes_per_s == 32e9 and t.roof_bf16.link_bytes_per_s == 300e9
        step = decode(32, 32 * 1000)
        ratio = t.step_time_s(step) / base.step_time_s(step)
        assert ratio > 1.0
        if tp == 1:
            assert ratio < sxm.bandwidth_tb_s / pcie.bandwidth_tb_s


def test_an_a100_40gb_step_is_the_a100_80gb_step_scaled_by_the_data_sheets():
    """The A100 40GB SXM (the 80GB part's GA100 die and NVLink 3, HBM2 at 1.555 against 2.039 TB/s)
    has no tables: priced from the A100 80GB's by the roofline's ratio. A decode step is slower by at
    most the bandwidth ratio; a prefill step (compute-bound, the same 312 TFLOPS) by much less."""
    from kvlab.sim.timing import ScaledTiming

    small, big = hardware.gpu("a100-40gb"), hardware.gpu("a100-80gb")
    t, base = timing("llama-3.1-8b", "a100-40gb"), timing("llama-3.1-8b", "a100-80gb")
    assert isinstance(t, ScaledTiming) and "a100_sxm vLLM 0.14.0" in t.timing_source
    assert "scaled by the roofline's a100-40gb/a100-80gb ratio" in t.timing_source
    assert t.roof.link_bytes_per_s == t.roof_bf16.link_bytes_per_s == 300e9
    dec = decode(32, 32 * 1000)
    ratio = t.step_time_s(dec) / base.step_time_s(dec)
    assert 1.0 < ratio < big.bandwidth_tb_s / small.bandwidth_tb_s
    pre = prefill(((8192, 0),))
    assert 1.0 <= t.step_time_s(pre) / base.step_time_s(pre) < ratio


@pytest.mark.parametrize("gpu", ["h100-pcie", "h100-nvl"])
def test_an_h100_pcie_or_nvl_step_is_the_h100_sxm_step_scaled_by_the_data_sheets(llama, gpu):
    """The PCIe cards of the GH100 die have no tables: a step is the H100 SXM's priced step times the
    roofline's ratio of the two GPUs for that step, whose rooflines differ only in the data sheets'
    FLOPS, HBM bandwidth and link (the same kernel efficiencies); labelled, the host time the SXM's."""
    from kvlab.sim.timing import ScaledTiming, cost_model

    arch = card("llama-3.1-8b").arch
    card_gpu, sxm = hardware.gpu(gpu), hardware.gpu("h100")
    t = timing("llama-3.1-8b", gpu)
    assert isinstance(t, ScaledTiming) and isinstance(t.base, kernels.KernelTiming)
    assert f"scaled by the roofline's {gpu}/h100 ratio" in t.timing_source and "h100_sxm vLLM 0.24.0" in t.timing_source
    assert t.roof.bytes_per_s == pytest.approx(t.roof_bf16.bytes_per_s * card_gpu.bandwidth_tb_s / sxm.bandwidth_tb_s)
    assert t.roof.flops_per_s == pytest.approx(t.roof_bf16.flops_per_s * card_gpu.bf16_tflops / sxm.bf16_tflops)
    assert t.roof_bf16 == cost_model(arch, weight_format(None, arch), "bfloat16", "auto", sxm, 1)
    for step in (decode(32, 32 * 3000), prefill(((2048, 0),), decodes=8, decode_kv=8 * 1000)):
        host = llama.host_s(step.requests)
        ratio = t.roof.gpu_s(step) / t.roof_bf16.gpu_s(step)
        assert t.step_time_s(step) == pytest.approx((llama.step_time_s(step) - host) * ratio + host, rel=1e-9)
    # the H100 PCIe: fewer SMs and 2.0 TB/s: slower on both kinds of step; the NVL's 3.9 TB/s: faster decodes
    assert (t.decode_step_s(32, 32 * 3000) > llama.decode_step_s(32, 32 * 3000)) == (gpu == "h100-pcie")
    assert t.step_time_s(prefill(((4096, 0),))) > llama.step_time_s(prefill(((4096, 0),)))
    # no measured part on the twin either (DeepSeek-V2-Lite over -tp 2): this GPU's own roofline,
    # labelled with its own reason
    roof = timing("deepseek-v2-lite", gpu, tp=2)
    assert isinstance(roof, CostModel) and f"no vLLM kernel tables for GPU {gpu}" in roof.timing_source
