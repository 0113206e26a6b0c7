"""Measure, on a CUDA GPU, the kernels vLLM runs where the simulator's measured tables have no rows.

aiconfigurator-core's tables (the simulator's measured kernel data) hold MoE rows only at the
exact (hidden, intermediate, top-k, experts) shapes NVIDIA measured: DeepSeek-V2-Lite's MoE
(hidden 2,048, 64 experts of 1,408, top-6) is in none, so the simulator prices it by the roofline.
This script times, on whatever CUDA GPU it runs on:

1. **vLLM's Triton fused-MoE op** (bf16 experts, and FP8 per-tensor experts as `-q fp8` runs them)
   at DeepSeek-V2-Lite's shape and, as the harness check, at Qwen3-30B-A3B's shape (hidden 2,048,
   128 experts of 768, top-8), which the tables hold: the same token counts, the same "balanced"
   routing (aiconfigurator's collector/helper.py `balanced_logits`) and the same timing method
   (one op captured in a CUDA graph, replays timed with CUDA events, the mean per replay). The
   GEMM kernel is vLLM 0.32.0's own (`bench/_vllm_fused_moe_kernel.py`, copied verbatim), with
   vLLM's tile configuration (its tuned JSON where vLLM ships one for the GPU,
   `bench/vllm_moe_configs/`, else vLLM 0.32's `get_default_config`). Routing (softmax top-k),
   the block alignment, SiLU-and-multiply and the top-k sum, which vLLM runs as its own CUDA ops,
   are done here in PyTorch; so each row gives the whole op (`latency`), the two GEMM launches
   with only what lies between them (`latency_gemms`: SiLU-and-multiply, and for FP8 the
   activations' quantisation, in PyTorch; the simulator's figure, sim/measured_moe.py), and the
   whole op over four layers of distinct weights per replay (`latency_layers`: no expert weight
   stays in L2 from one replay to the next, as in a model).
2. **Dense bf16 GEMMs** (`torch.nn.functional.linear`, the cuBLAS path vLLM's unquantized linear
   layers run): shapes on aiconfigurator's GEMM grid (the harness check) and DeepSeek-V2-Lite's
   own layer shapes, with the same weights every replay (`latency`, aiconfigurator's method) and
   rotating through copies of the weights larger than L2 together (`latency_cold`).

3. **MLA decode attention**: vLLM 0.32's Triton MLA decode kernel (the TRITON_MLA backend,
   `bench/_vllm_triton_decode_attention.py`, copied verbatim; vLLM's fourth choice on Hopper after
   FLASH_ATTN_MLA, FLASHMLA and FLASHINFER_MLA, which are CUDA extensions) at DeepSeek-V2-Lite's 16
   heads over a paged bf16 latent cache, per batch and context, four layers of distinct caches per
   replay: the latent's bytes over the time, against the roofline's 90 % of HBM.

4. (`--only extra`, not in a full run) the MoE op's two GEMM launches alone, inputs made (and for
   FP8 quantised) beforehand (`moe_launches.csv`: what FP8 experts are priced from, since PyTorch's
   quantisation in the replay of 1. costs more than vLLM's), this GPU's bf16 matrix rate, and
   PyTorch's prefill attention (FlashAttention-2, cuDNN) at MLA's prefill head sizes (`probes.csv`).

Writes `moe_perf.csv`, `gemm_perf.csv` (aiconfigurator's column names, plus the columns above), `mla_decode.csv`
and `meta.json` (GPU, driver, torch, Triton) into `--out` as it goes: a run stopped half-way keeps
every row it finished.

Run on a GPU machine: `python3 bench/gpu_kernels.py --out DIR [--quick]`. Needs torch with CUDA
and Triton; not vLLM, not kvlab. Compare with the tables: `python bench/gpu_kernels_check.py DIR`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VLLM_KERNEL_VERSION = "0.32.0"  # the release bench/_vllm_fused_moe_kernel.py was copied from
# name: (hidden, intermediate, top-k, experts, renormalise the top-k weights: the HF config's norm_topk_prob)
MOE_SHAPES = {
    "qwen3-30b-a3b": (2048, 768, 8, 128, True),
    "deepseek-v2-lite": (2048, 1408, 6, 64, False),
}
# aiconfigurator's MoE token grid (its moe_perf tables' num_tokens)
MOE_TOKENS = (1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 768, 1024, 1536,
              2048, 3072, 4096, 6144, 8192, 12288, 16384)
QUICK_TOKENS = (1, 8, 64, 256, 1024, 4096, 16384)
# name: (n, k) of y = x W^T, W [n, k]
GEMM_SHAPES = {
    "grid-4096x4096": (4096, 4096),
    "grid-6144x4096": (6144, 4096),
    "grid-2048x2048": (2048, 2048),
    "grid-3072x2048": (3072, 2048),
    "v2lite-q_proj": (3072, 2048),  # 16 heads x 192 (qk_nope 128 + rope 64)
    "v2lite-kv_a_proj_with_mqa": (576, 2048),  # kv_lora 512 + rope 64
    "v2lite-kv_b_proj": (4096, 512),  # 16 heads x (128 + 128)
    "v2lite-o_proj": (2048, 2048),
    "v2lite-dense_gate_up": (21888, 2048),  # layer 0: 2 x 10,944
    "v2lite-dense_down": (2048, 10944),
    "v2lite-shared_gate_up": (5632, 2048),  # 2 shared experts of 1,408: 2 x 2,816
    "v2lite-shared_down": (2048, 2816),
}
GEMM_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
FP8_MAX = 448.0  # float8_e4m3fn


def graph_ms(fn, warmups: int = 3, runs: int = 20) -> float:
    """Mean milliseconds per replay of `fn` captured in a CUDA graph (aiconfigurator's
    benchmark_with_power without power: warm up, capture, warm up the replay, time `runs` replays)."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(warmups):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        graph.replay()
    end.record()
    end.synchronize()
    del graph
    return start.elapsed_time(end) / runs


