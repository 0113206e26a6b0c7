"""GPU telemetry from `nvidia-smi`, sampled beside each metrics scrape.

Rows use the names of the widely deployed nvidia_gpu_exporter (`nvidia_smi_*`, bytes, ratios,
watts), labelled with the GPU's index, uuid and name. Without `nvidia-smi` the scraper writes one
`kvlab:gpu_telemetry_absent` row saying so, and the figures report GPU figures as missing.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

QUERY = ("index", "uuid", "name", "memory.used", "memory.total", "utilization.gpu", "power.draw")
MiB = 1 << 20
# family -> (nvidia-smi field, factor to the family's unit)
FAMILIES = {
    "nvidia_smi_memory_used_bytes": ("memory.used", MiB),
    "nvidia_smi_memory_total_bytes": ("memory.total", MiB),
    "nvidia_smi_utilization_gpu_ratio": ("utilization.gpu", 0.01),
    "nvidia_smi_power_draw_watts": ("power.draw", 1.0),
}
Row = tuple[float, str, str, dict[str, str], float]


@dataclass(frozen=True)
class GpuReading:
    index: str
    uuid: str
    name: str
    values: dict[str, float]  # nvidia-smi field -> number; fields it reports as [N/A] are left out


def parse_query_csv(text: str) -> list[GpuReading]:
    """Parse `nvidia-smi --query-gpu=<QUERY> --format=csv,noheader,nounits` output."""
    out = []
    for line in text.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(QUERY):
            raise ValueError(f"expected {len(QUERY)} fields, got {len(cells)}: {line!r}")
        row = dict(zip(QUERY, cells))
        values = {}
        for key in QUERY[3:]:
            try:
                values[key] = float(row[key])
            except ValueError:  # "[N/A]", "[Not Supported]"
                pass
        out.append(GpuReading(row["index"], row["uuid"], row["name"], values))
    return out


def reading_rows(ts: float, readings: list[GpuReading]) -> list[Row]:
    rows = []
    for r in readings:
        labels = {"index": r.index, "uuid": r.uuid, "name": r.name}
        for family, (field, factor) in FAMILIES.items():
            if field in r.values:
                rows.append((ts, family, family, labels, r.values[field] * factor))
    return rows


class NvidiaSmi:
    """Samples every visible GPU; `absent_reason` is set when it cannot."""

    def __init__(self, executable: str | None = None, timeout_s: float = 5.0):
        self.executable = executable or shutil.which("nvidia-smi")
        self.timeout_s = timeout_s
        self.absent_reason = None if self.executable else "nvidia-smi not found on PATH"

    @property
    def available(self) -> bool:
        return self.absent_reason is None

    def sample(self, ts: float) -> list[Row]:
        """Rows for every GPU; raises RuntimeError with the reason when nvidia-smi fails."""
        cmd = [self.executable, f"--query-gpu={','.join(QUERY)}", "--format=csv,noheader,nounits"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"nvidia-smi: {e}") from None
        if proc.returncode != 0:
            raise RuntimeError(f"nvidia-smi exited {proc.returncode}: {proc.stderr.strip()[:200]}")
        try:
            return reading_rows(ts, parse_query_csv(proc.stdout))
        except ValueError as e:
            raise RuntimeError(f"nvidia-smi output: {e}") from None
