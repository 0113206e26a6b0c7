"""Agent-style load on an OpenAI-compatible server (vLLM), for plain Locust.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --workload agent -u 8 -t 60s --headless --csv out/locust

Options added to Locust's own: --workload NAME|PATH (loadtest/NAME.yaml), --shape
constant|steps|poisson|diurnal, --seed N, --records DIR (per-request records, default
<--csv prefix>_requests or ./kvlab-records), --max-requests N, --no-calibrate with --tokenizer PATH or
--tokens-per-word X (size prompts without probing the server's usage). -u is the peak user count
(for poisson: session slots) and -t the run time; without them the workload's `load:` defaults apply.
Scale-out: one `--master` and N `--worker` processes (see docs/load.md).

The workload logic (sessions, calibration, streaming measurements, records) lives in
kvlab.loadtest; this file only wires it to Locust's HTTP client, stats and load shapes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import struct
import sys
import time
from collections import Counter

import gevent
import gevent.socket
import geventhttpclient.client
import geventhttpclient.connectionpool
import locust.stats
import orjson
from locust import FastHttpUser, LoadTestShape, events, task
from locust.exception import StopUser
from locust.runners import STATE_CLEANUP, STATE_STOPPED, STATE_STOPPING, MasterRunner, WorkerRunner

from kvlab.errors import KvlabError
from kvlab.io import write_text_atomic
from kvlab.loadtest.driver import AgentDriver, RunBounds
from kvlab.loadtest.records import FLUSH_EVERY_S, RecordWriter
from kvlab.loadtest.render import Calibration, CalibrationError
from kvlab.loadtest.shapes import SHAPES, ShapePlan
from kvlab.loadtest.stream import ChatStream, StreamResult, failed, http_error_kind
from kvlab.loadtest.workload import Workload, load_workload

log = logging.getLogger("kvlab.loadtest")
STATE: dict = {}  # this process's workload, driver and record writer


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--workload", default="agent", help="kvlab workload profile: name in loadtest/ or a YAML path")
    parser.add_argument("--shape", choices=SHAPES, default=None, help="Load shape (default: the workload's)")
    parser.add_argument("--seed", type=int, default=0, help="Session stream seed")
    parser.add_argument("--records", default=None, help="Folder for per-request records")
    parser.add_argument("--max-requests", type=int, default=None, help="Stop after this many requests (default: the workload's)")
    parser.add_argument("--no-calibrate", action="store_true", default=False,
                        help="Size prompts without probing the server's usage: from --tokenizer or --tokens-per-word")
    parser.add_argument("--tokenizer", default=None, help="With --no-calibrate: a local tokenizer folder (the model's or a twin's)")
    parser.add_argument("--tokens-per-word", type=float, default=None, help="With --no-calibrate: tokens per filler word")
    # Set by kvlab's runner with --tokens-per-word when it counted with --tokenizer itself: the
    # chat template's tokens per request and per message.
    parser.add_argument("--kvlab-template-tokens", default=None, include_in_web_ui=False, help="(internal)")
    # kvlab load's progress: where each process writes its users and turns in flight every second.
    parser.add_argument("--kvlab-live", default=None, include_in_web_ui=False, help="(internal)")
    # Set by the master at test start, for its workers: how to split the session stream, how long.
    parser.add_argument("--kvlab-worker-count", type=int, default=1, include_in_web_ui=False, help="(internal)")
    parser.add_argument("--kvlab-duration-s", type=float, default=None, include_in_web_ui=False, help="(internal)")


def workload() -> Workload:
    return STATE["workload"]


@events.init.add_listener
def _init(environment, **_kw) -> None:
    opts = environment.parsed_options
    if opts is None:  # Locust used as a library: nothing to configure from the command line
        return
    try:
        wl = load_workload(opts.workload).with_shape(opts.shape)
    except KvlabError as e:
        sys.stderr.write(f"kvlab: error: {e}\n")
        sys.exit(2)
    STATE["workload"] = wl
    try:
        STATE["sizing"] = _sizing(opts)
    except KvlabError as e:
        sys.stderr.write(f"kvlab: error: {e}\n")
        sys.exit(2)
    AgentUser.network_timeout = wl.request.stall_timeout_s
    AgentUser.connection_timeout = wl.request.connect_timeout_s
    # vLLM's --api-key: read from the environment only, so it is never on a command line or in a file.
    key = os.environ.get("KVLAB_API_KEY") or os.environ.get("OPENAI_API_KEY")
    AgentUser.default_headers = {"Authorization": f"Bearer {key}"} if key else None


def _sizing(opts) -> Calibration | None:
    """None: calibrate on the server's usage; else prompts sized as --no-calibrate says."""
    from kvlab.loadtest import sizing

    chosen = sizing.requested(not opts.no_calibrate, opts.tokenizer, opts.tokens_per_word, workload().prompt_sizing)
    if chosen is None:
        return None
    tokenizer, tokens_per_word = chosen
    if tokenizer:
        return sizing.from_tokenizer(tokenizer)
    cal = sizing.from_tokens_per_word(tokens_per_word)
    if opts.kvlab_template_tokens:  # counted by kvlab's runner with a tokenizer
        base, message = (float(x) for x in opts.kvlab_template_tokens.split(","))
        cal = Calibration(tokens_per_word=cal.tokens_per_word, message_tokens=message, base_tokens=base,
                          method="tokenizer")
    return cal


