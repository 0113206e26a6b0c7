"""The Locust baselines bench/loadgen_capacity.py measures kvlab's client against: the least a
Locust user can do per SSE line and still time it (each one times every line, keeps the gaps, and
reads the usage chunk; neither reports anything per chunk to Locust's stats).

    locust -f bench/locust_baselines.py MinimalUser     # FastHttpUser, geventhttpclient readline
    locust -f bench/locust_baselines.py HttpLinesUser   # HttpUser (requests), iter_lines

BENCH_LOG (environment): a file that gets one line "end_unix_ts completion_tokens" per successful
reply when Locust quits.
"""

from __future__ import annotations

import json
import os
import time

from locust import FastHttpUser, HttpUser, events, task

MAX_TOKENS = int(os.environ.get("BENCH_MAX_TOKENS", "128"))
BODY = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "Task bench: go"}],
                   "max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True}})
HEADERS = {"Content-Type": "application/json"}
DONE: list[tuple[float, int]] = []


@events.quitting.add_listener
def _write_log(environment, **_kw) -> None:
    path = os.environ.get("BENCH_LOG")
    if path:
        with open(path, "w") as fh:
            fh.writelines(f"{t:.6f} {n}\n" for t, n in DONE)


class _Timing:
    """Per line: the arrival time, the gap to the previous data line, the usage chunk read."""

    __slots__ = ("t0", "first", "last", "gaps", "usage")

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.first = self.last = None
        self.gaps: list[float] = []
        self.usage = None

    def line(self, line: bytes, now: float) -> None:
        if line.startswith(b"data: {"):
            if b'"usage"' in line:
                self.usage = json.loads(line[6:])["usage"]
                return
            if self.first is None:
                self.first = now - self.t0
            else:
                self.gaps.append(now - self.last)
            self.last = now

    def finish(self, resp) -> None:
        """The reply's verdict to Locust, and its end time and tokens to the bench's log."""
        if self.usage is None:
            resp.failure("no usage chunk")
            return
        resp.success()
        DONE.append((time.time(), self.usage["completion_tokens"]))


class MinimalUser(FastHttpUser):
    @task
    def chat(self) -> None:
        t = _Timing()
        with self.client.post("/v1/chat/completions", data=BODY, headers=HEADERS, stream=True,
                              catch_response=True, name="chat") as resp:
            raw = resp._response
            while line := raw.readline(b"\n"):
                t.line(line, time.perf_counter())
            t.finish(resp)


class HttpLinesUser(HttpUser):
    @task
    def chat(self) -> None:
        t = _Timing()
        with self.client.post("/v1/chat/completions", data=BODY, headers=HEADERS, stream=True,
                              catch_response=True, name="chat") as resp:
            for line in resp.iter_lines():
                t.line(line, time.perf_counter())
            t.finish(resp)
