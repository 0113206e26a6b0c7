"""Weight-only int4 linear layers on Hopper from kvlab's own measurement of vLLM's kernels.

The measured GEMM tables (aiconfigurator-core) hold bf16 and FP8 GEMMs, no AWQ/GPTQ int4 ones. Without
a measurement, an int4 model on an H100/H200 is priced from the BF16 tables times the roofline's
format/BF16 ratio, with Machete's compute-bound rate a published claim (the BF16 rate) and the legacy
AWQ kernel's GEMM under 256 rows assumed to stream the packed weights once. `bench/gpu_quant_gemms.py`
timed vLLM 0.26's compiled kernels on one H200 against cuBLAS at the same shapes
(`data/kernels/quant_gemm_perf.csv`): Machete, Marlin and the legacy AWQ kernels, the layer shapes of
Qwen3-8B, Llama-3.1-8B and Qwen2.5-7B at `-tp 1`, 1 to 16,384 rows. What it shows against those
assumptions: Machete is 1.0-1.5x cuBLAS's time from 1,024 rows (not 1.0x), 0.6-0.8x at one row;
Marlin on Hopper 2.0-2.5x from 1,024 rows (its MMAs are Ampere's); the legacy `awq_gemm` 2.5-3.6x at
64 rows, and its dequantize + cuBLAS path 1.1-1.2x at 8,192.

Where every quantized linear layer of a dense model (no MoE, no MLA) is among the measured shapes (or
near one, below), at the measured group size (128), a step costs the BF16 tables' step plus, for each layer,
`bf16_table(n, k, m) x (measured_format(n, k, m) / measured_bf16(n, k, m) - 1)` at its m rows (every new
token; `gemm_tables.gemm_seconds`, linear between the measured row counts). The ratio, not the H200's
absolute time, carries to an H100: both kernels move the same bytes and FLOPs, so it holds where they
are in the same regime (compute-bound from ~256 rows on both GPUs, HBM-bound at a few rows on both).
The denominator is the bf16 cuBLAS measurement for every format (AWQ runs with fp16 activations: its
kernels are compared with the GEMM the BF16 tables price).

A layer shape not measured takes the ratio of the nearest measured shape (log distance in n and k)
where both its n and k are within NEAREST_FACTOR of it (Llama-2-7B's 12,288 x 4,096 qkv_proj from
6,144 x 4,096; Qwen3-8B at `-tp 2`); the BF16 table time stays its own. Checked before it was adopted,
leaving each measured shape out in turn and pricing it from the nearest of the other nine (`tests/
test_sim_quant_gemms.py`): the ratios at 1-8,192 rows land within ±20 % of the measured ones on 60-66 of
70 points per int4 format and 84 of 105 for block FP8 (medians 0.96-1.02; worst 0.66x and 1.44x).

Elsewhere (a shape farther than that, MoE experts, other group sizes, GPUs without measured rows)
`measured_delta` answers None and the roofline's ratio prices the format, as before.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import NamedTuple

from kvlab.models.arch import ModelArch
from kvlab.sim import gemm_tables, kernels
from kvlab.sim.measured_moe import read_rows

DATA = Path(__file__).resolve().parents[1] / "data" / "kernels" / "quant_gemm_perf.csv"
MEASURED_GPU = "NVIDIA H200"
MEASURED_GROUP = 128
# (kvlab weight format, the GEMM path timing.weight_kernel picked) -> the measured format
FORMATS = {("gptq", "machete"): "machete_uint4b8_g128", ("awq", "machete"): "machete_uint4_zp_g128",
           ("gptq", "marlin"): "marlin_uint4b8_g128", ("awq", "marlin"): "marlin_uint4_zp_g128",
           ("awq", "dequant"): "awq_legacy_g128", ("fp8-block", "cutlass_block"): "fp8_block_128"}
MEASURED_BITS = {"awq": 4, "gptq": 4}  # the AWQ/GPTQ rows are int4 kernels'
BASELINE = "bfloat16"
NEAREST_FACTOR = 2.0  # an unmeasured layer shape borrows a measured one's ratio within this factor in n and k
GPUS = ("h100", "h200")  # Hopper presets with BF16 GEMM tables to scale (gemm_tables.SYSTEMS)


@functools.lru_cache(maxsize=1)
def _rows() -> tuple[dict, ...]:
    """The CSV's rows, read once."""
    return read_rows(DATA)


@functools.lru_cache(maxsize=1)
def _latencies() -> dict[tuple[str, int, int], tuple[tuple[int, ...], tuple[float, ...]]]:
    """(format, n, k) -> (rows, seconds) of the whole layer, rows ascending."""
    out: dict[tuple[str, int, int], dict[int, float]] = {}
    for r in _rows():
        if r["device"] == MEASURED_GPU:
            out.setdefault((r["format"], int(r["n"]), int(r["k"])), {})[int(r["m"])] = float(r["latency"]) / 1e3
    return {key: (tuple(sorted(v)), tuple(v[m] for m in sorted(v))) for key, v in out.items()}


def kernel_version() -> str:
    """The vLLM release whose kernels the rows time (from their kernel_source, 'vllm0.26.0 ...')."""
    return _rows()[0]["kernel_source"].split()[0].removeprefix("vllm")


