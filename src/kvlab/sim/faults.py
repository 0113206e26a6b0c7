"""Faults `kvlab sim serve` injects on purpose, to rehearse failures on a simulated server.

kvlab's own testing option, not a vLLM flag: `--fault SPEC` (repeatable), or specs separated by
spaces in $KVLAB_SIM_FAULT (which leaves an experiment spec, and so its results folder, unchanged:
unset it and rerun the same command to complete the run). Every injected fault logs one line
starting "injected fault SPEC". Requests are numbered from 1 in arrival order over
/v1/chat/completions and /v1/completions (a load generator's calibration probes included); a
request gets the first request fault, in the order given, whose EVERY divides its number.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from kvlab.errors import KvlabError
from kvlab.sim import logs

FAULT_ENV = "KVLAB_SIM_FAULT"

# kind: (parameters, what it does); the help and the error messages list these.
KINDS = {
    "http-5xx": ("[:EVERY]", "chat and completions requests answered HTTP 500 with vLLM's error JSON (every one, or "
                             "every EVERY-th)"),
    "stall": (":AFTER_TOKENS:SECONDS[:EVERY]", "a streamed answer goes silent for SECONDS (wall) after "
                                              "AFTER_TOKENS tokens, then resumes (every one, or every EVERY-th "
                                              "request)"),
    "malformed-sse": ("[:EVERY]", "a streamed answer's second token event is sent as truncated JSON, "
                                  "then the stream ends (every one, or every EVERY-th request)"),
    "metrics-gone": (":AFTER", "/metrics answers 404 after AFTER answers"),
    "die-after": (":SECONDS", "the process exits with code 1 SECONDS (wall) after it started answering, like a "
                              "crashed engine"),
    "never-healthy": ("", "the server listens and serves, but /health answers 503 forever"),
    "fail-start": ("", "exits 1 at start with vLLM's 'larger than the available KV cache memory' error"),
}
_ARITY = {"http-5xx": (0, 1), "stall": (2, 3), "malformed-sse": (0, 1), "metrics-gone": (1,), "die-after": (1,),
          "never-healthy": (0,), "fail-start": (0,)}  # how many parameters each kind takes
REQUEST_KINDS = ("http-5xx", "stall", "malformed-sse")


@dataclass(frozen=True)
class Fault:
    spec: str  # as given, for the log lines
    kind: str
    every: int = 1  # request faults: every EVERY-th request
    after: int = 0  # stall: tokens before the silence; metrics-gone: answers before the 404s
    seconds: float = 0.0  # stall: the silence; die-after: the time to live


def kinds_line() -> str:
    return ", ".join(f"{kind}{params}" for kind, (params, _) in KINDS.items())


def help_text() -> str:
    return "; ".join(f"{kind}{params}: {what}" for kind, (params, what) in KINDS.items())


def _whole(value: str, name: str, least: int) -> int:
    try:
        n = int(value)
    except ValueError:
        n = None
    if n is None or n < least:
        raise ValueError(f"{name} must be a whole number >= {least}, got {value!r}")
    return n


def _seconds(value: str, name: str) -> float:
    try:
        s = float(value)
    except ValueError:
        s = None
    if s is None or not 0 < s < float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return s


def _parse_one(spec: str) -> Fault:
    kind, *p = spec.split(":")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    if len(p) not in _ARITY[kind]:
        raise ValueError(f"{kind} is written {kind}{KINDS[kind][0]}")
    if kind in ("http-5xx", "malformed-sse"):
        return Fault(spec, kind, every=_whole(p[0], "EVERY", 1) if p else 1)
    if kind == "stall":
        return Fault(spec, kind, after=_whole(p[0], "AFTER_TOKENS", 0), seconds=_seconds(p[1], "SECONDS"),
                     every=_whole(p[2], "EVERY", 1) if len(p) == 3 else 1)
    if kind == "metrics-gone":
        return Fault(spec, kind, after=_whole(p[0], "AFTER", 0))
    if kind == "die-after":
        return Fault(spec, kind, seconds=_seconds(p[0], "SECONDS"))
    return Fault(spec, kind)


def parse_faults(flags: list[str], env: str | None = None) -> tuple[Fault, ...]:
    """--fault values, then $KVLAB_SIM_FAULT's; a bad spec or a kind given twice is a KvlabError."""
    given = [("argument --fault", s) for s in flags] + [(f"${FAULT_ENV}", s) for s in (env or "").split()]
    faults: list[Fault] = []
    for source, spec in given:
        try:
            fault = _parse_one(spec.strip())
        except ValueError as e:
            raise KvlabError(f"{source}: invalid fault {spec!r}: {e} (kinds: {kinds_line()})") from None
        if any(f.kind == fault.kind for f in faults):
            raise KvlabError(f"{source}: fault {fault.kind} is given twice ({spec!r}); give each kind once")
        faults.append(fault)
    return tuple(faults)


class FaultPlan:
    """The faults of one server and what they have counted so far."""

    def __init__(self, faults: tuple[Fault, ...]):
        self.faults = {f.kind: f for f in faults}
        self.requests = 0  # chat/completions requests so far
        self.metrics_answers = 0  # /metrics answered so far
        self.metrics_gone_said = False

    def get(self, kind: str) -> Fault | None:
        return self.faults.get(kind)

    def next_request(self) -> tuple[int, Fault | None]:
        """The next chat/completions request's number, and its fault (None: answered normally)."""
        self.requests += 1
        n = self.requests
        return n, next((f for f in self.faults.values() if f.kind in REQUEST_KINDS and n % f.every == 0), None)

    def metrics_gone(self) -> bool:
        """True when this /metrics request is to be answered 404 (says so in the log the first time)."""
        f = self.faults.get("metrics-gone")
        if f is None or self.metrics_answers < f.after:
            self.metrics_answers += 1
            return False
        if not self.metrics_gone_said:
            self.metrics_gone_said = True
            injected(f, f"/metrics answers 404 from now on, after {self.metrics_answers} answers")
        return True


def injected(fault: Fault, what: str, level: str = "WARNING") -> None:
    """The one log line of an injected fault."""
    logs.log("APIServer", "kvlab_sim", f"injected fault {fault.spec} (kvlab sim serve --fault): {what}", level=level)


def fail_start(fault: Fault, cfg) -> None:
    """vLLM's start that fails sizing the KV cache (cfg: a SimConfig): its error line, then exit code 1."""
    cap = cfg.capacity
    needed = -(-cfg.max_model_len // cap.block_size) * cap.bytes_per_block  # one request at max_model_len
    injected(fault, "the engine fails at start, as vLLM does when the KV cache cannot hold one request", "ERROR")
    logs.log("EngineCore", "core.py:1010", "EngineCore failed to start.", level="ERROR")
    sys.stdout.write(
        f"ValueError: To serve at least one request with the model's max seq len ({cfg.max_model_len}), "
        f"({logs.format_gib(needed)} GiB KV cache is needed, which is larger than the available KV cache "
        "memory (0.0 GiB). Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when "
        "initializing the engine.\n")
    sys.stdout.flush()
    raise SystemExit(1)


def die(fault: Fault) -> None:
    """The engine dies: one line saying why, then the process is gone (exit code 1), connections dropped."""
    injected(fault, f"the engine dies now, {fault.seconds:g} s after the server started answering; the process "
                    "exits with code 1", "ERROR")
    sys.stderr.flush()
    os._exit(1)