# --- vLLM 0.32's tile choice (fused_moe.py: get_config_file_name, get_moe_configs, get_default_config)
def device_file_name() -> str:
    name = torch.cuda.get_device_name().replace(" ", "_")
    return "NVIDIA_H200" if "H200" in name.split("_") else name


def tuned_configs(experts: int, inter: int, dtype: str | None, config_dir: Path) -> dict | None:
    sel = f",dtype={dtype}" if dtype else ""
    path = config_dir / f"E={experts},N={inter},device_name={device_file_name()}{sel}.json"
    if not path.exists():
        return None
    cfg = json.loads(path.read_text())
    cfg.pop("triton_version", None)
    return {int(k): v for k, v in cfg.items()}


def default_config(m: int, experts: int, dtype: str | None) -> dict:
    """vLLM 0.32 `get_default_config`'s bf16 / FP8 per-tensor branch on CUDA."""
    block_m = 16 if m <= 32 else 32 if m <= 96 else 64 if m <= 512 else 128
    return {"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": 64 if m <= 64 else 128,
            "BLOCK_SIZE_K": 128 if dtype == "fp8_w8a8" or m <= 64 else 64,
            "GROUP_SIZE_M": 16 if m // max(experts, 1) > 128 else 1, "SPLIT_K": 1,
            "num_warps": 4 if m <= 128 else 8, "num_stages": 4 if m <= 32 else 3}


def moe_config(m: int, experts: int, inter: int, dtype: str | None, config_dir: Path) -> tuple[dict, str]:
    tuned = tuned_configs(experts, inter, dtype, config_dir)
    if tuned:
        return dict(tuned[min(tuned, key=lambda x: abs(x - m))]), "tuned"
    return default_config(m, experts, dtype), "default"


# --- the op
def balanced_topk_ids(tokens: int, experts: int, topk: int, device) -> torch.Tensor:
    """aiconfigurator's balanced_logits routing: token t's j-th expert is (t + j*stride) % E."""
    stride = math.ceil(experts / topk)
    t = torch.arange(tokens, device=device).unsqueeze(1).float()
    j = torch.arange(topk, device=device).unsqueeze(0).float()
    if tokens >= stride:
        sel = (t + j * stride) % experts
    else:
        sel = (t * stride / tokens + j * stride) % experts
    return sel.long()


