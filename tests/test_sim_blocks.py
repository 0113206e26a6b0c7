"""The simulator's block manager against a plain model of vLLM's BlockPool (an OrderedDict free
queue): same blocks handed out, same evictions, same cache hits, no leaks, for random operations."""

from collections import OrderedDict
from math import ceil

from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.sim.block_manager import BlockManager
from kvlab.sim.sequence import Sequence


class ReferencePool:
    """vLLM V1 BlockPool as written: a doubly linked free queue (here an OrderedDict)."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.ref = [0] * num_blocks
        self.hash: list = [None] * num_blocks
        self.free = OrderedDict.fromkeys(range(num_blocks))
        self.free.popitem(last=False)  # the null block
        self.cached: dict = {}
        self.tables: dict[str, list[int]] = {}

    def hits(self, hashes: list[int]) -> list[int]:
        out = []
        for h in hashes:
            if h not in self.cached:
                break
            out.append(self.cached[h])
        return out

    def allocate(self, key: str, hits: list[int], new: int) -> bool:
        if new + sum(1 for b in hits if self.ref[b] == 0) > len(self.free):
            return False
        for b in hits:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
        table = self.tables.setdefault(key, [])
        table.extend(hits)
        for _ in range(new):
            b, _ = self.free.popitem(last=False)
            if self.hash[b] is not None:
                if self.cached.get(self.hash[b]) == b:
                    del self.cached[self.hash[b]]
                self.hash[b] = None
            self.ref[b] = 1
            table.append(b)
        return True

    def cache(self, key: str, hashes: list[int]) -> None:
        for b, h in zip(self.tables[key], hashes):
            if self.hash[b] is None:
                self.hash[b] = h
                self.cached.setdefault(h, b)

    def release(self, key: str) -> None:
        for b in reversed(self.tables.pop(key)):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
                if self.hash[b] is None:
                    self.free.move_to_end(b, last=False)


# A request: which of 4 shared prefixes it starts with, how many prefix and own blocks it has.
request = st.tuples(st.integers(0, 3), st.integers(0, 6), st.integers(1, 6))
ops = st.lists(st.tuples(st.sampled_from(["add", "add", "free"]), request, st.integers(0, 10)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(4, 40))
def test_block_manager_matches_vllm_block_pool(ops, num_blocks):
    bs = 4
    bm = BlockManager(num_blocks, bs, enable_caching=True)
    ref = ReferencePool(num_blocks, bs)
    live: dict[str, Sequence] = {}
    for i, (op, (prefix, shared, own), pick) in enumerate(ops):
        if op == "free" and live:
            key = sorted(live)[pick % len(live)]
            bm.free_seq(live.pop(key))
            ref.release(key)
        elif op == "add":
            key = f"r{i}"
            tokens = [1000 * prefix + t for t in range(shared * bs)] + [10**6 + 100 * i + t for t in range(own * bs)]
            seq = Sequence(key, tokens, 1, 0.0)
            hits = bm.find_cached_prefix(seq)
            hashes = seq.hashes_for(len(tokens) // bs, bs)
            assert hits == ref.hits(hashes[:(len(tokens) - 1) // bs])
            new = ceil(len(tokens) / bs) - len(hits)
            seq.num_computed_tokens = 0
            ok = bm.allocate_slots(seq, len(tokens) - len(hits) * bs, hits)
            assert ok == ref.allocate(key, hits, new)
            if ok:
                ref.cache(key, hashes)
                live[key] = seq
                assert seq.block_table == ref.tables[key]
        bm.check_no_leak(list(live.values()))
        assert bm.num_free_blocks == len(ref.free)
        assert bm.cached == ref.cached
    # The free queues hand out the same blocks, in the same order.
    n = bm.num_free_blocks
    if n:
        probe = Sequence("probe", list(range(7 * 10**6, 7 * 10**6 + n * bs)), 1, 0.0)
        assert bm.allocate_slots(probe, n * bs)
        assert ref.allocate("probe", [], n)
        assert probe.block_table == ref.tables["probe"]


def test_null_block_is_never_handed_out():
    bm = BlockManager(5, 16, enable_caching=True)
    seq = Sequence("a", list(range(64)), 1, 0.0)
    assert bm.num_free_blocks == 4 and bm.usage() == 0.0
    assert bm.allocate_slots(seq, 64)
    assert sorted(seq.block_table) == [1, 2, 3, 4]
    assert bm.usage() == 1.0
    assert not bm.allocate_slots(Sequence("b", [1], 1, 0.0), 1)


def test_last_token_is_never_a_cache_hit():
    bs = 16
    bm = BlockManager(20, bs, enable_caching=True)
    first = Sequence("a", list(range(2 * bs)), 1, 0.0)
    assert bm.allocate_slots(first, 2 * bs)
    # Same 32 tokens again: only the first block may hit (vLLM recomputes the last token).
    assert len(bm.find_cached_prefix(Sequence("b", list(range(2 * bs)), 1, 0.0))) == 1
    assert len(bm.find_cached_prefix(Sequence("c", list(range(2 * bs + 1)), 1, 0.0))) == 2
