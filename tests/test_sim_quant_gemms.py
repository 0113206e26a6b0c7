"""Int4 and block-FP8 linear layers on Hopper from kvlab's own measurement of vLLM 0.26's compiled kernels
(kvlab.sim.quant_gemms; data/kernels/quant_gemm_perf.csv, bench/gpu_quant_gemms.py on one H200): the rows,
the harness against NVIDIA's BF16 tables, a step priced from them, and where they do not reach."""

import csv
import statistics

import pytest

from kvlab import hardware
from kvlab.models.cards import card
from kvlab.models.weights import WEIGHT_FORMATS, weight_format
from kvlab.sim import gemm_tables, kernels, quant_gemms
from kvlab.sim.timing import MeasuredRatioTiming, ScaledTiming, step_timing, weight_kernel

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="aiconfigurator-core is not installed (pip install aiconfigurator-core==0.12.0)")

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def csv_rows() -> list[dict]:
    with quant_gemms.DATA.open() as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def csv_ms(fmt: str, n: int, k: int, m: int) -> float:
    hits = [float(r["latency"]) for r in csv_rows() if (r["format"], int(r["n"]), int(r["k"]), int(r["m"])) == (fmt, n, k, m)]
    assert len(hits) == 1, (fmt, n, k, m)
    return hits[0]


def timing(model: str, q: str | None, gpu: str = "h100", version: str = "0.32", tp: int = 1, fmt=None,
           legacy: bool = False):
    """The step timing build_config picks (`legacy`: -q awq named on the command line)."""
    arch = card(model).arch
    fmt = fmt or weight_format(q, arch)
    preset = hardware.gpu(gpu)
    kernel = weight_kernel(fmt, preset, legacy=legacy, vllm_version=version, moe=arch.moe is not None)
    return step_timing(arch, fmt, "bfloat16", "auto", preset, tp, "auto", kernel)


def test_the_rows_cover_every_format_at_every_token_count_and_passed_their_checks():
    rows = csv_rows()
    assert {r["device"] for r in rows} == {"NVIDIA H200"}
    assert {r["kernel_source"].split()[0] for r in rows} == {"vllm0.26.0"}
    assert all(r["check_ok"] == "True" for r in rows)  # each format against its dequantized weights, within 4 %
    shapes = {}
    for r in rows:
        shapes.setdefault((r["format"], int(r["n"]), int(r["k"])), []).append(int(r["m"]))
    assert all(tuple(sorted(ms)) == TOKENS for ms in shapes.values())
    int4 = {f for f, *_ in shapes} - {"bfloat16", "float16", "fp8_static_tensor", "fp8_dynamic_token", "fp8_block_128"}
    assert int4 == set(quant_gemms.FORMATS.values()) - {"fp8_block_128"}
    # Qwen3-8B's, Llama-3.1-8B's and Qwen2.5-7B's layers at -tp 1, in every int4 format
    for model in ("qwen3-8b", "llama-3.1-8b", "qwen2.5-7b"):
        for _, n, k, _ in quant_gemms.dense_linear_shapes(card(model).arch, 1):
            assert all((f, n, k) in shapes for f in int4 | {"bfloat16", "fp8_block_128"}), (model, n, k)


def against_table(fmt: str, mode: str) -> list[float]:
    """kvlab's rows of `fmt` over aiconfigurator's H200 table of quant mode `mode`, point by point."""
    ratios = []
    for (f, n, k), (ms, seconds) in quant_gemms._latencies().items():
        if f == fmt:
            table = gemm_tables.gemm_seconds("h200_sxm", mode, n, k)
            ratios += [s / table[gemm_tables.GRID.index(m)] for m, s in zip(ms, seconds)]
    return ratios


def test_the_harness_against_nvidias_bf16_tables():
    """kvlab's bf16 cuBLAS rows against aiconfigurator's H200 BF16 GEMM table (NVIDIA's measurement, the
    base the ratios scale) at the same shapes and token counts: 194 of 225 within ±15 %, median 1.035."""
    ratios = against_table("bfloat16", "bfloat16")
    assert len(ratios) == 225
    assert 1.0 < statistics.median(ratios) < 1.07
    assert sum(abs(r - 1) <= 0.15 for r in ratios) == 194 and 0.8 < min(ratios) and max(ratios) < 1.3


def test_the_fp8_rows_against_nvidias_fp8_tables():
    """vLLM 0.26's per-tensor FP8 linear (static activation scale: quantisation + CUTLASS GEMM) against
    aiconfigurator's H200 FP8 GEMM table (vLLM 0.24, what prices `-q fp8` on Hopper) at the same shapes:
    172 of 225 points within ±15 %, median 0.959 (the harness, and the tables, on a second kernel)."""
    ratios = against_table("fp8_static_tensor", "fp8")
    assert len(ratios) == 225
    assert 0.93 < statistics.median(ratios) < 0.99 and sum(abs(r - 1) <= 0.15 for r in ratios) == 172


