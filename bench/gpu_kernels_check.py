"""Compare kvlab's GPU kernel measurements (bench/gpu_kernels.py) with aiconfigurator-core's tables.

Where both measured the same op on the same GPU kind, the ratio kvlab / table per point:
- MoE, Qwen3-30B-A3B's shape (hidden 2,048, 128 experts of 768, top-8), balanced routing: kvlab's
  `latency_gemms` and `latency` against the table's bf16 rows, and kvlab's FP8 per-tensor rows
  against the table's block-FP8 Triton rows (the nearest Triton FP8 kernel it has);
- dense bf16 GEMMs at the table's grid shapes (cuBLAS through torch.nn.functional.linear both).
Then what the measurement says about DeepSeek-V2-Lite's MoE (its TFLOP/s, FP8 against bf16) and its
MLA decode (vLLM's Triton kernel against the roofline's attention term, which prices it).

Run: `python bench/gpu_kernels_check.py [DIR]` (DIR: a gpu_kernels.py output folder; default the
rows kvlab ships, src/kvlab/data/kernels/). Prints JSON. Needs aiconfigurator-core.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvlab.sim import kernels, measured_moe

# the GPUs' device names (as torch reports them) -> kvlab presets -> aiconfigurator systems
PRESETS = {"NVIDIA H200": "h200", "NVIDIA H100 80GB HBM3": "h100"}
SYSTEMS = {device: kernels.SYSTEMS[preset] for device, preset in PRESETS.items()}


def read(path: Path) -> list[dict]:
    return list(measured_moe.read_rows(path))


def summary(ratios: dict) -> dict:
    vals = list(ratios.values())
    return {"points": len(vals), "within_10pct": sum(abs(r - 1) <= 0.10 for r in vals),
            "min_pct": round((min(vals) - 1) * 100, 1), "max_pct": round((max(vals) - 1) * 100, 1),
            "per_point": {str(k): round(v, 3) for k, v in ratios.items()}}


def _systems(rows: list[dict]):
    """(device, aiconfigurator system) of each device in `rows` that has tables."""
    for device in sorted({r["device"] for r in rows}):
        if device in SYSTEMS:
            yield device, SYSTEMS[device]


def moe_checks(rows: list[dict]) -> dict:
    out = {}
    for device, system in _systems(rows):
        mine = [r for r in rows if r["device"] == device and r["model"] == "qwen3-30b-a3b"]
        for dtype, mode, column in (("bfloat16", "bfloat16", "latency_gemms"), ("bfloat16", "bfloat16", "latency"),
                                    ("fp8", "fp8_block", "latency_gemms")):
            table = measured_moe._aic(system, measured_moe.CHECK_SHAPE, mode)
            ours = {int(r["num_tokens"]): float(r[column]) for r in mine if r["moe_dtype"] == dtype}
            ratios = {n: ours[n] / table[n] for n in sorted(ours) if n in table}
            if ratios:
                out[f"{device} qwen3-30b-a3b {dtype} {column} / table {mode}"] = summary(ratios)
    return out


def gemm_checks(rows: list[dict]) -> dict:
    out = {}
    for device, system in _systems(rows):
        df = kernels._table(system, "gemm", "gemm_perf.parquet")
        df = df[df.gemm_dtype == "bfloat16"]
        table = {(int(m), int(n), int(k)): float(v) for m, n, k, v in zip(df.m, df.n, df.k, df.latency)}
        for shape in sorted({r["shape"] for r in rows if r["device"] == device and r["shape"].startswith("grid-")}):
            ours = {(int(r["m"]), int(r["n"]), int(r["k"])): float(r["latency"]) for r in rows
                    if r["device"] == device and r["shape"] == shape}
            ratios = {key[0]: ours[key] / table[key] for key in sorted(ours) if key in table}
            if ratios:
                out[f"{device} {shape} bf16 latency / table"] = summary(ratios)
    return out


def v2_lite(rows: list[dict]) -> dict:
    mine = [r for r in rows if r["model"] == "deepseek-v2-lite"]
    hidden, inter, topk = 2048, 1408, 6
    by = {(r["device"], r["moe_dtype"], int(r["num_tokens"])): float(r["latency_gemms"]) for r in mine}
    out = {}
    for device in sorted({r["device"] for r in mine}):
        bf = {n: v for (d, t, n), v in by.items() if d == device and t == "bfloat16"}
        fp = {n: v for (d, t, n), v in by.items() if d == device and t == "fp8"}
        out[device] = {
            "bf16_tflops": {str(n): round(n * topk * 3 * 2 * hidden * inter / (ms / 1e3) / 1e12, 1) for n, ms in sorted(bf.items())},
            "fp8_over_bf16": {str(n): round(fp[n] / bf[n], 3) for n in sorted(bf) if n in fp},
        }
    return out


def mla_check(rows: list[dict]) -> dict:
    """The measured MLA decode (vLLM's Triton kernel) against the roofline's attention term: the
    latent read at 90 % of HBM, or the attention FLOPs at 50 % of peak, whichever is longer."""
    from kvlab import hardware
    from kvlab.sim import timing

    out = {}
    for r in rows:
        gpu = PRESETS.get(r["device"])
        if gpu is None:
            continue
        g = hardware.gpu(gpu)
        batch, context, heads = int(r["batch"]), int(r["context"]), int(r["num_heads"])
        lora, rope = int(r["kv_lora_rank"]), int(r["qk_rope_head_dim"])
        pairs = batch * context
        roof = max(pairs * (lora + rope) * 2 / (g.bandwidth_tb_s * 1e12 * timing.MEMORY_EFFICIENCY),
                   pairs * heads * (2 * (lora + rope) + 2 * lora) / (g.bf16_tflops * 1e12 * timing.ATTENTION_EFFICIENCY))
        out[f"{r['device']} batch {batch} context {context}"] = {
            "measured_ms": float(r["latency"]), "roofline_ms": round(roof * 1e3, 4),
            "measured_over_roofline": round(float(r["latency"]) / (roof * 1e3), 2),
            "latent_gb_s": float(r["kv_gb_s"]), "share_of_hbm": round(float(r["kv_gb_s"]) / (g.bandwidth_tb_s * 1e3), 3)}
    return out


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else measured_moe.DATA.parent
    if not kernels.available():
        print("gpu_kernels_check: aiconfigurator-core is not installed", file=sys.stderr)
        return 2
    moe = read(folder / "moe_perf.csv")
    gemm = read(folder / "gemm_perf.csv") if (folder / "gemm_perf.csv").exists() else []
    mla = read(folder / "mla_decode.csv") if (folder / "mla_decode.csv").exists() else []
    print(json.dumps({"moe": moe_checks(moe), "gemm": gemm_checks(gemm), "deepseek_v2_lite_moe": v2_lite(moe),
                      "mla_decode": mla_check(mla)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
