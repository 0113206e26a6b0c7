"""The per-process driver (sessions, calibration probes, verbatim history, records) against the
in-process fake server, through a plain httpx transport (Locust stays out of pytest)."""

import time

import httpx
import pytest

from fake_openai import BASE_TOKENS, MESSAGE_TOKENS, FakeConfig, FakeOpenAI, prompt_tokens
from kvlab.loadtest.driver import AgentDriver, RunBounds
from kvlab.loadtest.records import RecordWriter, read_requests
from kvlab.loadtest.render import PROBE_WORDS, Calibration, TextMaker, filler, probe_messages
from kvlab.loadtest.session import SessionRun
from kvlab.loadtest.stream import ChatStream, failed, http_error_kind
from kvlab.loadtest.workload import Workload, load_workload


class HttpxTransport:
    def __init__(self, base_url: str, timeout_s: float = 10.0):
        self.client = httpx.Client(base_url=base_url, timeout=timeout_s)

    def stream_chat(self, path, body, name):
        t0 = time.perf_counter()
        try:
            with self.client.stream("POST", path, json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    return r.status_code, failed(http_error_kind(r.status_code), r.text[:80], t0, time.perf_counter())
                s = ChatStream(t0)
                for line in r.iter_lines():
                    s.feed_line(line, time.perf_counter())
                return r.status_code, s.finish(time.perf_counter())
        except httpx.ConnectError as e:
            return None, failed("connect", type(e).__name__, t0, time.perf_counter())

    def get_json(self, path):
        try:
            r = self.client.get(path)
        except httpx.ConnectError:
            return None, None
        return r.status_code, (r.json() if r.status_code == 200 else None)


def workload(**session):
    return Workload.model_validate({"name": "t", "apps": {"count": 2, "system_tokens": 96},
                                    "session": {"turns": 3, "task_tokens": 40, "tool_result_tokens": 30,
                                                "max_tokens": 6, "think_time_s": 0.25, **session}})


def play(driver, transport, n_sessions):
    pauses = []
    for _ in range(n_sessions):
        run = driver.next_session()
        while not run.done:
            pauses.append(driver.play_turn(run, transport))
    return pauses


def test_calibration_fit_from_probe_counts():
    c = Calibration.fit(a_tokens=14, b_tokens=22, c_tokens=14 + 2 * PROBE_WORDS)
    assert (c.tokens_per_word, c.message_tokens, c.base_tokens, c.measured) == (2.0, 8, 6, True)
    assert c.words_for(101) == 50 and c.words_for(0) == 0 and c.words_for(1) == 1
    assert c.prompt_tokens(100, 2) == 6 + 16 + 100
    with pytest.raises(ValueError, match=r"does not grow with the prompt \(probe A \[user \"\"\] counted 10, "
                       r"B \[system \"\", user \"\"\] 12, C \[user 128 words\] 10\)"):
        Calibration.fit(10, 12, 10)


def test_text_is_seeded_and_the_app_prefix_is_shared():
    tm = TextMaker(5, Calibration(tokens_per_word=2.0))
    assert tm.system_prompt("app1", 200) == tm.system_prompt("app1", 200)
    assert len(tm.system_prompt("app1", 200).split()) == 100
    assert tm.system_prompt("app1", 200) != tm.system_prompt("app2", 200)
    assert tm.task("s5-1", 40) != tm.task("s5-2", 40)
    assert filler("k", 10) == filler("k", 10) and filler("k", 10) != filler("j", 10)
    assert probe_messages("B") == [{"role": "system", "content": ""}, {"role": "user", "content": ""}]


def test_session_run_appends_replies_verbatim():
    wl = workload()
    run = SessionRun(wl.session_plan(0, 0))
    run.begin(TextMaker(0, Calibration()))
    r0 = run.next_request()
    assert [m["role"] for m in r0.messages] == ["system", "user"]
    assert run.add_reply("  odd\nreply ", 6) == 0.25
    r1 = run.next_request()
    assert r1.messages[:3] == r0.messages + [{"role": "assistant", "content": "  odd\nreply "}]
    assert r1.messages[3]["content"].startswith("Tool result 1:")
    run.abort()
    assert run.done


def test_driver_plays_sessions_against_the_fake(tmp_path):
    wl = workload()
    with FakeOpenAI(FakeConfig()) as srv:
        writer = RecordWriter(tmp_path)
        driver = AgentDriver(wl, 0, writer, RunBounds(duration_s=60, max_requests=None))
        pauses = play(driver, HttpxTransport(srv.url), 4)
        writer.close()
        assert srv.verbatim_violations() == []
        bodies = srv.requests
    assert driver.model == "fake-model" and driver.calibrated and driver.ignore_eos
    # the fake counts 1 token per word, BASE_TOKENS per request and MESSAGE_TOKENS per message
    cal = driver.text.calibration
    assert (cal.tokens_per_word, cal.message_tokens, cal.base_tokens) == (1.0, MESSAGE_TOKENS, BASE_TOKENS)
    assert pauses == [0.25, 0.25, 0.0] * 4

    df = read_requests(tmp_path)
    probes, turns = df[df.kind == "probe"], df[df.kind == "turn"]
    assert len(probes) == 3 + 2  # A, B, C, then one per app
    assert len(turns) == 12 and turns.error_kind.isna().all()
    assert (turns.completion_tokens == 6).all() and (turns.max_tokens == 6).all()  # ignore_eos honoured
    assert all(b.get("ignore_eos") is True and b["stream_options"] == {"include_usage": True} for b in bodies)
    # measured prompt tokens are what the fake counted for exactly the messages sent
    turn_bodies = [b for b in bodies if b["max_tokens"] == 6]
    assert list(turns.prompt_tokens) == [len(prompt_tokens(b["messages"])) for b in turn_bodies]
    # calibration aims within the few words of "Task ID:" / "Tool result N:" headers
    assert ((turns.prompt_tokens - turns.planned_prompt_tokens).abs() <= 3 * turns.turn + 2).all()
    # the app's shared prefix: 96 words in the system message
    assert set(turns.system_tokens) == {96}
    assert list(turns.turn) == [0, 1, 2] * 4 and set(turns.turns_planned) == {3}
    # the fake's prefix cache: later turns hit at least the previous prompt's whole 32-token blocks
    for sid, s in turns.groupby("session_id"):
        prev = list(s.prompt_tokens)[:-1]
        assert all(c >= (p // 32) * 32 for c, p in zip(list(s.cached_tokens)[1:], prev))


def test_server_without_ignore_eos_gets_requests_without_it(tmp_path):
    with FakeOpenAI(FakeConfig(accept_ignore_eos=False, eos_after=4)) as srv:
        driver = AgentDriver(workload(max_tokens=8), 0, RecordWriter(tmp_path), RunBounds(60, None))
        play(driver, HttpxTransport(srv.url), 1)
        assert not driver.ignore_eos
        assert all("ignore_eos" not in b for b in srv.requests[1:])
    df = read_requests(tmp_path)
    assert df[df.kind == "probe"].status_code.tolist()[0] == 200  # the refused probe was retried
    assert set(df[df.kind == "turn"].completion_tokens) == {4}  # ends at EOS


def test_failed_turn_ends_the_session_and_the_run_goes_on(tmp_path):
    # requests 1-4 are probes (A, B, C, the first session's app); 6 is that session's 2nd turn
    with FakeOpenAI(FakeConfig(faults={6: "http_500"})) as srv:
        driver = AgentDriver(workload(), 0, RecordWriter(tmp_path), RunBounds(60, None))
        play(driver, HttpxTransport(srv.url), 3)
    df = read_requests(tmp_path)
    turns = df[df.kind == "turn"]
    bad = turns[turns.error_kind.notna()]
    assert list(bad.error_kind) == ["http_5xx"] and list(bad.status_code) == [500]
    first = turns[turns.session_id == bad.session_id.iloc[0]]
    assert len(first) == 2  # aborted after the failed turn
    assert turns.error_kind.isna().sum() == len(turns) - 1 and turns.session_id.nunique() == 3


def test_server_down_is_recorded_and_retried(tmp_path):
    wl = workload()
    unnamed = AgentDriver(wl, 0, RecordWriter(tmp_path / "a"), RunBounds(60, None))
    assert unnamed.play_turn(unnamed.next_session(), HttpxTransport("http://127.0.0.1:9")) == 1.0
    assert read_requests(tmp_path / "a").error_kind.tolist() == ["connect"]  # GET /v1/models
    driver = AgentDriver(wl.model_copy(update={"request": wl.request.model_copy(update={"model": "m"})}), 0,
                         RecordWriter(tmp_path / "b"), RunBounds(60, None))
    run = driver.next_session()
    transport = HttpxTransport("http://127.0.0.1:9")  # nothing listens on the discard port
    assert driver.play_turn(run, transport) == 1.0  # retry pause
    assert not driver.calibrated and run.turn == 0
    df = read_requests(tmp_path / "b")  # the model is named: the probes are tried
    assert list(df.error_kind) == ["connect"] * 3 and df.status_code.isna().all()


def test_a_server_gone_mid_run_is_retried_after_a_pause_not_hammered(tmp_path):
    wl = load_workload("agent-smoke")
    wl = wl.model_copy(update={"request": wl.request.model_copy(update={"model": "m"})})
    driver = AgentDriver(wl, 0, RecordWriter(tmp_path), RunBounds(60, None))
    with FakeOpenAI() as srv:
        t = HttpxTransport(srv.url)
        run = driver.next_session()
        assert driver.play_turn(run, t) > 0 or run.done  # calibrated, one turn answered
    run = driver.next_session()
    assert driver.play_turn(run, t) == 1.0  # connection refused: the session ends, the user pauses
    assert run.done
    turns = read_requests(tmp_path).query("kind == 'turn'")
    assert turns.error_kind.isna().tolist() == [True, False] and turns.error_kind.iloc[1] == "connect"


def test_request_bound_and_open_loop_offsets(tmp_path):
    wl = load_workload("agent-smoke").with_shape("poisson")
    with FakeOpenAI() as srv:
        driver = AgentDriver(wl, 0, RecordWriter(tmp_path), RunBounds(duration_s=1e9, max_requests=5))
        t = HttpxTransport(srv.url)
        sent = 0
        while (run := driver.next_session()) is not None:
            assert run.plan.start_offset_s > 0
            while not run.done:
                if driver.play_turn(run, t) is None:
                    break
            sent = driver.requests_sent
            if driver.exhausted:
                break
    assert sent == 5 and driver.exhausted and driver.next_session() is None
    turns = read_requests(tmp_path).query("kind == 'turn'")
    assert len(turns) == 5 and turns.start_lag_s.notna().sum() == turns.session_id.nunique()
    # sessions scheduled after the run's end are not started
    late = AgentDriver(wl, 0, None, RunBounds(duration_s=0.001, max_requests=None))
    assert late.next_session() is None


class Stopped(BaseException):
    """Stands in for gevent's GreenletExit, which Locust raises in a user it stops."""


def test_user_stopped_mid_request_is_recorded_as_cancelled(tmp_path):
    with FakeOpenAI() as srv:
        inner = HttpxTransport(srv.url)

        class Killing:
            get_json = inner.get_json

            def stream_chat(self, path, body, name):
                if body["max_tokens"] > 1:
                    raise Stopped()
                return inner.stream_chat(path, body, name)

        driver = AgentDriver(workload(), 0, RecordWriter(tmp_path), RunBounds(60, None))
        with pytest.raises(Stopped):
            driver.play_turn(driver.next_session(), Killing())
    turns = read_requests(tmp_path).query("kind == 'turn'")
    assert list(turns.error_kind) == ["cancelled"] and driver.in_flight == 0
    assert turns.error_detail.iloc[0] == "Stopped" and turns.status_code.isna().all()
