"""One request in the engine (vLLM V1 `Request`): its tokens, blocks and timestamps."""

from __future__ import annotations

from enum import Enum
from typing import Any

import numpy as np

# Chained block hashes start from this parent (vLLM's NONE_HASH, a fixed seed here so that runs repeat).
ROOT_HASH = 0x6B766C6162
_NO_BLOCKS = np.zeros(0, np.int64)


def extend_hashes(hashes: list[int], token_ids, num_blocks: int, block_size: int) -> list[int]:
    """Extend `hashes`, the chained hashes of the leading full blocks of `token_ids`, to the
    first `num_blocks` blocks (vLLM's hash_block_tokens: each block's hash covers its parent's)."""
    start = len(hashes)
    if start < num_blocks:
        parent = hashes[-1] if hashes else ROOT_HASH
        # zip over one iterator cuts the tokens into block tuples in C (no per-block slicing).
        it = iter(token_ids[start * block_size:num_blocks * block_size])
        for block in zip(*[it] * block_size):
            parent = hash((parent, block))
            hashes.append(parent)
    return hashes


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class Sequence:
    """A request: prompt plus generated tokens, how many are in the KV cache, and its block table."""

    __slots__ = (
        "seq_id", "status", "token_ids", "num_prompt_tokens", "max_tokens", "num_computed_tokens",
        "head_blocks", "tail_blocks", "block_hashes", "num_cached_blocks", "num_cached_tokens", "num_preemptions",
        "arrival_s", "queued_s", "first_scheduled_s", "first_token_s", "last_token_s", "first_out_s", "last_out_s", "finish_reason",
        "output_seed", "token_steps", "tag", "max_tokens_param", "aborted",
        "order", "join_step", "join_tokens", "next_block_step", "finish_step",
        "hash_array", "prev_blocks", "last_blocks",
    )

    def __init__(self, seq_id: str, token_ids: list[int], max_tokens: int, arrival_s: float, *,
                 output_seed: int = 0, tag: Any = None, max_tokens_param: int | None = None):
        self.seq_id = seq_id
        self.status = Status.WAITING
        self.token_ids = token_ids
        self.num_prompt_tokens = len(token_ids)
        self.max_tokens = max_tokens
        self.max_tokens_param = max_tokens_param  # what the client asked for (None: the default)
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        # The block table, in two parts: the leading blocks taken at admission as an int64 array
        # (cache hits on the earlier turn's blocks: never converted to Python ints), then a list.
        self.head_blocks = _NO_BLOCKS
        self.tail_blocks: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks of token_ids
        self.hash_array = _NO_BLOCKS  # a leading part of block_hashes as int64 (see hashes_array)
        self.num_cached_blocks = 0  # leading blocks of block_table registered in the prefix cache
        self.num_cached_tokens = -1  # prefix-cache hit at first scheduling (-1: not yet scheduled)
        self.num_preemptions = 0
        self.arrival_s = arrival_s
        self.queued_s = arrival_s  # when the engine core got it (after the front end's input processing)
        self.first_scheduled_s: float | None = None
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None
        # When the API server had the first / last token out to the client (`kvlab.sim.engine`'s front
        # end: the engine times above plus its queue; equal to them when the front end costs nothing).
        self.first_out_s: float | None = None
        self.last_out_s: float | None = None
        self.finish_reason: str | None = None
        self.output_seed = output_seed
        # Engine step indices at which tokens came out, as [first, last] runs (offline ITLs).
        self.token_steps: list[list[int]] = []
        self.tag = tag  # the caller's handle (HTTP stream, session turn)
        self.aborted = False
        # While decoding, a request advances one token per step without being touched: at the
        # start of step s it holds join_tokens + s - join_step tokens (see Scheduler).
        self.order = -1  # admission order: the running queue's order
        self.join_step = -1  # first decode step (-1: not decoding)
        self.join_tokens = 0
        self.next_block_step = -1
        self.finish_step = -1

        # A request that continues an earlier one (the next turn of a session) can pass the earlier
        # one's block table (int64, as freed: `last_blocks`); the prefix-cache lookup checks those
        # blocks in place first (same hits, fewer dict lookups).
        self.prev_blocks = _NO_BLOCKS
        self.last_blocks = _NO_BLOCKS

    @property
    def block_table(self) -> list[int]:
        """The request's KV blocks in order (a copy: the block manager keeps the two parts)."""
        return self.head_blocks.tolist() + self.tail_blocks

    @property
    def num_blocks(self) -> int:
        return len(self.head_blocks) + len(self.tail_blocks)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def hashes_for(self, num_blocks: int, block_size: int) -> list[int]:
        """The chained hashes of the first `num_blocks` full blocks, extended as needed."""
        return extend_hashes(self.block_hashes, self.token_ids, num_blocks, block_size)

    def hashes_array(self, num_blocks: int) -> np.ndarray:
        """The first `num_blocks` block hashes (already in `block_hashes`) as int64. The array is
        kept and only grows, and a session's next turn inherits it, so each hash is converted once."""
        a = self.hash_array
        if len(a) < num_blocks:
            a = self.hash_array = np.concatenate(
                (a, np.asarray(self.block_hashes[len(a):num_blocks], dtype=np.int64)))
        return a[:num_blocks]

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.num_blocks})")
