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

import bisect
import itertools
import json
import logging
import math
import operator
import os
import socket
import struct
import sys
import time
from collections import Counter, deque

import gevent
import gevent.hub
import gevent.socket
import geventhttpclient.client
import geventhttpclient.connectionpool
import geventhttpclient.response
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


def log_reply(stats, name: str, ttft_s: float | None, tpot_s: float | None, itl_s: list[float]) -> None:
    """A reply's TTFT, TPOT and ITL gaps (seconds) into Locust's stats in milliseconds, each entry
    and the total as log_request would leave them for each value, with one pass over the total."""
    now = time.time()
    parts = []
    for kind, value in (("TTFT", ttft_s), ("TPOT", tpot_s)):
        if value is not None:
            ms = value * 1000
            part = (1, ms, ms, ms, {locust.stats.bucket_response_time(ms): 1})
            _add(stats.get(name, kind), now, *part)
            parts.append(part)
    if itl_s:
        part = _summary(sorted(map(operator.mul, itl_s, _THOUSANDS)))  # ms, without a Python call per gap
        _add(stats.get(name, "ITL"), now, *part)
        parts.append(part)
    if len(parts) == 1:
        _add(stats.total, now, *parts[0])
    elif parts:
        _add(stats.total, now, sum(p[0] for p in parts), sum(p[1] for p in parts), min(p[2] for p in parts),
             max(p[3] for p in parts), *(p[4] for p in parts))


_THOUSANDS = itertools.repeat(1000.0)


def _summary(ms: list[float]) -> tuple:
    """(count, sum, min, max, histogram) of response times sorted in ascending order, each one in
    the histogram under the key Locust's bucket_response_time gives it."""
    lo, hi = ms[0], ms[-1]
    bucket = locust.stats.bucket_response_time  # looked up here: Locust lets it be replaced
    return len(ms), sum(ms), lo, hi, (_round_counts(ms) if bucket is _LOCUST_BUCKET and hi < 100 and lo > -100
                                      else Counter(map(bucket, ms)))


def _round_counts(ms: list[float]) -> dict:
    """Counter(map(round, ms)) for an ascending list (Locust's bucket below 100 ms is round()):
    one binary search per key instead of a call per value. round() halves to even: a key k takes
    k + 0.5 when k is even and leaves it to k + 1 when k is odd."""
    k, last = round(ms[0]), round(ms[-1])
    if last - k > 40:
        return Counter(map(round, ms))
    out, start = {}, 0
    while k < last:
        end = (bisect.bisect_left if k & 1 else bisect.bisect_right)(ms, k + 0.5, start)
        if end > start:
            out[k] = end - start
        start = end
        k += 1
    out[last] = len(ms) - start
    return out


def _add(entry, now: float, n: int, total: float, lo: float, hi: float, *histograms) -> None:
    """n response times into one StatsEntry, as n calls of its log() would leave it."""
    t = int(now)
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
    for histogram in histograms:
        for k, c in histogram.items():
            rt[k] += c


