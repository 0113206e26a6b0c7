"""Paged KV blocks with prefix caching, as vLLM V1's `BlockPool` and `KVCacheManager` keep them.

- Block 0 is the null block: taken out of the pool at start, never allocated, so a pool of
  `num_blocks` serves `num_blocks - 1` (vLLM's `get_usage` and capacity behave the same way).
- A full block gets a chained hash (parent hash, its tokens) and enters the prefix cache.
- Freed blocks join a free queue that doubles as the LRU of cached blocks; a request frees its
  blocks tail first. From vLLM 0.28 (`uncached_first`) blocks without a hash go to the front (reused
  first) and cached blocks to the back; before, every freed block joins the back (`BlockPool.free_blocks`).
  Allocation pops the front and evicts the popped block's hash.
- A cache hit on a free block takes it back out of the queue (`touch`).

The free queue is kept lazily, with the same order: each free is one run of block ids pushed to
the front or back of a deque; a block's entry is live while the block is free and the entry is
its latest (`_epoch`, reset to -1 when the block is taken or touched), so a touch only bumps the
reference count and clears the block's epoch, and dead entries are skipped when the front is popped. A request that continues an earlier one (the next turn of an agent
session) first checks the earlier request's blocks in place (`registered`: the block is the one the
cache serves for its hash), then looks further hashes up: the same hits, fewer dict lookups (the
cached dict is large and its lookups miss the CPU cache). Per-block state lives in numpy arrays,
so freeing, touching or checking a request's hundreds of blocks is a few vector operations;
popping single blocks walks the front run.
"""

from __future__ import annotations

from collections import deque
from functools import partial
from itertools import takewhile
from math import ceil
from operator import is_not

import numpy as np

from kvlab.sim.sequence import Sequence

_NO_BLOCKS = np.zeros(0, np.int64)

VECTOR_POP_MIN = 8  # allocations of this many blocks or more scan the free queue vectorized