def _records_dir(opts) -> str:
    if opts.records:
        return opts.records
    if opts.csv_prefix:
        return f"{opts.csv_prefix}_requests"
    return os.path.join("kvlab-records", time.strftime("%Y%m%d-%H%M%S"))


def _bounds(environment, worker_count: int) -> RunBounds:
    opts, wl = environment.parsed_options, workload()
    limit = opts.max_requests or wl.load.max_requests
    return RunBounds(duration_s=opts.run_time or opts.kvlab_duration_s or wl.load.duration_s,
                     max_requests=math.ceil(limit / worker_count) if limit else None)


@events.test_start.add_listener
def _test_start(environment, **_kw) -> None:
    runner, opts = environment.runner, environment.parsed_options
    if isinstance(runner, MasterRunner):
        opts.kvlab_worker_count = max(1, runner.worker_count)
        opts.kvlab_duration_s = opts.run_time or workload().load.duration_s
        return
    if "workload" not in STATE:
        _init(environment)
    index = runner.worker_index if isinstance(runner, WorkerRunner) else 0
    count = opts.kvlab_worker_count if isinstance(runner, WorkerRunner) else 1
    writer = RecordWriter(_records_dir(opts), batch_s=FLUSH_EVERY_S)
    STATE.update(writer=writer, driver=AgentDriver(workload(), opts.seed, writer, _bounds(environment, count),
                                                   worker_index=index, worker_count=max(count, index + 1),
                                                   sizing=STATE.get("sizing")))
    STATE["driver"].start()
    STATE["flusher"] = gevent.spawn(_flush_records, writer)
    if opts.kvlab_live:
        STATE["live"] = gevent.spawn(_write_live, environment, os.path.join(opts.kvlab_live, f"process-{index}.json"))
    log.info("kvlab: workload %s, worker %d of %d, records in %s", workload().name, index, count, writer.folder)


def _flush_records(writer: RecordWriter) -> None:
    """Records are written in batches; a quiet spell still gets them to disk within a second."""
    while True:
        gevent.sleep(FLUSH_EVERY_S)
        writer.flush()


def _write_live(environment, path: str) -> None:
    """Every second, this process's users and the turns it has in flight (kvlab load shows them
    while no turn has ended yet); a progress file for `kvlab load`, not a record: it deletes it."""
    from kvlab.loadtest.records import LiveCounts

    while True:
        driver = STATE.get("driver")
        LiveCounts(users=environment.runner.user_count, in_flight=driver.in_flight if driver else 0).write(path)
        gevent.sleep(1.0)


@events.test_stop.add_listener
def _test_stop(environment, **_kw) -> None:
    for name in ("flusher", "live"):
        greenlet = STATE.pop(name, None)
        if greenlet is not None:
            greenlet.kill(block=False)
    writer = STATE.pop("writer", None)
    if writer is not None:
        writer.close()


@events.quitting.add_listener
def _let_csv_catch_up(environment, **_kw) -> None:
    # Locust's CSV writer rewrites the files every second and only closes them at exit: give it
    # one more pass so that --csv holds the final counts (the requests that ended in the last second).
    opts = environment.parsed_options
    if opts is not None and opts.csv_prefix and not isinstance(environment.runner, WorkerRunner):
        gevent.sleep(1.2)


FATAL_FILE = "fatal-{pid}.txt"  # in the records folder: why this process stopped the run


