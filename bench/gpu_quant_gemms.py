"""Measure, on a CUDA GPU, vLLM's own quantized linear-layer kernels against the 16-bit GEMM they replace.

The simulator prices a weight-quantized dense layer (AWQ/GPTQ int4, FP8) from the measured BF16 GEMM
tables times a format/BF16 ratio. Where no measured ratio exists that ratio is the roofline's, with
Marlin's and Machete's compute-bound rates taken from published figures (sim/timing.py). This script
measures the ratio: each format's whole linear layer as vLLM runs it (activation quantisation
included) and its GEMM kernel alone, at the same (m, n, k) as cuBLAS in 16 bits, in one process on
one GPU. The kernels are vLLM's compiled ones (`_C_stable_libtorch`), called with the arguments vLLM's
Python layer passes (vLLM 0.26's `_custom_ops`, `MacheteLinearKernel`, `apply_gptq_marlin_linear`,
`AWQLinearMethod.apply`, the CUTLASS FP8 scaled-mm kernels):

| format | vLLM path | kernel |
|---|---|---|
| `bfloat16`, `float16` | unquantized linear | `torch.nn.functional.linear` (cuBLAS) |
| `machete_uint4b8_g128` | compressed-tensors W4A16 / GPTQ on Hopper (`MacheteLinearKernel`) | `machete_mm`, bf16 activations |
| `machete_uint4_zp_g128` | AWQ on Hopper from vLLM 0.19 (`MacheteLinearKernel` with zero points) | `machete_mm`, fp16 activations |
| `marlin_uint4b8_g128` | `gptq_marlin` (`apply_gptq_marlin_linear`) | `marlin_gemm`, bf16 activations |
| `marlin_uint4_zp_g128` | `awq_marlin` | `marlin_gemm` with zero points, fp16 activations |
| `awq_legacy_g128` | `-q awq` named (`AWQLinearMethod.apply`) | `awq_gemm` under 256 rows, else `awq_dequantize` + fp16 matmul |
| `fp8_static_tensor` | `-q fp8` with static activation scales | `static_scaled_fp8_quant` + `cutlass_scaled_mm` |
| `fp8_dynamic_token` | FP8 dynamic (per-token activations, per-channel weights) | `dynamic_per_token_scaled_fp8_quant` + `cutlass_scaled_mm` |
| `fp8_block_128` | block FP8 (128 x 128 weights, 1 x 128 activations), CUTLASS path | `per_token_group_fp8_quant` + `cutlass_scaled_mm` |

Timing as bench/gpu_kernels.py (aiconfigurator's method): one layer captured in a CUDA graph, the
same weights every replay, mean over replays. Before timing, each format's output is checked against
a 16-bit matmul on its own dequantized weights (`checks` in meta.json; a row whose check missed by
more than 10 % says so in `check_ok`; a format whose call raised is not timed).

Writes `quant_gemm_perf.csv` and `meta.json` into `--out` as it goes (a run stopped half-way keeps
every row it finished). The kernels come from an installed vLLM, or from a folder holding a vLLM
wheel's `_C_stable_libtorch.abi3.so` and `scalar_type.py` (`--vllm-ops DIR`, `--vllm-version V`):
the wheel must be built for this machine's torch (vLLM 0.20-0.26 pin torch 2.11).

Run on a GPU machine: `python3 bench/gpu_quant_gemms.py --out DIR [--vllm-ops DIR --vllm-version V]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu_kernels import finish, graph_ms, write_rows  # noqa: E402

# model: {layer: (n, k)} of y = x W^T, W [n, k], at -tp 1 (qkv and gate_up fused as vLLM fuses them)
SHAPES = {
    "qwen3-8b": {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (24576, 4096),
                 "down_proj": (4096, 12288)},
    "llama-3.1-8b": {"gate_up_proj": (28672, 4096), "down_proj": (4096, 14336)},  # qkv, o: qwen3-8b's
    "qwen2.5-7b": {"qkv_proj": (4608, 3584), "o_proj": (3584, 3584), "gate_up_proj": (37888, 3584),
                   "down_proj": (3584, 18944)},
    "deepseek-v2-lite": {"q_proj": (3072, 2048), "o_proj": (2048, 2048), "dense_gate_up": (21888, 2048),
                         "shared_gate_up": (5632, 2048), "shared_down": (2048, 2816)},
}
INT4 = ("machete_uint4b8_g128", "machete_uint4_zp_g128", "marlin_uint4b8_g128", "marlin_uint4_zp_g128",
        "awq_legacy_g128")
FP8 = ("fp8_static_tensor", "fp8_dynamic_token", "fp8_block_128")
FORMATS = ("bfloat16", "float16") + INT4 + FP8
MODEL_FORMATS = {"deepseek-v2-lite": ("bfloat16",) + FP8}  # int4 V2-Lite is not a configuration kvlab prices
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
GROUP = 128
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: nibble i of a word holds column 8c + order[i]
FP8_MAX = 448.0


class Ops:
    """vLLM's compiled ops (torch.ops._C) and its ScalarType ids."""

    def __init__(self, ops_dir: Path | None, version: str | None):
        if ops_dir is not None:
            torch.ops.load_library(str(ops_dir / "_C_stable_libtorch.abi3.so"))
            spec = importlib.util.spec_from_file_location("vllm_scalar_type", ops_dir / "scalar_type.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
            self.types = mod.scalar_types
            self.version = version or "unknown"
        else:
            import vllm
            import vllm._custom_ops  # noqa: F401  (loads vllm's _C ops)
            from vllm.scalar_type import scalar_types
            self.types = scalar_types
            self.version = vllm.__version__
        self.c = torch.ops._C
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count


# --- packing (vLLM's quant_utils / marlin_utils, in torch on the GPU)
def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """GPTQ packing: [k, n] 4-bit ints -> [k/8, n] int32, row 8i+j at bits 4j."""
    q = q.to(torch.int32).reshape(q.shape[0] // 8, 8, q.shape[1])
    out = torch.zeros(q.shape[0], q.shape[2], dtype=torch.int32, device=q.device)
    for j in range(8):
        out |= q[:, j, :] << (4 * j)
    return out


def pack_cols(q: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """[rows, n] 4-bit ints -> [rows, n/8] int32, nibble i holding column 8c + order[i]."""
    q = q.to(torch.int32).reshape(q.shape[0], q.shape[1] // 8, 8)
    out = torch.zeros(q.shape[0], q.shape[1], dtype=torch.int32, device=q.device)
    for i, col in enumerate(order):
        out |= q[:, :, col] << (4 * i)
    return out


def scale_perms():
    """vLLM marlin_utils.get_scale_perms."""
    perm = [i + 8 * j for i in range(8) for j in range(8)]
    single = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
    return perm, single


def marlin_permute_scales(s: torch.Tensor, k: int, n: int, group: int) -> torch.Tensor:
    perm, single = scale_perms()
    s = s.reshape(-1, len(perm))[:, perm] if group < k else s.reshape(-1, len(single))[:, single]
    return s.reshape(-1, n).contiguous()


def marlin_zero_points(zp: torch.Tensor, n: int) -> torch.Tensor:
    """vLLM marlin_utils.marlin_zero_points for 4 bits: scale permutation, interleave, pack columns."""
    perm, _ = scale_perms()
    zp = zp.reshape(-1, len(perm))[:, perm]
    zp = zp.reshape(-1, 8)[:, list(AWQ_PACK_ORDER)].reshape(-1, n).contiguous()
    return pack_cols(zp)


class Layer:
    """One linear layer's weights in every format, from one set of 4-bit integers and scales."""

    def __init__(self, ops: Ops, n: int, k: int, formats, dev):
        self.ops, self.n, self.k, self.formats = ops, n, k, formats
        g = k // GROUP
        self.q = torch.randint(0, 16, (k, n), device=dev, dtype=torch.int32)
        self.zp = torch.randint(4, 12, (g, n), device=dev, dtype=torch.int32)
        self.s = (torch.rand(g, n, device=dev) * 0.004 + 0.002)
        rep = lambda t: t.repeat_interleave(GROUP, dim=0)  # noqa: E731
        self.w_sym = ((self.q - 8).float() * rep(self.s)).t().contiguous()  # [n, k], uint4b8 dequantized
        self.w_zp = ((self.q - rep(self.zp)).float() * rep(self.s)).t().contiguous()
        self.w16 = {"bfloat16": self.w_sym.to(torch.bfloat16), "float16": self.w_zp.to(torch.float16)}
        self.prep = {}
        c, t = ops.c, ops.types
        if any(f.startswith(("machete", "marlin")) for f in formats):
            q_rows = pack_rows(self.q)  # [k/8, n]
        if "machete_uint4b8_g128" in formats:
            self.prep["machete_uint4b8_g128"] = (
                c.machete_prepack_B(q_rows.t().contiguous().t(), torch.bfloat16, t.uint4b8.id, torch.bfloat16),
                self.s.to(torch.bfloat16).contiguous())
        if "machete_uint4_zp_g128" in formats:
            s16 = self.s.to(torch.float16)
            self.prep["machete_uint4_zp_g128"] = (
                c.machete_prepack_B(q_rows.t().contiguous().t(), torch.float16, t.uint4.id, torch.float16),
                s16.contiguous(), (-1.0 * s16 * self.zp.to(torch.float16)).contiguous())
        empty = torch.empty(0, dtype=torch.int32, device=dev)
        self.empty, self.workspace = empty, torch.zeros(ops.sms, dtype=torch.int32, device=dev)
        if "marlin_uint4b8_g128" in formats:
            self.prep["marlin_uint4b8_g128"] = (
                c.gptq_marlin_repack(q_rows, empty, k, n, 4, False),
                marlin_permute_scales(self.s.to(torch.bfloat16), k, n, GROUP))
        if any(f in formats for f in ("marlin_uint4_zp_g128", "awq_legacy_g128")):
            q_awq = pack_cols(self.q, AWQ_PACK_ORDER)  # [k, n/8]
            z_awq = pack_cols(self.zp, AWQ_PACK_ORDER)  # [g, n/8]
            self.prep["awq_legacy_g128"] = (q_awq, self.s.to(torch.float16).contiguous(), z_awq)
            self.prep["marlin_uint4_zp_g128"] = (
                c.awq_marlin_repack(q_awq, k, n, 4, False),
                marlin_permute_scales(self.s.to(torch.float16), k, n, GROUP), marlin_zero_points(self.zp, n))
        w = self.w16["bfloat16"].float()
        if "fp8_static_tensor" in formats:
            sw = w.abs().max() / FP8_MAX
            self.prep["fp8_static_tensor"] = ((w / sw).to(torch.float8_e4m3fn).t(), sw.reshape(1))
        if "fp8_dynamic_token" in formats:
            sw = w.abs().amax(dim=1, keepdim=True) / FP8_MAX  # [n, 1]
            self.prep["fp8_dynamic_token"] = ((w / sw).to(torch.float8_e4m3fn).t(), sw.contiguous())
        if "fp8_block_128" in formats:
            blocks = w.reshape(n // 128, 128, k // 128, 128)
            sw = blocks.abs().amax(dim=(1, 3)) / FP8_MAX  # [n/128, k/128]
            wq = (blocks / sw[:, None, :, None]).reshape(n, k).to(torch.float8_e4m3fn)
            self.prep["fp8_block_128"] = (wq.t(), sw.t())  # B [k, n] column-major, Bs.T [k/128, n/128]

    def act_dtype(self, fmt: str) -> torch.dtype:
        return torch.float16 if fmt in ("float16", "machete_uint4_zp_g128", "marlin_uint4_zp_g128",
                                        "awq_legacy_g128") else torch.bfloat16

    def reference(self, fmt: str, x: torch.Tensor) -> torch.Tensor:
        zp = fmt in ("float16", "machete_uint4_zp_g128", "marlin_uint4_zp_g128", "awq_legacy_g128")
        return F.linear(x.float(), self.w_zp if zp else self.w_sym)

    def fns(self, fmt: str, x: torch.Tensor):
        """(the whole layer as vLLM runs it, its GEMM kernel alone) as callables of no arguments."""
        c, t, m, n, k = self.ops.c, self.ops.types, x.shape[0], self.n, self.k
        if fmt in ("bfloat16", "float16"):
            w = self.w16[fmt]
            f = lambda: F.linear(x, w)  # noqa: E731
            return f, f
        p = self.prep[fmt]
        if fmt == "machete_uint4b8_g128":
            f = lambda: c.machete_mm(x, p[0], t.uint4b8.id, None, p[1], None, GROUP, None, None, None)  # noqa: E731
            return f, f
        if fmt == "machete_uint4_zp_g128":
            f = lambda: c.machete_mm(x, p[0], t.uint4.id, None, p[1], p[2], GROUP, None, None, None)  # noqa: E731
            return f, f
        if fmt == "marlin_uint4b8_g128":
            e, ws = self.empty, self.workspace
            f = lambda: c.marlin_gemm(x, None, p[0], None, p[1], None, None, e, e, e, ws, t.uint4b8.id,  # noqa: E731
                                      m, n, k, True, False, True, False)
            return f, f
        if fmt == "marlin_uint4_zp_g128":
            e, ws = self.empty, self.workspace
            f = lambda: c.marlin_gemm(x, None, p[0], None, p[1], None, None, p[2], e, e, ws, t.uint4.id,  # noqa: E731
                                      m, n, k, True, False, True, False)
            return f, f
        if fmt == "awq_legacy_g128":
            if m >= 256:  # AWQLinearMethod.apply: FP16_MATMUL_HEURISTIC_CONDITION
                f = lambda: torch.matmul(x, c.awq_dequantize(p[0], p[1], p[2], 0, 0, 0))  # noqa: E731
            else:
                f = lambda: c.awq_gemm(x, p[0], p[1], p[2], 8)  # noqa: E731
            return f, f
        out = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
        xq = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
        if fmt == "fp8_static_tensor":
            sa = (x.float().abs().max() / FP8_MAX).reshape(1)
            quant = lambda: c.static_scaled_fp8_quant(xq, x, sa, None)  # noqa: E731
            gemm = lambda: c.cutlass_scaled_mm(out, xq, p[0], sa, p[1], None)  # noqa: E731
        elif fmt == "fp8_dynamic_token":
            sa = torch.empty(m, 1, dtype=torch.float32, device=x.device)
            quant = lambda: c.dynamic_per_token_scaled_fp8_quant(xq, x, sa, None)  # noqa: E731
            gemm = lambda: c.cutlass_scaled_mm(out, xq, p[0], sa, p[1], None)  # noqa: E731
        else:  # fp8_block_128: column-major activation scales, as vLLM's CUTLASS block path asks
            sa = torch.empty(k // 128, m, dtype=torch.float32, device=x.device).permute(1, 0)
            quant = lambda: c.per_token_group_fp8_quant(x, xq, sa, 128, 1e-10, -FP8_MAX, FP8_MAX,  # noqa: E731
                                                         False, True, False)
            gemm = lambda: c.cutlass_scaled_mm(out, xq, p[0], sa, p[1], None)  # noqa: E731
        quant()

        def whole():
            quant()
            gemm()
            return out
        return whole, gemm


def kernel_name(fmt: str, m: int) -> str:
    return {"bfloat16": "torch.nn.functional.linear", "float16": "torch.nn.functional.linear",
            "machete_uint4b8_g128": "machete_mm", "machete_uint4_zp_g128": "machete_mm",
            "marlin_uint4b8_g128": "marlin_gemm", "marlin_uint4_zp_g128": "marlin_gemm",
            "awq_legacy_g128": "awq_dequantize+matmul" if m >= 256 else "awq_gemm",
            "fp8_static_tensor": "static_scaled_fp8_quant+cutlass_scaled_mm",
            "fp8_dynamic_token": "dynamic_per_token_scaled_fp8_quant+cutlass_scaled_mm",
            "fp8_block_128": "per_token_group_fp8_quant+cutlass_scaled_mm"}[fmt]


def run(out: Path, ops: Ops, tokens, budget_s: float, meta: dict) -> None:
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    t_start = time.perf_counter()
    for model, layers in SHAPES.items():
        formats = MODEL_FORMATS.get(model, FORMATS)
        for layer, (n, k) in layers.items():
            if time.perf_counter() - t_start > budget_s:
                meta["skipped"].append(f"{model} {layer}")
                print(f"skip {model} {layer}: past --budget-s", flush=True)
                continue
            t0 = time.perf_counter()
            torch.manual_seed(0)
            lay = Layer(ops, n, k, formats, dev)
            for fmt in formats:
                # check at 64 rows (and 320 for the legacy AWQ path's dequantize branch)
                for m in (64, 320) if fmt == "awq_legacy_g128" else (64,):
                    x = torch.randn(m, k, device=dev, dtype=lay.act_dtype(fmt))
                    try:
                        got = lay.fns(fmt, x)[0]().float()
                        ref = lay.reference(fmt, x)
                        err = ((got - ref).norm() / ref.norm()).item()
                    except Exception as e:  # noqa: BLE001
                        err = f"{type(e).__name__}: {e}"[:300]
                    meta["checks"].append({"model": model, "layer": layer, "format": fmt, "m": m, "rel_error": err})
                    if not isinstance(err, float) or err > 0.1:
                        print(f"check {model} {layer} {fmt} m={m}: {err}", flush=True)
            rows = []
            for fmt in formats:
                # a call that raised is not timed; a numeric mismatch is timed and flagged (check_ok)
                mine = [c for c in meta["checks"] if c["model"] == model and c["layer"] == layer and c["format"] == fmt]
                if any(not isinstance(c["rel_error"], float) for c in mine):
                    continue
                check_ok = all(c["rel_error"] < 0.1 for c in mine)
                for m in tokens:
                    x = torch.randn(m, k, device=dev, dtype=lay.act_dtype(fmt))
                    try:
                        whole, kernel = lay.fns(fmt, x)
                        ms = graph_ms(whole)
                        ms_k = ms if kernel is whole else graph_ms(kernel)
                    except Exception as e:  # noqa: BLE001
                        meta["errors"].append(f"{model} {layer} {fmt} m={m}: {type(e).__name__}: {e}"[:300])
                        print(meta["errors"][-1], flush=True)
                        break
                    rows.append({"device": name, "kernel_source": f"vllm{ops.version} {kernel_name(fmt, m)}",
                                 "format": fmt, "act_dtype": str(lay.act_dtype(fmt)).replace("torch.", ""),
                                 "model": model, "layer": layer, "m": m, "n": n, "k": k,
                                 "latency": round(ms, 6), "latency_kernel": round(ms_k, 6),
                                 "check_ok": check_ok})
            if rows:
                write_rows(out / "quant_gemm_perf.csv", rows)
            by = {}
            for r in rows:
                by.setdefault(r["m"], {})[r["format"]] = r["latency"]
            for m in (1, 64, 1024, 8192):
                if m in by and "bfloat16" in by[m]:
                    print(f"{model} {layer} m={m}: " + ", ".join(f"{f} {v / by[m]['bfloat16']:.2f}"
                                                                 for f, v in by[m].items()), flush=True)
            print(f"{model} {layer} ({n}x{k}): {len(rows)} rows, {time.perf_counter() - t0:.1f} s", flush=True)
            del lay
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for quant_gemm_perf.csv and meta.json")
    ap.add_argument("--vllm-ops", type=Path, help="folder with a vLLM wheel's _C_stable_libtorch.abi3.so and "
                    "scalar_type.py (default: the installed vLLM)")
    ap.add_argument("--vllm-version", help="the release that folder's files come from")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new layer after this many seconds")
    ap.add_argument("--quick", action="store_true", help="tokens 1, 64, 1024, 8192 only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_quant_gemms: no CUDA GPU here (this script measures GPU kernels; run it on a GPU machine)",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    ops = Ops(args.vllm_ops, args.vllm_version)
    props = torch.cuda.get_device_properties(0)
    meta = {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "multiprocessors": props.multi_processor_count, "torch": torch.__version__, "cuda": torch.version.cuda,
            "vllm_kernels": ops.version, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "checks": [], "errors": [], "skipped": []}
    print(json.dumps({k: v for k, v in meta.items() if not isinstance(v, list)}), flush=True)
    try:
        run(args.out, ops, (1, 64, 1024, 8192) if args.quick else TOKENS, args.budget_s, meta)
    finally:
        status = finish(args.out, meta)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