def dense_linear_shapes(arch: ModelArch, tp: int) -> tuple[tuple[str, int, int, int], ...] | None:
    """(name, n, k, layers) of a dense transformer's quantized linear layers per rank (vLLM's fused
    qkv_proj and gate_up_proj), or None for an MoE or MLA model."""
    if arch.moe is not None or arch.mla is not None:
        return None
    h, d, layers = arch.hidden_size, arch.head_dim, arch.num_layers
    q, kv = arch.num_attention_heads * d, arch.num_key_value_heads * d
    return (("qkv_proj", (q + 2 * kv) // tp, h, layers), ("o_proj", h, q // tp, layers),
            ("gate_up_proj", 2 * arch.intermediate_size // tp, h, layers),
            ("down_proj", h, arch.intermediate_size // tp, layers))


class GemmDelta(NamedTuple):
    """Seconds a step's quantized linear layers add to (or save from) the BF16 tables' step at `m` rows."""

    curve: gemm_tables.Curve
    source: str

    def at(self, m: int) -> float:
        return self.curve.at(m)


def measured_format(fmt_name: str, group_size: int, kernel: str, bits: int | None = None) -> str | None:
    """The measured format for a kvlab weight format on GEMM path `kernel`, or None (`bits`: the
    format's, where given; the int4 rows do not price 8-bit GPTQ)."""
    if group_size != MEASURED_GROUP or (bits is not None and bits != MEASURED_BITS.get(fmt_name, bits)):
        return None
    return FORMATS.get((fmt_name, kernel))


def nearest_shape(fmt: str, n: int, k: int, exclude: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """The measured (n, k) whose ratio prices layer shape (n, k) in format `fmt`: itself if measured,
    else the nearest (log distance) within NEAREST_FACTOR in both n and k, else None. `exclude`: a
    shape to leave out (the leave-one-out check)."""
    table = _latencies()
    shapes = [(sn, sk) for f, sn, sk in table if f == fmt and (BASELINE, sn, sk) in table and (sn, sk) != exclude]
    if (n, k) in shapes:
        return (n, k)
    near = [(sn, sk) for sn, sk in shapes
            if max(sn / n, n / sn) <= NEAREST_FACTOR and max(sk / k, k / sk) <= NEAREST_FACTOR]
    return min(near, key=lambda s: math.log(s[0] / n) ** 2 + math.log(s[1] / k) ** 2) if near else None


def measured_ratio(fmt: str, shape: tuple[int, int], m: int) -> float:
    """The measured format/bf16 time ratio of a measured layer shape at m rows (linear between row counts)."""
    table = _latencies()
    return (gemm_tables.piecewise_linear(*table[(fmt, *shape)], m)
            / gemm_tables.piecewise_linear(*table[(BASELINE, *shape)], m))


@functools.lru_cache(maxsize=64)
def _delta(arch: ModelArch, fmt_name: str, group_size: int, kernel: str, gpu: str, tp: int,
           bits: int | None) -> GemmDelta | None:
    measured = measured_format(fmt_name, group_size, kernel, bits)
    shapes = dense_linear_shapes(arch, tp)
    if measured is None or shapes is None or gpu not in GPUS or not kernels.available():
        return None
    near = [nearest_shape(measured, n, k) for _, n, k, _ in shapes]
    if None in near:
        return None
    system = gemm_tables.SYSTEMS[gpu]
    grid = gemm_tables.GRID
    total = [0.0] * len(grid)
    for (_name, n, k, layers), shape in zip(shapes, near):
        base = gemm_tables.gemm_seconds(system, "bfloat16", n, k)
        for i, m in enumerate(grid):
            total[i] += layers * base[i] * (measured_ratio(measured, shape, m) - 1.0)
    exact = sum(shape == (n, k) for (_, n, k, _), shape in zip(shapes, near))
    how = ("per layer shape" if exact == len(shapes) else
           f"per layer shape ({exact} of {len(shapes)} measured, the others at the nearest measured shape)")
    source = (f"{measured} / bf16 GEMM ratio measured {how} (vLLM {kernel_version()} kernels on one H200, "
              f"bench/gpu_quant_gemms.py) on the {system} BF16 GEMM tables")
    return GemmDelta(gemm_tables.Curve(grid, tuple(total)), source)


def measured_delta(arch: ModelArch, fmt_name: str, group_size: int, kernel: str, gpu: str, tp: int,
                   bits: int | None = None) -> GemmDelta | None:
    """The measured int4 layers' difference from BF16 for this configuration, or None where the rows
    do not cover it (every layer shape measured or near a measured one, group 128, int4 AWQ/GPTQ, an
    H100/H200, a dense model)."""
    return _delta(arch, fmt_name, group_size, kernel, gpu, tp, bits)


@functools.lru_cache(maxsize=1)
def measured_models() -> tuple[str, ...]:
    """The models whose every int4 and block-FP8 layer the rows hold (for `kvlab gpus`)."""
    return tuple(sorted({r["model"] for r in _rows() if r["format"] == FORMATS[("awq", "machete")]}))


def measured_shapes() -> tuple[tuple[str, int, int], ...]:
    """(format, n, k) of every measured row set (for tests and `kvlab gpus`)."""
    return tuple(sorted(_latencies()))