def balanced_logits(tokens: int, experts: int, topk: int, device) -> torch.Tensor:
    """Router logits that route as `balanced_topk_ids` (aiconfigurator's balanced_logits before its softmax)."""
    return F.one_hot(balanced_topk_ids(tokens, experts, topk, device), experts).sum(1).to(torch.bfloat16)


def align(topk_ids: torch.Tensor, block_m: int, experts: int):
    """vLLM's moe_align_block_size (a CUDA op there) in PyTorch, without a host sync: the routed
    rows sorted by expert, each expert's rows padded to a multiple of block_m with the sentinel
    `numel`; the expert of each block; the padded total."""
    flat = topk_ids.reshape(-1)
    n = flat.numel()
    max_padded = n + experts * (block_m - 1)
    if n < experts:
        max_padded = min(n * block_m, max_padded)
    counts = torch.zeros(experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    count_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    rank = torch.arange(n, device=flat.device) - count_start[sorted_experts]
    dest = padded_start[sorted_experts] + rank
    sorted_ids = torch.full((max_padded,), n, dtype=torch.int32, device=flat.device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    blocks = torch.arange(0, max_padded, block_m, device=flat.device)
    expert_ids = torch.searchsorted(padded_end, blocks, right=True).clamp_(max=experts - 1).to(torch.int32)
    total = padded_end[-1:].to(torch.int32)
    return sorted_ids, expert_ids, total


def invoke(a, b, c, a_scale, b_scale, topk_weights, sorted_ids, expert_ids, total, mul_routed_weight: bool,
           top_k: int, config: dict, fp8: bool):
    """vLLM 0.32's invoke_fused_moe_triton_kernel for bf16 and FP8 per-tensor (no bias, no block
    scales, no tensor descriptors: CUDA's defaults); the compute type is the output's dtype, as
    vLLM takes it from the hidden states'."""
    import triton
    import triton.language as tl

    from _vllm_fused_moe_kernel import fused_moe_kernel

    cfg = dict(config)
    swap_ab = fp8 and a.is_cuda and torch.cuda.get_device_capability() == (9, 0) and cfg["BLOCK_SIZE_M"] < 64 \
        and cfg["BLOCK_SIZE_N"] >= 64
    m = a.size(0)
    num_tokens = m * top_k
    if sorted_ids is not None:
        em = sorted_ids.size(0)
        if m < cfg["BLOCK_SIZE_M"]:
            em = min(sorted_ids.size(0), m * top_k * cfg["BLOCK_SIZE_M"])
    else:
        em = num_tokens * cfg["BLOCK_SIZE_M"]
    grid = (triton.cdiv(em, cfg["BLOCK_SIZE_M"]) * triton.cdiv(b.size(1), cfg["BLOCK_SIZE_N"]),)
    cfg["SPLIT_K"] = 1
    block_k = cfg.pop("BLOCK_SIZE_K")
    fused_moe_kernel[grid](
        a, b, c, None, a_scale, b_scale, topk_weights, sorted_ids, expert_ids, total,
        b.size(1), b.size(2), em, num_tokens,
        a.stride(0), a.stride(1), b.stride(0), b.stride(2), b.stride(1), c.stride(1), c.stride(2),
        0, 0, 0, 0, 0, 0, 0, 0, 0,
        MUL_ROUTED_WEIGHT=mul_routed_weight, top_k=top_k, compute_type={torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[c.dtype],
        use_fp8_w8a8=fp8, use_int8_w8a8=False, use_int8_w8a16=False, per_channel_quant=False,
        naive_block_assignment=sorted_ids is None, HAS_BIAS=False, BLOCK_SIZE_K=block_k,
        SWAP_AB=swap_ab, USE_TD=False, **cfg)


def quantize(x: torch.Tensor):
    """Dynamic per-tensor FP8 (vLLM's scaled_fp8_quant without a given scale)."""
    scale = (x.abs().amax().float() / FP8_MAX).clamp(min=1e-12).reshape(1)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


class MoELayer:
    """One MoE layer's routed experts: `forward(x, logits)` as vLLM's fused_experts runs it."""

    def __init__(self, hidden, inter, topk, experts, renorm, fp8, device, dtype=torch.bfloat16):
        self.hidden, self.inter, self.topk, self.experts, self.renorm, self.fp8 = hidden, inter, topk, experts, renorm, fp8
        self.dtype = dtype  # the activations' (bf16 as vLLM serves these models; float16 where Triton's CPU interpreter checks it)
        w1 = torch.randn(experts, 2 * inter, hidden, device=device, dtype=dtype) * 0.02
        w2 = torch.randn(experts, hidden, inter, device=device, dtype=dtype) * 0.02
        if fp8:  # per-expert weight scales (vLLM's online FP8 MoE: one scale per expert and matrix)
            s1 = w1.abs().amax(dim=(1, 2)).float() / FP8_MAX
            s2 = w2.abs().amax(dim=(1, 2)).float() / FP8_MAX
            self.w1 = (w1.float() / s1[:, None, None]).to(torch.float8_e4m3fn)
            self.w2 = (w2.float() / s2[:, None, None]).to(torch.float8_e4m3fn)
            self.s1, self.s2 = s1, s2
            del w1, w2
        else:
            self.w1, self.w2, self.s1, self.s2 = w1, w2, None, None

    def route(self, logits):
        weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), self.topk, dim=-1)
        if self.renorm:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def assign(self, ids, m, config):
        if ids.numel() * 4 <= self.experts:  # vLLM's naive block assignment for tiny batches
            return None, ids.reshape(-1).to(torch.int32), torch.full((1,), ids.numel() * config["BLOCK_SIZE_M"],
                                                                      dtype=torch.int32, device=ids.device)
        return align(ids, config["BLOCK_SIZE_M"], self.experts)

    def gemms(self, x, weights, sorted_ids, expert_ids, total, config, c1, c2, c3):
        a, a_scale = quantize(x) if self.fp8 else (x, None)
        invoke(a, self.w1, c1, a_scale, self.s1, weights, sorted_ids, expert_ids, total, False, self.topk, config, self.fp8)
        c2.copy_(F.silu(c1.view(-1, 2 * self.inter)[:, :self.inter]) * c1.view(-1, 2 * self.inter)[:, self.inter:])
        a2, a2_scale = quantize(c2) if self.fp8 else (c2, None)
        invoke(a2, self.w2, c3, a2_scale, self.s2, weights, sorted_ids, expert_ids, total, True, 1, config, self.fp8)

    def buffers(self, m):
        dev = self.w2.device
        return (torch.empty(m, self.topk, 2 * self.inter, device=dev, dtype=self.dtype),
                torch.empty(m * self.topk, self.inter, device=dev, dtype=self.dtype),
                torch.empty(m, self.topk, self.hidden, device=dev, dtype=self.dtype))

    def forward(self, x, logits, config, bufs):
        weights, ids = self.route(logits)
        sorted_ids, expert_ids, total = self.assign(ids, x.size(0), config)
        c1, c2, c3 = bufs
        self.gemms(x, weights, sorted_ids, expert_ids, total, config, c1, c2, c3)
        return c3.sum(dim=1)


def reference_moe(layer: MoELayer, x, logits):
    """The op in plain PyTorch (float32), for the correctness check."""
    weights, ids = layer.route(logits)
    w1 = layer.w1.float() * (layer.s1[:, None, None] if layer.fp8 else 1)
    w2 = layer.w2.float() * (layer.s2[:, None, None] if layer.fp8 else 1)
    out = torch.zeros(x.size(0), layer.hidden, device=x.device)
    for t in range(x.size(0)):
        for j in range(layer.topk):
            e = ids[t, j]
            h = w1[e] @ x[t].float()
            h = F.silu(h[:layer.inter]) * h[layer.inter:]
            out[t] += weights[t, j] * (w2[e] @ h)
    return out


def finish(out: Path, meta: dict) -> int:
    """Stamp and write a run's meta.json; the exit status: 1 where a part failed."""
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return 1 if meta["errors"] else 0


def write_rows(path: Path, rows: list[dict]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


def run_moe(out: Path, tokens, config_dir: Path, dtypes) -> None:
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    for model, (hidden, inter, topk, experts, renorm) in MOE_SHAPES.items():
        for moe_dtype in dtypes:
            fp8 = moe_dtype == "fp8"
            cfg_dtype = "fp8_w8a8" if fp8 else None
            torch.manual_seed(0)
            layers = [MoELayer(hidden, inter, topk, experts, renorm, fp8, dev) for _ in range(4)]
            # correctness at a few tokens against plain PyTorch
            for m in (1, 5, 40):
                x = torch.randn(m, hidden, device=dev, dtype=torch.bfloat16)
                logits = torch.randn(m, experts, device=dev, dtype=torch.bfloat16)
                cfg, _ = moe_config(m, experts, inter, cfg_dtype, config_dir)
                got = layers[0].forward(x, logits, cfg, layers[0].buffers(m)).float()
                ref = reference_moe(layers[0], x, logits)
                err = ((got - ref).norm() / ref.norm()).item()
                print(f"check {model} {moe_dtype} m={m}: relative error {err:.4f}", flush=True)
                if err > (0.08 if fp8 else 0.02):
                    raise RuntimeError(f"{model} {moe_dtype}: the op disagrees with PyTorch (relative error {err:.3f})")
            for m in tokens:
                cfg, cfg_source = moe_config(m, experts, inter, cfg_dtype, config_dir)
                x = torch.randn(m, hidden, device=dev, dtype=torch.bfloat16)
                logits = balanced_logits(m, experts, topk, dev)
                bufs = layers[0].buffers(m)
                t0 = time.perf_counter()
                whole = graph_ms(lambda: layers[0].forward(x, logits, cfg, bufs))
                weights, rids = layers[0].route(logits)
                sorted_ids, expert_ids, total = layers[0].assign(rids, m, cfg)
                gemms = graph_ms(lambda: layers[0].gemms(x, weights, sorted_ids, expert_ids, total, cfg, *bufs))
                four = graph_ms(lambda: [layer.forward(x, logits, cfg, bufs) for layer in layers]) / len(layers)
                row = {"framework": "kvlab-bench", "version": VLLM_KERNEL_VERSION, "device": name, "op_name": "moe",
                       "kernel_source": f"vllm{VLLM_KERNEL_VERSION}_triton_fused_moe_kernel+torch_route_align_act_sum",
                       "moe_dtype": "bfloat16" if not fp8 else "fp8", "num_tokens": m, "hidden_size": hidden,
                       "inter_size": inter, "topk": topk, "num_experts": experts, "moe_tp_size": 1, "moe_ep_size": 1,
                       "distribution": "balanced", "latency": round(whole, 6), "latency_gemms": round(gemms, 6),
                       "latency_layers": round(four, 6), "config_source": cfg_source,
                       "config": json.dumps(cfg, sort_keys=True), "model": model}
                write_rows(out / "moe_perf.csv", [row])
                print(f"moe {model} {moe_dtype} m={m}: {whole:.4f} ms (gemms {gemms:.4f}, 4 layers {four:.4f}; "
                      f"{cfg_source}; {time.perf_counter() - t0:.1f} s)", flush=True)
            del layers
            torch.cuda.empty_cache()


def run_gemm(out: Path, tokens) -> None:
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 60 << 20)
    for shape, (n, k) in GEMM_SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        copies = max(2, math.ceil(4 * l2 / w.nbytes))
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        rows = []
        for m in tokens:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            warm = graph_ms(lambda: F.linear(x, w))
            cold = graph_ms(lambda: [F.linear(x, wi) for wi in ws]) / copies
            rows.append({"framework": "kvlab-bench", "version": torch.__version__, "device": name, "op_name": "gemm",
                         "kernel_source": "torch.nn.functional.linear", "gemm_dtype": "bfloat16", "m": m, "n": n, "k": k,
                         "latency": round(warm, 6), "latency_cold": round(cold, 6), "shape": shape,
                         "weight_copies": copies})
        write_rows(out / "gemm_perf.csv", rows)
        print(f"gemm {shape} ({n}x{k}): " + ", ".join(f"m={r['m']} {r['latency']:.4f}/{r['latency_cold']:.4f}"
                                                      for r in rows), flush=True)
        del w, ws
        torch.cuda.empty_cache()


# MLA decode attention (vLLM's TRITON_MLA backend kernel: bench/_vllm_triton_decode_attention.py)
MLA_SHAPES = {"deepseek-v2-lite": (16, 512, 64)}  # q heads, kv_lora_rank, qk_rope_head_dim
MLA_BATCHES = (1, 8, 32, 64, 128, 256)
MLA_CONTEXTS = (1024, 4096, 16384)
MLA_PAGE = 16  # vLLM's default block size; TRITON_MLA takes any multiple of 16


def mla_splits(max_seq_len: int, sm_count: int) -> int:
    """vLLM 0.32 triton_mla._compute_num_kv_splits."""
    ideal = 1 << (max(1, max_seq_len // 512) - 1).bit_length()
    return min(ideal, sm_count * 2)


class MLADecode:
    """One layer's MLA decode over a paged latent cache, as TritonMLAImpl.forward_mqa calls it."""

    def __init__(self, batch, context, heads, lora, rope, page, device, dtype=torch.bfloat16):
        pages = context // page
        self.cache = torch.randn(batch * pages, page, lora + rope, device=device, dtype=dtype) * 0.1
        self.block_table = torch.randperm(batch * pages, device=device, dtype=torch.int64).to(torch.int32).view(batch, pages)
        self.seq_lens = torch.full((batch,), context, device=device, dtype=torch.int32)
        self.q = torch.randn(batch, heads, lora + rope, device=device, dtype=dtype)
        self.o = torch.zeros(batch, heads, lora, device=device, dtype=dtype)
        self.lse = torch.zeros(batch, heads, device=device, dtype=dtype)
        sms = torch.cuda.get_device_properties(device).multi_processor_count if self.q.is_cuda else 132
        self.splits = mla_splits(context, sms)
        self.logits = torch.empty(batch, heads, self.splits, lora + 1, device=device, dtype=torch.float32)
        self.one = torch.tensor(1.0, dtype=torch.float32, device=device)
        self.lora, self.page, self.scale = lora, page, (lora + rope) ** -0.5

    def forward(self):
        from _vllm_triton_decode_attention import decode_attention_fwd

        kv = self.cache.unsqueeze(2)
        decode_attention_fwd(self.q, kv, kv[..., :self.lora], self.o, self.lse, self.block_table, self.seq_lens,
                             self.logits, self.splits, self.scale, self.page, k_scale=self.one, v_scale=self.one,
                             is_mla=True)
        return self.o

    def reference(self):
        out = []
        for b in range(self.q.size(0)):
            pages = self.block_table[b].long()
            kv = self.cache[pages].reshape(-1, self.cache.size(-1))[: int(self.seq_lens[b])].float()
            scores = torch.einsum("hd,td->ht", self.q[b].float(), kv) * self.scale
            out.append(torch.softmax(scores, dim=-1) @ kv[:, :self.lora])
        return torch.stack(out)


def run_mla(out: Path) -> None:
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    for model, (heads, lora, rope) in MLA_SHAPES.items():
        check = MLADecode(3, 256, heads, lora, rope, MLA_PAGE, dev)
        got, ref = check.forward().float(), check.reference()
        err = ((got - ref).norm() / ref.norm()).item()
        print(f"check mla {model}: relative error {err:.4f}", flush=True)
        if err > 0.02:
            raise RuntimeError(f"{model}: the MLA decode disagrees with PyTorch (relative error {err:.3f})")
        del check
        for context in MLA_CONTEXTS:
            for batch in MLA_BATCHES:
                layers = [MLADecode(batch, context, heads, lora, rope, MLA_PAGE, dev) for _ in range(4)]
                ms = graph_ms(lambda: [layer.forward() for layer in layers]) / len(layers)
                kv_bytes = batch * context * (lora + rope) * 2
                row = {"framework": "kvlab-bench", "version": VLLM_KERNEL_VERSION, "device": name,
                       "op_name": "mla_decode", "kernel_source": f"vllm{VLLM_KERNEL_VERSION}_triton_mla_decode_attention_fwd",
                       "kv_dtype": "bfloat16", "num_heads": heads, "kv_lora_rank": lora, "qk_rope_head_dim": rope,
                       "batch": batch, "context": context, "page_size": MLA_PAGE, "num_kv_splits": layers[0].splits,
                       "latency": round(ms, 6), "kv_bytes": kv_bytes, "kv_gb_s": round(kv_bytes / (ms / 1e3) / 1e9, 1),
                       "model": model}
                write_rows(out / "mla_decode.csv", [row])
                print(f"mla {model} batch={batch} context={context}: {ms:.4f} ms, {row['kv_gb_s']} GB/s of latent", flush=True)
                del layers
                torch.cuda.empty_cache()


# --- extra rows for later rounds (not read by the simulator): the GPU's own ceilings, the MoE op's
# two GEMM launches alone, and FlashAttention-class prefill attention at MLA's prefill head sizes
PREFILL_LENGTHS = (1024, 4096, 16384)


def run_extra(out: Path, tokens, config_dir: Path) -> None:
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    rows = []
    # ceilings: a device-to-device copy (bytes read + written) and an 8192^3 bf16 matrix product
    a = torch.empty(1 << 31, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = graph_ms(lambda: b.copy_(a), runs=10)
    rows.append({"device": name, "probe": "copy", "shape": "2 GiB", "latency": round(ms, 6),
                 "rate": round(2 * a.numel() / (ms / 1e3) / 1e12, 3), "unit": "TB/s read+written"})
    del a, b
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = graph_ms(lambda: x @ x, runs=10)
    rows.append({"device": name, "probe": "bf16 matmul", "shape": "8192^3", "latency": round(ms, 6),
                 "rate": round(2 * 8192 ** 3 / (ms / 1e3) / 1e12, 1), "unit": "TFLOP/s"})
    del x
    # the MoE op's two GEMM launches alone: inputs made beforehand (no routing, alignment, activation
    # or quantisation in the replay)
    for model, (hidden, inter, topk, experts, renorm) in MOE_SHAPES.items():
        for moe_dtype in ("bfloat16", "fp8"):
            fp8 = moe_dtype == "fp8"
            layer = MoELayer(hidden, inter, topk, experts, renorm, fp8, dev)
            out_rows = []
            for m in tokens:
                cfg, cfg_source = moe_config(m, experts, inter, "fp8_w8a8" if fp8 else None, config_dir)
                x = torch.randn(m, hidden, device=dev, dtype=torch.bfloat16)
                weights, rids = layer.route(balanced_logits(m, experts, topk, dev))
                sorted_ids, expert_ids, total = layer.assign(rids, m, cfg)
                c1, c2, c3 = layer.buffers(m)
                c2.normal_()
                a1, s1 = quantize(x) if fp8 else (x, None)
                a2, s2 = quantize(c2) if fp8 else (c2, None)

                def launches():
                    invoke(a1, layer.w1, c1, s1, layer.s1, weights, sorted_ids, expert_ids, total, False, topk, cfg, fp8)
                    invoke(a2, layer.w2, c3, s2, layer.s2, weights, sorted_ids, expert_ids, total, True, 1, cfg, fp8)

                ms = graph_ms(launches)
                out_rows.append({"device": name, "model": model, "moe_dtype": moe_dtype, "num_tokens": m,
                                 "latency_launches": round(ms, 6), "config_source": cfg_source})
            write_rows(out / "moe_launches.csv", out_rows)
            print(f"moe launches {model} {moe_dtype}: " + ", ".join(f"{r['num_tokens']}:{r['latency_launches']:.4f}"
                                                                  for r in out_rows), flush=True)
            del layer
            torch.cuda.empty_cache()
    # prefill attention at MLA's prefill head sizes (16 heads, q/k 192, v 128 padded to 192 as vLLM pads
    # it for FlashAttention), causal, one sequence, through PyTorch's SDPA backends (not vLLM's FA3)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        for n in PREFILL_LENGTHS:
            q = torch.randn(1, 16, n, 192, device=dev, dtype=torch.bfloat16)
            k, v = torch.randn_like(q), torch.randn_like(q)
            try:
                with sdpa_kernel(backend):
                    ms = graph_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), runs=10)
            except Exception as e:  # noqa: BLE001  (a backend this build lacks)
                rows.append({"device": name, "probe": f"sdpa {backend.name}", "shape": f"16 x {n} x 192 causal",
                             "latency": "", "rate": "", "unit": f"failed: {type(e).__name__}"})
                continue
            flops = 16 * n * n * (192 + 128)  # 2 x n^2/2 x heads x (QK^T 192 + PV 128, the unpadded V): causal half
            rows.append({"device": name, "probe": f"sdpa {backend.name}", "shape": f"16 x {n} x 192 causal",
                         "latency": round(ms, 6), "rate": round(flops / (ms / 1e3) / 1e12, 1),
                         "unit": "TFLOP/s (causal, unpadded V)"})
    write_rows(out / "probes.csv", rows)
    for r in rows:
        print("probe", r, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for moe_perf.csv, gemm_perf.csv, meta.json")
    ap.add_argument("--quick", action="store_true", help=f"MoE at {QUICK_TOKENS} tokens only")
    ap.add_argument("--config-dir", type=Path, default=HERE / "vllm_moe_configs",
                    help="vLLM's tuned fused-MoE configs (default: the copies beside this script)")
    ap.add_argument("--only", choices=("moe", "gemm", "mla", "extra"), help="one part only (extra: not in a full run)")
    ap.add_argument("--moe-dtypes", default="bfloat16,fp8", help="comma-separated: bfloat16, fp8")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA GPU here (this script measures GPU kernels; run it on a GPU machine)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    import triton

    props = torch.cuda.get_device_properties(0)
    meta = {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "multiprocessors": props.multi_processor_count, "memory_bytes": props.total_memory,
            "l2_bytes": getattr(props, "L2_cache_size", None), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__, "vllm_kernel": VLLM_KERNEL_VERSION,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta), flush=True)
    dtypes = [d.strip() for d in args.moe_dtypes.split(",") if d.strip()]
    parts = []  # bf16 MoE first (the rows the simulator lacks), then the GEMMs, then FP8 MoE
    if args.only in (None, "moe") and "bfloat16" in dtypes:
        parts.append(("moe bfloat16", lambda: run_moe(args.out, tokens, args.config_dir, ["bfloat16"])))
    if args.only in (None, "gemm"):
        parts.append(("gemm", lambda: run_gemm(args.out, GEMM_TOKENS)))
    if args.only in (None, "moe") and "fp8" in dtypes:
        parts.append(("moe fp8", lambda: run_moe(args.out, tokens, args.config_dir, ["fp8"])))
    if args.only in (None, "mla"):
        parts.append(("mla", lambda: run_mla(args.out)))
    if args.only == "extra":
        parts.append(("extra", lambda: run_extra(args.out, tokens, args.config_dir)))
    tokens = QUICK_TOKENS if args.quick else MOE_TOKENS
    meta["errors"] = {}
    for part, fn in parts:
        try:  # one part failing (a Triton release that cannot compile the kernel, say) keeps the others
            fn()
        except Exception as e:  # noqa: BLE001
            meta["errors"][part] = f"{type(e).__name__}: {e}"[:2000]
            print(f"gpu_kernels: {part} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return finish(args.out, meta)


if __name__ == "__main__":
    raise SystemExit(main())
