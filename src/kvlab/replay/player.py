"""The offline replay's event loop: agent sessions' turns arrive, the simulated engine steps in
virtual time, metrics are scraped, every request is recorded (no HTTP).

A session's prompt is its app's system prompt, then every earlier turn's input and verbatim reply,
then this turn's input, so turns of one session and sessions of one app share prefix-cache blocks
as they would on vLLM. With `concurrency=N` it plays closed-loop users (N sessions at a time, the
next starting when one ends); without it every plan starts at its `start_offset_s` (plans must come
in start order), and with `max_in_flight=C` at most C sessions run at once, a later one waiting
(first come, first served) until one ends, as `vllm bench serve --max-concurrency` holds requests at
a semaphore. `max_requests` stops sending once that many requests have been sent (Locust's
`--max-requests` in `kvlab load`).
"""

from __future__ import annotations

import gc
import heapq
import json
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from kvlab.errors import KvlabError
from kvlab.loadtest.plan import SessionPlan
from kvlab.sim import tokens
from kvlab.sim.config import SimConfig
from kvlab.sim.engine import Engine
from kvlab.sim.sequence import Sequence, Status, extend_hashes

RECORD_COLUMNS = ("start_ts", "session_id", "app_id", "turn", "ttft_s", "itl_s", "tpot_s", "e2e_s",
                  "prompt_tokens", "completion_tokens", "cached_tokens", "num_preemptions",
                  "finish_reason", "error_kind")


def token_ids(key: str, n: int) -> range:
    """`n` token ids unique to `key` (an app's system prompt, one turn's input)."""
    base = (zlib.crc32(key.encode()) & 0x7FFFFFF) << 24
    return range(base, base + n)


def token_range(key: str, n: int) -> list[int]:
    """`token_ids` as a list."""
    return list(token_ids(key, n))


@lru_cache(maxsize=1024)
def _system_tokens(app_id: str, n: int) -> tuple[int, ...]:
    return tuple(token_range(f"app:{app_id}", n))


