"""An in-process OpenAI-compatible chat server (aiohttp, in a thread) for load-generator tests.

It streams the way vLLM does (a role chunk, one chunk per token, a finish chunk, a usage chunk,
`data: [DONE]`), counts tokens as whitespace-separated words plus fixed template overheads, keeps a
32-token-block prefix cache to report `cached_tokens`, and remembers every request and reply so a
test can check that replies come back verbatim. `faults` maps a request number (1-based, probes
included) or a predicate to a misbehaviour.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from dataclasses import dataclass, field
from typing import Callable

from aiohttp import web

BASE_TOKENS = 3  # per request (generation prompt)
MESSAGE_TOKENS = 4  # per message (role markers)
BLOCK = 32

FAULTS = ("http_500", "http_400", "malformed", "error_event", "stall", "drop", "no_done", "trickle")


def words(text: str) -> list[str]:
    return text.split()


def prompt_tokens(messages: list[dict]) -> list[str]:
    """The fake tokenizer: template markers and words."""
    toks = ["<bos>", "<gen>", "<gen2>"]
    for m in messages:
        toks += [f"<{m['role']}>", "<nl>", *words(m.get("content") or ""), "</s>", "<nl>"]
    return toks


@dataclass
class FakeConfig:
    ttft_s: float = 0.0
    itl_s: float = 0.0
    accept_ignore_eos: bool = True
    eos_after: int = 5  # without ignore_eos the fake "model" stops here
    stall_s: float = 5.0  # "stall": silence this long mid-stream, then the stream resumes
    trickle_s: float = 6.0  # "trickle": keep-alive comments this long, then the stream ends
    api_key: str | None = None  # like vllm serve --api-key: every request needs "Authorization: Bearer KEY"
    faults: dict[int, str] = field(default_factory=dict)
    fault_when: Callable[[int, dict], str | None] | None = None


class FakeOpenAI:
    def __init__(self, config: FakeConfig | None = None, model: str = "fake-model") -> None:
        self.config = config or FakeConfig()
        self.model = model
        self.requests: list[dict] = []  # bodies, in arrival order
        self.replies: dict[str, int] = {}  # reply text -> request number
        self.cached_blocks: set[tuple] = set()
        self.n = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FakeOpenAI":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake server did not start")

    def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat_quietly)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._loop.run_until_complete(web.SockSite(self._runner, sock).start())
        ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._loop is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        try:
            fut.result(10)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    # --- checks a test makes ---------------------------------------------------------------------

    def verbatim_violations(self) -> list[str]:
        """Assistant messages that are not exactly a reply this server sent earlier."""
        bad = []
        for i, body in enumerate(self.requests, 1):
            for m in body.get("messages", []):
                if m["role"] == "assistant" and self.replies.get(m["content"], i) >= i:
                    bad.append(f"request {i}: {m['content'][:40]!r}")
        return bad

    # --- handlers ------------------------------------------------------------------------------

    def _unauthorized(self, request: web.Request) -> bool:
        key = self.config.api_key
        return key is not None and request.headers.get("Authorization") != f"Bearer {key}"

    async def _models(self, request: web.Request) -> web.Response:
        if self._unauthorized(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    def _fault(self, n: int, body: dict) -> str | None:
        if n in self.config.faults:
            return self.config.faults[n]
        return self.config.fault_when(n, body) if self.config.fault_when else None

    def _cached(self, toks: list[str]) -> int:
        hit = 0
        for end in range(BLOCK, len(toks), BLOCK):  # a full hit still recomputes the last token
            if tuple(toks[:end]) in self.cached_blocks:
                hit = end
            else:
                break
        for end in range(BLOCK, len(toks) + 1, BLOCK):
            self.cached_blocks.add(tuple(toks[:end]))
        return hit

    async def _chat_quietly(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._chat(request)
        except ConnectionResetError:  # the client gave up (stall and timeout tests): expected
            return web.Response(status=499)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if self._unauthorized(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        body = await request.json()
        self.n += 1
        n = self.n
        self.requests.append(body)
        fault = self._fault(n, body)
        if fault == "http_500":
            return web.json_response({"error": {"message": "boom", "code": 500}}, status=500)
        if fault == "http_400" or ("ignore_eos" in body and not self.config.accept_ignore_eos):
            return web.json_response({"error": {"message": "Extra inputs are not permitted: ignore_eos", "code": 400}}, status=400)
        toks = prompt_tokens(body["messages"])
        n_out = body["max_tokens"] if body.get("ignore_eos") else min(body["max_tokens"], self.config.eos_after)
        out_words = [f"r{n}w{k}" for k in range(n_out)]
        reply = " ".join(out_words)
        self.replies.setdefault(reply, n)

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)

        async def send(obj) -> None:
            await resp.write(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode())

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {"id": f"chatcmpl-{n}", "object": "chat.completion.chunk", "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        await asyncio.sleep(self.config.ttft_s)
        await send(chunk({"role": "assistant", "content": ""}))
        if fault == "malformed":
            await resp.write(b'data: {"id": "chatcmpl-broken", "choices": [\n\n')
            return await self._end(resp)
        if fault == "error_event":
            await send({"error": {"message": "engine died", "code": 500}})
            return await self._end(resp)
        for k, w in enumerate(out_words):
            if k:
                await asyncio.sleep(self.config.itl_s)
            if fault == "stall" and k == 1:
                await asyncio.sleep(self.config.stall_s)
            if fault == "drop" and k == 1:
                request.transport.close()  # the connection dies mid-stream
                return resp
            await send(chunk({"content": (" " if k else "") + w}, "length" if k == n_out - 1 else None))
        if fault == "trickle":  # alive, but not finishing in time
            for _ in range(int(self.config.trickle_s / 0.2)):
                await asyncio.sleep(0.2)
                await resp.write(b": keep-alive\n\n")
        await send({"id": f"chatcmpl-{n}", "object": "chat.completion.chunk", "model": self.model, "choices": [],
                    "usage": {"prompt_tokens": len(toks), "completion_tokens": n_out, "total_tokens": len(toks) + n_out,
                              "prompt_tokens_details": {"cached_tokens": self._cached(toks)}}})
        if fault != "no_done":
            await send("[DONE]")
        return await self._end(resp)

    async def _end(self, resp: web.StreamResponse) -> web.StreamResponse:
        await resp.write_eof()
        return resp
