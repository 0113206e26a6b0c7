"""SSE measurements: TTFT, every ITL gap, TPOT, E2E, usage, and every malformed case."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvlab.loadtest.stream import ChatStream, LineSplitter, failed, http_error_kind


def chunk(content=None, role=None, finish=None):
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


USAGE = {"object": "chat.completion.chunk", "choices": [],
         "usage": {"prompt_tokens": 32, "completion_tokens": 3, "total_tokens": 35,
                   "prompt_tokens_details": {"cached_tokens": 0}}}


def vllm_events():
    """The events vLLM 0.32 sends for a 3-token reply (role chunk first, usage last)."""
    return [chunk("", role="assistant"), chunk("es"), chunk(" 471"), chunk("30", finish="length"), USAGE]


def sse_bytes(events, done=True, sep=b"\n"):
    out = b"".join(b"data: " + json.dumps(e).encode() + sep + sep for e in events)
    return out + (b"data: [DONE]" + sep + sep if done else b"")


def play(lines_with_times, t0=0.0, end=None):
    s = ChatStream(t0)
    for line, t in lines_with_times:
        s.feed_line(line, t)
    return s.finish(end if end is not None else (lines_with_times[-1][1] if lines_with_times else t0))


def test_vllm_stream_timings_and_usage():
    events = vllm_events()
    # role chunk and first token at 0.5 s, then tokens at 0.6 and 0.8, usage and DONE at 0.81
    times = [0.5, 0.5, 0.6, 0.8, 0.81]
    lines = []
    for e, t in zip(events, times):
        lines += [(b"data: " + json.dumps(e).encode() + b"\n", t), (b"\n", t)]
    lines += [(b"data: [DONE]\n", 0.81), (b"\n", 0.81)]
    r = play(lines, t0=0.0)
    assert r.ok and r.error_kind is None
    assert r.ttft_s == 0.5
    assert r.itl_s == pytest.approx([0.1, 0.2])
    assert r.e2e_s == 0.81
    assert r.tpot_s == pytest.approx((0.81 - 0.5) / 2)  # vLLM: (e2e - ttft) / (completion_tokens - 1)
    assert (r.prompt_tokens, r.completion_tokens, r.cached_tokens) == (32, 3, 0)
    assert r.text == "es 47130" and r.chunks == 3 and r.finish_reason == "length"


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30), crlf=st.booleans())
def test_any_split_of_the_byte_stream_gives_the_same_result(cuts, crlf):
    data = sse_bytes(vllm_events(), sep=b"\r\n" if crlf else b"\n")
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    sp, s = LineSplitter(), ChatStream(0.0)
    for piece in pieces:
        for line in sp.feed(piece):
            s.feed_line(line, 1.0)
    for line in sp.flush():
        s.feed_line(line, 1.0)
    r = s.finish(1.0)
    assert r.ok and r.text == "es 47130" and r.completion_tokens == 3 and r.chunks == 3


def test_line_splitter_keeps_partial_lines_and_lone_cr():
    sp = LineSplitter()
    assert sp.feed(b"data: a") == []
    assert sp.feed(b"bc\r") == []  # "\r" may be half of "\r\n"
    assert sp.feed(b"\ndata: x\n\n") == [b"data: abc\r\n", b"data: x\n", b"\n"]
    assert sp.feed(b"tail") == [] and sp.flush() == [b"tail"]


def test_sse_comments_fields_and_multiline_data():
    s = ChatStream(0.0)
    for line in [": keep-alive", "event: message", "id: 7", "data:" + json.dumps(chunk("", role="assistant")), "",
                 'data: {"choices": [{"delta": ', 'data: {"content": "hi"}, "finish_reason": "stop"}]}', "",
                 "data:[DONE]", ""]:
        s.feed_line(line, 1.0)
    r = s.finish(1.0)
    assert r.ok and r.text == "hi" and r.finish_reason == "stop"


def test_empty_content_chunks_are_not_tokens():
    # vLLM may send "" while the detokenizer holds back an incomplete UTF-8 sequence
    s = ChatStream(0.0)
    for e, t in [(chunk("", role="assistant"), 0.2), (chunk("a"), 0.2), (chunk(""), 0.3), (chunk("b"), 0.4)]:
        s.on_event(json.dumps(e), t)
    s.on_event("[DONE]", 0.5)
    r = s.finish(0.5)
    assert r.itl_s == pytest.approx([0.2]) and r.chunks == 2
    assert r.tpot_s == pytest.approx(0.3)  # no usage: chunks stand in for completion tokens


@pytest.mark.parametrize("payload, kind", [
    ('{"choices": [', "malformed_sse"),
    ("[1, 2]", "malformed_sse"),
    ('{"error": {"message": "engine died", "code": 500}}', "stream_error"),
    ('{"error": "overloaded"}', "stream_error"),
])
def test_bad_events(payload, kind):
    s = ChatStream(0.0)
    s.feed_line("data: " + json.dumps(chunk("", role="assistant")), 0.1)
    s.feed_line("", 0.1)
    s.feed_line("data: " + payload, 0.2)
    assert s.feed_line("", 0.2) is True  # the stream is over: no use reading on
    r = s.finish(0.3)
    assert r.error_kind == kind and not r.ok
    assert r.tpot_s is None


def test_stream_without_done_is_incomplete_but_keeps_what_arrived():
    data = sse_bytes(vllm_events(), done=False)
    s = ChatStream(0.0)
    for line in data.splitlines(keepends=True):
        s.feed_line(line, 0.4)
    r = s.finish(0.5)
    assert r.error_kind == "incomplete" and r.ttft_s == 0.4 and r.completion_tokens == 3
    assert r.e2e_s == 0.5


def test_last_event_without_blank_line_is_dispatched():
    s = ChatStream(0.0)
    s.feed_line(b"data: [DONE]", 0.3)  # no trailing newline, no blank line
    r = s.finish(0.3)
    assert r.ok and r.e2e_s == 0.3


def test_first_error_wins_and_failed_results():
    s = ChatStream(0.0)
    s.fail("stall", "no byte for 30 s")
    s.fail("incomplete", "later")
    assert s.finish(1.0).error_kind == "stall"
    r = failed("connect", "ConnectionRefusedError", 1.0, 1.25)
    assert (r.error_kind, r.e2e_s, r.ttft_s, r.itl_s) == ("connect", 0.25, None, [])
    assert [http_error_kind(c) for c in (400, 404, 429, 500, 503)] == ["http_4xx"] * 3 + ["http_5xx"] * 2


# Events of every kind the parser tells apart, as raw data payloads: feed's block path and its
# typed token decode must give what the line-by-line path (feed_line -> on_event) gives.
ODD_EVENTS = [
    json.dumps(chunk("", role="assistant")).encode(), json.dumps(chunk("es")).encode(), json.dumps(chunk("")).encode(),
    json.dumps(chunk("30", finish="length")).encode(), json.dumps(USAGE).encode(),
    b'{"choices":[{"delta":{"content":"a"}}],"usage":null}',
    b'{"choices":[{"delta":{"content":"a"}}],"choices":[{"delta":{"content":"b"}}]}',  # last key wins
    b'{"choices":[{"delta":{"content":"a","content":1}}]}',
    b'{"choices":[{"delta":{"content":"a"}},{"delta":{"content":"b"}}]}',
    b'{"id":"\xff","choices":[{"delta":{"content":"x"}}]}',  # invalid UTF-8 in a skipped field
    b'{"choices":[{"delta":{"content":"a\xff"}}]}',  # ... in the content
    b'{"choices":[{"delta":{"content":"\\ud800"}}]}', b'{"created":NaN,"choices":[{"delta":{"content":"n"}}]}',
    b'{"created":1e999,"choices":[{"delta":{"content":"i"}}]}',
    b'{"x":' + b"[" * 3000 + b"]" * 3000 + b',"choices":[{"delta":{"content":"d"}}]}',  # deeper than parsers go
    b'{"choices":[{"delta":{"content":"a"}}]} x', b"", b"[1, 2]", b'{"error": "overloaded"}',
    b'{"error": null, "choices":[{"delta":{"content":"a"}}]}', b'{"choices": 5}', b'{"choices":[{"delta":"x"}]}',
]


def _lines_of(payload: bytes, multiline: bool) -> bytes:
    if multiline and len(payload) > 2:  # the same data as two data: lines (joined with a newline)
        k = len(payload) // 2
        return b"data: " + payload[:k] + b"\ndata:" + payload[k:] + b"\n\n"
    return b"data: " + payload + b"\n\n"


@settings(max_examples=300, deadline=None)
@given(picks=st.lists(st.tuples(st.integers(0, len(ODD_EVENTS) - 1), st.booleans(), st.booleans()), max_size=12),
       cuts=st.lists(st.integers(min_value=0, max_value=20000), max_size=12), done=st.booleans())
def test_feed_blocks_match_the_line_by_line_path(picks, cuts, done):
    data = b"".join((b": keep-alive\n" if comment else b"") + _lines_of(ODD_EVENTS[i], multi)
                    for i, multi, comment in picks) + (b"data: [DONE]\n\n" if done else b"")
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    ref, fast = ChatStream(0.0), ChatStream(0.0)
    for n, piece in enumerate(pieces):  # each piece arrives at its own time
        fast.feed(piece, 1.0 + n)
    sp = LineSplitter()
    for n, piece in enumerate(pieces):
        for line in sp.feed(piece):
            ref.feed_line(line, 1.0 + n)
    for line in sp.flush():
        ref.feed_line(line, ref._last_t)
    a, b = fast.finish(99.0), ref.finish(99.0)
    assert a == b
