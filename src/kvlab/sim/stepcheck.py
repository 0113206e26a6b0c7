"""The simulator's decode steps against a vLLM server's own periodic stats lines.

vLLM's engine logs, every 10 s, the tokens it generated per second over the interval with a
snapshot of its running requests and KV-cache usage (vllm/v1/metrics/loggers.py):

    Engine 000: Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 2345.6 tokens/s,
    Running: 128 reqs, Waiting: 0 reqs, GPU KV cache usage: 35.2%, Prefix cache hit rate: 0.0%

In a decode-dominated interval that is the engine's step rate at a known batch: each step gives
every running request one token, so generation throughput = running / step time, measured by vLLM
itself with no client or API server in between. The running requests' context follows from the
usage: the blocks held (`usage x usable blocks`) hold their tokens, less half a block each on
average (the last block is partly filled). `price` prices that step with the simulator's own
pure-decode path (`cost.decode_step_s`, host time included), as `kvlab sim` runs it.

Scored (`unscored_reason` is None) where decoding dominates the interval: prompt throughput at most
DECODE_DOMINATED of the generation throughput, at least MIN_RUNNING requests running, some KV cache in
use. What the line cannot show: a preempted request's recomputation (vLLM counts a request's prompt
once, at its first token, so a full cache with requests waiting can hide prefill), the batch moving
within the interval (Running is a snapshot), and blocks shared by running requests (held once, read
by each: the context is then a lower bound).

Used by `kvlab sim check-log` (a user's own server log: `read_log`, then `check`), the experiment runner
(each real vLLM repeat's server log, step_check.json) and bench/step_check.py (published lines).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DECODE_DOMINATED = 0.10  # prompt throughput / generation throughput at most this
MIN_RUNNING = 8
FULL_USAGE = 0.95  # a note, not a rule: preemptions likely where requests wait at this usage

# vLLM V1's LoggingStatLogger line: "GPU" or, on other platforms, the device's name before "KV cache usage"
STATS_LINE = re.compile(
    r"Avg prompt throughput: (?P<prompt>[\d.]+) tokens/s, Avg generation throughput: (?P<gen>[\d.]+) tokens/s, "
    r"Running: (?P<running>\d+) reqs?, Waiting: (?P<waiting>\d+) reqs?, \w+ KV cache usage: (?P<usage>[\d.]+)%"
    r"(?:, Prefix cache hit rate: (?P<hit>[\d.]+)%)?")
# V0's (vllm/engine/metrics.py): Swapped and Pending instead of Waiting
V0_STATS_LINE = re.compile(r"Avg prompt throughput: [\d.]+ tokens/s, Avg generation throughput: [\d.]+ tokens/s, "
                           r"Running: \d+ reqs?, Swapped: \d+ reqs?, Pending: \d+ reqs?")
_STAMP = re.compile(r"\b(\d\d-\d\d \d\d:\d\d:\d\d)\b")


@dataclass(frozen=True)
class StatsLine:
    """One V1 stats line's figures (measured by vLLM; fractions, not per cent)."""

    prompt_tok_s: float
    gen_tok_s: float
    running: int
    waiting: int
    usage: float
    prefix_hit_rate: float | None
    stamp: str | None  # the line's "MM-DD HH:MM:SS", where it has one


@dataclass(frozen=True)
class StepCheck:
    """A stats line's step, simulated: the simulator's generation throughput at the line's batch."""

    line: StatsLine
    context_per_request: int  # tokens, from the usage (computed)
    step_s: float  # simulated
    sim_gen_tok_s: float  # simulated
    note: str = ""

    @property
    def error(self) -> float:
        """Simulated over measured generation throughput, less 1 (positive: the simulator is faster)."""
        return self.sim_gen_tok_s / self.line.gen_tok_s - 1


def parse_stats_line(text: str) -> StatsLine | None:
    m = STATS_LINE.search(text)
    if not m:
        return None
    stamp = _STAMP.search(text[:m.start()])
    hit = m["hit"]
    return StatsLine(float(m["prompt"]), float(m["gen"]), int(m["running"]), int(m["waiting"]),
                     float(m["usage"]) / 100, None if hit is None else float(hit) / 100,
                     stamp.group(1) if stamp else None)


def is_v0_stats_line(text: str) -> bool:
    return V0_STATS_LINE.search(text) is not None


def stats_lines(log_text: str) -> list[StatsLine]:
    """Every V1 stats line of a server log, in order."""
    return [s for s in map(parse_stats_line, log_text.splitlines()) if s is not None]


@dataclass(frozen=True)
class ServerLog:
    """What a check reads of a server log, read once: its V1 stats lines and its startup facts."""

    lines: list[StatsLine]
    v0: bool  # no V1 stats line, and V0's (Swapped/Pending) are there
    kv_cache_tokens: int | None  # the KV cache size line's
    kv_device: str | None
    vllm_version: str | None  # the log's release where kvlab can simulate it (build_config's vllm_version)
    sampler: str | None = None  # the top-k/top-p sampler the log names (its profiling run's: the KV cache's size)

    def engine_args(self) -> dict:
        """build_config's keywords for what the log states of the engine that wrote it: its vLLM release
        and the sampler its profiling run took, where the log names them."""
        return {k: v for k, v in (("vllm_version", self.vllm_version), ("sampler", self.sampler)) if v}


