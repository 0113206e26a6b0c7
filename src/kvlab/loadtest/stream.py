"""Measure a streamed chat completion from its SSE lines, timestamped as they arrive.

Transport-free: the Locust user feeds the line geventhttpclient's `readline` returned together with
the whole lines that came in the same recv (`feed`, one arrival time), the driver's tests feed httpx's
lines (`feed_line`); tests feed bytes split anywhere. Reading whole lines as soon as they arrive
matters: a reader that waits for 1 KiB (Locust's `iter_lines` / `iter_content(1024)`) sees the first
token late and inflates TTFT.

Definitions follow vLLM's (`vllm bench serve` and the server's own histograms):
- TTFT: send -> first chunk carrying a choice (vLLM sends it when the first token is out).
- ITL: every gap between consecutive chunks that carry generated text (each is one token unless
  the server batches several into a chunk). `vllm bench serve` also counts the gap from the role
  chunk to the first token's (about 0: vLLM sends them together), so its chat ITLs number one more
  a request and its mean ITL is (n - 1) / n of this one's for n-token replies; `kvlab sim bench`
  reports vLLM's.
- TPOT: (E2E - TTFT) / (completion_tokens - 1).
- E2E: send -> `data: [DONE]` (or the end of the stream).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import msgspec
import orjson
from msgspec import UNSET, UnsetType

_loads = orjson.loads  # raises orjson.JSONDecodeError, a ValueError


class _Delta(msgspec.Struct, gc=False):
    content: str


class _Choice(msgspec.Struct, gc=False):
    delta: _Delta
    finish_reason: None = None


class _TokenChunk(msgspec.Struct, gc=False):
    """The token chunk, as on_event's first case decides it: a JSON object whose `choices` is
    exactly one object with a `delta` object whose `content` is a string and a `finish_reason`
    that is null or absent, with neither `usage` nor `error` (typed UnsetType: any value there,
    null too, fails to decode). Any other event fails to decode (a ValueError) and goes to
    on_event. Decoding validates what it skips, as orjson does; what it takes that orjson refuses
    (invalid UTF-8 or numbers out of range in a skipped field) the standard parser on_event falls
    back to takes too, with the same content."""
    choices: tuple[_Choice]
    usage: UnsetType = UNSET
    error: UnsetType = UNSET


_decode_token = msgspec.json.Decoder(_TokenChunk).decode  # raises msgspec.DecodeError or UnicodeDecodeError: ValueErrors

# connect: no HTTP response (refused, reset, no headers in time); timeout: no complete reply within
# request.timeout_s; stall: no byte for request.stall_timeout_s mid-stream; http_4xx / http_5xx: error
# status; malformed_sse: an event that is not JSON; stream_error: an error event in the stream;
# incomplete: the stream ended without [DONE]; bad_response: a JSON answer without what was asked
# (GET /v1/models); cancelled: the run stopped the user mid-request; calibration: the server's usage
# counts cannot size prompts (a probe record, probe "fit": the run stops).
ERROR_KINDS = ("connect", "timeout", "stall", "http_4xx", "http_5xx", "malformed_sse", "stream_error",
               "incomplete", "bad_response", "cancelled", "calibration")


@dataclass
class StreamResult:
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    tpot_s: float | None = None
    e2e_s: float | None = None
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    chunks: int = 0  # chunks that carried generated text
    error_kind: str | None = None
    error_detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None


class LineSplitter:
    """Bytes as they arrive -> complete lines (for transports that hand over raw chunks)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        if b"\n" not in self._buf and b"\r" not in self._buf:
            return []
        lines = self._buf.splitlines(keepends=True)
        # A trailing "\r" may be the first half of "\r\n": keep it until the next byte decides.
        if lines and (not lines[-1].endswith((b"\n", b"\r")) or lines[-1].endswith(b"\r")):
            self._buf = lines.pop()
        else:
            self._buf = b""
        return lines

    def flush(self) -> list[bytes]:
        rest, self._buf = self._buf, b""
        return [rest] if rest else []


