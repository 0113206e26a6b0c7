"""A local OpenAI-style streaming endpoint for load-generator benchmarks (bench/loadgen_capacity.py),
on raw asyncio (no web framework: the server must cost far less per chunk than any client).

It streams the way vLLM does, byte for byte in shape: a role chunk, one chunk per token (compact
JSON, `logprobs` and `finish_reason` fields, the last token's chunk with finish_reason "length"),
a usage chunk and `data: [DONE]`, with chunked transfer encoding on a keep-alive connection.
`usage.prompt_tokens` counts 3 + 4 per message + the words of each message, so kvlab's calibration
probes fit; `GET /v1/models` names the model "bench".

One engine loop emits the tokens. `--step-ms 0` (capacity): each step writes the next chunk of every
running stream, as fast as it can (a stream whose socket is full is skipped until it drains: the
client sets the pace, as under saturation; `--burst K` puts K chunks in each write, so that the
server costs far less than a client and the client is what saturates). `--step-ms X` (timing error): each stream sends a chunk
every X ms on its own clock (phase set by its arrival) and each chunk carries its send time (`"kvlab_sent_ts"`, unix seconds), and `GET /kvlab/stamps` returns, per
stream, the send time of the first chunk and of every token chunk, keyed by the request's first user
message (kvlab's turns start "Task <session id>:"), for the client-side timing error.

    python bench/sse_server.py PORT [--step-ms 0] [--burst 1] [--ttft-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import json
import time

MODEL = "bench"
HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
        b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")


def frame(payload: bytes) -> bytes:
    """One HTTP chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def chunk_obj(delta: dict, finish: str | None = None, **extra) -> dict:
    return {"id": "chatcmpl-bench0123456789abcdef0123456789ab", "object": "chat.completion.chunk",
            "created": 1733190000, "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


ROLE = frame(event(chunk_obj({"role": "assistant", "content": ""})))
TOKEN = frame(event(chunk_obj({"content": " tok"})))
LAST = frame(event(chunk_obj({"content": " tok"}, "length")))
DONE = frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"
# paced chunks carry their send time: the event with a number filled in (%.6f of unix seconds)
STAMPED = event(chunk_obj({"content": " tok"}, kvlab_sent_ts=0.5)).replace(b"0.5}\n", b"%.6f}\n")
STAMPED_LAST = event(chunk_obj({"content": " tok"}, "length", kvlab_sent_ts=0.5)).replace(b"0.5}\n", b"%.6f}\n")


def usage(prompt: int, completion: int) -> bytes:
    return frame(event({"id": "chatcmpl-bench0123456789abcdef0123456789ab", "object": "chat.completion.chunk",
                        "created": 1733190000, "model": MODEL, "choices": [],
                        "usage": {"prompt_tokens": prompt, "total_tokens": prompt + completion,
                                  "completion_tokens": completion}}))


def prompt_tokens(messages: list) -> int:
    return 3 + sum(4 + len(str(m.get("content") or "").split()) for m in messages if isinstance(m, dict))


def stamp_key(messages: list) -> str | None:
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "user" and str(m.get("content", "")).startswith("Task "):
            return str(m["content"]).split(":", 1)[0][5:]
    return None


class Stream:
    __slots__ = ("proto", "n", "sent", "prompt", "due", "key", "first_ts", "token_ts")

    def __init__(self, proto: "Conn", n: int, prompt: int, due: float, key: str | None) -> None:
        self.proto, self.n, self.sent, self.prompt, self.due, self.key = proto, n, 0, prompt, due, key
        self.first_ts: float | None = None
        self.token_ts: list[float] = []


class Engine:
    def __init__(self, step_s: float, ttft_s: float, burst: int = 1) -> None:
        self.step_s, self.ttft_s, self.burst = step_s, ttft_s, max(1, burst)
        self.stamp = step_s > 0
        self.running: list[Stream] = []
        self.wake = asyncio.Event()
        self.stamps: list[dict] = []
        self.heap: list[tuple[float, int, Stream]] = []  # paced streams by due time
        self.seq = itertools.count()

    def add(self, proto: "Conn", n: int, prompt: int, key: str | None) -> None:
        s = Stream(proto, n, prompt, time.monotonic() + self.ttft_s, key)
        if self.step_s > 0:
            heapq.heappush(self.heap, (s.due, next(self.seq), s))
        else:
            self.running.append(s)
        self.wake.set()

    def _token(self, last: bool, now: float) -> bytes:
        if not self.stamp:
            return LAST if last else TOKEN
        return frame((STAMPED_LAST if last else STAMPED) % now)

    def step(self) -> float | None:
        """Write the next chunk of every stream that can take one. Returns None if one was written,
        else how long until a stream is due (inf: all wait for their sockets to drain)."""
        t = time.monotonic()
        done = []
        wrote, wait = False, float("inf")
        for s in self.running:
            p = self.proto_ok(s)
            if p is None:
                done.append(s)
                continue
            if p.paused:
                continue
            if s.due > t:
                wait = min(wait, s.due - t)
                continue
            wrote = True
            now = time.time()
            k = min(self.burst, s.n - s.sent)
            last = s.sent + k >= s.n
            data = (HEAD + ROLE if s.sent == 0 else b"") + TOKEN * (k - 1 if last else k) + (LAST if last else b"")
            if s.sent == 0:
                s.first_ts = now
            s.sent += k
            if last:
                data += usage(s.prompt, s.n) + DONE
                done.append(s)
            p.transport.write(data)
            if last:
                p.busy = False
                p.serve_buffered()
        if done:
            gone = set(map(id, done))
            self.running = [s for s in self.running if id(s) not in gone]
        return None if wrote or done else wait

    @staticmethod
    def proto_ok(s: Stream) -> "Conn | None":
        return None if s.proto.transport is None or s.proto.transport.is_closing() else s.proto

    async def run(self) -> None:
        if self.step_s > 0:
            await self.run_paced()
            return
        while True:
            if not self.running:
                self.wake.clear()
                await self.wake.wait()
            wait = self.step()
            if wait is not None:  # nothing to write now: sleep until a socket drains or a stream is due
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), None if wait == float("inf") else wait)
                except asyncio.TimeoutError:
                    pass
            else:
                await asyncio.sleep(0)  # let the loop read new requests between steps

    async def run_paced(self) -> None:
        """Every stream on its own clock (first chunk after --ttft-ms, then one every --step-ms),
        its phase set by its arrival: chunks of different streams do not come in synchronized
        bursts, so what the client adds to each gap is its own cost and queueing."""
        while True:
            if not self.heap:
                self.wake.clear()
                await self.wake.wait()
                continue
            t = time.monotonic()
            while self.heap and self.heap[0][0] <= t:
                _, _, s = heapq.heappop(self.heap)
                if self.step_one(s):
                    heapq.heappush(self.heap, (s.due, next(self.seq), s))
            if self.heap:
                await asyncio.sleep(max(0.0, self.heap[0][0] - time.monotonic()))

    def step_one(self, s: Stream) -> bool:
        """Send one chunk of a paced stream; False when the stream is over."""
        p = self.proto_ok(s)
        if p is None:
            return False
        now = time.time()
        if s.sent == 0:
            s.first_ts = now
            p.transport.write(HEAD + ROLE)
        last = s.sent + 1 >= s.n
        p.transport.write(self._token(last, now))
        s.sent += 1
        s.token_ts.append(now)
        s.due += self.step_s
        if last:
            p.transport.write(usage(s.prompt, s.n) + DONE)
            if s.key is not None:
                self.stamps.append({"key": s.key, "first_ts": s.first_ts, "token_ts": s.token_ts})
            p.busy = False
            p.serve_buffered()
        return not last


