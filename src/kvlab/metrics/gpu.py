"""GPU telemetry from `nvidia-smi`, sampled beside each metrics scrape.

Rows use the names of the widely deployed nvidia_gpu_exporter (`nvidia_smi_*`, bytes, ratios,
watts), labelled with the GPU's index, uuid and name. Without `nvidia-smi` the scraper writes one
`kvlab:gpu_telemetry_absent` row saying so, and the figures report GPU figures as missing.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlab import nvidia_smi
from kvlab.units import MiB

QUERY = ("index", "uuid", "name", "memory.used", "memory.total", "utilization.gpu", "power.draw")
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


def readings(rows: list[dict[str, str]]) -> list[GpuReading]:
    out = []
    for row in rows:
        values = {key: v for key in QUERY[3:] if (v := nvidia_smi.number(row[key])) is not None}
        out.append(GpuReading(row["index"], row["uuid"], row["name"], values))
    return out


def parse_query_csv(text: str) -> list[GpuReading]:
    """Parse `nvidia-smi --query-gpu=<QUERY> --format=csv,noheader,nounits` output."""
    return readings(nvidia_smi.parse_csv(text, QUERY))


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
        self.executable = executable or nvidia_smi.find()
        self.timeout_s = timeout_s
        self.absent_reason = None if self.executable else "nvidia-smi not found on PATH"

    @property
    def available(self) -> bool:
        return self.absent_reason is None

    def sample(self, ts: float) -> list[Row]:
        """Rows for every GPU; raises RuntimeError with the reason when nvidia-smi fails."""
        return reading_rows(ts, readings(nvidia_smi.query_gpus(QUERY, self.executable, self.timeout_s)))
