"""MoE expert time from kvlab's own GPU measurements, for MoE shapes in no aiconfigurator table.

aiconfigurator's MoE tables hold only the (hidden, intermediate, top-k, experts) shapes NVIDIA
measured; DeepSeek-V2-Lite's (2,048, 1,408, top-6 of 64) is in none, so its steps fall back to the
roofline, which prices the experts at 75 % of the GPU's peak. `bench/gpu_kernels.py` timed vLLM
0.32's own Triton fused-MoE kernel at that shape on an H200 (`data/kernels/moe_perf.csv`): it
reaches at most ~415 TFLOP/s there (vLLM ships no tuned config for E=64, N=1408 on Hopper, so it runs
its default tiles), and a 16k-token chunk's experts take 1.8x the roofline's time.

- On the measured GPU the rows price the op directly (FP8: its GEMM launches from
  `moe_launches.csv` plus bf16's elementwise time, `_measured`): `latency_gemms`, vLLM's two GEMM launches
  (the harness check: at Qwen3-30B-A3B's shape, which the tables hold, that column is within
  -11 %..+22 % of aiconfigurator's whole-op rows, -11 %..+9 % up to 4,096 tokens; docs/simulator.md).
- On another GPU with aiconfigurator MoE rows at the check shape (Qwen3-30B-A3B, same hidden size
  and kernel) for both GPUs, the rows are transferred by that shape's per-token-count ratio
  (H100/H200). The method, tried on the tables' own 14 other bf16 shapes: 93-100 % of points within
  ±15 % of the H100 rows for every shape but Mixtral's 8 experts of 14,336 (74 %).
- Elsewhere (other GPUs, tensor parallelism, formats not measured) there is no curve: the roofline
  prices the experts as before.

`moe_curve` answers one configuration; the roofline's `CostModel` adds `moe_layers x curve(tokens)`
to a step and leaves the experts' bytes and FLOPs out of its own terms.
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path
from typing import NamedTuple

from kvlab.sim import kernels
from kvlab.sim.gemm_tables import SYSTEMS as AIC_SYSTEMS  # the GPUs whose tables the composition uses
from kvlab.sim.gemm_tables import piecewise_linear

DATA = Path(__file__).resolve().parents[1] / "data" / "kernels" / "moe_perf.csv"
LAUNCHES = DATA.with_name("moe_launches.csv")
MEASURED_GPUS = {"NVIDIA H200": "h200"}  # the device names in the CSV -> kvlab GPU presets
CHECK_SHAPE = (2048, 768, 8, 128)  # Qwen3-30B-A3B: in the tables and measured here
# kvlab weight format -> (the measured rows' moe_dtype, the aiconfigurator rows of the same kernel
# family that carry the ratio between GPUs: Triton's FP8 rows are the block-scale ones, the per-tensor
# "fp8" rows on Hopper are FlashInfer's, a kernel `-q fp8` does not run; see kernels.moe_quant_mode)
FORMATS = {"auto": ("bfloat16", "bfloat16"), "bf16": ("bfloat16", "bfloat16"), "fp16": ("bfloat16", "bfloat16"),
           "fp8": ("fp8", "fp8_block")}


class MoECurve(NamedTuple):
    """Seconds of one MoE layer's routed experts at `tokens` tokens (gemm_tables.piecewise_linear:
    linear between measured token counts, along the last two beyond them)."""

    tokens: tuple[int, ...]
    seconds: tuple[float, ...]
    source: str

    def at(self, n: int) -> float:
        return piecewise_linear(self.tokens, self.seconds, n)


def read_rows(path: Path) -> tuple[dict, ...]:
    """A kvlab kernel CSV's rows (its `#` provenance lines left out)."""
    with path.open() as f:
        return tuple(csv.DictReader(line for line in f if not line.startswith("#")))


@functools.lru_cache(maxsize=1)
def rows() -> tuple[dict, ...]:
    return read_rows(DATA)


@functools.lru_cache(maxsize=1)
def launch_rows() -> tuple[dict, ...]:
    return read_rows(LAUNCHES)


def measured_models(gpu: str) -> tuple[str, ...]:
    """The models whose MoE kvlab measured on GPU preset `gpu` (for `kvlab gpus`)."""
    return tuple(sorted({r["model"] for r in rows() if MEASURED_GPUS.get(r["device"]) == gpu}))