def test_what_the_kernels_measured():
    """The figures the module docstring and docs/simulator.md quote, read off the rows (Qwen3-8B's layers)."""
    layers = quant_gemms.dense_linear_shapes(card("qwen3-8b").arch, 1)

    def ratio(fmt, m):
        return [csv_ms(fmt, n, k, m) / csv_ms("bfloat16", n, k, m) for _, n, k, _ in layers]

    assert all(1.8 < r < 2.5 for r in ratio("marlin_uint4b8_g128", 8192))  # Marlin on Hopper: Ampere MMAs
    assert all(0.95 < r < 1.35 for r in ratio("machete_uint4b8_g128", 8192))  # Machete: near, not at, cuBLAS
    assert all(r > 2.4 for r in ratio("awq_legacy_g128", 64))  # awq_gemm: 2.5-3.4x at 64 rows
    assert all(1.05 < r < 1.3 for r in ratio("awq_legacy_g128", 8192))  # dequantize + fp16 cuBLAS
    assert all(r < 1.0 for r in ratio("marlin_uint4_zp_g128", 1))  # one row: fewer bytes, faster than bf16


def test_an_int4_step_is_the_bf16_tables_step_plus_the_measured_layers():
    """AWQ Qwen3-8B on an H100 (vLLM 0.32: Machete with zero points): a 64-row decode step is the BF16
    tables' step plus, per layer, the H100 table's bf16 GEMM x (measured AWQ / measured bf16 - 1) at 64
    rows, read here from the CSV; attention, KV and host time are the base's."""
    t = timing("qwen3-8b", "awq")
    assert isinstance(t, MeasuredRatioTiming) and t.fallback_reason is None
    assert "machete_uint4_zp_g128 / bf16 GEMM ratio measured per layer shape (vLLM 0.26.0 kernels on one H200" in \
        t.timing_source and "h100_sxm vLLM 0.24.0 kernel tables, bfloat16 GEMMs" in t.timing_source
    i = gemm_tables.GRID.index(64)
    expect = sum(layers * gemm_tables.gemm_seconds("h100_sxm", "bfloat16", n, k)[i]
                 * (csv_ms("machete_uint4_zp_g128", n, k, 64) / csv_ms("bfloat16", n, k, 64) - 1)
                 for _, n, k, layers in quant_gemms.dense_linear_shapes(card("qwen3-8b").arch, 1))
    kv = 64 * 2000
    assert t.decode_step_s(64, kv) - t.base.decode_step_s(64, kv) == pytest.approx(expect, rel=1e-9)
    assert t.host_s(64) == t.base.host_s(64)
    assert t.provenance_counts == {"scaled": 2}  # its own step and the base's, priced above
    # GPTQ / compressed-tensors W4A16 runs Machete without zero points; vLLM 0.18 ran AWQ on Marlin
    assert "machete_uint4b8_g128" in timing("qwen3-8b", "gptq").timing_source
    marlin = timing("qwen3-8b", "awq", version="0.18")
    assert "marlin_uint4_zp_g128" in marlin.timing_source
    # Marlin's Ampere MMAs: a 4,096-row step costs more than bf16's; one row, less (fewer bytes)
    assert marlin.delta.at(4096) > 0 > marlin.delta.at(1)
    legacy = timing("qwen3-8b", "awq", version="0.9.2", legacy=True)
    assert "awq_legacy_g128" in legacy.timing_source and legacy.delta.at(64) > marlin.delta.at(64) > 0


def test_an_unmeasured_shape_borrows_the_nearest_measured_ones_ratio():
    """Left out in turn, each measured shape priced from the nearest of the others (within 2x in n and
    k): the check the nearest-shape rule was adopted on (quant_gemms' docstring quotes these counts)."""
    counts = {}
    for fmt in sorted(set(quant_gemms.FORMATS.values())):
        shapes = sorted({(n, k) for f, n, k in quant_gemms._latencies() if f == fmt})
        errs = []
        for s in shapes:
            near = quant_gemms.nearest_shape(fmt, *s, exclude=s)
            errs += [quant_gemms.measured_ratio(fmt, near, m) / quant_gemms.measured_ratio(fmt, s, m)
                     for m in (1, 16, 64, 256, 1024, 4096, 8192)]
        counts[fmt] = (sum(abs(e - 1) <= 0.2 for e in errs), len(errs))
        assert 0.96 <= statistics.median(errs) <= 1.02 and 0.65 < min(errs) and max(errs) < 1.45, fmt
    assert counts == {"awq_legacy_g128": (62, 70), "fp8_block_128": (84, 105), "machete_uint4_zp_g128": (60, 70),
                      "machete_uint4b8_g128": (61, 70), "marlin_uint4_zp_g128": (66, 70),
                      "marlin_uint4b8_g128": (63, 70)}
    # Llama-2-7B (MHA: qkv 12,288 x 4,096; MLP 11,008): 1 of 4 shapes measured, 3 borrowed
    t = timing("llama-2-7b", "awq")
    assert isinstance(t, MeasuredRatioTiming) and "(1 of 4 measured, the others at the nearest measured shape)" \
        in t.timing_source
    assert quant_gemms.nearest_shape("machete_uint4_zp_g128", 12288, 4096) == (6144, 4096)
    assert quant_gemms.nearest_shape("machete_uint4_zp_g128", 1536, 4096) is None  # qkv at -tp 4: 2.3x off


