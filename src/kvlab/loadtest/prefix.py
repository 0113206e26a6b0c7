"""What the prefix cache should hit, predicted from the records alone.

vLLM's prefix cache hits whole blocks (`--block-size`), and a prompt that is cached entirely still
recomputes its last token, so a request can hit at most floor((prompt - 1) / block) blocks. With the
workload's structure that gives, per request, a range of expected hit tokens:
- turn 0 of a session: the app's shared prefix (system prompt + tool schemas, measured by the app
  probe as `system_tokens`), once any request of the app was sent before: from its whole blocks
  (low) to those of the prefix plus the template tokens around it (high, probe B's count);
- a later turn: the previous turn's prompt, whole blocks (low) — the history is resent verbatim —
  up to the previous prompt plus its reply minus the last token, whose KV is never computed (high:
  the reply re-tokenizes to the same tokens, which byte-level BPE does not promise);
- a probe: its full blocks if the same probe already ran on this server, else nothing.
Eviction, preemption and requests of one prefix sent at the same instant (the later one is
scheduled before the earlier one's blocks are computed) make a hit smaller than predicted;
nothing makes it larger. The prediction assumes the cache held none of the run's prompts before.
"""

from __future__ import annotations

import pandas as pd


def whole_blocks(tokens: float, block_size: int) -> int:
    return int(tokens // block_size) * block_size


def expected_prefix_hits(records_df: pd.DataFrame, block_size: int) -> pd.DataFrame:
    """The successful requests (turns and probes) in send order, with `expected_hit_low` and
    `expected_hit_high` token columns beside the measured `cached_tokens` (if reported)."""
    df = records_df[records_df["error_kind"].isna() & records_df["prompt_tokens"].notna()]
    df = df[df["kind"].isin(["turn", "probe"])].sort_values("start_ts", kind="stable").copy()
    probe_b = df[df["probe"] == "B"].groupby("worker")["prompt_tokens"].first().to_dict()
    seen_probes: set[tuple] = set()
    apps_seen: set[str] = set()
    last_turn: dict[str, tuple[int, int]] = {}  # session -> (prompt, completion) of its last turn
    lows, highs = [], []
    for r in df.itertuples(index=False):
        cap = int(r.prompt_tokens) - 1
        if r.kind == "probe":
            key = (r.probe, r.app_id, int(r.prompt_tokens))
            low = high = whole_blocks(cap, block_size) if key in seen_probes else 0
            seen_probes.add(key)
            if r.probe == "app":
                apps_seen.add(r.app_id)
        elif r.turn == 0:
            if r.app_id in apps_seen and pd.notna(r.system_tokens) and r.system_tokens > 0:
                template = probe_b.get(r.worker, 0)
                low = whole_blocks(min(r.system_tokens, cap), block_size)
                high = whole_blocks(min(r.system_tokens + template, cap), block_size)
            else:
                low = high = 0
            apps_seen.add(r.app_id)
        else:
            prompt, completion = last_turn.get(r.session_id, (0, 1))
            low = whole_blocks(min(prompt, cap), block_size)
            high = whole_blocks(min(prompt + completion - 1, cap), block_size)
        if r.kind == "turn":
            last_turn[r.session_id] = (int(r.prompt_tokens), int(r.completion_tokens or 1))
        lows.append(low)
        highs.append(high)
    df["expected_hit_low"] = lows
    df["expected_hit_high"] = highs
    return df.reset_index(drop=True)
