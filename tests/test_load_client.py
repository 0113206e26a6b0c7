"""The load generator's cheap per-chunk path and its honesty: body bytes split anywhere read as the
lines do, the inline token path agrees with the JSON path, ITL gaps logged once per request count
as Locust counts them one by one; chunks keep their own kernel receive times, through a wave of
between-replies work too; a calibration that cannot fit stops `kvlab load` (exit 1, one
line) while --no-calibrate runs; a run that sent no turn is never "errors: none"; a saturated
Locust process is warned about and its CPU recorded."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fake_openai import FakeConfig, FakeOpenAI
from kvlab.loadtest.runner import CLIENT_CPU_BUSY, client_warnings
from kvlab.loadtest.stream import ChatStream
from kvlab.schema.load import LoadRecord

REPO = Path(__file__).resolve().parents[1]
TINY = {"name": "tiny", "apps": {"count": 1, "system_tokens": 16},
        "session": {"turns": 2, "task_tokens": 24, "tool_result_tokens": 8, "max_tokens": 4, "think_time_s": 0.05},
        "request": {"timeout_s": 5, "stall_timeout_s": 2, "connect_timeout_s": 2},
        "limits": {"max_context_tokens": 1024}, "load": {"users": 2, "duration_s": 4, "max_requests": 1000}}


def vllm_chunk(content=None, role=None, finish=None, **extra):
    delta = {**({"role": role} if role else {}), **({"content": content} if content is not None else {})}
    obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


CONTENTS = ["Hello", " wor", "ld", " \"quoted\"", "\\n", " naïve ☃", "", " {json}", "\t"]


def vllm_body() -> bytes:
    usage = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
             "usage": {"prompt_tokens": 12, "total_tokens": 20, "completion_tokens": 8}}
    return (vllm_chunk("", role="assistant") + b"".join(vllm_chunk(c) for c in CONTENTS[:-1])
            + vllm_chunk(CONTENTS[-1], finish="length") + b"data: " + json.dumps(usage).encode() + b"\n\n"
            + b"data: [DONE]\n\n")


def by_lines(data: bytes, t: float = 1.0):
    s = ChatStream(0.0)
    for line in data.splitlines(keepends=True):
        s.feed_line(line, t)
    return s.finish(t)


@settings(max_examples=150, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=25), crlf=st.booleans())
def test_body_bytes_split_anywhere_read_as_the_lines_do(cuts, crlf):
    data = vllm_body()
    if crlf:
        data = data.replace(b"\n", b"\r\n")
    points = sorted({c % (len(data) + 1) for c in cuts})
    s = ChatStream(0.0)
    for a, b in zip([0, *points], [*points, len(data)]):
        s.feed(data[a:b], 1.0)
    r, ref = s.finish(1.0), by_lines(data)
    assert r.ok and r.__dict__ == ref.__dict__
    assert r.text == "".join(CONTENTS) and r.chunks == 8 and r.completion_tokens == 8 and r.finish_reason == "length"


def test_every_gap_is_timed_by_arrival_and_a_last_line_without_newline_counts():
    events = [e + b"\n\n" for e in vllm_body().split(b"\n\n") if e]
    events[-1] = events[-1][:-2]  # data: [DONE] without its line ending: the body just ends
    s = ChatStream(0.0)
    # the role chunk alone, then two token chunks in one recv, then one chunk per recv
    s.feed(events[0], 0.1)
    s.feed(events[1] + events[2], 0.2)
    for k, e in enumerate(events[3:], start=3):
        s.feed(e, 0.2 + 0.1 * (k - 2))
    r = s.finish(2.0)
    assert r.ok and r.ttft_s == 0.1
    # "" is not a token: the gap across its chunk is two chunks long
    assert r.itl_s == pytest.approx([0.0, 0.1, 0.1, 0.1, 0.1, 0.2, 0.1])
    assert r.e2e_s == pytest.approx(0.2 + 0.1 * (len(events) - 3))  # the [DONE] line's arrival


TOKEN_EVENTS = [vllm_chunk("a"), vllm_chunk(""), vllm_chunk(" b"), vllm_chunk("", role="assistant"), vllm_chunk("é\\n")]
ODD_EVENTS = [
    vllm_chunk("c", usage=None), vllm_chunk("d", error=None),  # usage or error present: the JSON path decides
    vllm_chunk("e")[:-2].replace(b"data: ", b"data:  ") + b"\n\n",  # padded: still a token chunk
    b"data: " + vllm_chunk("f")[6:-2] + b"," + vllm_chunk("g")[6:-2] + b"\n\n",  # two objects in one event
    b"data: \n\n", b"data: {\"choices\": [\n\n", vllm_chunk("h", finish="stop"),
    b'data: {"error": {"message": "boom"}}\n\n', b"data: [1]\n\n",
    b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n',
]


@settings(max_examples=200, deadline=None)
@given(blocks=st.lists(st.lists(st.one_of(st.sampled_from(TOKEN_EVENTS), st.sampled_from(ODD_EVENTS)), min_size=1,
                                max_size=6), min_size=1, max_size=6))
def test_a_block_of_events_reads_as_its_lines_do(blocks):
    # whole events arriving together (one feed per read, one arrival time): decoded together when
    # all are token chunks, else event by event; either way what the line-by-line path makes of them
    s, ref = ChatStream(0.0), ChatStream(0.0)
    for k, block in enumerate(blocks, start=1):
        data = b"".join(block)
        s.feed(data, 0.1 * k)
        for line in data.splitlines(keepends=True):
            ref.feed_line(line, 0.1 * k)
    end = 0.1 * (len(blocks) + 1)
    assert s.finish(end).__dict__ == ref.finish(end).__dict__


@pytest.mark.parametrize("event, kind", [
    (b"data: {\"choices\": [\n\n", "malformed_sse"),
    (b"data: {\"error\": {\"message\": \"engine died\"}, \"choices\": [{\"delta\": {\"content\": \"x\"}}]}\n\n",
     "stream_error"),
    (b"data: {\"choices\": [{\"delta\": {\"content\": 5}, \"finish_reason\": null}]}\n\n", "malformed_sse"),
    (b"data: {\"choices\": [\"x\"]}\n\n", "malformed_sse"),
    (b"data: {\"choices\": [], \"usage\": {\"prompt_tokens\": -1}}\n\n", "malformed_sse"),
])
def test_the_inline_path_leaves_every_error_kind_to_the_json_path(event, kind):
    data = vllm_chunk("", role="assistant") + vllm_chunk("a") + event + b"data: [DONE]\n\n"
    s = ChatStream(0.0)
    s.feed(data, 1.0)
    r = s.finish(1.0)
    assert r.error_kind == kind and r.__dict__ == by_lines(data).__dict__


def test_what_orjson_refuses_the_standard_parser_still_takes():
    # NaN and a lone surrogate: json.loads takes them (as kvlab always did), orjson does not
    data = (vllm_chunk("", role="assistant") + b'data: {"choices":[{"delta":{"content":"\\ud800x"}}],"x":NaN}\n\n'
            + b"data: [DONE]\n\n")
    s = ChatStream(0.0)
    s.feed(data, 1.0)
    r = s.finish(1.0)
    assert r.ok and r.chunks == 1 and r.__dict__ == by_lines(data).__dict__


def test_a_reply_logged_in_one_step_counts_as_locust_counts_each_value():
    # TTFT, TPOT and every ITL gap of a reply through log_reply (one pass over the total, the gaps'
    # histogram by binary search) leave every entry as one log_request per value would; gaps on the
    # half milliseconds too, where round() goes to the even key
    code = """