def test_where_the_rows_do_not_reach_the_roofline_ratio_prices_the_format():
    # -tp 8 (qkv 768 x 4,096: farther than 2x from any measured shape), an A100
    for t in (timing("qwen3-8b", "awq", tp=8), timing("qwen3-8b", "awq", "a100-80gb")):
        assert isinstance(t, ScaledTiming) and not isinstance(t, MeasuredRatioTiming)
        assert "scaled by the roofline's" in t.timing_source
    assert quant_gemms.measured_delta(card("qwen3-30b-a3b").arch, "awq", 128, "marlin", "h100", 1) is None
    assert quant_gemms.measured_delta(card("qwen3-8b").arch, "awq", 64, "machete", "h100", 1) is None  # group 64
    assert quant_gemms.measured_delta(card("qwen3-8b").arch, "awq", 128, "machete", "h200", 1) is not None


def test_block_fp8_up_to_vllm_0_10_runs_cutlass_and_is_priced_from_its_measurement():
    """vLLM's block-FP8 linear layers on Hopper: CUTLASS up to 0.10 (VLLM_USE_DEEP_GEMM "0"), DeepGEMM from
    0.11 ("1"), which the tables' fp8_block rows hold; Marlin W8A16 on an A100."""
    fp8_block = WEIGHT_FORMATS["fp8-block"]
    h100, a100 = hardware.gpu("h100"), hardware.gpu("a100-80gb")
    assert [weight_kernel(fp8_block, h100, vllm_version=v) for v in ("0.8.5", "0.10.2", "0.11.0", "0.32")] == \
        ["cutlass_block", "cutlass_block", "native", "native"]
    assert weight_kernel(fp8_block, a100, vllm_version="0.10.2") == "marlin"
    assert weight_kernel(fp8_block, h100, vllm_version="0.10.2", moe=True) == "native"
    old = timing("qwen3-8b", None, version="0.10.2", fmt=fp8_block)
    assert isinstance(old, MeasuredRatioTiming) and "fp8_block_128 / bf16 GEMM ratio" in old.timing_source
    new = timing("qwen3-8b", None, version="0.32", fmt=fp8_block)
    assert isinstance(new, kernels.KernelTiming) and "fp8_block" in new.timing_source
    # no CUTLASS rows within 2x of Qwen3-8B's shapes at -tp 8: the tables' fp8_block rows, as before
    assert isinstance(timing("qwen3-8b", None, version="0.10.2", fmt=fp8_block, tp=8), kernels.KernelTiming)


def test_8_bit_gptq_takes_gptq_paths_but_not_the_int4_rows():
    """An 8-bit GPTQ checkpoint runs where a 4-bit one does (vLLM's choose_mp_linear_kernel takes
    uint8b128 for Machete on Hopper and for Marlin elsewhere; `-q gptq` kept exllama, which
    reconstructs 8-bit weights too, up to 0.21), priced from the BF16 tables by the roofline's ratio
    at its own weight bytes: the int4 rows measure 4-bit kernels only."""
    from kvlab.sim.timing import marlin_efficiency

    int8, int4 = weight_format("gptq-int8"), weight_format("gptq")
    h100, a100 = hardware.gpu("h100"), hardware.gpu("a100-80gb")
    assert weight_kernel(int8, h100, vllm_version="0.32") == "machete"
    assert weight_kernel(int8, a100, vllm_version="0.32") == "marlin"
    assert weight_kernel(int8, a100, legacy=True, vllm_version="0.9.2") == "dequant"
    assert marlin_efficiency(a100, int8) == (pytest.approx(0.806 * 0.8), marlin_efficiency(a100, int8)[1])
    assert marlin_efficiency(a100, int8)[0] < marlin_efficiency(a100, int4)[0]  # the 8-bit benchmark: 0.806 vs 0.891
    arch = card("qwen3-8b").arch
    assert quant_gemms.measured_delta(arch, "gptq", 128, "machete", "h200", 1) is not None
    assert quant_gemms.measured_delta(arch, "gptq", 128, "machete", "h200", 1, bits=8) is None
    t8, t4 = timing("qwen3-8b", "gptq-int8"), timing("qwen3-8b", "gptq")
    assert isinstance(t8, ScaledTiming) and not isinstance(t8, MeasuredRatioTiming)
    assert "scaled by the roofline's machete/BF16 ratio" in t8.timing_source
    assert isinstance(t4, MeasuredRatioTiming)
    # on Marlin (A100) one decode row reads the weights: 8-bit ones take longer than 4-bit ones, less than BF16
    a8, a4, a16 = (timing("qwen3-8b", q, "a100-80gb") for q in ("gptq-int8", "gptq", None))
    assert a4.decode_step_s(1, 1024) < a8.decode_step_s(1, 1024) < a16.decode_step_s(1, 1024)
