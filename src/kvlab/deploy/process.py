"""A server process in its own process group, stopped as a whole: SIGINT, SIGTERM, then SIGKILL.

A lease file (optional) names the group while it runs, so that what a killed kvlab (kill -9, the
OOM killer) left running can be found and stopped later: `stop_leftover(lease)`."""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import psutil

from kvlab.schema import RecordError
from kvlab.schema.lease import ServerLease

# Seconds to wait after each signal before escalating (vLLM shuts its engine core down on SIGINT).
STOP_GRACE_S = {signal.SIGINT: 20.0, signal.SIGTERM: 10.0, signal.SIGKILL: 10.0}

_LIVE: "weakref.WeakSet[ProcessGroup]" = weakref.WeakSet()


@dataclass(frozen=True)
class StopReport:
    signals_sent: tuple[str, ...]
    exit_code: int | None
    survivors: tuple[int, ...]  # pids of the group still alive after SIGKILL (should be empty)


class ProcessGroup:
    """One child process started with start_new_session=True: its pid is the group id."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, lease: Path | None = None):
        self.argv = argv
        self.log_path = log_path
        self.lease = lease
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        try:
            self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        except OSError:
            self._log.close()
            raise
        self.pgid = self.proc.pid
        self._known: set[int] = {self.proc.pid}
        _LIVE.add(self)
        if lease is not None:
            _write_lease(lease, self.proc.pid, argv, log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def members(self) -> list[int]:
        """Live processes of the group, plus descendants seen earlier that left it."""
        self._known.update(self._descendants())
        return live_processes(self.pgid, self._known)

    def _descendants(self) -> set[int]:
        try:
            return {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def stop(self, grace_s: dict[signal.Signals, float] | None = None) -> StopReport:
        """SIGINT the group, then SIGTERM, then SIGKILL, until nothing of it is left."""
        grace_s = {**STOP_GRACE_S, **(grace_s or {})}
        sent = []
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            members = self.members()
            if not members:
                break
            self._signal(sig, members)
            sent.append(sig.name)
            if self._wait_gone(grace_s[sig]):
                break
        self.proc.poll()
        self._log.close()
        _LIVE.discard(self)
        survivors = tuple(self.members())
        if self.lease is not None and not survivors:
            self.lease.unlink(missing_ok=True)
        return StopReport(tuple(sent), self.proc.returncode, survivors)

    def _signal(self, sig: signal.Signals, members: list[int]) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass
        for pid in members:  # descendants that moved to another group
            try:
                if os.getpgid(pid) != self.pgid:
                    os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _wait_gone(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.proc.poll()  # reap our child so that it does not linger as a zombie
            if not self.members():
                return True
            time.sleep(0.2)
        return False


def live_processes(pgid: int, pids: set[int] = frozenset()) -> list[int]:
    """Running processes of process group pgid, or among pids (a zombie has ended: not counted)."""
    alive = []
    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and (p.pid in pids or os.getpgid(p.pid) == pgid):
                alive.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return alive


def _write_lease(lease: Path, pid: int, argv: list[str], log_path: Path) -> None:
    try:
        created = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:  # died at once: nothing to lease
        return
    ServerLease(pid=pid, pgid=pid, create_time=created, program=argv[:3], log=str(log_path), kvlab_pid=os.getpid(),
                kvlab_create_time=psutil.Process().create_time()).write(lease)


def _read_lease(lease: Path) -> ServerLease | None:
    """The lease, or None where it is missing, torn or no lease (then removed). A lease of another
    layout is refused (one line naming its version): the group it names is not judged blindly."""
    try:
        info = ServerLease.read_optional(lease)
    except RecordError:
        try:
            version = json.loads(lease.read_text()).get("schema_version", 0)
        except (OSError, ValueError, AttributeError):
            version = 0
        if version not in (0, ServerLease.VERSION):
            raise
        info = None
    if info is None:
        lease.unlink(missing_ok=True)
    return info


def _same_process(pid: int, created: float) -> bool:
    """pid still runs and is the process started at `created` (not a reused pid)."""
    try:
        return abs(psutil.Process(pid).create_time() - created) < 1.0
    except (psutil.NoSuchProcess, ValueError):
        return False


def stop_leftover(lease: Path, grace_s: float = 10.0) -> str | None:
    """Stop the process group a lease names if it still runs (the same process: pid and start time)
    and its kvlab is gone; remove the lease. Returns what was stopped, or None."""
    info = _read_lease(lease)
    if info is None:
        return None
    pid, created, owner = info.pid, info.create_time, info.kvlab_pid
    if owner != os.getpid() and _same_process(owner, info.kvlab_create_time):
        return None  # its kvlab still runs (another run in the same folder): not ours to stop
    what = None
    # A pid is not reused while a process group of that id lives: members left are the server's.
    if _same_process(pid, created) or live_processes(pid):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace_s
            while live_processes(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not live_processes(pid):
                break
        what = f"process group {pid} ({' '.join(info.program)}; log: {info.log})"
    lease.unlink(missing_ok=True)
    return what


@atexit.register
def _stop_all() -> None:
    """Nothing left running when the interpreter exits, whatever happened before."""
    for group in list(_LIVE):
        group.stop()