import importlib.util, json, random, sys
from locust.stats import RequestStats
spec = importlib.util.spec_from_file_location("lf", sys.argv[1]); lf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lf)
rng = random.Random(7)
one, many = RequestStats(), RequestStats()
for _ in range(300):
    gaps = [rng.choice([rng.uniform(0, 0.03), rng.randint(0, 40) / 2000, rng.uniform(0.1, 3), 0.0])
            for _ in range(rng.randint(0, 60))]
    ttft, tpot = rng.choice([None, rng.uniform(0, 2)]), rng.choice([None, rng.randint(0, 9) / 2000])
    for kind, v in (("TTFT", ttft), ("TPOT", tpot)):
        if v is not None:
            one.log_request(kind, "w", v * 1000, 0)
    for g in gaps:
        one.log_request("ITL", "w", g * 1000, 0)
    lf.log_reply(many, "w", ttft, tpot, gaps)
out = []
for st in (one, many):
    row = []
    for e in [st.get("w", k) for k in ("TTFT", "TPOT", "ITL")] + [st.total]:
        row.append([e.num_requests, round(e.total_response_time, 6), e.min_response_time, e.max_response_time,
                    sorted(e.response_times.items()), sum(e.num_reqs_per_sec.values()),
                    [e.get_response_time_percentile(p) for p in (0.5, 0.9, 0.99)]])
    out.append(row)
