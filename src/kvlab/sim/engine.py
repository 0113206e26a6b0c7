"""The simulated engine core: schedule a step, price it, advance the clock, emit tokens.

The engine never reads a clock: callers pass the time. The HTTP server passes simulated time
derived from the wall clock (`--speedup`); the offline runner passes virtual time. One step is
`plan = engine.schedule(now)`, then `engine.complete(plan, now + plan.duration_s)`.

The front end (vLLM V1's API server process, apart from the engine core) is one serial resource:
a request that arrives takes `SimConfig.frontend_per_request_s` of it plus
`frontend_per_prompt_token_s` per prompt token (parsing, tokenising, input processing) before the
engine core sees it (`Engine.intake`), and every request first takes `frontend_latency_s` on its
way in, a delay that occupies nothing (transport, HTTP, whatever sits between the client and the
API server: every request sees it, none waits for another's). A chat request at a vLLM release that
parses the model's chat template on every request (`SimConfig.frontend_per_chat_request_s`,
kvlab.sim.timing.chat_template_cost) first takes that work (`Engine.template`), and only when it is
through is its input processing queued (`intake`): the API server's event loop runs the ready
handlers' slices in turn, so the requests of a burst all do their template work before any of them
is tokenised and handed to the engine core. After each step it turns the step's
outputs into streamed chunks, `SimConfig.frontend_per_output_s` per request with a token in the
step plus `frontend_per_step_s` per step with outputs (what a step's batch costs whatever its size:
receiving and decoding the engine core's message, the output handler's pass), one step's outputs
after the other; the engine core does not wait for it (no backpressure in
V1: `vllm/v1/engine/core.py` queues its outputs unbounded). So a
token reaches the client when the front end is done with its step (`Sequence.first_out_s`,
`last_out_s`, `step_out_s`), later than the engine made it once the front end falls behind. vLLM's
own histograms keep their clocks (`vllm/v1/metrics/stats.py`): TTFT and end-to-end latency are
taken when the front end starts on the step (`IterationStats.iteration_timestamp`), inter-token,
prefill, decode and inference times from the engine core's timestamps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvlab.sim.block_manager import BlockManager
from kvlab.sim.config import SimConfig
from kvlab.sim.metrics import EngineMetrics
from kvlab.sim import tokens
from kvlab.sim.scheduler import Scheduler, SchedulerOutput
from kvlab.sim.sequence import Sequence, Status
from kvlab.sim.timing import StepWork


@dataclass
class StepPlan:
    out: SchedulerOutput
    work: StepWork
    duration_s: float
    start_s: float


@dataclass
class StepResult:
    decoded: list[Sequence] = field(default_factory=list)  # decoding requests (with emit_decodes)
    prefilled: list[Sequence] = field(default_factory=list)  # requests whose prefill ended in a token
    finished: list[Sequence] = field(default_factory=list)
    out_s: float = 0.0  # when the front end had this step's tokens out to the clients


def step_work(out: SchedulerOutput) -> StepWork:
    """What a scheduled step computes: the decode cohort plus the prefill chunks."""
    n_dec = out.num_decodes
    tokens_, sampled, kv = n_dec, n_dec, out.decode_tokens
    prefill_pairs = context = 0
    chunks = []
    for seq, n in out.chunks:
        c = seq.num_computed_tokens
        chunks.append((n, c))
        tokens_ += n
        kv += c + n
        if c + n >= seq.num_tokens:
            sampled += 1
        prefill_pairs += n * c + n * (n + 1) // 2
        context += c
    return StepWork(tokens_, sampled, n_dec + len(out.chunks), kv, out.decode_tokens, prefill_pairs, context,
                    n_dec, tuple(chunks))


class Engine:
    def __init__(self, cfg: SimConfig, *, record_token_steps: bool = False, emit_decodes: bool = False,
                 check_blocks: bool = False, created_s: float = 0.0):
        self.cfg = cfg
        self.bm = BlockManager(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching,
                               uncached_first=cfg.uncached_blocks_first)
        self.scheduler = Scheduler(self.bm, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len,
                                   cfg.enable_chunked_prefill, reserve_full_isl=cfg.scheduler_reserve_full_isl,
                                   skip_unfit_prompts=cfg.skip_unfit_prompts, async_scheduling=cfg.async_scheduling)
        self.cost = cfg.cost
        self.metrics = EngineMetrics(cfg.served_model_name, cfg.max_model_len, cfg.cache_config_labels(), created_s)
        self.record_token_steps = record_token_steps  # keep every step's end time (offline ITLs)
        self.emit_decodes = emit_decodes  # list the decoding requests of each step (HTTP streaming)
        self.check_blocks = check_blocks  # assert the block invariant after every step (tests)
        self.mfu_metrics = False  # fill vllm:estimated_* (vLLM: --enable-mfu-metrics)
        self.step_out_s: list[float] = []  # per step, when its tokens reached the clients (offline ITLs)
        self.num_steps = 0
        self.last_end_s = created_s
        # the front end's costs as one of its --api-server-count processes sees them (SimConfig.frontend_costs)
        self.frontend_in_s, self.frontend_token_s, self.frontend_out_s, self.frontend_step_s = cfg.frontend_costs()
        self.frontend_chat_s = cfg.frontend_chat_s()  # a chat request's template work (`template`)
        self.frontend_on = bool(self.frontend_out_s or self.frontend_step_s)  # outputs go through the front end
        self.frontend_latency_s = cfg.frontend_latency_s  # every request's delay on its way in
        self.frontend_free_s = float("-inf")  # when the front end is through with its work so far
        self.frontend_work_s = 0.0  # the front end's work taken on so far (seconds of its CPU)
        self.frontend_steps = 0  # steps whose outputs it took on so far (each costs frontend_step_s)
        # The latest step's output work: when it started, and when the front end's work before it
        # (including requests' input processing put ahead of it since) is through (`intake`).
        self.frontend_out_start_s = float("-inf")
        self.frontend_free_before_out_s = float("-inf")

    def parses_template(self, chat: bool) -> bool:
        """Whether a request (a chat request where `chat`) takes the chat template's work first (`template`):
        at a release that parses the template on each chat request (`frontend_chat_s` not 0)."""
        return chat and self.frontend_chat_s > 0

    def template(self, arrival_s: float) -> float:
        """When a chat request that reached the API server at `arrival_s` is through its chat-template
        work (`frontend_chat_s`; call only where `parses_template`): `frontend_latency_s` after it was
        sent, then after the front end's earlier work and this. Its input processing (`intake`, with
        `latency=False`) is queued at that time, behind the work the front end took on meanwhile."""
        return self._take_in(arrival_s + self.frontend_latency_s, self.frontend_chat_s)

    def intake(self, arrival_s: float, prompt_tokens: int, latency: bool = True) -> float:
        """When a request that reached the API server at `arrival_s` is through its input processing
        and can be added (`add_request`): `frontend_latency_s` after it was sent (`latency`; False
        where `template` took it already), then after the front end's earlier work and its own."""
        ready_s = arrival_s + self.frontend_latency_s if latency else arrival_s
        if latency and not (self.frontend_in_s or self.frontend_token_s):
            return ready_s  # (after `template`, even work that costs nothing waits for the front end)
        return self._take_in(ready_s, self.frontend_in_s + self.frontend_token_s * prompt_tokens)

    def _take_in(self, ready_s: float, cost_s: float) -> float:
        """The front end takes `cost_s` of a request's work that is ready at `ready_s`: when it is through."""
        self.frontend_work_s += cost_s
        if ready_s < self.frontend_out_start_s:
            # The request reached the front end before the latest step's outputs did (its callers learn
            # of it after that step: it arrived while the step ran): it is served first, after the work
            # before those outputs, and pushes the front end's later work back. The outputs' own
            # times, given out already, are not moved (at most the input processing of the requests
            # that arrived during one step).
            start = ready_s if ready_s > self.frontend_free_before_out_s else self.frontend_free_before_out_s
            self.frontend_free_before_out_s = start + cost_s
            self.frontend_free_s += cost_s
            return start + cost_s
        return self._front_end_work(ready_s, cost_s)[1]

    def _front_end(self, end_s: float, outputs: int) -> tuple[float, float]:
        """The front end takes a step's `outputs` when it is done with its earlier work and the step
        has ended: (when it starts on them, when they are out)."""
        before = self.frontend_free_s
        cost_s = self.frontend_step_s + self.frontend_out_s * outputs if outputs else 0.0
        self.frontend_work_s += cost_s
        self.frontend_steps += outputs > 0
        start, out = self._front_end_work(end_s, cost_s)
        self.frontend_out_start_s, self.frontend_free_before_out_s = start, before
        return start, out

    def _front_end_work(self, ready_s: float, cost_s: float) -> tuple[float, float]:
        """The front end, one serial resource, takes `cost_s` of work that is ready at `ready_s`
        after the work it already has: (when it starts, when it is through)."""
        start = ready_s if ready_s > self.frontend_free_s else self.frontend_free_s
        self.frontend_free_s = start + cost_s
        return start, self.frontend_free_s

    # -- requests

    def add_request(self, seq: Sequence) -> None:
        self.scheduler.add(seq)
        self.metrics.num_waiting = len(self.scheduler.waiting)

    def abort(self, seq: Sequence) -> None:
        """Drop a request (client went away); counted as finished_reason="abort" like vLLM."""
        if seq.status is Status.FINISHED:
            return
        seq.aborted = True
        self.scheduler.finish(seq, "abort")
        self.metrics.request_success["abort"] += 1
        self._update_gauges()

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- one step

    def schedule(self, now_s: float) -> StepPlan | None:
        out = self.scheduler.schedule(now_s)
        if out.empty and out.released:
            # Async scheduling: a step with nothing to run hands the engine core the previous step's
            # outputs at once, and what they freed is scheduled next, in no time
            first = out
            out = self.scheduler.schedule(now_s)
            out.preempted = first.preempted + out.preempted
        if out.preempted:
            self.metrics.inc("vllm:num_preemptions", len(out.preempted))
        if out.empty:
            self._update_gauges()
            return None
        work = step_work(out)
        return StepPlan(out, work, self.cost.step_time_s(work), now_s)

    def complete(self, plan: StepPlan, end_s: float) -> StepResult:
        """Apply a step's outputs at `end_s`: computed tokens, sampled tokens, finished requests."""
        out, sched, m = plan.out, self.scheduler, self.metrics
        step = out.step
        res = StepResult()
        if self.emit_decodes:
            res.decoded = sched.decoding()
        if out.num_decodes:  # every decoding request's previous token came at the last step's end
            m.observe("vllm:inter_token_latency_seconds", end_s - self.last_end_s, out.num_decodes)
        prompt_done = 0
        prefill_done = []
        max_len = self.cfg.max_model_len
        done = []  # requests whose prefill ends in this step (they sample their next token)
        for seq, n in out.chunks:
            if seq.aborted:
                continue
            seq.num_computed_tokens += n
            if seq.num_computed_tokens >= seq.num_tokens:
                done.append(seq)
        if self.frontend_on:
            fe_s, out_s = self._front_end(end_s, out.num_decodes + len(done))
        else:
            fe_s = out_s = end_s
        res.out_s = out_s
        for seq in done:
            seq.token_ids.append(tokens.output_token(seq.output_seed, seq.num_output_tokens))
            if seq.first_token_s is None:
                seq.first_token_s = end_s
                seq.first_out_s = out_s
                m.observe("vllm:time_to_first_token_seconds", fe_s - seq.arrival_s)
                m.on_prefill_done(seq.num_prompt_tokens, seq.num_cached_tokens)
                prompt_done += seq.num_prompt_tokens - seq.num_cached_tokens
            else:  # resumed after a preemption
                m.observe("vllm:inter_token_latency_seconds", end_s - seq.last_token_s)
            seq.last_token_s = end_s
            seq.last_out_s = out_s
            seq.token_steps.append([step, step])
            res.prefilled.append(seq)
            if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= max_len:
                res.finished.append(seq)
            else:
                prefill_done.append(seq)
        for seq in sched.finishing(step):
            seq.last_token_s = end_s
            seq.last_out_s = out_s
            res.finished.append(seq)
        new_tokens = out.num_decodes + len(res.prefilled)
        m.inc("vllm:generation_tokens", new_tokens)
        m.observe("vllm:iteration_tokens_total", prompt_done + new_tokens)
        sched.advance(prefill_done, res.finished, end_s)
        sched.last_out_s = out_s
        for seq in res.finished:
            self._observe_finished(seq, fe_s)
        self._account_step(plan.work, end_s, out_s)
        return res

    def run_decodes(self, now_s: float, until_s: float) -> float:
        """Run pure-decode steps while the next one would start before `until_s`; returns the new
        time. The same steps, blocks, times and metrics as `schedule` + `complete` would give, for
        the stretches where a step decides nothing (see `Scheduler.decode_stretch_step`)."""
        sched, cost, m = self.scheduler, self.cost, self.metrics
        n = sched.num_decoding
        if not n or now_s != self.last_end_s:
            return now_s
        itl = m.hist["vllm:inter_token_latency_seconds"]
        record = self.step_out_s.append if self.record_token_steps else None
        front_end = self._front_end if self.frontend_on else None
        t, steps = now_s, 0
        while t < until_s and sched.decode_stretch_step():
            kv = sched._decode_base + n * (sched.step - 1)
            end = t + cost.decode_step_s(n, kv)
            itl.observe(end - t, n)
            t = end
            if record:
                record(front_end(t, n)[1] if front_end else t)
            elif front_end:
                front_end(t, n)
            if self.mfu_metrics:
                self._count_mfu(StepWork(n, n, n, kv, kv, 0, 0))
            steps += 1
        if steps:
            m.inc("vllm:generation_tokens", n * steps)
            m.observe("vllm:iteration_tokens_total", n, steps)
            self.num_steps += steps
            self.last_end_s = sched.last_end_s = t
            sched.last_out_s = self.frontend_free_s if front_end else t
            self._update_gauges()
            if self.check_blocks:
                self.bm.check_no_leak(list(sched.running.values()))
        return t

    def _observe_finished(self, seq: Sequence, fe_s: float) -> None:
        m = self.metrics
        m.request_success["length"] += 1
        h = m.hist  # Histogram.observe directly (EngineMetrics.observe is this lookup and call)
        n_out = seq.num_output_tokens
        scheduled = seq.first_scheduled_s if seq.first_scheduled_s is not None else seq.queued_s
        decode_s = seq.last_token_s - seq.first_token_s
        h["vllm:e2e_request_latency_seconds"].observe(fe_s - seq.arrival_s)
        h["vllm:request_queue_time_seconds"].observe(scheduled - seq.queued_s)  # engine core's QUEUED event
        h["vllm:request_prefill_time_seconds"].observe(seq.first_token_s - scheduled)
        h["vllm:request_inference_time_seconds"].observe(seq.last_token_s - scheduled)
        h["vllm:request_decode_time_seconds"].observe(decode_s)
        h["vllm:request_num_preemptions"].observe(seq.num_preemptions)
        h["vllm:request_prefill_kv_computed_tokens"].observe(seq.num_prompt_tokens - max(seq.num_cached_tokens, 0))
        h["vllm:request_prompt_tokens"].observe(seq.num_prompt_tokens)
        h["vllm:request_generation_tokens"].observe(n_out)
        h["vllm:request_time_per_output_token_seconds"].observe(decode_s / (n_out - 1) if n_out > 1 else 0.0)
        h["vllm:request_max_num_generation_tokens"].observe(seq.max_tokens)
        h["vllm:request_params_n"].observe(1)
        if seq.max_tokens_param:
            h["vllm:request_params_max_tokens"].observe(seq.max_tokens_param)

    def _update_gauges(self) -> None:
        m, stats = self.metrics, self.scheduler.prefix_stats
        m.counters["vllm:prefix_cache_queries"] = stats.queries
        m.counters["vllm:prefix_cache_hits"] = stats.hits
        m.num_running = self.scheduler.num_running
        m.num_waiting = len(self.scheduler.waiting)
        m.kv_cache_usage = self.bm.usage()

    def _count_mfu(self, work: StepWork) -> None:
        c, m = self.cost, self.metrics
        m.inc("vllm:estimated_flops_per_gpu", c.compute_s(work) * c.flops_per_s)
        m.inc("vllm:estimated_read_bytes_per_gpu", c.memory_s(work) * c.bytes_per_s)
        m.inc("vllm:estimated_write_bytes_per_gpu", work.tokens * c.kv_bytes_per_token)

    def _account_step(self, work: StepWork, end_s: float, out_s: float) -> None:
        self._update_gauges()
        if self.mfu_metrics:
            self._count_mfu(work)
        if self.record_token_steps:
            self.step_out_s.append(out_s)
        self.last_end_s = end_s
        self.num_steps += 1
        if self.check_blocks:
            self.bm.check_no_leak(list(self.scheduler.running.values()))
