"""Continuous batching as vLLM V1's `Scheduler.schedule` does it (FCFS policy).

vLLM's rule: each step has a budget of `max_num_batched_tokens`. Running requests go first, in
admission order: a decode takes one token, an unfinished prefill the rest of its prompt up to the
budget (chunked prefill). When a running request cannot get a block, the last running request is
preempted (blocks freed, computed tokens reset: recompute) and goes to the front of the waiting
queue, until the allocation fits or the request itself was preempted (then the running pass
stops). Then, only if nobody was preempted, waiting requests are admitted in order while budget
is left and fewer than `max_num_seqs` run, each starting from its prefix-cache hit; from vLLM 0.19
(`reserve_full_isl`, vLLM's --scheduler-reserve-full-isl) only where the free blocks hold its whole
sequence, before only its first chunk. With chunked prefill off, a prompt larger than the budget
left ends admission (from vLLM 0.12) or is skipped for the next one (before). With async
scheduling (vLLM's default from 0.14) a request that finished in a step holds its slot and blocks
until the next step is scheduled. Checked step by step against vLLM's own `Scheduler` and
`AsyncScheduler` (bench/scheduler_conformance.py, tests/test_sim_scheduler_conformance.py).

Two facts make this cheap to simulate without changing it: `max_num_seqs <= max_num_batched_tokens`
(vLLM enforces it), so every decoding request gets its token every step; and a prefill can only be
unfinished in the last request admitted, so running = decoding requests, then prefills. Decoding
requests therefore advance implicitly (the "decode cohort"): a request that joined at step j with
t tokens holds t + s - j tokens at step s, and queues by step (`DueQueue`) say at which step it needs its next block and
at which it finishes. A step costs O(requests that change state), not O(running requests).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from kvlab.sim import tokens
from kvlab.sim.block_manager import BlockManager
from kvlab.sim.sequence import Sequence, Status

_order = attrgetter("order")  # a request's admission order
_first = itemgetter(0)


class DueQueue:
    """Decoding requests due at a step (for a new block, or for their last token), bucketed by step:
    a heap of the steps that have entries and, per step, the (admission order, request) pairs pushed
    for it. Popping sorts a step's pairs by order, so `pop` returns the same requests in the same
    order as a heap of (step, order, request) entries would, with one heap operation per step
    instead of per entry. An entry is current while its request still decodes, under the same
    admission order, and its `field` (next_block_step or finish_step) still names that step; stale
    ones are dropped."""

    __slots__ = ("steps", "at", "field")

    def __init__(self, field: str):
        self.steps: list[int] = []
        self.at: dict[int, list[tuple[int, Sequence]]] = {}
        self.field = attrgetter(field)

    def push(self, step: int, order: int, seq: Sequence) -> None:
        bucket = self.at.get(step)
        if bucket is None:
            self.at[step] = [(order, seq)]
            heapq.heappush(self.steps, step)
        else:
            bucket.append((order, seq))

    def push_all(self, step: int, seqs: list[Sequence]) -> None:
        """`push(step, seq.order, seq)` for each of `seqs`, in turn."""
        bucket = self.at.get(step)
        if bucket is None:
            bucket = self.at[step] = []
            heapq.heappush(self.steps, step)
        bucket += [(seq.order, seq) for seq in seqs]

    def pop(self, step: int, ordered: bool = True) -> list[Sequence]:
        """The current entries due by `step`, by (step, order); `ordered=False` leaves each step's
        entries in push order (for a caller that sorts by order itself)."""
        steps, at, field = self.steps, self.at, self.field
        out: list[Sequence] = []
        while steps and steps[0] <= step:
            s = heapq.heappop(steps)
            bucket = at.pop(s)
            if ordered and len(bucket) > 1:
                bucket.sort(key=_first)
            out += [seq for order, seq in bucket
                    if seq.join_step >= 0 and seq.order == order and field(seq) == s]
        return out

    def first_step(self) -> int | None:
        """The earliest step with a current entry (steps with only stale entries are dropped)."""
        steps, at, field = self.steps, self.at, self.field
        while steps:
            s = steps[0]
            for order, seq in at[s]:
                if seq.join_step >= 0 and seq.order == order and field(seq) == s:
                    return s
            heapq.heappop(steps)
            del at[s]
        return None


@dataclass
class PrefixCacheStats:
    """Counted at admission of requests that were never preempted (vLLM `PrefixCacheStats`)."""

    queries: int = 0
    hits: int = 0


@dataclass
class SchedulerOutput:
    step: int
    num_decodes: int = 0  # decoding requests, one token each
    decode_tokens: int = 0  # their tokens at the step's start (the context each one's query reads)
    chunks: list[tuple[Sequence, int]] = field(default_factory=list)  # (prefilling request, tokens)
    preempted: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)
    released: int = 0  # async scheduling: finished requests whose slots and blocks this schedule freed

    @property
    def num_tokens(self) -> int:
        return self.num_decodes + sum(n for _, n in self.chunks)

    @property
    def empty(self) -> bool:
        return not self.num_decodes and not self.chunks


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, enable_chunked_prefill: bool = True, reserve_full_isl: bool = True,
                 skip_unfit_prompts: bool = False, async_scheduling: bool = False):
        if max_num_seqs > max_num_batched_tokens:
            raise ValueError("max_num_seqs must not exceed max_num_batched_tokens (vLLM checks this)")
        self.bm = block_manager
        self.block_size = block_manager.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.reserve_full_isl = reserve_full_isl
        self.skip_unfit_prompts = skip_unfit_prompts  # chunked prefill off, before vLLM 0.12
        # vLLM's AsyncScheduler: step N+1 is scheduled before step N's outputs are taken, so a request
        # that finished in step N keeps its slot and blocks through the next `schedule` (`_done`)
        self.async_scheduling = async_scheduling
        self._done: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # admission order -> request, in running order
        self.prefilling: dict[int, Sequence] = {}  # the running requests not decoding yet
        self.prefix_stats = PrefixCacheStats()
        self.step = 0  # the next step to schedule
        self.num_decoding = 0
        self._decode_base = 0  # sum over the cohort of join_tokens - join_step
        self._block_due = DueQueue("next_block_step")
        self._finish_due = DueQueue("finish_step")
        self._order = 0
        self.last_end_s = 0.0  # end time of the last completed step
        self.last_out_s = 0.0  # when its tokens reached the clients (set by the engine)
        # The last failed admission: (head request, block frees so far, free blocks, budget). Until
        # blocks are freed, fewer free blocks and no less budget cannot admit it either.
        self._blocked: tuple | None = None

    # -- queue state

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        """Requests running, less those that finished in the last step and hold their blocks until the
        next `schedule` (async scheduling: vLLM counts them out when it takes that step's outputs)."""
        return len(self.running) - sum(self.running.get(seq.order) is seq for seq in self._done)

    def decoding(self) -> list[Sequence]:
        return [s for s in self.running.values() if s.join_step >= 0]

    def tokens_now(self, seq: Sequence) -> int:
        """A decoding request's token count at the start of the current step."""
        return seq.join_tokens + self.step - seq.join_step

    # -- the decode cohort

    def _join(self, seq: Sequence, step: int) -> None:
        """`seq` got its token at `step - 1`'s end and decodes from `step` on."""
        t = seq.num_tokens
        seq.join_step, seq.join_tokens = step, t
        self.num_decoding += 1
        self._decode_base += t - step
        bs = self.block_size
        # At step s it needs slots for t + s - step tokens; a new block when that passes its blocks.
        self._push_block_due(seq, step + seq.num_blocks * bs + 1 - t)
        # It finishes at the step whose token reaches max_tokens or max_model_len.
        last_tokens = min(seq.num_prompt_tokens + seq.max_tokens, self.max_model_len)
        seq.finish_step = step + max(0, last_tokens - 1 - t)
        self._finish_due.push(seq.finish_step, seq.order, seq)

    def _leave(self, seq: Sequence, num_tokens: int, cached_tokens: int | None = None) -> None:
        """Take `seq` out of the cohort, its tokens made explicit up to `num_tokens`, its blocks full
        within `cached_tokens` (default: all but the last token) in the prefix cache."""
        seq.token_ids.extend(tokens.output_tokens(seq.output_seed, seq.num_output_tokens, num_tokens - seq.num_prompt_tokens))
        seq.num_computed_tokens = num_tokens - 1
        if seq.token_steps:  # its last token came out at this step
            seq.token_steps[-1][1] = seq.join_step + num_tokens - seq.join_tokens - 1
        self.num_decoding -= 1
        self._decode_base -= seq.join_tokens - seq.join_step
        seq.join_step = -1
        self.bm.cache_full_blocks(seq, num_tokens - 1 if cached_tokens is None else cached_tokens)

    def _push_block_due(self, seq: Sequence, step: int) -> None:
        seq.next_block_step = step
        self._block_due.push(step, seq.order, seq)

    def _push_blocks_due(self, seqs: list[Sequence], step: int) -> None:
        """`_push_block_due(seq, step)` for each of `seqs`."""
        if seqs:
            for seq in seqs:
                seq.next_block_step = step
            self._block_due.push_all(step, seqs)

    def finishing(self, step: int) -> list[Sequence]:
        """Decoding requests whose token at `step` is their last."""
        return self._finish_due.pop(step)

    def next_finish_step(self) -> int | None:
        return self._finish_due.first_step()

    def decode_stretch_step(self) -> bool:
        """Run the current step as a pure-decode step if it needs no decisions: no prefill, no
        admission possible, no request finishing, enough free blocks for the due ones. False (and
        nothing changed) otherwise. The caller accounts for the step."""
        step = self.step
        if self.prefilling or not self.num_decoding:
            return False
        budget = self.max_num_batched_tokens - self.num_decoding
        if self.waiting and not (len(self.running) >= self.max_num_seqs or budget <= 0
                                 or self.admission_blocked(budget)):
            return False
        fin = self.next_finish_step()
        if fin is not None and fin <= step:
            return False
        due = self._blocks_due(step)
        if not self.bm.append_blocks(due):
            for seq in due:
                self._push_block_due(seq, seq.next_block_step)
            return False
        self._push_blocks_due(due, step + self.block_size)
        if self._done:  # async: the previous step's finished requests leave once this one is scheduled
            self._release_done()
        self.step = step + 1
        return True

    def _blocks_due(self, step: int) -> list[Sequence]:
        out = self._block_due.pop(step, ordered=False)
        out.sort(key=_order)
        return out

    # -- one step

    def schedule(self, now_s: float) -> SchedulerOutput:
        out = SchedulerOutput(self.step)
        if self._schedule_decodes(out):
            budget = self._schedule_prefills(out, self.max_num_batched_tokens - self.num_decoding)
            if budget is not None and not out.preempted:
                self._schedule_waiting(out, budget, now_s)
        out.num_decodes = self.num_decoding
        out.decode_tokens = self._decode_base + self.num_decoding * self.step
        if self._done:  # async: the previous step's outputs are taken after this step is scheduled
            out.released = self._release_done()
        return out

    def _release_done(self) -> int:
        """Free the requests that finished in the previous step (async scheduling), unless preempted in
        this one; how many."""
        n = 0
        for seq in self._done:
            if self.running.get(seq.order) is seq:
                self._release(seq)
                n += 1
        self._done = []
        return n

    def _preempt_last(self, out: SchedulerOutput) -> Sequence:
        victim = next(reversed(self.running.values()))
        if victim.status is Status.FINISHED:  # async: finished in the step in flight, its blocks still held
            self._release(victim)
            victim.num_preemptions += 1
        else:
            self.preempt(victim)
        out.preempted.append(victim)
        return victim

    def _release(self, seq: Sequence) -> None:
        """Free a finished request's slot and blocks (at once, or with async scheduling after the next
        `schedule`)."""
        self._remove_running(seq)
        self.bm.free_seq(seq)

    def _schedule_decodes(self, out: SchedulerOutput) -> bool:
        """Give decoding requests that fill their last block a new one; False if the running pass
        stopped (the request itself had to be preempted)."""
        bs = self.block_size
        due = self._blocks_due(self.step)
        if self.bm.append_blocks(due):  # all fit: one pop, no preemption
            self._push_blocks_due(due, self.step + bs)
            return True
        for seq in due:
            if seq.join_step < 0:  # preempted earlier in this pass
                continue
            while not self.bm.append_block(seq):
                if self._preempt_last(out) is seq:
                    return False
            self._push_block_due(seq, self.step + bs)
        return True

    def _schedule_prefills(self, out: SchedulerOutput, budget: int) -> int | None:
        """Continue unfinished prefills; the budget left, or None if the running pass stopped."""
        for seq in list(self.prefilling.values()):
            if budget <= 0:
                break
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.bm.allocate_slots(seq, n):
                if self._preempt_last(out) is seq:
                    return None
            out.chunks.append((seq, n))
            budget -= n
        return budget

    def admission_blocked(self, budget: int) -> bool:
        """True when the head of the waiting queue is known not to fit (see `_blocked`)."""
        b = self._blocked
        bm = self.bm
        return (b is not None and self.waiting and b[0] is self.waiting[0] and b[1] == bm.frees
                and bm.num_free_blocks <= b[2] and budget >= b[3])

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, now_s: float) -> None:
        waiting, running = self.waiting, self.running
        skipped: list[Sequence] = []
        while waiting and budget > 0 and len(running) < self.max_num_seqs:
            seq = waiting[0]
            if self.admission_blocked(budget):
                break
            computed = self.bm.find_cached_prefix(seq)
            num_hit = len(computed) * self.block_size
            n = seq.num_tokens - num_hit
            if not self.enable_chunked_prefill and n > budget:
                if not self.skip_unfit_prompts:
                    break
                skipped.append(waiting.popleft())  # before vLLM 0.12: set aside, the next one tried
                continue
            n = min(n, budget)
            full = min(seq.num_tokens, self.max_model_len) if self.reserve_full_isl else 0
            if not self.bm.allocate_slots(seq, n, computed, full):
                self._blocked = (seq, self.bm.frees, self.bm.num_free_blocks, budget)
                break
            waiting.popleft()
            if seq.num_preemptions == 0:
                self.prefix_stats.queries += seq.num_tokens
                self.prefix_stats.hits += num_hit
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = num_hit
            if seq.first_scheduled_s is None:
                seq.first_scheduled_s = now_s
            seq.num_computed_tokens = num_hit
            seq.status = Status.RUNNING
            seq.order = self._order
            self._order += 1
            running[seq.order] = seq
            self.prefilling[seq.order] = seq
            out.chunks.append((seq, n))
            out.admitted.append(seq)
            budget -= n
        if skipped:  # back at the head, in reverse (vLLM's prepend_requests of its skipped queue)
            waiting.extendleft(skipped)

    def preempt(self, seq: Sequence) -> None:
        """Free a running request's blocks and put it at the front of the waiting queue. With async
        scheduling its last decode step is still in flight: that token is kept (vLLM delivers it), but
        vLLM had cached its blocks only up to the token before (it caches a decode's block when the
        step's output is taken), or up to its prefill if it has not decoded yet."""
        if seq.join_step >= 0:
            n = self.tokens_now(seq)
            self._leave(seq, n, max(seq.join_tokens - 1, n - 2) if self.async_scheduling else None)
            seq.last_token_s = self.last_end_s
            seq.last_out_s = self.last_out_s
        self._remove_running(seq)
        self.bm.free_seq(seq)
        seq.status = Status.PREEMPTED
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _remove_running(self, seq: Sequence) -> None:
        del self.running[seq.order]
        self.prefilling.pop(seq.order, None)

    # -- after the step

    def advance(self, prefill_done: list[Sequence], finished: list[Sequence], end_s: float) -> None:
        """End of step `self.step` at `end_s`: requests whose prefill completed join the cohort,
        `finished` ones (their last token came out in this step) leave and free their blocks."""
        nxt = self.step + 1
        for seq in prefill_done:
            del self.prefilling[seq.order]
            self._join(seq, nxt)
        for seq in finished:
            self.finish(seq, "length", token_this_step=True)
        self.step = nxt
        self.last_end_s = end_s

    def finish(self, seq: Sequence, reason: str, token_this_step: bool = False) -> None:
        """Take a finished (or aborted) request out and free its blocks; with async scheduling, a
        request that finished in the step just run (`token_this_step`) keeps its slot and blocks
        until the next `schedule` has run (vLLM takes that step's outputs after scheduling the next)."""
        if seq.status is Status.RUNNING:
            if seq.join_step >= 0:
                self._leave(seq, self.tokens_now(seq) + token_this_step)
            self.prefilling.pop(seq.order, None)
            if self.async_scheduling and token_this_step:
                self._done.append(seq)
            else:
                self._release(seq)
        else:
            if seq.status in (Status.WAITING, Status.PREEMPTED):
                self.waiting.remove(seq)
            self.bm.free_seq(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