# The kernel's receive time of each read (Linux: SO_TIMESTAMPNS on the TCP socket, CLOCK_REALTIME).
# A chunk stamped when its greenlet gets to read it would also carry the time it waited for this
# process: the other users' chunks that arrived with it, the OS scheduler, the garbage collector.
_SO_TIMESTAMPNS = 35 if sys.platform.startswith("linux") else None  # also SCM_TIMESTAMPNS
_TIMESPEC = struct.Struct("@ll")  # struct timespec: time_t and long, both a C long on Linux
_CMSG_SPACE = socket.CMSG_SPACE(_TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 0
_SOL_SOCKET, _TIMESPEC_SIZE, _unpack_timespec = socket.SOL_SOCKET, _TIMESPEC.size, _TIMESPEC.unpack_from


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
        # gevent's own recvmsg, inlined: one Python frame per read, not two (this runs for every read
        # of every stream): the native socket's read if the kernel has bytes, else wait as gevent does
        while True:
            try:
                data, ancillary, _flags, _addr = self._sock.recvmsg(bufsize, _CMSG_SPACE, flags)
                break
            except BlockingIOError:  # EWOULDBLOCK
                if self.timeout == 0.0:
                    raise
            self._wait(self._read_event)
        # this read's time or none: a read the kernel did not stamp (a TCP segment that came in before
        # the kernel turned receive stamps on, `net_enable_timestamp`'s deferred work) must not keep
        # the previous read's time
        self.rx_wall = None
        for level, kind, payload in ancillary:
            if kind == _SO_TIMESTAMPNS and level == _SOL_SOCKET and len(payload) >= _TIMESPEC_SIZE:
                sec, ns = _unpack_timespec(payload)
                self.rx_wall = sec + ns * 1e-9
        return data


class _ReadsFirst:
    """Lets the work between two replies (the reply's stats and record, the next request built and
    sent) run one user at a time, between the event loop's reads.

    Replies end in waves: vLLM's engine steps every running request at once, and requests of
    equal length end in the same step. Run back to back, a wave's per-reply work (a few hundred us
    each) kept this process from reading for tens of milliseconds, so a stream's chunk could wait
    in its socket until the stream's next chunk came, and the kernel merges the two into one
    receive with the newer one's time (TCP coalesces queued segments and keeps the later stamp):
    the older chunk's TTFT or ITL would read one engine step late. Here a waiting user goes on at
    the start of a turn of the loop (a libev prepare watcher, before the loop polls its sockets
    and reads what has come) or when the loop has nothing else to do (an idle watcher, which also
    keeps the poll from sleeping while users wait), one user each time: every chunk that has
    arrived is read, with its own time, between two users' between-replies work. The wave's work
    is as long as before, and the requests it sends start about as late as they did (each one's
    TTFT counts from its own send)."""

    __slots__ = ("waiters", "prepare", "idle")

    def __init__(self) -> None:
        self.waiters: deque = deque()
        self.prepare = self.idle = None

    def wait(self) -> None:
        waiter = gevent.hub.Waiter()
        if self.idle is None:
            loop = gevent.get_hub().loop
            self.prepare, self.idle = loop.prepare(), loop.idle()
        self.waiters.append(waiter)
        if not self.idle.active:
            self.prepare.start(self._release)
            self.idle.start(self._release)
        try:
            waiter.get()
        except BaseException:  # killed while waiting (a stop): not released later
            try:
                self.waiters.remove(waiter)
            except ValueError:
                pass
            raise

    def _release(self) -> None:
        # in the hub: one user's turn, then back here
        if self.waiters:
            self.waiters.popleft().switch(None)
        if not self.waiters and self.idle is not None:
            self.prepare.stop()
            self.idle.stop()  # an active idle watcher makes the loop poll without sleeping


_reads_first = _ReadsFirst()


class _StampingPool(geventhttpclient.connectionpool.ConnectionPool):
    def _create_tcp_socket(self, family: int, socktype: int, protocol: int):
        if _SO_TIMESTAMPNS is None or not _CMSG_SPACE:
            return super()._create_tcp_socket(family, socktype, protocol)
        return StampedSocket(family, socktype, protocol)


class _BufferingResponse(geventhttpclient.response.HTTPSocketPoolResponse):
    """geventhttpclient's response, whose HTTP parser hands each body chunk (one per SSE event, as
    vLLM frames them) straight to the body buffer's `extend`: the parser looks `_on_body` up on the
    response for every chunk, and a built-in method costs no Python call (what HTTPResponse._on_body
    does: append the bytes to `_body_buffer`)."""

    def _read_headers(self, pre_buffered: bytes = b"") -> None:
        buf = getattr(self, "_body_buffer", None)
        if type(buf) is bytearray:
            self._on_body = buf.extend
        super()._read_headers(pre_buffered)


# every plain-HTTP client Locust's FastHttpSession makes in this process gets stamped sockets and
# the buffering response
geventhttpclient.client.ConnectionPool = _StampingPool
geventhttpclient.client.HTTPSocketPoolResponse = _BufferingResponse


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
        log_reply(self.user.environment.stats, name, res.ttft_s, res.tpot_s, res.itl_s)

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
    """Each SSE line as soon as its last byte arrives (iter_content(1024) would wait for a whole
    KiB), stamped with the kernel's receive time of the read that brought it where the socket has
    one (StampedSocket), else when it is read. After each read of the socket, every whole line in
    the response's body buffer goes to the stream at once, with that read's arrival time: one
    `feed` per read, not a readline call per line (geventhttpclient's readline, as the loop below
    does it: read, parse, take the whole lines)."""
    raw = resp._response  # geventhttpclient response: FastResponse exposes no line reader of its own
    buf = getattr(raw, "_body_buffer", None)
    sock = getattr(raw, "_sock", None)
    if not isinstance(sock, StampedSocket):
        sock = None  # TLS, or no kernel receive times: stamped when read
    feed, clock, wall, t0 = stream.feed, time.perf_counter, time.time, stream.t0
    try:
        if not isinstance(buf, bytearray) or not hasattr(raw, "message_complete"):
            # another geventhttpclient layout: line by line
            while line := raw.readline(b"\n"):
                stream.feed_line(line, _arrival(clock(), sock, wall, t0))
        else:
            block = raw.block_size
            while True:
                cut = buf.rfind(b"\n") + 1
                if cut:
                    data = bytes(buf[:cut])
                    del buf[:cut]
                    feed(data, _arrival(clock(), sock, wall, t0))
                if raw.message_complete:
                    break
                s = raw._sock
                if s is None:
                    raise geventhttpclient.response.HTTPConnectionClosed("connection closed.")
                try:
                    raw.feed(s.recv(block))
                except BaseException:
                    raw.release()
                    raise
        # Read to the end of the body (after [DONE] too) so the connection goes back to the pool.
        rest = raw.read()  # a last line without its newline
        if rest:
            stream.feed_line(rest, clock())
    except (TimeoutError, socket.timeout):
        stream.fail("stall", f"no byte for {workload().request.stall_timeout_s:g} s")
    except (OSError, ValueError) as e:  # connection reset, HTTP parse error mid-body
        stream.fail("incomplete", f"{type(e).__name__}: {str(e)[:120]}")
    res = stream.finish(time.perf_counter())
    _reads_first.wait()  # what follows until the next request is sent waits for the loop's reads
    return res


def _arrival(now: float, sock: StampedSocket | None, wall, t0: float) -> float:
    """`now` (perf_counter), or the kernel's receive time of the socket's latest read on the same
    clock (how long ago it arrived, taken off now; an age the request's own span cannot hold, as
    after a clock step, is not used). Lines that arrived together in one read share the newest
    one's time."""
    if sock is not None and sock.rx_wall is not None:
        age = wall() - sock.rx_wall
        if 0.0 < age < now - t0:
            return now - age
    return now


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