def _on(r: dict, gpu: str, shape: tuple) -> bool:
    """Row `r` (moe_perf.csv) is of MoE `shape` on kvlab preset `gpu`."""
    return MEASURED_GPUS.get(r["device"]) == gpu and (
        int(r["hidden_size"]), int(r["inter_size"]), int(r["topk"]), int(r["num_experts"])) == shape


def _gemms(gpu: str, shape: tuple, moe_dtype: str) -> dict[int, float]:
    """moe_perf.csv's `latency_gemms`, ms per token count, on kvlab preset `gpu`."""
    return {int(r["num_tokens"]): float(r["latency_gemms"]) for r in rows()
            if _on(r, gpu, shape) and r["moe_dtype"] == moe_dtype and r["distribution"] == "balanced"}


def _launches(gpu: str, shape: tuple, moe_dtype: str) -> dict[int, float]:
    """moe_launches.csv: the two GEMM launches alone, ms per token count."""
    models = {r["model"] for r in rows() if _on(r, gpu, shape)}
    return {int(r["num_tokens"]): float(r["latency_launches"]) for r in launch_rows()
            if MEASURED_GPUS.get(r["device"]) == gpu and r["model"] in models and r["moe_dtype"] == moe_dtype}


def _measured(gpu: str, shape: tuple, moe_dtype: str) -> dict[int, float]:
    """The op's ms per token count on kvlab preset `gpu`: bf16 `latency_gemms` (the two launches and
    PyTorch's SiLU-and-multiply between them); FP8 its two launches plus the same elementwise time
    as bf16's at that token count (`latency_gemms` - launches, bf16): PyTorch's three passes of
    SiLU-and-multiply stand for vLLM's fused SiLU-and-multiply and its dynamic FP8 quantisation of the
    result (three passes too); the FP8 rows of moe_perf.csv carry PyTorch's own quantisation, several
    kernels where vLLM runs two, and are not used."""
    bf16 = _gemms(gpu, shape, "bfloat16")
    if moe_dtype == "bfloat16":
        return bf16
    own, bf16_launches = _launches(gpu, shape, moe_dtype), _launches(gpu, shape, "bfloat16")
    return {n: own[n] + max(0.0, bf16[n] - bf16_launches[n]) for n in own if n in bf16 and n in bf16_launches}


def _aic(system: str, shape: tuple, mode: str) -> dict[int, float]:
    df = kernels._moe_frame(system, mode, (*shape[:4], 1, 1))
    if df is None or not len(df):
        return {}
    df = df[df.distribution == "balanced"]
    return dict(zip(df.num_tokens.astype(int), df.latency.astype(float)))


@functools.lru_cache(maxsize=64)
def moe_curve(hidden: int, inter: int, topk: int, experts: int, fmt_name: str, gpu: str, tp: int) -> MoECurve | None:
    """The measured (or transferred) curve for one MoE shape, weight format and GPU preset at
    tensor parallelism `tp`, or None where kvlab has none."""
    if tp != 1 or fmt_name not in FORMATS:
        return None
    shape = (hidden, inter, topk, experts)
    dtype, aic_mode = FORMATS[fmt_name]
    own = _measured(gpu, shape, dtype)
    device = next((d for d, g in MEASURED_GPUS.items() if g == gpu), None)
    if own:
        pts = sorted(own.items())
        return MoECurve(tuple(n for n, _ in pts), tuple(ms / 1e3 for _, ms in pts),
                        f"MoE experts measured: vLLM's Triton fused-MoE kernel on an {device}, kvlab bench/gpu_kernels.py")
    if gpu not in AIC_SYSTEMS or not kernels.available():
        return None
    for device_name, preset in MEASURED_GPUS.items():
        base = _measured(preset, shape, dtype)
        if not base or preset not in AIC_SYSTEMS:
            continue
        there, here = _aic(AIC_SYSTEMS[preset], CHECK_SHAPE, aic_mode), _aic(AIC_SYSTEMS[gpu], CHECK_SHAPE, aic_mode)
        pts = sorted(n for n in base if n in there and n in here)
        if len(pts) < 2:
            continue
        return MoECurve(tuple(pts), tuple(base[n] * here[n] / there[n] / 1e3 for n in pts),
                        f"MoE experts measured on an {device_name} (vLLM's Triton fused-MoE kernel, kvlab "
                        f"bench/gpu_kernels.py), transferred to the {gpu.upper()} by aiconfigurator's "
                        f"{gpu.upper()}/{preset.upper()} ratio at Qwen3-30B-A3B's MoE shape")
    return None