print(json.dumps(out))
"""
    p = subprocess.run([sys.executable, "-c", code, str(REPO / "loadtest" / "locustfile.py")], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert p.returncode == 0, p.stderr[-2000:]
    one, many = json.loads(p.stdout.strip().splitlines()[-1])
    assert one == many


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel receive times: SO_TIMESTAMPNS (Linux)")
def test_chunks_are_stamped_with_the_kernels_receive_time_not_when_read():
    # in a subprocess: importing Locust monkey-patches the interpreter. Bytes that wait 0.3 s in the
    # socket before the client reads them keep the time they arrived.
    code = """
import importlib.util, json, socket, sys, time
import geventhttpclient.client
spec = importlib.util.spec_from_file_location("lf", sys.argv[1]); lf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lf)
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
c = lf.StampedSocket(socket.AF_INET, socket.SOCK_STREAM); c.connect(srv.getsockname()); a, _ = srv.accept()
# The first socket to ask for receive stamps turns them on in deferred kernel work
# (net_enable_timestamp -> netstamp_work); a segment that comes in before carries no stamp, and
# TCP then gives the read none. Exchange bytes until a read is stamped (or give up after 2 s).
for _ in range(100):
    a.sendall(b"w"); c.recv(16)
    if c.rx_wall is not None:
        break
    time.sleep(0.02)
sent = time.time(); a.sendall(b"data: x\\n\\n")
time.sleep(0.3)
data = c.recv(4096); read = time.time()
arrived = c.rx_wall - sent
c.setsockopt(socket.SOL_SOCKET, lf._SO_TIMESTAMPNS, 0); a.sendall(b"y"); c.recv(16)  # a read with no stamp
print(json.dumps([data.decode(), arrived, read - sent, geventhttpclient.client.ConnectionPool is lf._StampingPool,
                  c.rx_wall]))
"""
    p = subprocess.run([sys.executable, "-c", code, str(REPO / "loadtest" / "locustfile.py")], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert p.returncode == 0, p.stderr[-2000:]
    data, arrived_after_s, read_after_s, patched, unstamped = json.loads(p.stdout.strip().splitlines()[-1])
    assert data == "data: x\n\n" and patched
    assert read_after_s >= 0.3 and -0.001 < arrived_after_s < 0.05
    assert unstamped is None  # a later read without a kernel time does not keep the earlier one


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel receive times: SO_TIMESTAMPNS (Linux)")
def test_a_wave_of_between_replies_work_lets_each_chunk_be_read_with_its_own_time():
    # 30 users end their replies at once (2 ms of CPU each after the reply) while a stream's chunk A
    # arrives, and its next chunk B 20 ms later. Run back to back (ungated), the 60 ms of work keep
    # the socket unread until B is there too, and the kernel hands A and B over in one read with
    # B's time: A reads 20 ms late. Through the locustfile's gate, each user's work waits for the
    # loop's reads: A is read alone, with its own time.
    code = """
import importlib.util, json, socket, sys, time
spec = importlib.util.spec_from_file_location("lf", sys.argv[1]); lf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lf)
import gevent
from gevent import monkey
real_thread, real_sleep = monkey.get_original("_thread", "start_new_thread"), monkey.get_original("time", "sleep")
sys.setswitchinterval(0.0005)

def spin(s):
    t = time.perf_counter()
    while time.perf_counter() - t < s:
        pass

def wave(gated):
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
    c = lf.StampedSocket(socket.AF_INET, socket.SOCK_STREAM); c.connect(srv.getsockname()); a, _ = srv.accept()
    sent, reads = [], []
    def sender():  # an OS thread: sends while the event loop works
        sent.append(time.time()); a.sendall(b"data: A\\n\\n")
        real_sleep(0.02); sent.append(time.time()); a.sendall(b"data: B\\n\\n")
    def reader():
        while len(b"".join(r[0] for r in reads)) < 18:
            d = c.recv(4096); reads.append((d, c.rx_wall))
    def between_replies():  # one user's work after its reply: 2 ms of CPU
        if gated:
            lf._reads_first.wait()
        spin(0.002)
    # the users end their replies as A arrives: the work starts once A is sent, not on a 5 ms timer
    # of the sender thread's (a loaded run once read A alone ungated: A came after the 60 ms of work)
    real_thread(sender, ())
    while not sent:
        real_sleep(0.0002)
    users = [gevent.spawn(between_replies) for _ in range(30)]
    r = gevent.spawn(reader)
    gevent.joinall(users + [r], timeout=10)
    return [[d.decode(), (t - sent[0]) * 1000] for d, t in reads], (sent[1] - sent[0]) * 1000

