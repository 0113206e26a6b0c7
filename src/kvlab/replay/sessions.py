"""The session streams the offline replay plays, from the workload model Locust plays.

`kvlab.loadtest.workload.Workload.sessions(seed)` yields the same `SessionPlan`s a Locust run of
the profile sends; here they are started as Locust starts its users, and `predicted_max_users`
says, from the memory model's block count alone, how many sessions' contexts fit at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from itertools import islice
from math import ceil
from pathlib import Path

from kvlab.errors import KvlabError
from kvlab.loadtest.plan import SessionPlan
from kvlab.loadtest.workload import Workload, load_workload


def closed_loop(workload: Workload, seed: int, users: int, spawn_rate: float | None = None,
                plans: Iterable[SessionPlan] | None = None) -> Iterator[SessionPlan]:
    """The session stream of `users` closed-loop users (Locust's `constant` shape): user i starts
    its first session at i / spawn_rate seconds (default: the workload's `load.spawn_rate`, else all
    users within one second, as `kvlab load` spawns them); later sessions start when a user's
    previous one ends (their start offsets are not used). `plans`: the workload's stream of `seed`
    if the caller keeps it already (it is not generated again)."""
    if users < 1:
        raise KvlabError(f"--users must be at least 1, got {users}")
    if spawn_rate is not None and spawn_rate <= 0:
        raise KvlabError(f"--spawn-rate must be positive, got {spawn_rate}")
    rate = spawn_rate or workload.load.spawn_rate or users
    stream = workload.sessions(seed) if plans is None else plans
    return (replace(plan, start_offset_s=i / rate) if i < users else plan for i, plan in enumerate(stream))


def session_stream(sessions: Iterable[SessionPlan] | Workload | str | Path, seed: int, concurrency: int | None,
                   spawn_rate: float | None = None) -> Iterable[SessionPlan]:
    """SessionPlans as given, or those of a workload (a `Workload`, a profile name or a YAML path):
    closed-loop users with `concurrency`, else open-loop arrivals of its `poisson` shape."""
    if isinstance(sessions, (str, Path)):
        sessions = load_workload(sessions)
    if not isinstance(sessions, Workload):
        return sessions
    if concurrency is not None:
        return closed_loop(sessions, seed, concurrency, spawn_rate)
    if sessions.load.shape.kind != "poisson":
        raise KvlabError(f"workload {sessions.name}: give a number of users (closed loop), or use its poisson "
                         f"shape for open-loop arrivals (its shape is {sessions.load.shape.kind})")
    return sessions.sessions(seed)


def predicted_max_users(num_blocks: int, block_size: int, plans: Iterable[SessionPlan], limit: int = 100_000) -> int:
    """How many of `plans`, in order, could hold their final contexts in the KV cache at once:
    each app's shared system prompt once (its full blocks), every session's own blocks besides, in
    the `num_blocks - 1` blocks that serve requests (block 0 is vLLM's null block). With that many
    concurrent users all at their longest, preemptions can start. At most `limit` plans are read."""
    free = num_blocks - 1
    apps: set[str] = set()
    n = 0
    for plan in islice(plans, limit):
        shared = plan.system_tokens // block_size
        own = ceil((plan.context_tokens_at_end - 1) / block_size) - shared  # the last token's KV is never written
        need = own + (0 if plan.app_id in apps else shared)
        if need > free:
            break
        free -= need
        apps.add(plan.app_id)
        n += 1
    return n
