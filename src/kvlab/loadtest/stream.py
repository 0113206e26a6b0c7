"""Measure a streamed chat completion from its SSE lines, timestamped as they arrive.

Transport-free: the Locust user feeds lines read with geventhttpclient's `readline`, the benchmark
client feeds aiohttp's; tests feed bytes split anywhere. Reading whole lines as soon as they arrive
matters: a reader that waits for 1 KiB (Locust's `iter_lines` / `iter_content(1024)`) sees the first
token late and inflates TTFT.

Definitions follow vLLM's (`vllm bench serve` and the server's own histograms):
- TTFT: send -> first chunk carrying a choice (vLLM sends it when the first token is out).
- ITL: every gap between consecutive chunks that carry generated text (each is one token unless
  the server batches several into a chunk).
- TPOT: (E2E - TTFT) / (completion_tokens - 1).
- E2E: send -> `data: [DONE]` (or the end of the stream).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# connect: no HTTP response (refused, reset, no headers in time); timeout: no complete reply within
# request.timeout_s; stall: no byte for request.stall_timeout_s mid-stream; http_4xx / http_5xx: error
# status; malformed_sse: an event that is not JSON; stream_error: an error event in the stream;
# incomplete: the stream ended without [DONE]; bad_response: a JSON answer without what was asked
# (GET /v1/models); cancelled: the run stopped the user mid-request.
ERROR_KINDS = ("connect", "timeout", "stall", "http_4xx", "http_5xx", "malformed_sse", "stream_error",
               "incomplete", "bad_response", "cancelled")


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
    """Feed it SSE lines with their arrival time (same clock as `t0`); `finish()` gives the result."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.r = StreamResult()
        self.done = False
        self._data: list[str] = []
        self._parts: list[str] = []
        self._last_token_t: float | None = None
        self._last_t = t0

    # --- SSE framing -----------------------------------------------------------------------

    def feed_line(self, line: bytes | str, now: float) -> bool:
        """One line (with or without its line ending). Returns True once the stream is over."""
        if self.done:
            return True
        self._last_t = now
        text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
        text = text.rstrip("\r\n")
        if text == "":
            self._dispatch(now)
        elif text.startswith(":"):
            pass  # SSE comment / keep-alive
        elif text.startswith("data:"):
            value = text[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
        # other fields (event:, id:, retry:) carry nothing for chat completions
        return self.done

    def _dispatch(self, now: float) -> None:
        if not self._data:
            return
        payload = "\n".join(self._data)
        self._data = []
        self.on_event(payload, now)

    # --- OpenAI chat-completion chunks -------------------------------------------------------

    def on_event(self, payload: str, now: float) -> None:
        if payload.strip() == "[DONE]":
            self._end(now)
            return
        try:
            obj = json.loads(payload)
        except ValueError:
            self.fail("malformed_sse", "event data is not JSON")
            return
        if not isinstance(obj, dict):
            self.fail("malformed_sse", "event is not a JSON object")
            return
        if "error" in obj:
            err = obj["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            self.fail("stream_error", str(msg)[:200] or "an error event without a message")
            return
        choices = obj.get("choices") or []
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            self.fail("malformed_sse", "event choices are not a list of objects")
            return
        if choices:
            self._on_choice(choices[0], now)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._on_usage(usage)

    def _on_choice(self, choice: dict, now: float) -> None:
        delta = choice.get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        finish = choice.get("finish_reason")
        if not isinstance(delta, dict) or not isinstance(content, (str, type(None))) or \
                not isinstance(finish, (str, type(None))):
            self.fail("malformed_sse", "a choice whose delta, content or finish_reason is not what OpenAI sends")
            return
        if self.r.ttft_s is None:
            self.r.ttft_s = now - self.t0
        if content:
            if self._last_token_t is not None:
                self.r.itl_s.append(now - self._last_token_t)
            self._last_token_t = now
            self.r.chunks += 1
            self._parts.append(content)
        if choice.get("finish_reason"):
            self.r.finish_reason = choice["finish_reason"]

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