@lru_cache(maxsize=1024)
def _system_hashes(app_id: str, n: int, block_size: int) -> tuple[int, ...]:
    """The chained hashes of an app's system prompt's full blocks: every session of the app starts
    with them, so they are hashed once per run instead of once per session."""
    return tuple(extend_hashes([], _system_tokens(app_id, n), n // block_size, block_size))


@dataclass
class _Session:
    plan: SessionPlan
    context: list[int]
    hashes: list[int]
    hash_array: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # hashes as int64, in part
    # the last turn's request: its freed block table (`last_blocks`) is read when the next turn is sent, not when
    # it finished: with async scheduling its blocks are freed after the next `schedule`, after `on_finished`
    last: Sequence | None = None
    turn: int = 0


# The event loop allocates a container object or more per token step and request (lists, tuples, Sequences), and
# keeps most of them (records, token lists) to the end: at CPython's default first-generation threshold (700) the
# cyclic collector passes over them again and again. At 50,000 it passes about 70 times less often at each
# generation, with at most 50,000 new objects waiting for a pass; the loop makes few cycles (a session and its last
# turn's request until the next turn is sent). Measured (2026-12-07, session 44, three 128-user configs of bench/sim_speed.py,
# one process, alternately): 11.0 CPU s against 12.9-14.2 s at the default; the same results (no figure depends
# on when garbage is collected).
GC_GEN0_THRESHOLD = 50_000


@contextmanager
def _fewer_gc_passes(gen0: int = GC_GEN0_THRESHOLD):
    """The cyclic garbage collector's first-generation threshold raised to `gen0` (never lowered) while the
    block runs, restored after. The threshold is the process's: kvlab runs one event loop at a time in a
    process (the planner's probes and bench/sim_speed.py's configs run in processes of their own)."""
    old = gc.get_threshold()
    gc.set_threshold(max(gen0, old[0]), *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


class Player:
    """The event loop: turn arrivals, engine steps, metric scrapes, records."""

    def __init__(self, cfg: SimConfig, sessions: Iterable[SessionPlan], duration_s: float,
                 concurrency: int | None, scrape_interval_s: float, check_blocks: bool,
                 fast_decode: bool = True, max_in_flight: int | None = None, max_requests: int | None = None,
                 chat: bool = False):
        self.cfg = cfg
        self.engine = Engine(cfg, record_token_steps=True, check_blocks=check_blocks)
        self.duration_s = duration_s
        self.scrape_interval_s = scrape_interval_s
        self.plans: Iterator[SessionPlan] = iter(sessions)
        self.concurrency = concurrency
        self.arrivals: list[tuple[float, int, _Session]] = []  # (time, order, session)
        # (time the front end is through with a request's work so far, order, request, whether that was its
        # chat-template work, after which its input processing is queued, or all of it)
        self.intake: list[tuple[float, int, Sequence, bool]] = []
        # the requests are chat requests (/v1/chat/completions): at a release that parses the chat template
        # on each, they take that work first (kvlab.sim.engine.Engine.template)
        self.chat_template = self.engine.parses_template(chat)
        self.order = 0
        self.pending: SessionPlan | None = None  # open loop: the next plan not yet started
        self.records: list[dict] = []
        self.runs: list[tuple[int, list[list[int]]]] = []  # (record index, token step runs)
        self.samples: list[tuple[float, str, str, str, float]] = []
        self.next_scrape_s = 0.0
        self._label_json: dict[tuple, str] = {}
        self.max_kv_usage = 0.0
        self.fast_decode = fast_decode
        self.max_in_flight = max_in_flight  # open loop: sessions running at once (a client's semaphore)
        self.in_flight = 0
        self.held: deque[_Session] = deque()  # open loop: arrived, waiting for a free slot
        self.max_requests = max_requests
        self.requests_sent = 0
        self.on_progress: Callable[[float, int], None] | None = None  # (simulated s, requests ended), per request

    # -- sessions

    def start(self) -> None:
        if self.concurrency is not None:
            for _ in range(self.concurrency):
                self._start_next(None)
        else:
            self.pending = next(self.plans, None)

    def _start_next(self, at_s: float | None) -> None:
        plan = next(self.plans, None)
        if plan is not None:
            self._push(at_s if at_s is not None else plan.start_offset_s, self._new_session(plan))

    def _new_session(self, plan: SessionPlan) -> _Session:
        return _Session(plan, list(_system_tokens(plan.app_id, plan.system_tokens)),
                        list(_system_hashes(plan.app_id, plan.system_tokens, self.cfg.block_size)))

    def _push(self, at_s: float, sess: _Session) -> None:
        heapq.heappush(self.arrivals, (at_s, self.order, sess))
        self.order += 1

    def next_event_s(self) -> float:
        t = self.arrivals[0][0] if self.arrivals else float("inf")
        if self.intake and self.intake[0][0] < t:
            t = self.intake[0][0]
        if self.pending is not None:
            t = min(t, self.pending.start_offset_s)
        return t

    def admit_arrivals(self, now_s: float) -> None:
        while self.pending is not None and self.pending.start_offset_s <= now_s:
            sess = self._new_session(self.pending)
            if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
                self.held.append(sess)
            else:
                self.in_flight += 1
                self._push(self.pending.start_offset_s, sess)
            self.pending = next(self.plans, None)
        # arrivals and the front end's hand-offs, in time order (an arrival first at the same time): a
        # request through its chat-template work queues its input processing behind what arrived before
        while True:
            t_arrival = self.arrivals[0][0] if self.arrivals else float("inf")
            t_intake = self.intake[0][0] if self.intake else float("inf")
            if t_arrival <= t_intake and t_arrival <= now_s:
                at_s, _, sess = heapq.heappop(self.arrivals)
                self._send_turn(sess, at_s)
            elif t_intake <= now_s:
                ready_s, _, seq, templated = heapq.heappop(self.intake)
                if templated:
                    self._take_in(seq, ready_s, latency=False)
                else:
                    self.engine.add_request(seq)
            else:
                break

    def _send_turn(self, sess: _Session, at_s: float) -> None:
        if self.max_requests is not None and self.requests_sent >= self.max_requests:
            return  # the request bound is reached: the session sends nothing more
        self.requests_sent += 1
        plan, k = sess.plan, sess.turn
        turn = plan.turns[k]
        prompt = sess.context
        prompt.extend(token_ids(f"{plan.session_id}:{k}", turn.user_tokens))
        max_len = self.cfg.max_model_len
        error = None
        if turn.max_tokens > max_len:
            error = "max_tokens"  # vLLM: 400 "max_tokens=... cannot be greater than max_model_len=..."
        elif len(prompt) > max_len:
            error = "context_length"  # vLLM: 400 "This model's maximum context length is ..."
        if error:
            self._record_error(sess, at_s, len(prompt), error)
            self._end_session(sess, at_s)
            return
        seq = Sequence(f"{plan.session_id}-{k}", prompt, turn.max_tokens, at_s,
                       output_seed=tokens.prompt_seed(prompt), tag=sess, max_tokens_param=turn.max_tokens)
        seq.block_hashes = sess.hashes  # the context's full blocks are hashed already
        seq.hash_array = sess.hash_array
        if sess.last is not None:
            seq.prev_blocks, sess.last = sess.last.last_blocks, None
        if self.chat_template:  # the chat template's work first, then the input processing
            self._hold(seq, self.engine.template(at_s), True)
        else:
            self._take_in(seq, at_s)

    def _take_in(self, seq: Sequence, at_s: float, latency: bool = True) -> None:
        ready_s = self.engine.intake(at_s, seq.num_prompt_tokens, latency)  # the API server's input processing
        if ready_s > at_s:
            self._hold(seq, ready_s, False)
        else:
            self.engine.add_request(seq)

    def _hold(self, seq: Sequence, until_s: float, templated: bool) -> None:
        """`seq` in the front end until `until_s` (`templated`: through its chat-template work only)."""
        seq.queued_s = until_s
        heapq.heappush(self.intake, (until_s, self.order, seq, templated))
        self.order += 1

    def on_finished(self, seq: Sequence, end_s: float) -> None:
        sess: _Session = seq.tag
        self._record(seq, sess)
        if self.on_progress is not None:
            self.on_progress(end_s, len(self.records))
        sess.context = seq.token_ids  # prompt + the verbatim reply: the next turn's prefix
        sess.hashes = seq.block_hashes
        sess.hash_array = seq.hash_array
        think_s = sess.plan.turns[sess.turn].think_time_s
        sess.turn += 1
        if sess.turn < len(sess.plan.turns):
            sess.last = seq  # (a reference cycle, seq.tag being sess, until the next turn is sent)
            self._push(end_s + think_s, sess)
        else:
            self._end_session(sess, end_s + think_s)

    def _end_session(self, sess: _Session, at_s: float) -> None:
        if self.concurrency is not None:
            self._start_next(at_s)
        elif self.max_in_flight is not None:
            self.in_flight -= 1
            if self.held:
                self.in_flight += 1
                self._push(at_s, self.held.popleft())

    # -- records

    def _record(self, seq: Sequence, sess: _Session, error: str | None = None) -> None:
        n_out = seq.num_output_tokens
        # the client's clock: when the front end had the tokens out (kvlab.sim.engine)
        ttft = seq.first_out_s - seq.arrival_s if seq.first_out_s is not None else None
        e2e = seq.last_out_s - seq.arrival_s if seq.last_out_s is not None else None
        tpot = (e2e - ttft) / (n_out - 1) if ttft is not None and n_out > 1 else None
        self.runs.append((len(self.records), seq.token_steps))
        self.records.append({
            "start_ts": seq.arrival_s, "session_id": sess.plan.session_id, "app_id": sess.plan.app_id,
            "turn": sess.turn, "ttft_s": ttft, "itl_s": None, "tpot_s": tpot, "e2e_s": e2e,
            "prompt_tokens": seq.num_prompt_tokens, "completion_tokens": n_out,
            "cached_tokens": max(seq.num_cached_tokens, 0), "num_preemptions": seq.num_preemptions,
            "finish_reason": seq.finish_reason, "error_kind": error,
        })

    def _record_error(self, sess: _Session, at_s: float, prompt_tokens: int, error: str) -> None:
        self.records.append({
            "start_ts": at_s, "session_id": sess.plan.session_id, "app_id": sess.plan.app_id,
            "turn": sess.turn, "ttft_s": None, "itl_s": None, "tpot_s": None, "e2e_s": None,
            "prompt_tokens": prompt_tokens, "completion_tokens": 0, "cached_tokens": 0, "num_preemptions": 0,
            "finish_reason": None, "error_kind": error,
        })

    def record_unfinished(self) -> None:
        sched = self.engine.scheduler
        for seq in list(sched.running.values()) + list(sched.waiting) + [x[2] for x in sorted(self.intake)]:
            if seq.status is not Status.FINISHED:  # (async scheduling: finished, its blocks not yet freed)
                self._record(seq, seq.tag, "incomplete")

    def fill_itls(self) -> None:
        """Each record's inter-token latencies: the differences of the times the steps its tokens
        came out in reached the client (`Engine.step_out_s`). All records' token times are gathered into one array and differenced
        at once (the same subtractions as per record), then each record takes its slice as a list. The
        gathered steps are one cumulative sum (1 a token inside a run, the jump from the last run's step
        at a run's start), and each slice is converted on its own: no list of all the gaps is built and
        cut again (0.25 -> 0.15 CPU s for a 128-user sim_speed config's 2.3 M gaps)."""
        firsts: list[int] = []
        lasts: list[int] = []
        spans: list[tuple[int, int]] = []  # (record index, its number of tokens)
        for i, runs in self.runs:
            n = 0
            for a, b in runs:
                firsts.append(a)
                lasts.append(b)
                n += b - a + 1
            spans.append((i, n))
        a = np.asarray(firsts, dtype=np.int64)
        b = np.asarray(lasts, dtype=np.int64)
        lens = b - a + 1
        starts = np.cumsum(lens) - lens  # where each run begins in the gathered array
        steps = np.ones(int(lens.sum()), dtype=np.int64)
        jumps = a.copy()
        jumps[1:] -= b[:-1]
        steps[starts] = jumps
        np.cumsum(steps, out=steps)  # run j's steps a_j .. b_j, one run after the other
        times = np.asarray(self.engine.step_out_s)[steps]
        diffs = times[1:] - times[:-1]
        pos = 0
        for i, n in spans:
            self.records[i]["itl_s"] = diffs[pos:pos + n - 1].tolist() if n else []
            pos += n

    # -- metrics

    def scrape_until(self, now_s: float) -> None:
        m = self.engine.metrics
        while self.next_scrape_s <= now_s and self.next_scrape_s <= self.duration_s:
            ts = self.next_scrape_s
            cache = self._label_json
            for family, name, labels, value in m.samples():
                key = (name, *labels.values())
                js = cache.get(key)
                if js is None:
                    js = cache[key] = json.dumps(labels, sort_keys=True)
                self.samples.append((ts, family, name, js, value))
            self.next_scrape_s += self.scrape_interval_s

    # -- the loop

    def run(self) -> None:
        with _fewer_gc_passes():
            self._run()

    def _run(self) -> None:
        eng = self.engine
        t = 0.0
        self.start()
        while True:
            nxt = self.next_event_s()
            if not eng.has_work:
                if nxt >= self.duration_s:
                    break
                t = max(t, nxt)
            self.scrape_until(t)
            if t >= self.duration_s:
                break
            self.admit_arrivals(t)
            plan = eng.schedule(t)
            if plan is None:
                nxt = self.next_event_s()
                if nxt == float("inf"):
                    if not eng.scheduler.waiting:
                        break  # nothing more will arrive (the request bound is reached)
                    head = eng.scheduler.waiting[0]
                    raise KvlabError(
                        f"request {head.seq_id} ({head.num_tokens} tokens) can never be scheduled: it needs more "
                        f"than the {eng.bm.num_usable_blocks} usable KV blocks of {eng.bm.block_size} tokens")
                t = max(t, nxt)
                continue
            t_end = t + plan.duration_s
            res = eng.complete(plan, t_end)
            for seq in res.finished:
                self.on_finished(seq, res.out_s)  # the client has the last token (and sends its next turn)
            t = t_end
            if self.fast_decode:
                t = eng.run_decodes(t, min(self.next_event_s(), self.next_scrape_s, self.duration_s))
            usage = eng.metrics.kv_cache_usage
            if usage > self.max_kv_usage:
                self.max_kv_usage = usage
        self.scrape_until(self.duration_s)
        self.record_unfinished()
        self.fill_itls()