class Conn(asyncio.Protocol):
    engine: Engine

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.paused = False
        self.busy = False  # a stream is running on this connection

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.transport = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.engine.wake.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.serve_buffered()

    def serve_buffered(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1").split("\r\n")
            length = 0
            for h in head[1:]:
                k, _, v = h.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v.strip())
            if len(self.buf) < end + 4 + length:
                return
            body, self.buf = self.buf[end + 4:end + 4 + length], self.buf[end + 4 + length:]
            method, path = head[0].split(" ")[:2]
            self.route(method, path, body)

    def reply(self, status: str, obj) -> None:
        data = json.dumps(obj).encode()
        self.transport.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
                             f"\r\n\r\n".encode() + data)

    def route(self, method: str, path: str, body: bytes) -> None:
        if method == "GET" and path == "/v1/models":
            self.reply("200 OK", {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        elif method == "GET" and path == "/health":
            self.reply("200 OK", {})
        elif method == "GET" and path == "/kvlab/stamps":
            self.reply("200 OK", {"stamps": self.engine.stamps})
            self.engine.stamps = []
        elif method == "POST" and path == "/v1/chat/completions":
            try:
                req = json.loads(body)
                messages = req.get("messages") or []
                n = max(1, int(req.get("max_tokens") or 16))
            except (ValueError, TypeError, AttributeError):
                self.reply("400 Bad Request", {"error": {"message": "bad request body", "code": 400}})
                return
            self.busy = True
            self.engine.add(self, n, prompt_tokens(messages), stamp_key(messages))
        else:
            self.reply("404 Not Found", {"error": {"message": f"no route {method} {path}", "code": 404}})


async def serve(port: int, step_ms: float, ttft_ms: float, burst: int) -> None:
    engine = Engine(step_ms / 1000, ttft_ms / 1000, burst)
    Conn.engine = engine
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Conn, "127.0.0.1", port, backlog=1024)
    async with server:
        await asyncio.gather(server.serve_forever(), engine.run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("port", type=int)
    ap.add_argument("--step-ms", type=float, default=0.0, help="engine step period; 0: as fast as the clients read")
    ap.add_argument("--ttft-ms", type=float, default=0.0, help="delay before a stream's first chunk")
    ap.add_argument("--burst", type=int, default=1, help="with --step-ms 0: token chunks per write (one write per "
                    "stream per step; each chunk still its own SSE event)")
    args = ap.parse_args()
    try:
        asyncio.run(serve(args.port, args.step_ms, args.ttft_ms, args.burst))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
