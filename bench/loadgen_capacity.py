"""How much streaming one load-generator process sustains: chunks/s and requests/s against a
zero-latency local SSE endpoint (bench/sse_server.py), and the client's CPU seconds per 1,000 chunks.

Side by side in the same run:
- Locust: loadtest/locustfile.py through kvlab.loadtest.runner.run_load (one process; with
  --workers N also a master and N workers), every chunk parsed and its ITL fed to Locust's stats;
- a plain asyncio/aiohttp client, as `vllm bench serve` is built, parsing the same way (ChatStream).

    PYTHONPATH=src python bench/loadgen_capacity.py [--users 32] [--duration 20] [--chunks 200] [--workers 2]

Not a test: the figures depend on the machine and on what else runs on it; docs/load.md ("Load-generator
capacity") keeps the ones measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# --- the plain asyncio client (runs in its own process) ---------------------------------------------


async def _aiohttp_user(session, url: str, body: bytes, until: float, totals: dict) -> None:
    from kvlab.loadtest.stream import ChatStream

    while time.monotonic() < until:
        t0 = time.perf_counter()
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            stream = ChatStream(t0)
            async for line in resp.content:  # aiohttp yields each line as it arrives
                stream.feed_line(line, time.perf_counter())
            r = stream.finish(time.perf_counter())
        totals["requests"] += 1
        totals["chunks"] += r.chunks
        totals["errors"] += 0 if r.ok else 1


async def _aiohttp_main(base: str, users: int, duration_s: float, chunks: int) -> dict:
    import aiohttp

    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "go"}], "max_tokens": chunks,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    totals = {"requests": 0, "chunks": 0, "errors": 0}
    conn = aiohttp.TCPConnector(limit=users)
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.monotonic()
        await asyncio.gather(*(_aiohttp_user(session, f"{base}/v1/chat/completions", body, t0 + duration_s, totals)
                               for _ in range(users)))
        totals["duration_s"] = time.monotonic() - t0
    return totals


def run_aiohttp(base: str, users: int, duration_s: float, chunks: int) -> dict:
    cpu0 = children_cpu_s()
    out = subprocess.run([sys.executable, __file__, "--aiohttp-client", base, str(users), str(duration_s), str(chunks)],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    res = json.loads(out.stdout)
    res["cpu_s"] = children_cpu_s() - cpu0
    return res


# --- Locust -------------------------------------------------------------------------------------------


def run_locust(base: str, users: int, duration_s: float, chunks: int, workers: int, out: Path) -> dict:
    from kvlab.loadtest.runner import run_load

    profile = out / "bench.yaml"
    profile.write_text(yaml.safe_dump({
        "name": "bench", "apps": {"system_tokens": 0},
        "session": {"turns": 1, "task_tokens": 8, "max_tokens": chunks, "think_time_s": 0},
        "request": {"ignore_eos": False}, "load": {"max_requests": 10_000_000}}))
    cpu0 = children_cpu_s()
    res = run_load(base, profile, users, duration_s, out_dir=out / f"locust-w{workers}", workers=workers)
    cpu = children_cpu_s() - cpu0
    turns = res.requests().query("kind == 'turn'")
    cancelled = turns.error_kind == "cancelled"  # in flight when the run ended
    return {"requests": int((~cancelled).sum()), "chunks": int(turns[~cancelled].chunks.sum()),
            "errors": int((turns.error_kind.notna() & ~cancelled).sum()), "cancelled_at_end": int(cancelled.sum()),
            "duration_s": res.summary["duration_s"], "cpu_s": cpu}


def row(name: str, r: dict, server_cpu_s: float) -> str:
    d = r["duration_s"]
    return (f"| {name} | {r['requests'] / d:,.0f} | {r['chunks'] / d:,.0f} | {1000 * r['cpu_s'] / max(r['chunks'], 1):.3f} "
            f"| {r['cpu_s'] / d:.0%} | {server_cpu_s / d:.0%} | {r['errors']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--chunks", type=int, default=200, help="chunks (tokens) per reply")
    ap.add_argument("--workers", type=int, default=0, help="also run Locust with a master and N workers")
    ap.add_argument("--aiohttp-client", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.aiohttp_client:
        base, users, dur, chunks = args.aiohttp_client
        print(json.dumps(asyncio.run(_aiohttp_main(base, int(users), float(dur), int(chunks)))))
        return

    port = free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "bench" / "sse_server.py"), str(port)])
    base = f"http://127.0.0.1:{port}"
    try:
        srv = psutil.Process(server.pid)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for name, fn in [("Locust, 1 process (FastHttpUser, readline)", lambda: run_locust(base, args.users, args.duration, args.chunks, 0, Path(tmp))),
                             ("asyncio + aiohttp, 1 process", lambda: run_aiohttp(base, args.users, args.duration, args.chunks))] + (
                    [(f"Locust, master + {args.workers} workers", lambda: run_locust(base, args.users, args.duration, args.chunks, args.workers, Path(tmp)))]
                    if args.workers else []):
                s0 = sum(srv.cpu_times()[:2])
                r = fn()
                rows.append(row(name, r, sum(srv.cpu_times()[:2]) - s0))
                print(name, json.dumps(r), file=sys.stderr)
    finally:
        server.terminate()
        server.wait(10)
    print(f"\n{args.users} users, {args.chunks} chunks per reply, {args.duration:g} s each, {os.cpu_count()} CPUs "
          f"(load average before: {os.getloadavg()[0]:.2f})\n")
    print("| client | requests/s | chunks/s | client CPU s per 1,000 chunks | client CPU | server CPU | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
