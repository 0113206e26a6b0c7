"""GPU presets: memory, bandwidth and dense FLOPS from vendor data sheets.

`memory_bytes` is what the CUDA runtime reports as total device memory (what vLLM multiplies by
--gpu-memory-utilization), which is a little less than the marketed size; each preset says where
its figure comes from. Data-sheet FLOPS are dense (the "with sparsity" figures are twice these). Bandwidth and FLOPS:
NVIDIA H100 (SXM, PCIe, NVL)/H200/A100/L40S/L4/B200 and AMD MI300X data sheets, NVIDIA Ada whitepaper (RTX 4090).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from kvlab.errors import KvlabError
from kvlab.units import GiB, MiB


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float  # marketed capacity (data sheet)
    memory_bytes: int  # total as the CUDA runtime reports it
    memory_source: str
    bandwidth_tb_s: float
    bf16_tflops: float
    fp8_tflops: float | None
    compute_capability: float  # CUDA compute capability (gfx942 for MI300X, written 9.4)
    aliases: tuple[str, ...] = ()
    platform: str = "cuda"  # "cuda" or "rocm"

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB

    def to_dict(self) -> dict:
        """The preset as `kvlab gpus --json` prints it."""
        return {"name": self.name, "aliases": list(self.aliases), "memory_gb": self.memory_gb,
                "memory_bytes": self.memory_bytes, "memory_gib": round(self.memory_gib, 2),
                "memory_source": self.memory_source, "bandwidth_tb_s": self.bandwidth_tb_s,
                "bf16_tflops": self.bf16_tflops, "fp8_tflops": self.fp8_tflops,
                "compute_capability": self.compute_capability, "platform": self.platform}

    @property
    def default_max_num_seqs(self) -> int:
        """vLLM's API-server default for this device (`EngineArgs._get_default_max_num_*`)."""
        return 1024 if self._large else 256

    @property
    def default_max_num_batched_tokens(self) -> int:
        if self.memory_bytes >= 160 * GiB:
            return 16384
        return 8192 if self._large else 2048

    @property
    def _large(self) -> bool:
        return self.memory_bytes >= 160 * GiB or (self.memory_bytes >= 70 * GiB and "a100" not in self.name)



# memory_bytes: the CUDA runtime's total (torch total_memory, the figure vLLM logs as
# total_gpu_memory) where it was seen, else the nvidia-smi / rocm-smi total; the source says which.
PRESETS: tuple[GPU, ...] = (
    GPU("h100", 80, 81090 * MiB,
        "torch total_memory 81090 MiB (nvidia-smi: 81559 MiB, github.com/NVIDIA/nccl/issues/1264)",
        3.35, 989, 1979, 9.0, ("h100-sxm", "h100-80gb", "h100-sxm-80gb")),
    # The PCIe cards of the same GH100 die: fewer SMs (114) and HBM2e at 2.0 TB/s on the H100 PCIe,
    # all 132 SMs at a 350-400 W cap and 94 GB of HBM3 at 3.9 TB/s on the H100 NVL (NVIDIA H100 data
    # sheet: 1,513 / 1,671 BF16 and 3,026 / 3,341 FP8 TFLOPS with sparsity; PCIe Gen5, NVLink bridge
    # 600 GB/s for pairs). No kernel tables of their own: `kvlab.sim.kernels.TABLE_TWINS`.
    GPU("h100-pcie", 80, 84942979072,
        "CUDA total 84942979072 B (XLA's H100 PCIe target spec, github.com/openxla/xla "
        "xla/backends/gpu/target_config/specs/h100_pcie.txtpb; nvidia-smi: 81559 MiB)",
        2.0, 756, 1513, 9.0, ("h100-pcie-80gb",)),
    GPU("h100-nvl", 94, 99961274368,
        "NVML total less reserved memory, 99961274368 B (github.com/fastfetch-cli/fastfetch/issues/1658; "
        "nvidia-smi: 95830 MiB)",
        3.9, 835, 1671, 9.0, ("h100-nvl-94gb",)),
    GPU("h200", 141, 143156 * MiB,
        "torch total_memory 143156 MiB (nvidia-smi: 143771 MiB, github.com/sgl-project/sglang/issues/3196)",
        4.8, 989, 1979, 9.0, ("h200-sxm", "h200-141gb")),
    GPU("a100-80gb", 80, 81049 * MiB,
        "CUDA total 81049 MiB on A100 80GB PCIe (github.com/ekondis/mixbench/issues/47)",
        2.039, 312, None, 8.0, ("a100", "a100-sxm-80gb")),
    # The A100 80GB PCIe: the SXM part's GA100 die (108 SMs, 312 dense BF16 TFLOPS) with HBM2e at
    # 1.935 TB/s and a 300 W cap (NVIDIA A100 data sheet: 2,039 GB/s and 400 W for the SXM); PCIe Gen4
    # x16, an NVLink bridge only for pairs that have one. No kernel tables of its own:
    # `kvlab.sim.kernels.TABLE_TWINS`. Memory: the CUDA total seen on this card (the a100-80gb's figure).
    GPU("a100-pcie", 80, 81049 * MiB,
        "CUDA total 81049 MiB on A100 80GB PCIe (github.com/ekondis/mixbench/issues/47)",
        1.935, 312, None, 8.0, ("a100-80gb-pcie", "a100-pcie-80gb")),
    GPU("a100-40gb", 40, 42298834944,
        "CUDA total 42298834944 B on A100-SXM4-40GB (github.com/bottlerocket-os/bottlerocket/pull/3873)",
        1.555, 312, None, 8.0, ("a100-sxm-40gb",)),
    GPU("l40s", 48, 45589 * MiB, "torch total_memory 45589 MiB (nvidia-smi: 46068 MiB)",
        0.864, 362, 733, 8.9, ()),
    GPU("l4", 24, 23034 * MiB,
        "nvidia-smi total 23034 MiB (github.com/modal-labs/modal-client/pull/2797); CUDA reports slightly less",
        0.300, 121, 242, 8.9, ()),
    GPU("rtx-4090", 24, 24563 * MiB, "torch total_memory 24563 MiB (nvidia-smi: 24564 MiB, github.com/vllm-project/vllm/issues/7553)",
        1.008, 165, 330, 8.9, ("4090", "rtx4090")),
    GPU("b200", 180, 182631 * MiB, "torch total_memory 182631 MiB (github.com/pytorch/ao/pull/4002)",
        7.7, 2250, 4500, 10.0, ()),
    GPU("mi300x", 192, 206141652992,
        "rocm-smi VRAM total 206141652992 B (github.com/ROCm/ROCm/issues/4750)",
        5.3, 1307, 2615, 9.4, (), platform="rocm"),
)


def gpu(name: str) -> GPU:
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    for p in PRESETS:
        if key == p.name or key in p.aliases:
            return p
    names = [p.name for p in PRESETS] + [a for p in PRESETS for a in p.aliases]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise KvlabError(f"unknown GPU {name!r}{hint} (kvlab gpus lists the presets)")