class ChatStream:
    """Feed it SSE lines (`feed_line`) or raw body bytes (`feed`) with their arrival time (same
    clock as `t0`); `finish()` gives the result.

    The per-chunk path is kept short, as it runs for every token of every request: lines stay
    bytes; `feed` splits a block of whole one-line events on the event boundaries and decodes
    each one straight into the token chunk's few fields (`_TokenChunk`, msgspec); any other event
    goes to on_event, which decodes it with orjson and, for what orjson refuses, again with the
    standard library, so that every error kind (and what the standard parser accepts) stays as
    it was."""

    __slots__ = ("t0", "r", "done", "_data", "_parts", "_last_token_t", "_last_t", "_rest", "_splitter")

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.r = StreamResult()
        self.done = False
        self._data: list[bytes] = []
        self._parts: list[str] = []
        self._last_token_t: float | None = None
        self._last_t = t0
        self._rest = b""
        self._splitter: LineSplitter | None = None

    # --- SSE framing -----------------------------------------------------------------------

    def feed(self, data: bytes, now: float) -> bool:
        """Body bytes as they arrived (split anywhere); every complete line is stamped `now`.
        Returns True once the stream is over. `finish()` takes a last line without its newline."""
        if self.done or not data:
            return self.done
        if self._splitter is not None or b"\r" in data:
            # CR or CRLF line endings: the general splitter (a lone "\r" waits for the next byte)
            if self._splitter is None:
                self._splitter = LineSplitter()
                data, self._rest = self._rest + data, b""
            for line in self._splitter.feed(data):
                if self.feed_line(line, now):
                    break
            return self.done
        if self._rest:
            data = self._rest + data
        self._last_t = now
        if not self._data and data[:6] == b"data: " and data[-2:] == b"\n\n":
            # The common block: whole events of one "data: " line each. Split on the event
            # boundaries; with exactly two newlines per event, no payload holds a newline, so each
            # one is a whole event's data (what the line-by-line loop below would collect).
            payloads = data[6:-2].split(b"\n\ndata: ")
            if data.count(b"\n") == 2 * len(payloads):
                self._rest = b""
                self._events(payloads, now)
                return self.done
        lines = data.split(b"\n")
        self._rest = lines.pop()
        pending, events = self._data, []
        for line in lines:
            if not line:
                if pending:
                    events.append(pending[0] if len(pending) == 1 else b"\n".join(pending))
                    pending = []
            elif line[:6] == b"data: ":
                pending.append(line[6:])
            elif line[:5] == b"data:":
                pending.append(line[5:])
            # comments (":") and other fields (event:, id:, retry:) carry nothing for chat completions
        self._data = pending
        if events:
            self._events(events, now)
        return self.done

    def _events(self, payloads: list[bytes], now: float) -> None:
        """Events' data that arrived together: a token chunk is decoded straight into the few
        typed fields that decide it (`_TokenChunk`: msgspec skips the rest without building it),
        its state kept in locals; anything that does not decode as one goes to on_event whole."""
        decode, r, parts = _decode_token, self.r, self._parts
        gaps, last_t, chunks = r.itl_s, self._last_token_t, r.chunks
        for payload in payloads:
            try:
                content = decode(payload).choices[0].delta.content
            except (ValueError, RecursionError):  # not a token chunk (or not JSON): on_event decides
                pass
            else:
                if r.ttft_s is None:
                    r.ttft_s = now - self.t0
                if content:
                    if last_t is not None:
                        gaps.append(now - last_t)
                    last_t = now
                    chunks += 1
                    parts.append(content)
                continue
            self._last_token_t, r.chunks = last_t, chunks
            self.on_event(payload, now)
            last_t, chunks = self._last_token_t, r.chunks
            if self.done:
                break
        self._last_token_t, r.chunks = last_t, chunks

    def feed_line(self, line: bytes | bytearray | str, now: float) -> bool:
        """One line (with or without its line ending). Returns True once the stream is over."""
        if self.done:
            return True
        self._last_t = now
        if isinstance(line, str):
            line = line.encode("utf-8", errors="surrogateescape")
        if line[:6] == b"data: ":  # the common line first
            self._data.append(line[6:].rstrip(b"\r\n"))
            return False
        line = line.rstrip(b"\r\n")
        if not line:
            if self._data:
                self._dispatch(now)
        elif line[:5] == b"data:":
            self._data.append(line[5:])
        # comments (":") and other fields (event:, id:, retry:) carry nothing for chat completions
        return self.done

    def _flush_lines(self) -> None:
        """The end of the body: a last line without its newline counts."""
        rest = self._splitter.flush() if self._splitter is not None else ([self._rest] if self._rest else [])
        self._rest = b""
        for line in rest:
            self.feed_line(line, self._last_t)

    def _dispatch(self, now: float) -> None:
        data = self._data
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        self._data = []
        self.on_event(payload, now)

    # --- OpenAI chat-completion chunks -------------------------------------------------------

    def on_event(self, payload: bytes | str, now: float) -> None:
        if isinstance(payload, str):
            payload = payload.encode("utf-8", errors="surrogateescape")
        if payload == b"[DONE]":  # never JSON: spared the parser's exception (below for the padded forms)
            self._end(now)
            return
        try:
            obj = _loads(payload)
        except ValueError:
            if payload.strip() == b"[DONE]":
                self._end(now)
                return
            # what orjson refuses (NaN, huge integers, invalid UTF-8, lone surrogates) the standard
            # parser may take, as it always did: the slow path keeps its verdicts
            try:
                obj = json.loads(payload.decode("utf-8", errors="replace"))
            except ValueError:
                self.fail("malformed_sse", "event data is not JSON")
                return
            except RecursionError:  # deeper than the standard parser goes
                self.fail("malformed_sse", "event data nested too deep to read")
                return
        if type(obj) is not dict:
            self.fail("malformed_sse", "event is not a JSON object")
            return
        # the token chunk (one choice, a delta with text, no finish, no usage, no error): read with
        # the few checks that decide it, everything else below
        choices = obj.get("choices")
        if type(choices) is list and len(choices) == 1 and "usage" not in obj and "error" not in obj:
            choice = choices[0]
            if type(choice) is dict and choice.get("finish_reason") is None:
                delta = choice.get("delta")
                if type(delta) is dict and type(delta.get("content")) is str:
                    self._on_token(delta["content"], now)
                    return
        if "error" in obj:
            err = obj["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            self.fail("stream_error", str(msg)[:200] or "an error event without a message")
            return
        choices = obj.get("choices") or []
        if type(choices) is list and len(choices) == 1 and type(choices[0]) is dict:
            self._on_choice(choices[0], now)  # the common chunk: one choice
        elif choices:
            if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
                self.fail("malformed_sse", "event choices are not a list of objects")
                return
            self._on_choice(choices[0], now)
        usage = obj.get("usage")
        if type(usage) is dict:
            self._on_usage(usage)

    def _on_token(self, content: str, now: float) -> None:
        """A token chunk read on the fast path: what _on_choice does with a delta holding only
        `content` and no finish_reason."""
        r = self.r
        if r.ttft_s is None:
            r.ttft_s = now - self.t0
        if content:
            if self._last_token_t is not None:
                r.itl_s.append(now - self._last_token_t)
            self._last_token_t = now
            r.chunks += 1
            self._parts.append(content)

    def _on_choice(self, choice: dict, now: float) -> None:
        delta = choice.get("delta") or {}
        finish = choice.get("finish_reason")
        content = delta.get("content") if type(delta) is dict else None
        if type(delta) is not dict or (content is not None and type(content) is not str) or \
                (finish is not None and type(finish) is not str):
            self.fail("malformed_sse", "a choice whose delta, content or finish_reason is not what OpenAI sends")
            return
        self._on_token(content or "", now)
        if finish:
            self.r.finish_reason = finish

    def _on_usage(self, usage: dict) -> None:
        details = usage.get("prompt_tokens_details")
        counts = {"prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
                  "cached_tokens": details.get("cached_tokens") if isinstance(details, dict) else None}
        bad = [k for k, v in counts.items() if v is not None and (type(v) is not int or v < 0)]
        if bad:
            self.fail("malformed_sse", f"usage {bad[0]} is not a token count")
            return
        self.r.prompt_tokens = counts["prompt_tokens"]
        self.r.completion_tokens = counts["completion_tokens"]
        self.r.cached_tokens = counts["cached_tokens"]

    def _end(self, now: float) -> None:
        self.done = True
        self.r.e2e_s = now - self.t0

    def fail(self, kind: str, detail: str) -> None:
        """A transport or protocol error; the first one wins."""
        if self.r.error_kind is None:
            self.r.error_kind = kind
            self.r.error_detail = detail
        self.done = True

    # --- result -------------------------------------------------------------------------------

    def finish(self, now: float) -> StreamResult:
        """Close the stream at `now` (end of body): a stream without [DONE] is incomplete."""
        if not self.done:
            self._flush_lines()
            if self._data and not self.done:
                self._dispatch(self._last_t)
            if not self.done:
                self.fail("incomplete", "stream ended without data: [DONE]")
        r = self.r
        if r.e2e_s is None:
            r.e2e_s = now - self.t0
        r.text = "".join(self._parts)
        n = r.completion_tokens if r.completion_tokens is not None else r.chunks
        if r.ok and r.ttft_s is not None and n and n > 1:
            r.tpot_s = (r.e2e_s - r.ttft_s) / (n - 1)
        return r


def failed(kind: str, detail: str, t0: float, now: float) -> StreamResult:
    """The result of a request that never got a stream (connect error, HTTP error status)."""
    return StreamResult(e2e_s=now - t0, error_kind=kind, error_detail=detail)


def http_error_kind(status: int) -> str:
    return "http_5xx" if status >= 500 else "http_4xx"