def _stop_on_fatal(environment, message: str) -> None:
    """A failure that retrying cannot cure (calibration that cannot fit): one line on stderr and
    in the records folder (kvlab's runner reads it), a non-zero exit, and the run ends now."""
    if STATE.get("fatal"):
        return
    STATE["fatal"] = message
    sys.stderr.write(f"kvlab: error: {message}\n")
    log.error("kvlab: %s", message)
    writer = STATE.get("writer")
    if writer is not None:
        writer.flush()
        write_text_atomic(writer.folder / FATAL_FILE.format(pid=os.getpid()), message + "\n")
    environment.process_exit_code = 3
    gevent.spawn(environment.runner.quit)


def _quit_when_idle(environment) -> None:
    """The request bound is reached: let in-flight requests finish, then end the run."""
    driver = STATE.get("driver")
    deadline = time.monotonic() + max(environment.stop_timeout or 0, 1)
    while driver is not None and driver.in_flight and time.monotonic() < deadline:
        gevent.sleep(0.05)
    environment.runner.quit()


_LOCUST_BUCKET = locust.stats.bucket_response_time


def log_many(stats, method: str, name: str, times_ms: list[float]) -> None:
    """Many response times of one kind in one step, as Locust's StatsEntry.log would count them
    one by one (the entry and the total: count, sum, min, max, rounded histogram, per second).
    One request event per inter-token gap costs more CPU than reading the chunk itself."""
    if not times_ms:
        return
    now = time.time()
    t = int(now)
    n, total, lo, hi = len(times_ms), sum(times_ms), min(times_ms), max(times_ms)
    bucket = locust.stats.bucket_response_time  # looked up here: Locust lets it be replaced
    # Locust's own rounding is round() below 100 ms: the same keys without a call per gap
    buckets = Counter(map(round if bucket is _LOCUST_BUCKET and hi < 100 else bucket, times_ms))
    for entry in (stats.total, stats.get(name, method)):
        last = entry.last_request_timestamp
        if entry.use_response_times_cache and last and t > int(last):
            entry._cache_response_times(t - 1)  # what StatsEntry.log does for the web UI's current percentiles
        entry.num_requests += n
        entry.num_reqs_per_sec[t] += n
        entry.last_request_timestamp = now
        entry.total_response_time += total
        entry.min_response_time = lo if entry.min_response_time is None else min(entry.min_response_time, lo)
        entry.max_response_time = max(entry.max_response_time, hi)
        rt = entry.response_times
        for k, c in buckets.items():
            rt[k] += c


