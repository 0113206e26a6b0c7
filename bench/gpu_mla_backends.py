"""Measure, on a Hopper GPU, the MLA decode kernels vLLM picks there, at DeepSeek-V2-Lite's 16 heads.

vLLM on compute capability 9.0 decodes MLA with FLASH_ATTN_MLA (FlashAttention 3 with a separate
value head: `FlashAttnMLAImpl.forward_mqa`) for a bf16 latent cache and FLASHMLA for an FP8 one
(`platforms/cuda.py` `_get_backend_priorities`; FLASH_ATTN_MLA refuses FP8). The simulator prices
V2-Lite's attention from aiconfigurator's measured MLA *module* rows less their projections
(`sim/mla_module.py`): this script times the kernels alone, as vLLM calls them, to show how much of
that module is the kernel (the rest: rotary embedding, cache write, the absorbed W_UK/W_UV products,
launches). Per batch and context: one layer's decode over a paged latent cache (576 = 512 + 64 rope
values a token), four layers of distinct caches per CUDA-graph replay (no cache stays in L2), mean
per layer; bytes of latent read over that time.

- `FLASH_ATTN_MLA` (bf16 cache, 16-token pages): `get_scheduler_metadata` then `flash_attn_varlen_func`
  (fa_version 3) with vLLM's arguments, `num_splits` 32 (vLLM's default
  `flash_attn_max_num_splits_for_cuda_graph` under full CUDA graphs);
- `FLASHMLA` bf16 and FP8 (64-token pages): `flash_mla_with_kvcache` and
  `_flashmla_extension_C.fwd_kvcache_mla_fp8` (FP8 query and cache, per-tensor scales).

Each is checked against a float32 softmax attention on the same cache first (`checks` in meta.json).
The kernels come from a vLLM wheel built for this machine's torch, unpacked into `--vllm-ops DIR` as
`DIR/vllm/...` (the wheel's own layout: `vllm_flash_attn/_vllm_fa3_C.abi3.so` and
`flash_attn_interface.py`, `_flashmla_C.abi3.so`, `_flashmla_extension_C.abi3.so`,
`third_party/flashmla/flash_mla_interface.py`, with empty `__init__.py` files), or from an installed vLLM.

Run on a Hopper machine: `python3 bench/gpu_mla_backends.py --out DIR [--vllm-ops DIR --vllm-version V]`.
Writes `mla_backends.csv` and `meta.json` as it goes.

Status (2026-12-04): written and checked on CPU for syntax only; no GPU machine was lent after it was
written, so it has not run yet and nothing in kvlab reads its output. The files it needs from the
vllm 0.26.0 wheel fit one device call (the FA3 extension is 153 MB, 13 MB under `xz -3`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu_kernels import finish, graph_ms, write_rows  # noqa: E402

HEADS, LORA, ROPE = 16, 512, 64  # DeepSeek-V2-Lite
BATCHES = (1, 8, 32, 64, 128, 256)
CONTEXTS = (1024, 4096, 16384)
FA_SPLITS = 32


class Decode:
    """One layer's MLA decode over a paged latent cache, on one backend."""

    def __init__(self, backend: str, batch: int, context: int, dev):
        self.backend, self.batch, self.context = backend, batch, context
        self.page = 16 if backend == "FLASH_ATTN_MLA" else 64
        pages = -(-context // self.page)
        self.scale = (128 + ROPE) ** -0.5  # vLLM's MLA softmax scale: qk_head_dim = nope 128 + rope 64
        cache = torch.randn(batch * pages, self.page, LORA + ROPE, device=dev, dtype=torch.bfloat16) * 0.5
        self.block_table = torch.randperm(batch * pages, device=dev).to(torch.int32).view(batch, pages)
        self.seq_lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
        q = torch.randn(batch, HEADS, LORA + ROPE, device=dev, dtype=torch.bfloat16) * 0.5
        self.fp8 = backend == "FLASHMLA_FP8"
        if self.fp8:
            self.k_scale = (cache.float().abs().max() / 448.0).reshape(1)
            self.q_scale = (q.float().abs().max() / 448.0).reshape(1)
            self.cache = (cache.float() / self.k_scale).to(torch.float8_e4m3fn)
            self.q = (q.float() / self.q_scale).to(torch.float8_e4m3fn)
            self.ref_cache = self.cache.float() * self.k_scale
            self.ref_q = self.q.float() * self.q_scale
        else:
            self.cache, self.q, self.ref_cache, self.ref_q = cache, q, cache.float(), q.float()
        self.cu_q = torch.arange(batch + 1, device=dev, dtype=torch.int32)
        if backend == "FLASH_ATTN_MLA":
            from vllm.vllm_flash_attn.flash_attn_interface import get_scheduler_metadata
            self.meta = get_scheduler_metadata(batch_size=batch, max_seqlen_q=1, max_seqlen_k=context,
                                               num_heads_q=HEADS, num_heads_kv=1, headdim=ROPE,
                                               cache_seqlens=self.seq_lens, qkv_dtype=torch.bfloat16,
                                               headdim_v=LORA, page_size=self.page, cu_seqlens_q=self.cu_q,
                                               causal=True, num_splits=FA_SPLITS)
        elif backend == "FLASHMLA":
            from vllm.third_party.flashmla.flash_mla_interface import get_mla_metadata
            self.meta = get_mla_metadata()[0]
        else:
            self.meta = torch.ops._flashmla_extension_C.get_mla_decoding_metadata_dense_fp8(self.seq_lens, HEADS, 1)

    def forward(self):
        if self.backend == "FLASH_ATTN_MLA":
            from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func
            return flash_attn_varlen_func(
                q=self.q[..., LORA:], k=self.cache[..., LORA:].unsqueeze(-2), v=self.cache[..., :LORA].unsqueeze(-2),
                q_v=self.q[..., :LORA], max_seqlen_q=1, cu_seqlens_q=self.cu_q, max_seqlen_k=self.context,
                seqused_k=self.seq_lens, block_table=self.block_table, softmax_scale=self.scale, causal=True,
                fa_version=3, scheduler_metadata=self.meta, num_splits=FA_SPLITS)
        if self.backend == "FLASHMLA":
            from vllm.third_party.flashmla.flash_mla_interface import flash_mla_with_kvcache
            return flash_mla_with_kvcache(self.q.unsqueeze(1), self.cache.unsqueeze(-2), self.block_table,
                                          self.seq_lens, LORA, self.meta, softmax_scale=self.scale, causal=True,
                                          is_fp8_kvcache=False)[0].squeeze(1)
        tile, splits = self.meta
        return torch.ops._flashmla_extension_C.fwd_kvcache_mla_fp8(
            self.q.unsqueeze(1), self.cache.unsqueeze(-2), LORA, self.seq_lens, self.block_table, self.scale, True,
            tile, splits, self.q_scale, self.k_scale)[0].squeeze(1)

    def reference(self):
        out = []
        for b in range(self.batch):
            kv = self.ref_cache[self.block_table[b].long()].reshape(-1, LORA + ROPE)[: self.context]
            p = torch.softmax(torch.einsum("hd,td->ht", self.ref_q[b], kv) * self.scale, dim=-1)
            out.append(p @ kv[:, :LORA])
        return torch.stack(out)


def load(ops_dir: Path | None) -> str:
    if ops_dir is not None:
        sys.path.insert(0, str(ops_dir))
    import vllm.vllm_flash_attn.flash_attn_interface as fa  # noqa: F401  (loads _vllm_fa3_C)
    import vllm._flashmla_C  # noqa: F401
    import vllm._flashmla_extension_C  # noqa: F401
    return "FA3 available" if fa.FA3_AVAILABLE else f"FA3 unavailable: {fa.FA3_UNAVAILABLE_REASON}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vllm-ops", type=Path, help="folder holding the wheel's vllm/ package files (default: installed vLLM)")
    ap.add_argument("--vllm-version", default="unknown")
    ap.add_argument("--backends", default="FLASH_ATTN_MLA,FLASHMLA,FLASHMLA_FP8")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("gpu_mla_backends: needs a Hopper GPU (compute capability 9.x)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "vllm_kernels": args.vllm_version,
            "loaded": load(args.vllm_ops), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "checks": [], "errors": []}
    print(json.dumps({k: v for k, v in meta.items() if not isinstance(v, list)}), flush=True)
    dev = torch.device("cuda")
    try:
        for backend in args.backends.split(","):
            try:
                check = Decode(backend, 3, 300, dev)
                got, ref = check.forward().float(), check.reference()
                err = ((got - ref).norm() / ref.norm()).item()
            except Exception as e:  # noqa: BLE001
                meta["errors"].append(f"{backend} check: {type(e).__name__}: {e}"[:500])
                print(meta["errors"][-1], flush=True)
                continue
            meta["checks"].append({"backend": backend, "rel_error": err})
            print(f"check {backend}: relative error {err:.4f}", flush=True)
            for context in CONTEXTS:
                for batch in BATCHES:
                    try:
                        layers = [Decode(backend, batch, context, dev) for _ in range(4)]
                        ms = graph_ms(lambda: [layer.forward() for layer in layers]) / len(layers)
                    except Exception as e:  # noqa: BLE001
                        meta["errors"].append(f"{backend} b={batch} s={context}: {type(e).__name__}: {e}"[:500])
                        print(meta["errors"][-1], flush=True)
                        continue
                    kv_bytes = batch * context * (LORA + ROPE) * (1 if backend == "FLASHMLA_FP8" else 2)
                    row = {"device": meta["device"], "kernel_source": f"vllm{args.vllm_version} {backend}",
                           "backend": backend, "kv_dtype": "fp8" if backend == "FLASHMLA_FP8" else "bfloat16",
                           "num_heads": HEADS, "batch": batch, "context": context, "page_size": layers[0].page,
                           "latency": round(ms, 6), "kv_bytes": kv_bytes,
                           "kv_gb_s": round(kv_bytes / (ms / 1e3) / 1e9, 1), "check_rel_error": round(err, 5)}
                    write_rows(args.out / "mla_backends.csv", [row])
                    print(f"{backend} batch={batch} context={context}: {ms:.4f} ms, {row['kv_gb_s']} GB/s", flush=True)
                    del layers
                    torch.cuda.empty_cache()
    finally:
        status = finish(args.out, meta)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
