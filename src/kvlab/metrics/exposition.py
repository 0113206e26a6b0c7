"""Prometheus text exposition -> tidy samples, and vLLM's metric names across versions.

Parsing uses prometheus_client's own parser. A malformed exposition loses only the families that
do not parse: the text is re-parsed one family block at a time and the failures are reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

VLLM_PREFIX = "vllm:"

# Old family name -> the name the same quantity has in current vLLM (`shared/reference/vllm.md`).
# Versions that export both names export the same observations under each, so the old name is
# dropped where the new one is present and renamed where it is absent (see `canonical_rows`).
RENAMED_FAMILIES: dict[str, str] = {
    # deprecated 0.9, hidden 0.11, gone from 0.12
    "vllm:gpu_cache_usage_perc": "vllm:kv_cache_usage_perc",
    # replaced 0.10.2, gone by 0.16
    "vllm:time_per_output_token_seconds": "vllm:inter_token_latency_seconds",
    # gone from 0.12 (counted blocks, not tokens, in 0.8: the hit rate is a ratio either way)
    "vllm:gpu_prefix_cache_queries": "vllm:prefix_cache_queries",
    "vllm:gpu_prefix_cache_hits": "vllm:prefix_cache_hits",
}


@dataclass(frozen=True)
class Sample:
    """One exposition line: `name{labels} value` of metric family `family`."""

    family: str  # prometheus_client's family name: counters without `_total`, histograms without suffix
    name: str  # the sample's own name: `..._total`, `..._bucket`, `..._sum`, `..._count`, `..._created`
    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class ParseResult:
    samples: list[Sample]
    errors: list[str] = field(default_factory=list)  # one line per family block that did not parse


def parse_exposition(text: str, prefix: str | None = VLLM_PREFIX) -> ParseResult:
    """Samples whose family starts with `prefix` (all with None); never raises on bad text."""
    try:
        return ParseResult(_samples(text, prefix))
    except ValueError:
        pass
    samples: list[Sample] = []
    errors: list[str] = []
    for block in _family_blocks(text):
        try:
            samples += _samples(block, prefix)
        except ValueError as e:
            errors.append(f"{_block_name(block)}: {e}")
    return ParseResult(samples, errors)


def _samples(text: str, prefix: str | None) -> list[Sample]:
    out = []
    for fam in text_string_to_metric_families(text):
        if prefix and not fam.name.startswith(prefix):
            continue
        for s in fam.samples:
            out.append(Sample(fam.name, s.name, dict(s.labels), float(s.value)))
    return out


def _family_blocks(text: str) -> list[str]:
    """Split at each `# HELP` / `# TYPE` that starts a new family, so one bad family fails alone."""
    blocks: list[list[str]] = [[]]
    current = None
    for line in text.splitlines():
        m = re.match(r"#\s+(?:HELP|TYPE)\s+(\S+)", line)
        if m and m.group(1) != current:
            current = m.group(1)
            blocks.append([])
        blocks[-1].append(line)
    return ["\n".join(b) + "\n" for b in blocks if b]


def _block_name(block: str) -> str:
    m = re.match(r"#\s+(?:HELP|TYPE)\s+(\S+)", block)
    return m.group(1) if m else "untyped lines"


def canonical_name(name: str) -> str:
    """The current vLLM name of a family or sample name (suffixes `_total`, `_bucket`... kept)."""
    for old, new in RENAMED_FAMILIES.items():
        if name == old or (name.startswith(old) and name[len(old)] == "_"):
            return new + name[len(old):]
    return name


def canonical_rows(df):
    """Rename old vLLM names in a samples frame (columns ts, name, labels, ...) to current ones.

    A row whose current name already appears at the same scrape (`ts`) with the same labels is a
    duplicate of the same observation and is dropped rather than counted twice.
    """
    import pandas as pd

    renamed = df["name"].map(canonical_name)
    is_old = renamed != df["name"]
    if not is_old.any():
        return df
    current = set(zip(df.loc[~is_old, "ts"], df.loc[~is_old, "name"], df.loc[~is_old, "labels"]))
    keys = zip(df["ts"], renamed, df["labels"])
    duplicate = is_old & pd.Series([k in current for k in keys], index=df.index)
    out = df.loc[~duplicate].copy()
    out["name"] = renamed[~duplicate]
    out["family"] = out["family"].map(canonical_name)
    return out