# Boolean flags are counted (np.count_nonzero, about 0.2 us on a few hundred blocks), not reduced:
# ndarray.any()/all() go through Python wrappers and np.logical_or.reduce costs 0.8 us, more than the work.
_count = np.count_nonzero
_is_block = partial(is_not, None)  # a cache lookup that hit


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool, uncached_first: bool = True):
        if num_blocks < 2:
            raise ValueError(f"need at least 2 KV blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.uncached_first = uncached_first  # freed blocks without a hash to the front (vLLM 0.28+)
        self.null_block = 0  # never handed out
        self.ref_cnt = np.zeros(num_blocks, np.int32)
        self.ref_cnt[0] = 1
        self.block_hash = np.zeros(num_blocks, np.int64)  # valid where `hashed`
        self.hashed = np.zeros(num_blocks, bool)
        self.registered = np.zeros(num_blocks, bool)  # cached[block_hash[b]] is b
        # The run holding a free block's live entry; -1 for a block in use (ref_cnt > 0).
        self._epoch = np.full(num_blocks, -1, np.int64)
        self.cached: dict[int, int] = {}  # block hash -> the block that serves hits for it
        # [run id, block ids (array), next position, the same ids as a list (for scalar scans; made
        # when a scalar scan first reaches the run)]
        self._runs: deque[list] = deque()
        self._next_run = 0
        self.num_free_blocks = 0
        self.frees = 0  # how many times blocks were freed (admission checks can be reused until then)
        self._push_run(np.arange(1, num_blocks, dtype=np.int64), front=False)

    # -- accounting

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def usage(self) -> float:
        """vLLM's `kv_cache_usage_perc`: the fraction of usable blocks not in the free queue."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    # -- prefix cache

    def find_cached_prefix(self, seq: Sequence) -> list[int] | np.ndarray:
        """The longest run of cached full blocks at the start of `seq`: a list, or an int64 array
        when all of them are the leading blocks of the request `seq` continues (`prev_blocks`).

        The last token is never a hit (vLLM recomputes it to get logits), so at most
        `(num_tokens - 1) // block_size` blocks count."""
        if not self.enable_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        if max_blocks <= 0:
            return []
        hashes = seq.hashes_for(max_blocks, self.block_size)
        m = 0
        k = min(len(seq.prev_blocks), max_blocks)
        if k:  # the earlier request's blocks, where they still serve these hashes
            prev = seq.prev_blocks[:k]
            ok = self.registered[prev] & (self.block_hash[prev] == seq.hashes_array(k))
            m = int(ok.argmin())
            if ok[m]:
                m = k
        if m == max_blocks:  # all hits are the earlier request's blocks: returned as int64
            return seq.prev_blocks[:m]
        more = list(takewhile(_is_block, map(self.cached.get, hashes[m:max_blocks])))
        if not more and m:
            return seq.prev_blocks[:m]
        # one dict lookup per block after those, up to the first miss
        return seq.prev_blocks[:m].tolist() + more if m else more

    # -- allocation

    def _blocks_needed(self, seq: Sequence, num_tokens: int, num_computed: int, in_queue: int) -> int:
        """Free blocks an allocation for `num_tokens` slots would take (vLLM
        `get_num_blocks_to_allocate`): new blocks, plus hit blocks that sit in the free queue."""
        new = ceil(num_tokens / self.block_size) - seq.num_blocks - num_computed
        return max(new, 0) + in_queue

    def _num_in_queue(self, idx: np.ndarray) -> int:
        """How many of the blocks `idx` sit in the free queue (reference count 0)."""
        return int(np.count_nonzero(self.ref_cnt[idx] == 0)) if len(idx) else 0

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed: list[int] | np.ndarray | None = None,
                       must_fit_tokens: int = 0) -> bool:
        """Give `seq` KV slots for its computed tokens, the cache hits `computed` (a list or an
        int64 array, as find_cached_prefix returns them) and `num_new_tokens` more; False (and no
        change) when the free queue is too short, or too short for `must_fit_tokens` slots (vLLM's
        admission of a whole sequence, `full_sequence_must_fit`). The hits are converted to an index
        array once, for both the check and the touch; hits given as an array become the head of the
        block table of a request without blocks."""
        num_hits = 0 if computed is None else len(computed)
        total = seq.num_computed_tokens + num_hits * self.block_size + num_new_tokens
        if num_hits:
            is_array = isinstance(computed, np.ndarray)
            idx = computed if is_array else np.asarray(computed, dtype=np.int64)
            in_queue = self._num_in_queue(idx)
        else:
            in_queue = 0
        if self._blocks_needed(seq, max(total, must_fit_tokens), num_hits, in_queue) > self.num_free_blocks:
            return False
        if num_hits:
            self.num_free_blocks -= in_queue  # touch: hits in the free queue leave it
            self.ref_cnt[idx] += 1  # a block occurs at most once in a request's hits
            self._epoch[idx] = -1  # their queue entries are dead
            if is_array and not seq.num_blocks:
                seq.head_blocks = idx
            else:
                seq.tail_blocks.extend(computed.tolist() if is_array else computed)
            seq.num_cached_blocks = seq.num_blocks
        new = ceil(total / self.block_size) - seq.num_blocks
        if new > 0:
            seq.tail_blocks.extend(self._pop_free(new))
        self.cache_full_blocks(seq, min(total, seq.num_tokens))
        return True

    def append_block(self, seq: Sequence) -> bool:
        """One more block for a decoding request (False when none is free)."""
        if not self.num_free_blocks:
            return False
        seq.tail_blocks.extend(self._pop_free(1))
        return True

    def append_blocks(self, seqs: list[Sequence]) -> bool:
        """One more block for each of `seqs`, in order: the same blocks as `append_block` on each in
        turn (nothing else changes the free queue meanwhile), in one pop. False (and no change)
        when fewer blocks are free."""
        if len(seqs) > self.num_free_blocks:
            return False
        if seqs:
            for seq, b in zip(seqs, self._pop_free(len(seqs))):
                seq.tail_blocks.append(b)
        return True

    def _push_run(self, blocks: np.ndarray, front: bool) -> None:
        run = self._next_run
        self._next_run += 1
        self._epoch[blocks] = run
        entry = [run, blocks, 0, None]
        if front:
            self._runs.appendleft(entry)
        else:
            self._runs.append(entry)
        self.num_free_blocks += len(blocks)

    def _pop_free(self, n: int) -> list[int]:
        """The first `n` live entries of the free queue, now referenced once, hashes evicted.

        Runs are scanned in growing slices, vectorized: an entry is live while its block is free
        (`ref_cnt` 0) and this run is the block's latest: `_epoch` is the run (it is -1 while the block is
        in use); a block is in a run at most
        once and live in one run only, so marking the taken blocks after the scan changes nothing."""
        if n < VECTOR_POP_MIN:
            return self._pop_free_few(n)
        ref, epoch, runs = self.ref_cnt, self._epoch, self._runs
        taken: list[np.ndarray] = []
        need = n
        while need:
            entry = runs[0]
            run, blocks, pos, _ = entry
            end = len(blocks)
            chunk = max(4 * need, 128)
            while need and pos < end:
                seg = blocks[pos:pos + chunk]
                live = (epoch[seg] == run).nonzero()[0]
                if len(live) >= need:
                    taken.append(seg[live[:need]])
                    pos += int(live[need - 1]) + 1
                    need = 0
                else:
                    if len(live):
                        taken.append(seg[live])
                    need -= len(live)
                    pos += len(seg)
                    chunk *= 2
            entry[2] = pos
            if pos >= end:
                runs.popleft()
        out = taken[0] if len(taken) == 1 else np.concatenate(taken)
        ref[out] = 1
        epoch[out] = -1
        self._evict(out[self.hashed[out]])
        self.num_free_blocks -= n
        return out.tolist()

    def _pop_free_few(self, n: int) -> list[int]:
        """`_pop_free` one entry at a time: cheaper for the few blocks decoding requests take.
        Reads the run's ids from its list copy (numpy scalar indexing costs more)."""
        ref, epoch, runs, hashed = self.ref_cnt, self._epoch, self._runs, self.hashed
        out: list[int] = []
        while len(out) < n:
            entry = runs[0]
            run, arr, pos, blocks = entry
            if blocks is None:
                blocks = entry[3] = arr.tolist()
            end = len(blocks)
            while pos < end:
                b = blocks[pos]
                pos += 1
                if epoch[b] == run:
                    ref[b] = 1
                    epoch[b] = -1
                    if hashed[b]:
                        self._evict_one(b)
                    out.append(b)
                    if len(out) == n:
                        break
            entry[2] = pos
            if pos >= end:
                runs.popleft()
        self.num_free_blocks -= n
        return out

    def _evict_one(self, b: int) -> None:
        if self.registered[b]:
            del self.cached[int(self.block_hash[b])]
            self.registered[b] = False
        self.hashed[b] = False

    def _evict(self, blocks: np.ndarray) -> None:
        """Drop the hashes of reused blocks from the prefix cache."""
        if not len(blocks):
            return
        served = blocks[self.registered[blocks]]
        if len(served):
            cached = self.cached
            for h in self.block_hash[served].tolist():
                del cached[h]
            self.registered[served] = False
        self.hashed[blocks] = False

    def cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Register the blocks that `num_tokens` tokens fill completely in the prefix cache."""
        if not self.enable_caching:
            return
        num_full = num_tokens // self.block_size
        first = seq.num_cached_blocks
        if num_full <= first:
            return
        hashes = seq.hashes_for(num_full, self.block_size)
        head = seq.head_blocks
        nh = len(head)
        if first >= nh:  # (always, unless the head is not cached yet)
            blocks = seq.tail_blocks[first - nh:num_full - nh]
        else:
            blocks = head[first:num_full].tolist() + seq.tail_blocks[:max(num_full - nh, 0)]
        idx = np.asarray(blocks, dtype=np.int64)
        new_hashes = hashes[first:num_full]
        hashed = self.hashed[idx]
        if _count(hashed):  # rare: keep only the blocks without a hash
            keep = (~hashed).nonzero()[0]
            idx = idx[keep]
            keep_list = keep.tolist()
            blocks = [blocks[i] for i in keep_list]
            new_hashes = [new_hashes[i] for i in keep_list]
        if blocks:
            self.block_hash[idx] = new_hashes
            self.hashed[idx] = True
            # A block serves hits for its hash unless an earlier block holds that hash already.
            served_by = np.fromiter(map(self.cached.setdefault, new_hashes, blocks), np.int64, len(blocks))
            self.registered[idx] = served_by == idx
        seq.num_cached_blocks = num_full

    def free_seq(self, seq: Sequence) -> None:
        """Release a request's blocks, tail first, so its last blocks are evicted first (and, with
        `uncached_first`, the ones without a hash before any cached block)."""
        head, tail = seq.head_blocks, seq.tail_blocks
        if len(head) or tail:
            fwd = np.fromiter(tail, np.int64, len(tail))
            if len(head):
                fwd = np.concatenate((head, fwd))
            idx = fwd[::-1]
            ref = self.ref_cnt
            ref[idx] -= 1  # a block occurs at most once in a request's table
            freed = idx[ref[idx] == 0]
            if len(freed):
                self.frees += 1
                if not self.uncached_first:
                    self._push_run(freed, front=False)
                elif self.enable_caching:
                    hashed = self.hashed[freed]
                    n_hashed = _count(hashed)
                    if n_hashed == len(hashed):
                        self._push_run(freed, front=False)
                    else:
                        self._push_run(freed[~hashed], front=True)
                        if n_hashed:
                            self._push_run(freed[hashed], front=False)
                else:
                    self._push_run(freed, front=True)
            seq.last_blocks = fwd
        seq.head_blocks, seq.tail_blocks = _NO_BLOCKS, []
        seq.num_cached_blocks = 0

    def check_no_leak(self, live: list[Sequence]) -> None:
        """free + used == usable, and every used block is held by a live request (a test hook)."""
        held: dict[int, int] = {}
        for s in live:
            for b in s.block_table:
                held[b] = held.get(b, 0) + 1
        assert self.num_free_blocks + len(held) == self.num_usable_blocks, (self.num_free_blocks, len(held))
        assert int(np.count_nonzero(self.ref_cnt[1:] == 0)) == self.num_free_blocks
        for b, n in held.items():
            assert b != self.null_block and self.ref_cnt[b] == n, (b, n, self.ref_cnt[b])
        for h, b in self.cached.items():
            assert self.hashed[b] and self.registered[b] and int(self.block_hash[b]) == h