def read_log(text: str, since: int = 0, window: tuple[str | None, str | None] = (None, None)) -> ServerLog:
    """The log's stats lines, from character `since` of `text` on (the experiment runner: where the repeat's
    load began) and, where `window` gives them, stamped from its first "MM-DD HH:MM:SS" to its second (both
    included; a line without a stamp is then left out); its startup facts from the whole text."""
    from kvlab.deploy.facts import parse_log
    from kvlab.models.budget import vllm_release

    lines = stats_lines(text[since:])
    first, last = window
    if first or last:
        lines = [s for s in lines if s.stamp and (not first or s.stamp >= first) and (not last or s.stamp <= last)]
    v0 = not lines and any(map(is_v0_stats_line, text.splitlines()))
    facts = parse_log(text)
    version = facts.vllm_version if facts.vllm_version and vllm_release(facts.vllm_version) else None
    return ServerLog(lines, v0, facts.kv_cache_tokens, facts.kv_device, version, facts.sampler)


def log_stamp(text: str, what: str) -> str:
    """A "MM-DD HH:MM:SS" stamp as vLLM's log lines carry it (a --since/--until value), or KvlabError."""
    from kvlab.errors import KvlabError

    if not re.fullmatch(r"\d\d-\d\d \d\d:\d\d:\d\d", text.strip()):
        raise KvlabError(f"{what} takes a time as vLLM's log lines stamp it, MM-DD HH:MM:SS (e.g. \"09-04 01:30:00\"), "
                         f"got {text!r}")
    return text.strip()


def unscored_reason(s: StatsLine) -> str | None:
    """Why the line's interval is not a decode step to price, or None. The words before " (" are the kind
    of reason (`reason_kind`), the rest the line's figures."""
    if s.running < MIN_RUNNING:
        return f"fewer than {MIN_RUNNING} requests running ({s.running})"
    if s.prompt_tok_s > DECODE_DOMINATED * s.gen_tok_s:
        return f"prefill in the interval ({s.prompt_tok_s:,.0f} prompt tokens/s against {s.gen_tok_s:,.0f} generated)"
    if s.usage <= 0:
        return "no KV cache in use"
    return None


def reason_kind(reason: str) -> str:
    return reason.split(" (")[0]


def price(cost, s: StatsLine, kv_cache_tokens: int, block_size: int) -> StepCheck:
    """The line's decode step priced by `cost` (a SimConfig's step-time backend) at the line's batch and
    the context its KV usage holds, on a cache of `kv_cache_tokens` as vLLM logs its size (every block of
    `block_size` tokens, the null block too): the usage is of the blocks less the null one
    (`BlockPool.get_usage`, vLLM 0.11 and 0.32 alike)."""
    held = s.usage * (kv_cache_tokens // block_size - 1) * block_size
    context = max(round(held - s.running * block_size / 2), s.running)
    step_s = cost.decode_step_s(s.running, context)
    notes = []
    if s.prefix_hit_rate:
        notes.append(f"prefix hits {s.prefix_hit_rate:.0%}: context a lower bound if running requests share blocks")
    if s.waiting and s.usage >= FULL_USAGE:
        notes.append("KV cache full with requests waiting: a preempted request's recomputation is not in the "
                     "prompt throughput (vLLM counts a request's prompt once, at its first token)")
    return StepCheck(s, round(context / s.running), step_s, s.running / step_s, "; ".join(notes))


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def summary(errors: list[float]) -> str:
    """Within ±25 %, the median error and how many the simulator prices faster, in words."""
    within = sum(abs(e) <= 0.25 for e in errors)
    return (f"within ±25 %: {within} of {len(errors)} ({within / len(errors):.0%}); median error "
            f"{100 * median(errors):+.1f} %; simulated faster than measured on {sum(e > 0 for e in errors)}")


def check(server_log: ServerLog, cfg, log: str):
    """A server log's V1 stats lines priced by the simulated engine `cfg` (a SimConfig) on the log's own KV
    cache size where it states one: a StepCheckResult (what `kvlab sim check-log` prints and the experiment
    runner records beside a real vLLM repeat); `log` names the log in it."""
    from kvlab.schema.stepcheck import CheckedLine, StepCheckResult

    lines = server_log.lines
    block = cfg.capacity.block_size
    predicted = cfg.capacity.num_blocks * block  # as vLLM logs its KV cache size: every block, the null one too
    if server_log.kv_cache_tokens:
        kv_tokens = server_log.kv_cache_tokens
        named = " the log names" if cfg.sampler == server_log.sampler else ""
        kv_source = (f"the log's KV cache size line ({server_log.kv_device}; the memory model predicts "
                     f"{predicted:,} tokens with the {cfg.sampler} sampler{named})")
    else:
        kv_tokens = predicted
        kv_source = "predicted by the memory model (the log has no KV cache size line)"
    checked, unscored = [], {}
    for line in lines:
        reason = unscored_reason(line)
        if reason:
            kind = reason_kind(reason)
            unscored[kind] = unscored.get(kind, 0) + 1
            continue
        c = price(cfg.cost, line, kv_tokens, block)
        checked.append(CheckedLine(stamp=line.stamp, running=line.running, waiting=line.waiting,
                                   kv_cache_usage=line.usage, measured_gen_tok_s=line.gen_tok_s,
                                   context_per_request=c.context_per_request, simulated_step_ms=1000 * c.step_s,
                                   simulated_gen_tok_s=c.sim_gen_tok_s, error=c.error, note=c.note))
    errors = [c.error for c in checked]
    return StepCheckResult(
        log=log, model=cfg.model, gpu=cfg.gpu.name, vllm_version=cfg.vllm_version, timing_source=cfg.cost.timing_source,
        host_source=cfg.host_source(), kv_cache_tokens=kv_tokens, kv_cache_source=kv_source, stats_lines=len(lines),
        lines=checked, unscored=unscored, within_25pct=sum(abs(e) <= 0.25 for e in errors),
        median_error=median(errors) if errors else None)
