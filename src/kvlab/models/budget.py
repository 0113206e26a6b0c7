"""The `--gpu` KV budget: what vLLM's memory profiling at start leaves for the KV cache.

vLLM measures it (`vllm/v1/worker/gpu_worker.py`, `determine_available_memory`); kvlab, without a
GPU, estimates each term: weights per rank, the transient activation peak of the profiling run,
non-torch memory (CUDA context, NCCL, cuBLAS workspaces) and CUDA-graph memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

from kvlab import hardware
from kvlab.errors import KvlabError
from kvlab.models.arch import ModelArch
from kvlab.units import GiB


@dataclass(frozen=True)
class MemoryEstimate:
    """How vLLM splits one GPU's memory (an estimate: vLLM measures it by profiling at start)."""

    total_bytes: int
    gpu_memory_utilization: float
    requested_bytes: int  # ceil(total x utilization)
    weight_bytes: int  # per rank
    activation_bytes: int  # estimated transient peak of the profiling run
    non_torch_bytes: int  # estimated CUDA context, NCCL and cuBLAS workspaces
    cudagraph_bytes: int  # estimated CUDA-graph memory
    kv_budget_bytes: int


# Estimate constants (documented in README "How capacity is computed"): vLLM measures these by
# profiling at start; kvlab cannot, so it states them.
NON_TORCH_BYTES = int(0.5 * GiB)
CUDAGRAPH_BYTES = int(0.5 * GiB)


def activation_estimate_bytes(arch: ModelArch, max_num_batched_tokens: int, max_num_seqs: int,
                              tp: int, act_bytes: int = 2) -> int:
    """Peak transient memory of vLLM's profiling run: one forward pass of max_num_batched_tokens
    (the widest MLP activation, gate and up outputs, plus the residual stream) and the sampler's
    fp32 logits for max_num_seqs."""
    if arch.moe is not None:
        widest = max(arch.intermediate_size if len(arch.moe.moe_layers) < arch.num_layers else 0,
                      arch.moe.moe_intermediate_size * arch.moe.num_experts_per_tok)
    else:
        widest = arch.intermediate_size
    mlp = max_num_batched_tokens * (2 * widest // tp + 4 * arch.hidden_size) * act_bytes
    logits = max_num_seqs * arch.vocab_size * 4 // tp
    return mlp + logits


def estimate_kv_budget(arch: ModelArch, preset: hardware.GPU, gpu_memory_utilization: float,
                       weight_bytes_per_gpu: int, max_num_batched_tokens: int | None,
                       max_num_seqs: int | None, tp: int) -> MemoryEstimate:
    """The KV budget per rank on `preset`, itemised; KvlabError when nothing is left for the KV cache."""
    if not 0 < gpu_memory_utilization <= 1:
        raise KvlabError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
    w_gpu = weight_bytes_per_gpu
    total = preset.memory_bytes
    requested = ceil(total * gpu_memory_utilization)
    mnbt = max_num_batched_tokens or preset.default_max_num_batched_tokens
    mns = max_num_seqs or preset.default_max_num_seqs
    act = activation_estimate_bytes(arch, mnbt, mns, tp)
    budget = requested - w_gpu - act - NON_TORCH_BYTES - CUDAGRAPH_BYTES
    if w_gpu > requested:
        raise KvlabError(
            f"the weights ({w_gpu / GiB:.2f} GiB per GPU) do not fit {preset.name} at "
            f"--gpu-memory-utilization {gpu_memory_utilization} ({requested / GiB:.2f} GiB): "
            f"short by {(w_gpu - requested) / GiB:.2f} GiB; use more GPUs (-tp), a smaller "
            "--quantization, or a larger GPU"
        )
    if budget <= 0:
        raise KvlabError(
            f"no memory left for the KV cache on {preset.name}: weights {w_gpu / GiB:.2f} GiB plus "
            f"estimated activations and overhead {(act + NON_TORCH_BYTES + CUDAGRAPH_BYTES) / GiB:.2f} GiB "
            f"exceed {requested / GiB:.2f} GiB by {-budget / GiB:.2f} GiB"
        )
    return MemoryEstimate(total, gpu_memory_utilization, requested, w_gpu, act,
                          NON_TORCH_BYTES, CUDAGRAPH_BYTES, budget)
