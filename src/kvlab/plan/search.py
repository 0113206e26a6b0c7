"""Sessions per replica within the SLO: a search over closed-loop concurrency on the simulator.

Coarse to fine, bisecting a bracket [largest load that met the SLO, smallest that missed it].
Coarse probes run half the simulated window. From a first guess (the memory model's count of
sessions whose final contexts fit in the KV cache at once, x1.5, at most 256) the load grows until
the SLO is missed (faster the further below it a probe was, `Verdict.margin`) or shrinks until it
is met (faster the fewer requests met it), then the bracket is halved down to 10 %. Fine probes
run the whole window: the bracket's lower end is probed again and moved down by 5 % steps until
the long window meets the SLO too (short windows see fewer of the rare KV-cache peaks), the
bracket is halved down to `tolerance`, and its upper end must miss in a fine probe (else it moves
up by 5 % steps). The answer is the largest fine probe that met the SLO; the fine probe above it
that missed is reported beside it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Callable

from kvlab.loadtest.workload import Workload
from kvlab.plan.configs import PlanConfig
from kvlab.plan.probe import Probe, Verdict, Window, run_probe
from kvlab.schema.slo import SLO

COARSE_TOLERANCE = 0.10
CONFIRM_STEP = 0.05  # how far a fine probe moves an end of the bracket that it contradicts
MAX_USERS = 16384
MAX_GUESS = 256


@dataclass(frozen=True)
class SearchSettings:
    slo: SLO
    attainment: float  # share of requests that must meet the SLO
    sim_s: float  # simulated seconds of a fine probe (coarse: half); the first third warms up
    tolerance: float  # the fine bracket's width, relative
    seed: int
    use_cache: bool = True
    verbose: bool = True

    @property
    def coarse(self) -> Window:
        return Window(self.sim_s / 2, self.sim_s / 6)

    @property
    def fine(self) -> Window:
        return Window(self.sim_s, self.sim_s / 3)


@dataclass
class ProbeLog:
    users: int
    stage: str  # coarse / fine
    sim_s: float
    attainment: float
    margin: float
    passed: bool
    judged: int
    cached: bool
    cpu_s: float


@dataclass
class SearchResult:
    config: PlanConfig
    status: str  # "ok"; "slo_unmet": one session already misses it; "at_cap": meets it at MAX_USERS
    users: int  # sessions per replica within the SLO (0 when unmet)
    fail_users: int | None  # the smallest load above it that missed the SLO in a fine probe
    verdict: Verdict | None  # at `users` (fine)
    probe: Probe | None  # the fine probe at `users`, or the one-session probe when unmet
    probes: list[ProbeLog] = field(default_factory=list)

    @property
    def cpu_s(self) -> float:
        return sum(p.cpu_s for p in self.probes)


class _Searcher:
    def __init__(self, cfg: PlanConfig, workload: Workload, s: SearchSettings,
                 log: Callable[[str, ProbeLog], None] | None = None):
        self.cfg, self.workload, self.s = cfg, workload, s
        if log is None:
            log = (lambda msg, _: print(msg, file=sys.stderr, flush=True)) if s.verbose else (lambda msg, _: None)
        self.log = log
        self.logs: list[ProbeLog] = []
        self.seen: dict[tuple[str, int], tuple[Verdict, Probe]] = {}

    def probe(self, users: int, stage: str) -> Verdict:
        key = (stage, users)
        if key in self.seen:
            return self.seen[key][0]
        window = self.s.coarse if stage == "coarse" else self.s.fine
        p, cached, cpu_s = run_probe(self.cfg, self.workload, self.s.seed, users, window, self.s.use_cache)
        v = p.judge(self.s.slo, self.s.attainment)
        self.seen[key] = (v, p)
        entry = ProbeLog(users, stage, window.sim_s, v.attainment, v.margin, v.passed, v.judged, cached, cpu_s)
        self.logs.append(entry)
        how = "cached" if cached else f"{cpu_s:.1f} CPU s"
        self.log(f"  {self.cfg.label}: {users} sessions, {stage} {window.sim_s:g} s -> {v.attainment:.1%} of "
                 f"{v.judged} requests met the SLO ({'pass' if v.passed else 'miss'}; {how})", entry)
        return v

    # -- the stages

    def grow(self, users: int) -> tuple[int, int | None]:
        """Coarse: from a guess, up until a miss or down until a pass: (largest pass, smallest miss);
        0 when nothing passed, None when everything did up to MAX_USERS."""
        v = self.probe(users, "coarse")
        if v.passed:
            lo = users
            while lo < MAX_USERS:
                nxt = min(MAX_USERS, max(lo + 1, int(lo * _growth(v.margin))))
                v = self.probe(nxt, "coarse")
                if not v.passed:
                    return lo, nxt
                lo = nxt
            return lo, None
        hi = users
        while hi > 1:
            nxt = max(1, int(hi / _shrink(v.attainment, self.s.attainment)))
            v = self.probe(nxt, "coarse")
            if v.passed:
                return nxt, hi
            hi = nxt
        return 0, hi

    def narrow(self, lo: int, hi: int, tol: float, stage: str) -> tuple[int, int]:
        """Halve the bracket (geometrically) until it is `tol` wide."""
        while hi - lo > max(1, tol * lo):
            c = _middle(lo, hi)
            if self.probe(c, stage).passed:
                lo = c
            else:
                hi = c
        return lo, hi

    def fine_lower(self, lo: int, hi: int) -> tuple[int, int]:
        """Fine: the coarse bracket's lower end again, moved down by 5 % steps until the longer
        window meets the SLO too (short windows see fewer of the rare KV-cache peaks); 0 if one
        session misses it."""
        while not self.probe(lo, "fine").passed:
            if lo == 1:
                return 0, 1
            lo, hi = max(1, min(lo - 1, int(lo * (1 - CONFIRM_STEP)))), lo
        return lo, hi

    def run(self, guess: int) -> SearchResult:
        lo, hi = self.grow(max(1, min(guess, MAX_USERS)))
        if lo == 0:
            return self._unmet()
        if hi is None:
            return self._result("at_cap", lo, None)
        lo, hi = self.narrow(lo, hi, COARSE_TOLERANCE, "coarse")
        lo, hi = self.fine_lower(lo, hi)
        if lo == 0:
            return self._unmet()
        while True:
            lo, hi = self.narrow(lo, hi, self.s.tolerance, "fine")
            if not self.probe(hi, "fine").passed:  # the miss above the answer, in the long window too
                return self._result("ok", lo, hi)
            lo = hi
            while self.probe(hi, "fine").passed:
                if hi >= MAX_USERS:
                    return self._result("at_cap", hi, None)
                lo, hi = hi, min(MAX_USERS, max(hi + 1, int(hi * (1 + CONFIRM_STEP))))

    def _result(self, status: str, users: int, fail: int | None) -> SearchResult:
        self.probe(users, "fine")
        v, p = self.seen[("fine", users)]
        return SearchResult(self.cfg, status, users, fail, v, p, self.logs)

    def _unmet(self) -> SearchResult:
        self.probe(1, "fine")
        v, p = self.seen[("fine", 1)]
        if v.passed:  # only the coarse window missed it
            return SearchResult(self.cfg, "ok", 1, None, v, p, self.logs)
        return SearchResult(self.cfg, "slo_unmet", 0, 1, v, p, self.logs)


def _growth(margin: float) -> float:
    """How much more load to try after a pass: far below the SLO, double it."""
    if margin < 0.5:
        return 2.0
    return 1.5 if margin < 0.8 else 1.25


def _shrink(attainment: float, target: float) -> float:
    """How much less load to try after a miss: the fewer requests met the SLO, the more."""
    if attainment >= target / 2:
        return 2.0
    return 4.0 if attainment >= 0.1 else 8.0


def _middle(lo: int, hi: int) -> int:
    """The bracket's geometric middle, strictly inside it."""
    return min(max(round(math.sqrt(lo * hi)), lo + 1), hi - 1)


def initial_guess(cfg: PlanConfig, workload: Workload, seed: int) -> int:
    """1.5x the sessions whose final contexts the KV cache holds at once (kvlab.replay.sessions): under
    agent load only the sessions being served hold blocks, and most of them are not at their end.
    At most 256: a tight SLO can bind far below the KV cache, and probes with fewer sessions are cheaper."""
    from kvlab.plan.probe import workload_plans
    from kvlab.replay.sessions import predicted_max_users

    sim = cfg.sim_config()
    fit = predicted_max_users(sim.num_blocks, sim.block_size, workload_plans(workload, seed), limit=MAX_GUESS)
    return max(4, min(MAX_GUESS, int(1.5 * fit)))


def search(cfg: PlanConfig, workload: Workload, settings: SearchSettings,
           log: Callable[[str, ProbeLog], None] | None = None) -> SearchResult:
    """The most closed-loop sessions one replica of `cfg` serves within the SLO (simulated).
    log(line, probe) after each probe (default: the line to stderr where settings.verbose)."""
    return _Searcher(cfg, workload, settings, log).run(initial_guess(cfg, workload, settings.seed))