print(json.dumps({"gated": wave(True), "ungated": wave(False)}))
"""
    p = subprocess.run([sys.executable, "-c", code, str(REPO / "loadtest" / "locustfile.py")], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    (gated, gap_ms), (ungated, ungated_gap_ms) = out["gated"], out["ungated"]
    assert gap_ms > 15 and ungated_gap_ms > 15  # B came well after A in both
    assert [d for d, _ in gated] == ["data: A\n\n", "data: B\n\n"]
    assert abs(gated[0][1]) < gap_ms / 4 and abs(gated[1][1] - gap_ms) < gap_ms / 4  # each stamped when it came
    # the mechanism the gate is there for: merged, with the later time
    assert ungated == [["data: A\n\ndata: B\n\n", pytest.approx(ungated_gap_ms, abs=5)]]


# --- kvlab load, end to end ----------------------------------------------------------------------


def kvlab_load(tmp_path: Path, url: str, *args: str, workload: dict = TINY, timeout: float = 120):
    wl = tmp_path / f"{workload['name']}.yaml"
    wl.write_text(yaml.safe_dump(workload))
    out = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "kvlab", "load", "--host", url, "--workload", str(wl), *args,
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    return p, out, time.monotonic() - t0


def test_usage_that_does_not_count_the_prompt_stops_the_run_and_no_calibrate_runs(tmp_path):
    with FakeOpenAI(FakeConfig(constant_prompt_tokens=100)) as srv:
        p, out, took = kvlab_load(tmp_path, srv.url, "-u", "4", "-t", "20s")
        assert p.returncode == 1, p.stderr[-2000:]
        assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("kvlab: error: calibration failed: the server's usage.prompt_tokens does not grow "
                               "with the prompt (probe A [user \"\"] counted 100, B [system \"\", user \"\"] 100, "
                               "C [user 128 words] 100)")
        assert "--no-calibrate" in last
        assert took < 20  # stopped, not retried until the run time
        rec = LoadRecord.read(out / "load.json")
        assert rec.failure and rec.failure.startswith("calibration failed") and rec.summary.requests == 0
        probes = len([1 for line in (out / "requests").glob("*.jsonl") for _ in line.read_text().splitlines()])
        assert probes <= 4 * 5  # each process probed once (models, A, B, C, fit), not in a loop

        p, out, _ = kvlab_load(tmp_path, srv.url, "-u", "2", "-t", "4s", "--no-calibrate", "--tokens-per-word", "1.0")
        assert p.returncode == 0, p.stderr[-2000:]
        rec = LoadRecord.read(out / "load.json")
        assert rec.failure is None and rec.summary.requests_ok >= 2
        assert rec.prompt_sizing.method == "tokens_per_word" and rec.prompt_sizing.tokens_per_word == 1.0
        assert "prompt sizing: tokens_per_word" in p.stdout

        p, _, _ = kvlab_load(tmp_path, srv.url, "--tokens-per-word", "1.0")
        assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
            "kvlab: error: --tokenizer and --tokens-per-word size prompts without calibration: add --no-calibrate")


def test_no_calibrate_with_a_twin_tokenizer(tmp_path):
    from kvlab.models.twins import build_tokenizer

    tok = tmp_path / "tok"
    tok.mkdir()
    build_tokenizer(tok)
    with FakeOpenAI(FakeConfig(constant_prompt_tokens=100)) as srv:
        p, out, _ = kvlab_load(tmp_path, srv.url, "-u", "2", "-t", "3s", "--no-calibrate", "--tokenizer", str(tok))
    assert p.returncode == 0, p.stderr[-2000:]
    sizing = LoadRecord.read(out / "load.json").prompt_sizing
    assert sizing.method == "tokenizer" and sizing.tokenizer == str(tok) and sizing.tokens_per_word > 1
    assert (sizing.base_tokens, sizing.message_tokens) != (3.0, 4.0)  # the twin's chat template, counted


def test_a_run_that_sent_no_turn_is_not_errors_none(tmp_path):
    p, out, _ = kvlab_load(tmp_path, "http://127.0.0.1:9", "-u", "1", "-t", "2s")
    assert p.returncode == 1
    assert "errors: none" not in p.stdout and "errors: no turn was sent" in p.stdout
    assert p.stderr.strip().splitlines()[-1].startswith("kvlab: error: no turn was sent: nothing was measured")
    assert "no turn was sent: nothing was measured" in LoadRecord.read(out / "load.json").warnings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_saturated_locust_process_is_warned_about_and_its_cpu_recorded(tmp_path):
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "bench" / "sse_server.py"), str(port), "--burst", "32"],
                              start_new_session=True)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        heavy = {"name": "heavy", "apps": {"system_tokens": 0},
                 "session": {"turns": 1, "task_tokens": 8, "max_tokens": 256, "think_time_s": 0},
                 "request": {"ignore_eos": False}, "load": {"max_requests": 10_000_000}}
        p, out, _ = kvlab_load(tmp_path, f"http://127.0.0.1:{port}", "-u", "16", "-t", "10s", workload=heavy)
    finally:
        server.terminate()
        server.wait(10)
    assert p.returncode == 0, p.stderr[-2000:]
    rec = LoadRecord.read(out / "load.json")
    [cpu] = rec.client_cpu
    # busy: most of a core (on 2 cores shared with the stream server and the other test worker it gets
    # 0.79-0.95 of one; the warning's threshold is CLIENT_CPU_BUSY, checked on fixed samples below)
    assert cpu.role == "standalone" and cpu.samples >= 4 and cpu.p90 >= 0.6
    assert rec.summary.client_cpu_busiest == cpu.p90
    warned = any(w.startswith("client CPU: Locust standalone process") and "--workers" in w for w in rec.warnings)
    assert warned == (cpu.p90 >= CLIENT_CPU_BUSY)
    assert ("warning: client CPU" in p.stdout and "latencies may include client queueing" in p.stdout) == warned


def test_the_client_cpu_warning_is_given_at_the_busy_threshold():
    """One warning naming the busiest streaming process at or above CLIENT_CPU_BUSY of a core (the
    master does not stream), with a --workers suggestion; none below it."""
    def proc(role, pid, p90):
        return {"role": role, "pid": pid, "p90": p90, "samples": 10}

    summary = {"requests": 5, "requests_ok": 5}
    [w] = client_warnings([proc("standalone", 7, CLIENT_CPU_BUSY)], 0, summary)
    assert w.startswith("client CPU: Locust standalone process 7 was busy 80% of a core") and "--workers 2" in w
    [w] = client_warnings([proc("master", 1, 0.99), proc("worker", 2, 0.85), proc("worker", 3, 0.9)], 2, summary)
    assert "worker process 3 was busy 90%" in w and "2 of 2 streaming" in w and "--workers 4" in w
    assert client_warnings([proc("standalone", 7, CLIENT_CPU_BUSY - 0.01), proc("master", 1, 0.99)], 0, summary) == []


def test_the_experiment_runner_fails_the_repeat_with_the_calibration_error_and_exits_non_zero(tmp_path):
    from conftest import run_kvlab
    from kvlab.schema.experiment import RepeatResults

    wl = tmp_path / "tiny.yaml"
    wl.write_text(yaml.safe_dump(TINY))
    with FakeOpenAI(FakeConfig(constant_prompt_tokens=100)) as srv:
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump(dict(
            name="calib", engine="external", endpoint=srv.url, gpu="h100", max_model_len=4096,
            models=["llama-3.1-8b"], workloads=[str(wl)], load={"users": [2]}, duration_s=20, warmup_s=0,
            scrape_interval_s=0.5)))
        r = run_kvlab("experiment", "run", str(spec), "--out", str(tmp_path / "r"), timeout=240)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kvlab: error: 1 repeat(s) stopped before measuring; first: ") and \
        "calibration failed: the server's usage.prompt_tokens does not grow with the prompt" in last
    [results] = (tmp_path / "r").glob("*/repeat-1/results.json")
    res = RepeatResults.read(results)
    assert res.status == "failed" and res.failure.reason.startswith("calibration failed")
