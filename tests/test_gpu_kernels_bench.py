"""bench/gpu_kernels.py measures vLLM's Triton fused-MoE kernel on a GPU machine; here, without a
GPU, its alignment (vLLM's moe_align_block_size, redone in PyTorch) is checked against a plain
reading of that op, and the whole op (vLLM's kernel, copied verbatim, run by Triton's CPU
interpreter) against the MoE layer in plain PyTorch."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
gk = importlib.import_module("gpu_kernels")


@pytest.mark.parametrize("m,topk,experts,block", [(5, 6, 64, 16), (40, 6, 64, 16), (300, 8, 128, 64), (3, 2, 8, 16)])
def test_align_sorts_each_experts_rows_and_pads_them_to_the_block(m, topk, experts, block):
    torch.manual_seed(m)
    ids = torch.stack([torch.randperm(experts)[:topk] for _ in range(m)])
    sorted_ids, expert_ids, total = gk.align(ids, block, experts)
    flat = ids.reshape(-1).tolist()
    start = 0
    for e in range(experts):
        rows = [i for i, v in enumerate(flat) if v == e]
        padded = -(-len(rows) // block) * block
        seg = sorted_ids[start:start + padded].tolist()
        assert seg[:len(rows)] == rows and all(v == len(flat) for v in seg[len(rows):])
        assert all(expert_ids[b].item() == e for b in range(start // block, (start + padded) // block))
        start += padded
    assert total.tolist() == [start]


def test_balanced_routing_is_aiconfigurators():
    # collector/helper.py balanced_logits: stride ceil(E/topk); token t's j-th expert (t + j*stride) % E
    ids = gk.balanced_topk_ids(16, 64, 6, "cpu")
    assert ids[0].tolist() == [0, 11, 22, 33, 44, 55] and ids[5].tolist() == [5, 16, 27, 38, 49, 60]
    assert ids.reshape(-1).bincount(minlength=64).max() <= 2


def test_default_config_is_vllm_032s():
    assert gk.default_config(1, 64, None) == {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128,
                                              "GROUP_SIZE_M": 1, "SPLIT_K": 1, "num_warps": 4, "num_stages": 4}
    assert gk.default_config(16384, 64, None)["GROUP_SIZE_M"] == 16
    assert gk.default_config(4096, 64, "fp8_w8a8")["BLOCK_SIZE_K"] == 128


CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import gpu_kernels as gk
for m in (1, 5, 40):
    torch.manual_seed(m)
    layer = gk.MoELayer(256, 128, 6, 64, False, False, torch.device("cpu"), dtype=torch.float16)
    x = torch.randn(m, 256, dtype=torch.float16)
    logits = torch.randn(m, 64)
    got = layer.forward(x, logits, gk.default_config(m, 64, None), layer.buffers(m)).float()
    ref = gk.reference_moe(layer, x, logits)
    print(m, ((got - ref).norm() / ref.norm()).item())
"""


def test_the_op_with_vllms_kernel_equals_the_layer_in_plain_pytorch():
    pytest.importorskip("triton")
    # Triton's CPU interpreter (chosen when triton is imported: a fresh process); float16, as the
    # interpreter has no bf16 (numpy); the GPU runs bf16
    out = subprocess.run([sys.executable, "-c", CHECK, str(BENCH)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    errors = {int(m): float(e) for m, e in (line.split() for line in out.stdout.split("\n") if line.strip())}
    assert set(errors) == {1, 5, 40} and max(errors.values()) < 0.01, errors


MLA_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import gpu_kernels as gk
torch.manual_seed(0)
m = gk.MLADecode(2, 64, 4, 32, 16, 16, torch.device("cpu"), dtype=torch.float16)
print(((m.forward().float() - m.reference()).norm() / m.reference().norm()).item())
"""


def test_the_mla_decode_with_vllms_triton_kernel_equals_attention_over_the_latent():
    pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "-c", MLA_CHECK, str(BENCH)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) < 0.01


def test_mla_splits_are_vllms():
    # vLLM 0.32 triton_mla._compute_num_kv_splits: next power of 2 of context // 512, at most 2 per SM
    assert [gk.mla_splits(c, 132) for c in (256, 1024, 1536, 4096, 16384, 1 << 20)] == [1, 2, 4, 8, 32, 264]
