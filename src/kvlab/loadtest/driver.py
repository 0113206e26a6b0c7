"""The per-process side of a load run, independent of Locust: which session comes next, the
calibration probes, the request body, and the record of every request.

The Locust user (loadtest/locustfile.py) hands it a `Transport` that sends one streamed request and
reports it to Locust's stats; tests hand it a plain one. Locust runs users as greenlets, so the
lock below is gevent's once Locust has monkey-patched `threading`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterator, Protocol

from kvlab.loadtest.plan import SessionPlan
from kvlab.loadtest.records import RecordWriter, RequestRecord
from kvlab.loadtest.render import Calibration, CalibrationError, TextMaker, probe_messages
from kvlab.loadtest.session import SessionRun, TurnRequest
from kvlab.loadtest.stream import StreamResult, failed, http_error_kind
from kvlab.loadtest.workload import Workload

RETRY_PAUSE_S = 1.0  # after a failed calibration probe (server down): try again this much later


class Transport(Protocol):
    def stream_chat(self, path: str, body: dict, name: str) -> tuple[int | None, StreamResult]:
        """POST `body` with stream=True; (HTTP status or None, measured stream)."""
        ...

    def get_json(self, path: str) -> tuple[int | None, dict | None]:
        """GET a JSON document: (HTTP status or None, the document or None)."""
        ...


@dataclass(frozen=True)
class RunBounds:
    duration_s: float
    max_requests: int | None  # this process's share


class AgentDriver:
    def __init__(self, workload: Workload, seed: int, writer: RecordWriter | None, bounds: RunBounds,
                 worker_index: int = 0, worker_count: int = 1, sizing: Calibration | None = None) -> None:
        """sizing: prompts sized without probes (--no-calibrate: a local tokenizer or a stated
        tokens-per-word ratio); None: calibrate on the server's usage before the first turn."""
        self.workload = workload
        self.seed = seed
        self.writer = writer
        self.bounds = bounds
        self.sizing = sizing
        self.text = TextMaker(seed, sizing or Calibration())
        self.model = workload.request.model
        self.ignore_eos = workload.request.ignore_eos
        self.calibrated = False
        self.fatal: str | None = None  # calibration cannot fit: the run stops, it does not retry
        self.probe_tokens: dict[str, int] = {}  # probe name -> measured prompt tokens
        self.app_system_tokens: dict[str, int | None] = {}
        self.requests_sent = 0
        self.in_flight = 0
        self.t0 = time.time()
        self._sessions: Iterator[SessionPlan] = workload.sessions(seed, worker_index, worker_count)
        self._lock = threading.Lock()

    def start(self) -> None:
        """The test starts now: open-loop session offsets count from here."""
        self.t0 = time.time()

    # --- bounds -------------------------------------------------------------------------------

    @property
    def exhausted(self) -> bool:
        """No more requests may start: the request bound is reached."""
        m = self.bounds.max_requests
        return m is not None and self.requests_sent >= m

    def next_session(self) -> SessionRun | None:
        """The next session of this process's stream, None when the run is over for it."""
        if self.exhausted:
            return None
        with self._lock:
            plan = next(self._sessions)
        if plan.start_offset_s >= self.bounds.duration_s:
            return None
        return SessionRun(plan)

    # --- requests -----------------------------------------------------------------------------

    def body(self, messages: list[dict], max_tokens: int) -> dict:
        req = self.workload.request
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, "temperature": req.temperature}
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body

    def _send(self, transport: Transport, messages: list[dict], max_tokens: int, name: str) -> tuple[float, int | None, StreamResult]:
        start_ts = time.time()
        status, res = transport.stream_chat(self.workload.request.endpoint, self.body(messages, max_tokens), name)
        return start_ts, status, res

    def _record(self, start_ts: float, status: int | None, res: StreamResult, *, kind: str,
                run: SessionRun | None = None, turn: int = -1, max_tokens: int = 1,
                planned: int | None = None, start_lag_s: float | None = None,
                probe: str | None = None, app_id: str | None = None) -> None:
        if self.writer is None:
            return
        plan = run.plan if run else None
        self.writer.write(RequestRecord(
            start_ts=start_ts, kind=kind, probe=probe, session_id=plan.session_id if plan else None,
            app_id=plan.app_id if plan else app_id, turn=turn, turns_planned=len(plan.turns) if plan else 0,
            status_code=status, error_kind=res.error_kind, error_detail=res.error_detail,
            ttft_s=res.ttft_s, itl_s=res.itl_s, tpot_s=res.tpot_s, e2e_s=res.e2e_s,
            prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
            cached_tokens=res.cached_tokens, planned_prompt_tokens=planned,
            system_tokens=self.app_system_tokens.get(plan.app_id) if plan else None,
            max_tokens=max_tokens, finish_reason=res.finish_reason, chunks=res.chunks, start_lag_s=start_lag_s))

    def _probe(self, transport: Transport, probe: str, messages: list[dict], app_id: str | None = None) -> int | None:
        """One max_tokens=1 request; its measured prompt tokens (None if it failed)."""
        name = f"probe {app_id or probe}"
        start_ts, status, res = self._send(transport, messages, 1, name)
        if status == 400 and self.ignore_eos and res.error_kind == "http_4xx":
            # A server that refuses vLLM's `ignore_eos`: output lengths then end at EOS.
            self.ignore_eos = False
            start_ts, status, res = self._send(transport, messages, 1, name)
        self._record(start_ts, status, res, kind="probe", probe=probe, app_id=app_id)
        if res.ok and res.prompt_tokens is not None:
            self.probe_tokens[probe] = res.prompt_tokens
            return res.prompt_tokens
        return None

    def calibrate(self, transport: Transport) -> bool:
        """Once per process: the model name, then probes A, B, C (render.py) unless prompts are
        sized without them. False if the server could not answer (the failures are recorded; the
        next turn tries again). Raises CalibrationError when the server answered with usage counts
        that cannot size prompts: that does not get better by retrying."""
        if self.calibrated:  # every turn asks: no lock once it is done
            return True
        with self._lock:
            if self.fatal is not None:
                raise CalibrationError(self.fatal)
            if self.calibrated:
                return True
            if self.model is None and not self._discover_model(transport):
                return False
            if self.sizing is not None:
                self.calibrated = True
                return True
            counts = [self._probe(transport, k, probe_messages(k)) for k in ("A", "B", "C")]
            if any(c is None for c in counts):
                return False
            try:
                calibration = Calibration.fit(*counts)  # type: ignore[arg-type]
            except CalibrationError as e:
                self.fatal = str(e)
                now = time.time()
                self._record(now, None, failed("calibration", self.fatal, 0.0, 0.0), kind="probe", probe="fit")
                raise
            self.text = TextMaker(self.seed, calibration)
            self.calibrated = True
            return True

    def _discover_model(self, transport: Transport) -> bool:
        """The served model's name from GET /v1/models; a failure is recorded like a failed probe."""
        start_ts, t0 = time.time(), time.perf_counter()
        status, doc = transport.get_json("/v1/models")
        data = (doc or {}).get("data") if isinstance(doc, dict) else None
        if data and isinstance(data[0], dict) and "id" in data[0]:
            self.model = data[0]["id"]
            return True
        kind = "connect" if status is None else http_error_kind(status) if status >= 400 else "bad_response"
        self._record(start_ts, status, failed(kind, "GET /v1/models gave no model", t0, time.perf_counter()),
                     kind="probe", probe="models", max_tokens=0)
        return False

    def measure_app(self, transport: Transport, run: SessionRun) -> None:
        """Tokens the app's shared prefix adds (probe [system, user ""] minus probe B)."""
        app = run.plan.app_id
        if app in self.app_system_tokens:
            return
        with self._lock:
            if app in self.app_system_tokens:
                return
            self.app_system_tokens[app] = None
            if run.plan.system_tokens <= 0:
                self.app_system_tokens[app] = 0
                return
            if "B" not in self.probe_tokens:  # no calibration probes (--no-calibrate): nothing to subtract
                return
            msgs = [run.messages[0], {"role": "user", "content": ""}]
            n = self._probe(transport, "app", msgs, app_id=app)
            if n is not None:
                self.app_system_tokens[app] = n - self.probe_tokens["B"]

    def session_start_in_s(self, run: SessionRun) -> float:
        """Seconds until an open-loop session is due (<= 0: due or late)."""
        return self.t0 + run.plan.start_offset_s - time.time()

    def play_turn(self, run: SessionRun, transport: Transport) -> float | None:
        """Send the session's next turn. Returns the pause before the next one, or None when no
        request was sent (the bound is reached)."""
        if not self.calibrate(transport):
            return RETRY_PAUSE_S
        run.begin(self.text)
        if run.turn == 0:
            self.measure_app(transport, run)
        if not self._take_request():
            return None
        lag = None
        if run.turn == 0 and self.workload.load.shape.kind == "poisson":
            lag = max(0.0, -self.session_start_in_s(run))
        res = self._send_turn(transport, run, run.next_request(), lag)
        if not res.ok:
            run.abort()
            # a server that refuses connections (down, restarting) is not hammered: wait a moment
            return RETRY_PAUSE_S if res.error_kind == "connect" else 0.0
        return run.add_reply(res.text, res.completion_tokens)

    def _take_request(self) -> bool:
        with self._lock:
            if self.exhausted:
                return False
            self.requests_sent += 1
            return True

    def _send_turn(self, transport: Transport, run: SessionRun, req: TurnRequest, lag: float | None) -> StreamResult:
        """Send and record one turn; a user stopped mid-request is recorded as cancelled."""
        meta = dict(kind="turn", run=run, turn=req.turn, max_tokens=req.max_tokens,
                    planned=req.planned_prompt_tokens, start_lag_s=lag)
        start_ts = time.time()
        self.in_flight += 1
        try:
            start_ts, status, res = self._send(transport, req.messages, req.max_tokens, self.workload.name)
        except BaseException as e:
            if not isinstance(e, Exception):  # GreenletExit: the end of the run or a ramp-down
                self._record(start_ts, None, StreamResult(error_kind="cancelled", error_detail=type(e).__name__,
                                                          e2e_s=time.time() - start_ts), **meta)
            raise
        finally:
            self.in_flight -= 1
        self._record(start_ts, status, res, **meta)
        return res
