"""A zero-latency OpenAI-style streaming endpoint for load-generator benchmarks: every request gets
`max_tokens` pre-encoded chat-completion chunks written back to back, a usage chunk and [DONE].

    python bench/sse_server.py PORT
"""

from __future__ import annotations

import json
import sys

from aiohttp import web

CHUNK = ("data: " + json.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "model": "bench",
                                "choices": [{"index": 0, "delta": {"content": " tok"}, "finish_reason": None}]})
         + "\n\n").encode()
ROLE = ("data: " + json.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "model": "bench",
                               "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]}) + "\n\n").encode()
DONE = b"data: [DONE]\n\n"


def usage(prompt: int, completion: int) -> bytes:
    return ("data: " + json.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "choices": [],
                                   "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                             "total_tokens": prompt + completion}}) + "\n\n").encode()


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "bench", "object": "model"}]})


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    n = int(body.get("max_tokens", 16))
    prompt = 3 + sum(4 + len((m.get("content") or "").split()) for m in body.get("messages", []))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    await resp.write(ROLE)
    for _ in range(n):
        await resp.write(CHUNK)
    await resp.write(usage(prompt, n))
    await resp.write(DONE)
    await resp.write_eof()
    return resp


def main() -> None:
    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
