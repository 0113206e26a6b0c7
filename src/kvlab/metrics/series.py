"""Counter increases and histogram quantiles, with Prometheus's own semantics.

`counter_increase` is Prometheus's reset handling without its extrapolation: a drop in a counter
means the server restarted and counted again from zero. `histogram_quantile` is PromQL's
(prometheus/promql/quantile.go, 2.42): linear interpolation inside the bucket, the first bucket
starting at 0, a rank in the +Inf bucket answered by the highest finite bound.
"""

from __future__ import annotations

import math
from typing import Sequence


def counter_increase(values: Sequence[float]) -> tuple[float, int]:
    """Total increase over consecutive samples of one counter series, and the number of resets."""
    total = 0.0
    resets = 0
    for prev, cur in zip(values, values[1:]):
        if cur < prev:
            resets += 1
            total += cur
        else:
            total += cur - prev
    return total, resets


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The q-quantile from cumulative `(upper_bound, count)` buckets; None without observations."""
    if not 0 <= q <= 1:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    if any(math.isnan(le) or not math.isfinite(c) for le, c in buckets):
        return None  # a garbled exposition (NaN or infinite counts) has no quantile
    b = sorted(buckets)
    if len(b) < 2 or not math.isinf(b[-1][0]):
        return None
    # Prometheus makes the counts monotonic (deltas over a window can break that by rounding).
    counts = []
    for _, c in b:
        counts.append(max(c, counts[-1]) if counts else c)
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    i = next(k for k, c in enumerate(counts) if c >= rank)
    if i == len(b) - 1:
        return b[-2][0]
    if i == 0 and b[0][0] <= 0:
        return b[0][0]
    start, end, count = 0.0, b[i][0], counts[i]
    if i > 0:
        start = b[i - 1][0]
        count -= counts[i - 1]
        rank -= counts[i - 1]
    return start + (end - start) * (rank / count) if count > 0 else start


def quantile_linear(q: float, values: Sequence[float]) -> float | None:
    """PromQL's quantile_over_time (and numpy's default): linear between closest ranks."""
    v = sorted(values)
    if not v:
        return None
    rank = q * (len(v) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (rank - lo)
