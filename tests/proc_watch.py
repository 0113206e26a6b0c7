"""Which processes a test run started, by an environment tag every child inherits, and their
process groups: after a fault, none of them may be left."""

from __future__ import annotations

import os
import threading
import time
import uuid

import psutil

TAG_ENV = "KVLAB_TEST_RUN"


def new_tag() -> str:
    return f"kvlab-test-{uuid.uuid4().hex[:12]}"


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes (not zombies) whose environment carries the tag, this one excepted."""
    out = []
    for p in psutil.process_iter(["status"]):
        if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if p.environ().get(TAG_ENV) == tag:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def group_members(pgids: set[int]) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) in pgids:
                out.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return out


class GroupWatch:
    """Records, while a run goes on, the process groups of the tagged processes (the server's,
    Locust's); `leftovers()` lists what is still alive of any of them, or still tagged."""

    def __init__(self, tag: str, every_s: float = 0.2):
        self.tag = tag
        self.every_s = every_s
        self.pgids: set[int] = set()
        self.seen: dict[int, tuple[int, str]] = {}  # pid -> (process group, command line)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "GroupWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def sample(self) -> None:
        for p in tagged(self.tag):
            try:
                pgid = os.getpgid(p.pid)
                if pgid != os.getpgid(0):  # the test's own group is not the run's
                    self.pgids.add(pgid)
                self.seen[p.pid] = (pgid, " ".join(p.cmdline())[:300])
            except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
                continue

    def groups_with(self, word: str) -> set[int]:
        """The groups of processes whose command line held `word` (e.g. fake_openai.py, locust)."""
        return {pgid for pgid, cmd in self.seen.values() if word in cmd}

    def leftovers(self, wait_s: float = 5.0) -> list[str]:
        """What is left after up to wait_s (a process that was just signalled may take a moment)."""
        deadline = time.monotonic() + wait_s
        while True:
            left = {p.pid: p for p in [*tagged(self.tag), *group_members(self.pgids)]}
            if not left or time.monotonic() > deadline:
                return [f"{pid}: {self._cmd(p)}" for pid, p in left.items()]
            time.sleep(0.2)

    @staticmethod
    def _cmd(p: psutil.Process) -> str:
        try:
            return " ".join(p.cmdline())[:200]
        except psutil.Error:
            return "?"
