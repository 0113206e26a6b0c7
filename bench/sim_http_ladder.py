"""An agent ladder against `kvlab sim serve` over HTTP: where do preemptions start?

For each model, start `kvlab sim serve MODEL --gpu h100 --speedup X`, then for each rung send
`users` concurrent completions at once: a shared 1000-token system prompt, 200 tokens of the
user's own, and a reply that ends the context at 8,192 tokens (the last KV block fills on the last
step, so all users hold their full context at the same moment). The rungs are the memory model's
prediction (`kvlab.replay.sessions.predicted_max_users`) and one more user; vllm:num_preemptions_total
from /metrics says what happened.

The users must hold their full contexts at the same moment: the last block of a request is taken
at most `block_size - 1` steps before it ends, so all requests must be admitted within that many
steps. Over HTTP the requests of a burst arrive over a fraction of a wall second, which at a high
`--speedup` is many simulated steps; so the ladder serves `--block-size 256` (255 steps of slack;
the same KV tokens) at `--speedup 2` (a burst spread over 3 simulated seconds, about 100 steps,
still preempts at the predicted rung; over 6 it no longer does). Run: `python bench/sim_http_ladder.py`
(about 8 minutes).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvlab.loadtest.plan import SessionPlan, TurnPlan
from kvlab.ports import free_port
from kvlab.replay.sessions import predicted_max_users

SYSTEM, USER, END = 1000, 200, 8192
REPLY_TOKENS = END - SYSTEM - USER + 1
SESSION = SessionPlan("user", "app0", SYSTEM, (TurnPlan(USER, REPLY_TOKENS, 0.0),))
PORT = int(os.environ.get("PORT", "0"))  # 0: a free port
BLOCK_SIZE = os.environ.get("BLOCK_SIZE", "256")


def word(i: int, tag: str) -> str:
    """A one-token word (letters only, <= 8 bytes with its leading space)."""
    letters = ""
    while True:
        letters = "abcdefghijklmnopqrstuvwxyz"[i % 26] + letters
        i //= 26
        if not i:
            break
    return " " + tag + letters


def prompt(user: int) -> str:
    return "".join(word(i, "s") for i in range(SYSTEM)) + "".join(word(user * USER + i, "u") for i in range(USER))


def preemptions(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "vllm:num_preemptions_total")


async def rung(url: str, users: int) -> dict:
    bodies = [json.dumps({"prompt": prompt(u), "max_tokens": REPLY_TOKENS}).encode() for u in range(users)]
    before = preemptions(url)
    t0 = time.time()
    sent: list[float] = []

    async def post(c: httpx.AsyncClient, body: bytes) -> httpx.Response:
        sent.append(time.time())
        return await c.post("/v1/completions", content=body, headers={"content-type": "application/json"})

    limits = httpx.Limits(max_connections=users + 8)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as c:
        replies = await asyncio.gather(*(post(c, b) for b in bodies))
    usage = [r.json()["usage"] for r in replies]
    assert all(u["prompt_tokens"] == SYSTEM + USER for u in usage), usage[0]
    return {"users": users, "preemptions": preemptions(url) - before, "wall_s": round(time.time() - t0, 1),
            "send_spread_wall_s": round(max(sent) - min(sent), 2),
            "completion_tokens": sum(u["completion_tokens"] for u in usage)}


def ladder(model: str, speedup: float) -> dict:
    port = PORT or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvlab", "sim", "serve", model, "--gpu", "h100", "--port", str(port),
                             "--speedup", str(speedup), "--block-size", BLOCK_SIZE, "--disable-uvicorn-access-log",
                             "--disable-log-stats"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = []
    try:
        for line in proc.stdout:
            log.append(line)
            if "Application startup complete." in line:
                break
        text = "".join(log)
        blocks = int(re.search(r"num_gpu_blocks=(\d+)", text).group(1))
        block_size = int(re.search(r"block_size=(\d+)", text).group(1))
        kv_line = re.search(r"GPU KV cache size: [^\n]*", text).group(0)
        n = predicted_max_users(blocks, block_size, [SESSION] * 10_000)
        url = f"http://127.0.0.1:{port}"
        rungs = [asyncio.run(rung(url, k)) for k in (n, n + 1)]
        return {"model": model, "num_gpu_blocks": blocks, "block_size": block_size, "log": kv_line,
                "predicted_max_users": n, "rungs": rungs}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


if __name__ == "__main__":
    speedup = float(os.environ.get("SPEEDUP", "2"))
    results = [ladder(m, speedup) for m in ("deepseek-v2-lite", "llama-3.1-8b")]
    print(json.dumps(results, indent=2))