# The kernel's receive time of each read (Linux: SO_TIMESTAMPNS on the TCP socket, CLOCK_REALTIME).
# A chunk stamped when its greenlet gets to read it would also carry the time it waited for this
# process: the other users' chunks that arrived with it, the OS scheduler, the garbage collector.
_SO_TIMESTAMPNS = 35 if sys.platform.startswith("linux") else None  # also SCM_TIMESTAMPNS
_TIMESPEC = struct.Struct("@ll")  # struct timespec: time_t and long, both a C long on Linux
_CMSG_SPACE = socket.CMSG_SPACE(_TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 0


class StampedSocket(gevent.socket.socket):
    """A gevent TCP socket whose recv keeps the kernel's receive time of the bytes it returned
    (`rx_wall`, unix seconds; None where the kernel gave none). recv returns what it always
    returned: the kernel time comes as ancillary data of the same read (recvmsg)."""

    __slots__ = ("rx_wall",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rx_wall: float | None = None
        try:
            self.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        except OSError:
            pass  # no kernel receive times: rx_wall stays None and chunks are stamped on reading

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data, ancillary, _flags, _addr = self.recvmsg(bufsize, _CMSG_SPACE, flags)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(payload) >= _TIMESPEC.size:
                sec, ns = _TIMESPEC.unpack_from(payload)
                self.rx_wall = sec + ns * 1e-9
        return data


class _StampingPool(geventhttpclient.connectionpool.ConnectionPool):
    def _create_tcp_socket(self, family: int, socktype: int, protocol: int):
        if _SO_TIMESTAMPNS is None or not _CMSG_SPACE:
            return super()._create_tcp_socket(family, socktype, protocol)
        return StampedSocket(family, socktype, protocol)


# every plain-HTTP client Locust's FastHttpSession makes in this process gets stamped sockets
geventhttpclient.client.ConnectionPool = _StampingPool


class LocustTransport:
    """One streamed chat completion through the user's FastHttpSession, reported to Locust's
    stats as the POST (E2E), TTFT and TPOT (one event each) and the request's ITL gaps (logged
    together once the request ends, so Locust's tables, web UI and --csv count every gap), all in
    milliseconds."""

    def __init__(self, user: FastHttpUser) -> None:
        self.user = user

    def stream_chat(self, path: str, body: dict, name: str) -> tuple[int | None, StreamResult]:
        t0 = time.perf_counter()
        timeout_s = workload().request.timeout_s
        try:
            with gevent.Timeout(timeout_s):
                status, res = self._post(path, body, name, t0)
        except gevent.Timeout:
            # raised inside Locust's `with` block, which then reports nothing: report it here
            status, res = None, failed("timeout", f"no complete reply in {timeout_s:g} s", t0, time.perf_counter())
            self._fire("POST", name, res.e2e_s, RuntimeError(_failure_message(res, status)))
        if res.ok:
            self._report(name, res)
        return status, res

    def _fire(self, kind: str, name: str, seconds: float, exception: Exception | None = None) -> None:
        self.user.environment.events.request.fire(request_type=kind, name=name, response_time=seconds * 1000,
                                                  response_length=0, exception=exception, context={})

    def _post(self, path: str, body: dict, name: str, t0: float) -> tuple[int | None, StreamResult]:
        stream = ChatStream(t0)
        # A redirect is not followed: load goes only to --host (a 3xx is a bad_response).
        with self.user.client.post(path, data=_json_body(body), headers=JSON_HEADERS, stream=True,
                                   catch_response=True, name=name, allow_redirects=False) as resp:
            status = resp.status_code or None
            error = getattr(resp, "error", None)
            if status is None:
                kind = "stall" if isinstance(error, (TimeoutError, socket.timeout)) else "connect"
                res = failed(kind, type(error).__name__ if error else "no response", t0, time.perf_counter())
            elif 300 <= status < 400:
                res = failed("bad_response", f"HTTP {status} redirect to {resp.headers.get('location')} not followed "
                             "(load goes only to --host)", t0, time.perf_counter())
            elif status >= 400:
                res = failed(http_error_kind(status), f"HTTP {status}: {_error_text(resp)}", t0, time.perf_counter())
            else:
                res = _read_stream(resp, stream)
            resp.request_meta["response_time"] = (res.e2e_s or 0.0) * 1000
            resp.request_meta["response_length"] = len(res.text)
            if res.ok:
                resp.success()
            else:
                resp.failure(_failure_message(res, status))
        return status, res

    def _report(self, name: str, res: StreamResult) -> None:
        # straight into the stats, as Locust's own request listener would log them (no event round trip)
        stats = self.user.environment.stats
        if res.ttft_s is not None:
            stats.log_request("TTFT", name, res.ttft_s * 1000, 0)
        if res.tpot_s is not None:
            stats.log_request("TPOT", name, res.tpot_s * 1000, 0)
        if res.itl_s:
            log_many(stats, "ITL", name, [g * 1000 for g in res.itl_s])

    def get_json(self, path: str) -> tuple[int | None, dict | None]:
        with self.user.client.get(path, name=path, catch_response=True, allow_redirects=False) as resp:
            status = resp.status_code or None
            if status != 200:
                resp.failure(f"HTTP {status}" if status else "connect: no response")
                return status, None
            try:
                return status, resp.json()
            except ValueError:
                resp.failure("bad_response: not JSON")
                return status, None


# what Locust's json= adds, with the body encoded by orjson (an agent's long history costs the standard
# encoder several times more CPU)
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


def _json_body(body: dict) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError:  # what orjson will not write (a lone surrogate in a text): the standard encoder escapes it
        return json.dumps(body).encode()


def _read_stream(resp, stream: ChatStream) -> StreamResult:
    """Each SSE line as soon as its last byte arrives (geventhttpclient's readline returns what the
    socket has; iter_content(1024) would wait for a whole KiB), stamped with the kernel's receive
    time where the socket has one (StampedSocket), else when it is read. The lines that came in the
    same recv as the one readline returned are already in the response's buffer: they are taken
    with it, whole lines only, stamped with the same arrival time, without a readline call each."""
    raw = resp._response  # geventhttpclient response: FastResponse exposes no line reader of its own
    buf = getattr(raw, "_body_buffer", None)
    if not isinstance(buf, bytearray):
        buf = None  # another geventhttpclient layout: line by line
    feed, feed_line, clock = stream.feed, stream.feed_line, time.perf_counter
    sock = getattr(raw, "_sock", None)
    if not isinstance(sock, StampedSocket):
        sock = None  # TLS, or no kernel receive times: stamped when read
    wall, t0 = time.time, stream.t0
    try:
        while line := raw.readline(b"\n"):
            now = clock()
            if sock is not None and sock.rx_wall is not None:
                # The line's last byte came with the latest read: stamped with that read's kernel
                # receive time, on the perf_counter clock (how long ago it arrived, taken off now;
                # an age the request's own span cannot hold, as after a clock step, is not used).
                # Lines that arrived together in one read share the newest one's time.
                age = wall() - sock.rx_wall
                if 0.0 < age < now - t0:
                    now -= age
            cut = buf.rfind(b"\n") + 1 if buf else 0
            if cut:
                data = line + buf[:cut]
                del buf[:cut]
                feed(bytes(data), now)
            else:
                feed_line(line, now)
        # Read to the end of the body (after [DONE] too) so the connection goes back to the pool.
        rest = raw.read()  # a last line without its newline
        if rest:
            feed_line(rest, clock())
    except (TimeoutError, socket.timeout):
        stream.fail("stall", f"no byte for {workload().request.stall_timeout_s:g} s")
    except (OSError, ValueError) as e:  # connection reset, HTTP parse error mid-body
        stream.fail("incomplete", f"{type(e).__name__}: {str(e)[:120]}")
    return stream.finish(time.perf_counter())


def _failure_message(res: StreamResult, status: int | None) -> str:
    """What Locust groups failures by: the kind and a stable detail (the record keeps the rest)."""
    if res.error_kind in ("http_4xx", "http_5xx") or (status and 300 <= status < 400):
        return f"{res.error_kind}: HTTP {status}"
    return f"{res.error_kind}: {res.error_detail}"


def _error_text(resp) -> str:
    try:
        text = resp.text or ""
    except Exception:  # the body of an error response is only a courtesy
        return ""
    return " ".join(text.split())[:160]


class AgentUser(FastHttpUser):
    """An agent: plays sessions one after another, one turn per task, pausing (tool run, think)
    between turns with Locust's wait_time, so a graceful stop never cuts a turn in half."""

    def on_start(self) -> None:
        self.transport = LocustTransport(self)
        self.session = None
        self.pause_s = 0.0

    def wait_time(self) -> float:
        return self.pause_s

    @task
    def turn(self) -> None:
        if self.environment.runner.state in (STATE_CLEANUP, STATE_STOPPING, STATE_STOPPED):
            # A user woken from its pause in the same instant Locust stops it would otherwise send
            # one more request and be killed in the middle of it.
            raise StopUser()
        driver: AgentDriver = STATE["driver"]
        try:
            self._turn(driver)
        except CalibrationError as e:
            _stop_on_fatal(self.environment, str(e))
            raise StopUser() from None

    def _turn(self, driver: AgentDriver) -> None:
        if self.session is None or self.session.done:
            self.session = driver.next_session()
            if self.session is None:
                self._out_of_work(driver)
                return
            due_s = driver.session_start_in_s(self.session)
            if due_s > 0:
                gevent.sleep(due_s)  # open loop: the session's scheduled arrival
        pause = driver.play_turn(self.session, self.transport)
        if pause is None:
            self._out_of_work(driver)
        else:
            self.pause_s = pause

    def _out_of_work(self, driver: AgentDriver) -> None:
        if driver.exhausted:
            if not STATE.get("quitting"):
                STATE["quitting"] = True
                gevent.spawn(_quit_when_idle, self.environment)
            raise StopUser()
        self.pause_s = 1.0  # open loop: no session due before the end of the run


class KvlabShape(LoadTestShape):
    """constant | steps | poisson | diurnal (kvlab.loadtest.shapes), from -u/-t or the workload."""

    use_common_options = True

    def tick(self):
        opts, wl = self.runner.environment.parsed_options, workload()
        users = opts.num_users or wl.load.users
        plan = ShapePlan(wl.load.shape, users, opts.run_time or wl.load.duration_s)
        target = plan.users_at(self.get_run_time())
        if target is None:
            return None
        return target, opts.spawn_rate or wl.load.spawn_rate or max(plan.peak_users, 1)
