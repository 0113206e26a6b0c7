"""An OpenAI-compatible chat server (aiohttp) for load-generator and fault tests: in-process (in a
thread) or as a process that stands in for `vllm serve` (`python tests/fake_openai.py --model M
--served-model-name NAME --host H --port P ...`, faults from the environment, see `main`).

It streams the way vLLM does (a role chunk, one chunk per token, a finish chunk, a usage chunk,
`data: [DONE]`), counts tokens as whitespace-separated words plus fixed template overheads, keeps a
32-token-block prefix cache to report `cached_tokens`, and remembers every request and reply so a
test can check that replies come back verbatim. `faults` maps a request number (1-based, probes
included) or a predicate to a misbehaviour. `/health` and a vLLM-style `/metrics` (vLLM's names:
cache_config_info, kv_cache_usage_perc, running/waiting, prompt/generation token counters) are
served too, and can fail on purpose (`health_status`, `metrics_gone_after`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from aiohttp import web

BASE_TOKENS = 3  # per request (generation prompt)
MESSAGE_TOKENS = 4  # per message (role markers)
BLOCK = 32

FAULTS = ("http_500", "http_400", "malformed", "error_event", "stall", "drop", "no_done", "trickle", "redirect")


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
    health_status: int = 200  # what GET /health answers
    metrics_gone_after: int | None = None  # GET /metrics answers 404 after this many answers
    redirect_to: str | None = None  # "redirect": 307 to this base URL (load must not follow it)
    kv_cache_tokens: int = 8192  # what /metrics reports as the KV pool (num_gpu_blocks x block_size)
    block_size: int = 128
    constant_prompt_tokens: int | None = None  # usage.prompt_tokens says this whatever the prompt (a stub)


class FakeOpenAI:
    def __init__(self, config: FakeConfig | None = None, model: str = "fake-model", host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.config = config or FakeConfig()
        self.model = model
        self.host = host
        self.metrics_served = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.running = 0
        self.requests: list[dict] = []  # bodies, in arrival order
        self.replies: dict[str, int] = {}  # reply text -> request number
        self.cached_blocks: set[tuple] = set()
        self.n = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None
        self.port = port

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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
        if self._error is not None:
            raise self._error

    def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat_quietly)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:  # the port is taken: say so at once
            self._error = e
            ready.set()
            return
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

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.config.health_status)

    async def _metrics(self, request: web.Request) -> web.Response:
        gone = self.config.metrics_gone_after
        if gone is not None and self.metrics_served >= gone:
            return web.Response(status=404, text="Not Found")
        self.metrics_served += 1
        return web.Response(text=self.exposition(), content_type="text/plain")

    def exposition(self) -> str:
        """The families kvlab's figures read, with vLLM's names and labels."""
        c = self.config
        blocks = c.kv_cache_tokens // c.block_size
        used = min(1.0, len(self.cached_blocks) * BLOCK / c.kv_cache_tokens)
        lab = f'engine="0",model_name="{self.model}"'
        return "".join([
            "# TYPE vllm:num_requests_running gauge\n", f"vllm:num_requests_running{{{lab}}} {self.running}.0\n",
            "# TYPE vllm:num_requests_waiting gauge\n", f"vllm:num_requests_waiting{{{lab}}} 0.0\n",
            "# TYPE vllm:kv_cache_usage_perc gauge\n", f"vllm:kv_cache_usage_perc{{{lab}}} {used}\n",
            "# TYPE vllm:num_preemptions_total counter\n", f"vllm:num_preemptions_total{{{lab}}} 0.0\n",
            "# TYPE vllm:prompt_tokens_total counter\n", f"vllm:prompt_tokens_total{{{lab}}} {self.prompt_tokens_total}.0\n",
            "# TYPE vllm:generation_tokens_total counter\n",
            f"vllm:generation_tokens_total{{{lab}}} {self.generation_tokens_total}.0\n",
            "# TYPE vllm:cache_config_info gauge\n",
            f'vllm:cache_config_info{{block_size="{c.block_size}",cache_dtype="auto",engine="0",'
            f'kv_cache_size_tokens="{c.kv_cache_tokens}",num_gpu_blocks="{blocks}"}} 1.0\n',
        ])

    def _fault(self, n: int, body: dict) -> str | None:
        if n in self.config.faults:
            return self.config.faults[n]
        return self.config.fault_when(n, body) if self.config.fault_when else None

    def _usage_prompt(self, toks: list[str]) -> int:
        c = self.config.constant_prompt_tokens
        return len(toks) if c is None else c

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
        self.running += 1
        try:
            return await self._chat(request)
        except ConnectionResetError:  # the client gave up (stall and timeout tests): expected
            return web.Response(status=499)
        finally:
            self.running -= 1

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if self._unauthorized(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        body = await request.json()
        self.n += 1
        n = self.n
        self.requests.append(body)
        fault = self._fault(n, body)
        if fault == "redirect":
            raise web.HTTPTemporaryRedirect(f"{self.config.redirect_to}{request.path}")
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

        self.prompt_tokens_total += len(toks)
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
            self.generation_tokens_total += 1
        if fault == "trickle":  # alive, but not finishing in time
            for _ in range(int(self.config.trickle_s / 0.2)):
                await asyncio.sleep(0.2)
                await resp.write(b": keep-alive\n\n")
        await send({"id": f"chatcmpl-{n}", "object": "chat.completion.chunk", "model": self.model, "choices": [],
                    "usage": {"prompt_tokens": self._usage_prompt(toks), "completion_tokens": n_out,
                              "total_tokens": self._usage_prompt(toks) + n_out,
                              "prompt_tokens_details": {"cached_tokens": self._cached(toks)}}})
        if fault != "no_done":
            await send("[DONE]")
        return await self._end(resp)

    async def _end(self, resp: web.StreamResponse) -> web.StreamResponse:
        await resp.write_eof()
        return resp


# --- as a process standing in for `vllm serve` ----------------------------------------------------

FAKE_ENV = "KVLAB_FAKE"  # JSON: the fault plan of a fake server process (see main)


def main(argv: list[str] | None = None) -> None:
    """Serve like `python -m vllm.entrypoints.openai.api_server` (the same flags; unknown ones are
    ignored). The environment variable KVLAB_FAKE (JSON) says how to misbehave, for every server or,
    under a served model name, for that one ({"llama-3.1-8b": {...}}):
      start_delay_s: wait this long before listening;  exit_at_start: after 1 s print a vLLM-like error, exit
      with this code;  hang: listen but never answer (not even /health);  health_status: what
      /health answers;  child: start a child process in the group (like vLLM's EngineCore);
      fault_all: the fault of every chat request;  faults_every: {fault: k}, request n (n > 4, after
      the calibration) gets the first fault whose k divides n;  metrics_gone_after, stall_s, itl_s,
      ttft_s: as FakeConfig.  VLLM_API_KEY is honoured as by vLLM."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fake")
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args, _ = ap.parse_known_args(argv)
    plan = json.loads(os.environ.get(FAKE_ENV) or "{}")
    name = args.served_model_name or args.model
    plan = plan.get(name, {}) if any(isinstance(v, dict) and k != "faults_every" for k, v in plan.items()) else plan
    print(f"INFO fake vLLM API server version 0.0.0+fake (pid {os.getpid()}, group {os.getpgid(0)})", flush=True)
    if plan.get("child"):
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])  # same group, like EngineCore
    time.sleep(plan.get("start_delay_s", 0))
    if "exit_at_start" in plan:
        # real vLLM fails after seconds of loading, not at once: live long enough (1 s) for the tests'
        # process watch (a sample every 0.2 s) to see this server's group even on a loaded machine
        time.sleep(1.0)
        print("ValueError: To serve at least one request with the models's max seq len (4096), (0.50 GiB KV "
              "cache is needed, which is larger than the available KV cache memory (0.01 GiB).", flush=True)
        sys.exit(plan["exit_at_start"])
    if plan.get("hang"):
        sock = socket.socket()
        sock.bind((args.host, args.port))
        sock.listen(16)  # connections are accepted by the kernel and never answered
        while True:
            time.sleep(3600)
    fault_all, every = plan.get("fault_all"), plan.get("faults_every", {})

    def fault_when(n: int, body: dict) -> str | None:
        if fault_all:
            return fault_all
        return next((kind for kind, k in every.items() if n > 4 and n % k == 0), None)

    config = FakeConfig(
        api_key=os.environ.get("VLLM_API_KEY"), health_status=plan.get("health_status", 200),
        metrics_gone_after=plan.get("metrics_gone_after"), stall_s=plan.get("stall_s", 5.0),
        itl_s=plan.get("itl_s", 0.0), ttft_s=plan.get("ttft_s", 0.0), fault_when=fault_when)
    srv = FakeOpenAI(config, model=name, host=args.host, port=args.port)
    srv.start()
    tokens = config.kv_cache_tokens
    print(f"INFO CPU KV cache size: {tokens:,} tokens, Maximum concurrency for 4,096 tokens per request: "
          f"{tokens / 4096:.2f}x", flush=True)
    print(f"INFO Starting vLLM API server on http://{args.host}:{srv.port}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # SIGINT to the group: shut down as vLLM does, without a traceback
        print("INFO Shutting down", flush=True)
