"""How much streaming one load-generator process sustains per CPU-second, kvlab's Locust client next
to three baselines, in one session against one local server; then how far kvlab's client-side
TTFT and ITL are from the server's send times at 25 %, 50 % and 90 % of its capacity.

Clients (each one process, pinned to CPU 0 with taskset where it exists; the server on CPU 1):
- kvlab: loadtest/locustfile.py (what `kvlab load` runs), workload: 1 turn, 128 tokens, no pause;
- locust-minimal: Locust FastHttpUser timing each SSE line read with readline (bench/locust_baselines.py);
- locust-httpuser: Locust HttpUser timing each line of iter_lines;
- aiohttp: an asyncio + aiohttp client built as `vllm bench serve`'s OpenAI chat backend is
  (lines of `response.content`, json.loads per chunk, perf_counter per chunk, ITL list).
Server: bench/sse_server.py, vLLM-shaped chunks, as fast as the client reads with 16 chunks per
write (capacity: the server costs far less than any client, so the client is what saturates), or
paced, one chunk per write every --step-ms per stream, each stamped with its send time (timing
error). The timing error's 100 % is kvlab's own capacity against the paced server (each chunk alone
in its recv costs far more than in the capacity table's bursts), measured first by saturating it.

The timing-error rows also say how much of the window kvlab's client was runnable but waiting for
its core (Linux schedstat: other processes on the machine) and the load average: on a shared
machine those, not the client, may set the tail.

The clients take turns in rounds (default 3): each round runs every client once, a warm-up and
then its window(s) (default one of 10 s), so that a machine whose speed drifts over the minutes of
the bench moves all of them alike within a round. Per window: token chunks of the replies that
ended in it / the client process's CPU seconds in it (psutil, user + system), and replies per
second; the table gives, per client, the median over its windows, and kvlab's ratio to
`locust-minimal` and to `aiohttp` round by round with their median.

    PYTHONPATH=src python bench/loadgen_capacity.py [--window 10] [--warmup 5] [--concurrency 16 64]
        [--rounds 3] [--windows 1] [--clients kvlab,locust-minimal,locust-httpuser,aiohttp]
        [--timing-error] [--json]

Not a test: the figures depend on the machine and on what else runs on it (the load average is
printed); docs/load.md ("Load-generator capacity") keeps the ones measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import yaml

from kvlab.ports import free_port

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
CLIENTS = ("kvlab", "locust-minimal", "locust-httpuser", "aiohttp")
MAX_TOKENS = 128
CLIENT_CPU, SERVER_CPU = "0", "1"


def pinned(cmd: list[str], cpu: str) -> list[str]:
    """taskset where it exists and there is more than one CPU; else the command as is."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", cpu, *cmd]
    return cmd


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "BENCH_MAX_TOKENS": str(MAX_TOKENS)}


class Server:
    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(pinned([sys.executable, str(BENCH / "sse_server.py"), str(self.port), *args],
                                            SERVER_CPU), env=env(), start_new_session=True)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("bench/sse_server.py did not start")

    def stamps(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/kvlab/stamps", timeout=30) as r:
            return json.loads(r.read())["stamps"]

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(10)


# --- the vllm-bench-serve-style client (its own process) ---------------------------------------------


async def _aiohttp_user(session, url: str, payload: dict, until: float, done: list) -> None:
    while time.time() < until:
        st = time.perf_counter()
        ttft, itl, text, most_recent, output_tokens = 0.0, [], "", st, None
        async with session.post(url=url, json=payload, headers={"Content-Type": "application/json"}) as response:
            if response.status != 200:
                continue
            async for chunk_bytes in response.content:
                chunk_bytes = chunk_bytes.strip()
                if not chunk_bytes:
                    continue
                chunk = chunk_bytes.decode("utf-8").removeprefix("data: ")
                if chunk != "[DONE]":
                    timestamp = time.perf_counter()
                    data = json.loads(chunk)
                    if choices := data.get("choices"):
                        content = choices[0]["delta"].get("content")
                        if ttft == 0.0:
                            ttft = timestamp - st
                        else:
                            itl.append(timestamp - most_recent)
                        text += content or ""
                    elif usage := data.get("usage"):
                        output_tokens = usage.get("completion_tokens")
                    most_recent = timestamp
        if output_tokens:
            done.append((time.time(), output_tokens))


async def _aiohttp_main(base: str, users: int, run_s: float) -> list:
    import aiohttp

    payload = {"model": "bench", "messages": [{"role": "user", "content": "Task bench: go"}],
               "max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True}}
    done: list = []
    timeout = aiohttp.ClientTimeout(total=6 * 60 * 60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=users), timeout=timeout) as session:
        until = time.time() + run_s
        await asyncio.gather(*(_aiohttp_user(session, f"{base}/v1/chat/completions", payload, until, done)
                               for _ in range(users)))
    return done


# --- one client run: warm-up + windows ---------------------------------------------------------------


def client_command(name: str, url: str, users: int, run_s: float, work: Path) -> tuple[list[str], Path]:
    """(command, where its per-reply log or records go)."""
    locust = [sys.executable, "-m", "locust", "--headless", "-u", str(users), "-r", str(users), "-t", f"{int(run_s)}s",
              "--host", url, "--only-summary", "--loglevel", "WARNING", "--stop-timeout", "5"]
    if name == "kvlab":
        profile = work / "bench.yaml"
        profile.write_text(yaml.safe_dump({
            "name": "bench", "apps": {"system_tokens": 0},
            "session": {"turns": 1, "task_tokens": 8, "max_tokens": MAX_TOKENS, "think_time_s": 0},
            "request": {"ignore_eos": False}, "load": {"max_requests": 100_000_000}}))
        records = work / "records"
        return [*locust, "-f", str(REPO / "loadtest" / "locustfile.py"), "--workload", str(profile),
                "--records", str(records)], records
    log = work / "replies.txt"
    if name == "locust-minimal":
        return [*locust, "-f", str(BENCH / "locust_baselines.py"), "MinimalUser"], log
    if name == "locust-httpuser":
        return [*locust, "-f", str(BENCH / "locust_baselines.py"), "HttpLinesUser"], log
    if name == "aiohttp":
        return [sys.executable, __file__, "--aiohttp-client", url, str(users), str(run_s), str(log)], log
    raise ValueError(name)


def replies(name: str, where: Path) -> list[tuple[float, int]]:
    """(end unix time, token chunks) of every successful reply."""
    if name == "kvlab":
        from kvlab.loadtest.records import read_requests

        df = read_requests(where)
        ok = df[(df.kind == "turn") & df.error_kind.isna()]
        return list(zip((ok.start_ts + ok.e2e_s).tolist(), ok.chunks.astype(int).tolist()))
    rows = []
    for line in where.read_text().splitlines():
        t, n = line.split()
        rows.append((float(t), int(n)))
    return rows


def run_client(name: str, url: str, users: int, warmup_s: float, window_s: float, windows: int, work: Path) -> dict:
    work.mkdir(parents=True)
    run_s = warmup_s + windows * window_s + 2
    cmd, where = client_command(name, url, users, run_s, work)
    out = open(work / "client.log", "wb")
    p = subprocess.Popen(pinned(cmd, CLIENT_CPU), env={**env(), "BENCH_LOG": str(where)}, stdout=out,
                         stderr=subprocess.STDOUT, start_new_session=True)
    proc = psutil.Process(p.pid)
    t_start = time.time()
    marks = []  # (unix time, client CPU seconds) at each window edge
    for k in range(windows + 1):
        time.sleep(max(0.0, t_start + warmup_s + k * window_s - time.time()))
        c = proc.cpu_times()
        marks.append((time.time(), c.user + c.system))
    p.wait(run_s + 120)
    out.close()
    if p.returncode not in (0, 1):  # Locust exits 1 when a request failed (reported below)
        raise RuntimeError(f"{name} exited {p.returncode}: see {work / 'client.log'}")
    rows = replies(name, where)
    per = []
    for (t0, c0), (t1, c1) in zip(marks, marks[1:]):
        inside = [n for t, n in rows if t0 <= t < t1]
        cpu = c1 - c0
        per.append({"chunks": sum(inside), "responses": len(inside), "cpu_s": cpu, "wall_s": t1 - t0,
                    "chunks_per_cpu_s": sum(inside) / cpu if cpu > 0 else float("nan"),
                    "responses_per_s": len(inside) / (t1 - t0), "cpu_of_core": cpu / (t1 - t0)})
    return summarize(name, users, per, window_s)


def summarize(name: str, users: int, per: list[dict], window_s: float) -> dict:
    """A client's windows at one concurrency: the median of each figure over them."""
    med = lambda key: statistics.median(w[key] for w in per)  # noqa: E731
    return {"name": name, "concurrency": users, "chunks_per_cpu_s": round(med("chunks_per_cpu_s"), 1),
            "responses_per_s": round(med("responses_per_s"), 2), "chunks_per_s": round(med("chunks") / window_s, 1),
            "client_cpu_of_core": round(med("cpu_of_core"), 3), "windows": per}


def merge_rounds(rounds: list[dict], window_s: float) -> dict:
    """One client at one concurrency over its rounds: medians over all their windows (one round:
    what run_client gave), and each round's own median."""
    merged = summarize(rounds[0]["name"], rounds[0]["concurrency"], [w for r in rounds for w in r["windows"]], window_s)
    return {**merged, "rounds_chunks_per_cpu_s": [r["chunks_per_cpu_s"] for r in rounds]}


def round_ratios(per_round: dict[str, list[dict]], users: int) -> list[dict]:
    """kvlab's chunks per CPU-second over each baseline's, round by round (the two ran minutes
    apart at most), and the median of those ratios."""
    out = []
    for base in ("locust-minimal", "aiohttp"):
        if "kvlab" not in per_round or base not in per_round:
            continue
        xs = [k["chunks_per_cpu_s"] / b["chunks_per_cpu_s"] for k, b in zip(per_round["kvlab"], per_round[base])]
        out.append({"name": "kvlab", "against": base, "concurrency": users,
                    "per_round": [round(x, 3) for x in xs], "median": round(statistics.median(xs), 3)})
    return out


# --- timing error -------------------------------------------------------------------------------------


def runqueue_wait_s(pid: int) -> float | None:
    """Seconds the process's main thread has been runnable but waiting for a CPU (Linux's
    /proc/PID/task/PID/schedstat, second field): the share of a window another process held the
    client's core. None where the kernel does not say."""
    try:
        with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def timing_error(capacity_chunks_per_s: float, fractions: list[float], step_ms: float, warmup_s: float,
                 window_s: float, work: Path) -> list[dict]:
    """kvlab's client against the paced server: users sized so that the offered chunk rate is a
    fraction of the client's capacity; errors = client-measured minus server-stamped."""
    import numpy as np

    from kvlab.loadtest.records import read_requests

    rows = []
    for frac in fractions:
        users = max(1, round(frac * capacity_chunks_per_s * step_ms / 1000))
        srv = Server("--step-ms", f"{step_ms:g}", "--ttft-ms", f"{step_ms:g}")
        try:
            d = work / f"timing-{frac:g}"
            d.mkdir(parents=True)
            run_s = warmup_s + window_s + 2
            cmd, records = client_command("kvlab", srv.url, users, run_s, d)
            with open(d / "client.log", "wb") as out:
                p = subprocess.Popen(pinned(cmd, CLIENT_CPU), env=env(), stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
                proc = psutil.Process(p.pid)
                t_start = time.time()
                time.sleep(warmup_s)
                c0, w0, q0 = sum(proc.cpu_times()[:2]), time.time(), runqueue_wait_s(p.pid)
                time.sleep(window_s)
                c1, w1, q1 = sum(proc.cpu_times()[:2]), time.time(), runqueue_wait_s(p.pid)
                p.wait(run_s + 120)
            stamps = {s["key"]: s for s in srv.stamps()}
        finally:
            srv.stop()
        df = read_requests(records)
        ok = df[(df.kind == "turn") & df.error_kind.isna() & (df.start_ts >= t_start + warmup_s)
                & (df.start_ts + df.e2e_s < w1)]
        ttft_err, itl_err, chunks = [], [], 0
        for r in ok.itertuples():
            s = stamps.get(r.session_id)
            if s is None or len(s["token_ts"]) != len(r.itl_s) + 1:
                continue
            ttft_err.append(r.start_ts + r.ttft_s - s["first_ts"])
            server_gaps = np.diff(s["token_ts"])
            itl_err.extend(np.abs(np.asarray(r.itl_s) - server_gaps))
            chunks += len(s["token_ts"])
        q = lambda xs, p: round(float(np.percentile(xs, p)) * 1000, 3) if len(xs) else None  # noqa: E731
        rows.append({"fraction_of_capacity": frac, "users": users, "step_ms": step_ms,
                     "offered_chunks_per_s": round(users * 1000 / step_ms),
                     "measured_chunks_per_s": round(chunks / window_s),
                     "client_cpu_of_core": round((c1 - c0) / (w1 - w0), 3),
                     "client_runqueue_wait_share": round((q1 - q0) / (w1 - w0), 3) if q0 is not None and q1 is not None else None,
                     "load_average_1m": round(os.getloadavg()[0], 2), "requests": len(ttft_err),
                     "ttft_error_ms_p50": q(ttft_err, 50), "ttft_error_ms_p99": q(ttft_err, 99),
                     "itl_error_ms_p50": q(itl_err, 50), "itl_error_ms_p99": q(itl_err, 99)})
        print(f"timing error at {frac:.0%}: {json.dumps(rows[-1])}", file=sys.stderr)
    return rows


# --- main ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated; 'none' for the timing error alone")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds before the first window")
    ap.add_argument("--window", type=float, default=10.0, help="seconds per window")
    ap.add_argument("--windows", type=int, default=1, help="windows per client per round")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds: each runs every client in turn (warm-up, then its windows)")
    ap.add_argument("--timing-error", action="store_true", help="also measure kvlab's TTFT/ITL error")
    ap.add_argument("--step-ms", type=float, default=10.0, help="timing error: the paced server's ms per chunk")
    ap.add_argument("--burst", type=int, default=16, help="capacity: token chunks per server write (bench/sse_server.py)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    ap.add_argument("--aiohttp-client", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.aiohttp_client:
        base, users, run_s, log = args.aiohttp_client
        done = asyncio.run(_aiohttp_main(base, int(users), float(run_s)))
        Path(log).write_text("".join(f"{t:.6f} {n}\n" for t, n in done))
        return

    names = [c.strip() for c in args.clients.split(",") if c.strip() and c.strip() != "none"]
    bad = [n for n in names if n not in CLIENTS]
    if bad:
        sys.exit(f"loadgen_capacity: unknown client {bad[0]!r}: use {', '.join(CLIENTS)}")
    if args.rounds < 1 or args.windows < 1 or args.window <= 0:
        sys.exit("loadgen_capacity: --rounds and --windows must be at least 1 and --window above 0")
    load_before = os.getloadavg()
    results, timing, ratios = [], [], []
    with tempfile.TemporaryDirectory(prefix="kvlab-capacity-") as tmp:
        srv = Server("--burst", str(args.burst)) if names else None
        try:
            for users in args.concurrency:
                per_round = {name: [] for name in names}
                for k in range(args.rounds):
                    # the clients take turns, round by round: a machine whose speed drifts over the
                    # minutes of the bench moves all of them alike within a round
                    for name in names:
                        r = run_client(name, srv.url, users, args.warmup, args.window, args.windows,
                                       Path(tmp) / f"{name}-{users}-{k}")
                        per_round[name].append(r)
                        print(f"{name} c={users} round {k + 1}: {r['chunks_per_cpu_s']:,.0f} chunks/CPU-s, "
                              f"{r['responses_per_s']:.1f} replies/s, client CPU {r['client_cpu_of_core']:.0%}",
                              file=sys.stderr)
                for name in names:
                    results.append(merge_rounds(per_round[name], args.window))
                ratios.extend(round_ratios(per_round, users))
        finally:
            if srv is not None:
                srv.stop()
        if args.timing_error:
            # The client's capacity as the paced server delivers: each chunk alone in its recv (a
            # wake-up and a readline each), far below the table's, where a busy client finds many
            # chunks per recv. Measured by saturating it (400 streams at one chunk per step).
            sat = timing_error(400_000 / args.step_ms, [1.0], args.step_ms, args.warmup, args.window, Path(tmp) / "sat")
            capacity = sat[0]["measured_chunks_per_s"] / max(sat[0]["client_cpu_of_core"], 1e-9)
            print(f"kvlab against the paced server, 400 streams: {sat[0]['measured_chunks_per_s']:,} chunks/s at "
                  f"{sat[0]['client_cpu_of_core']:.0%} of a core: capacity {capacity:,.0f} chunks per CPU-second "
                  "(the timing error's 100 %)", file=sys.stderr)
            timing = timing_error(capacity, [0.25, 0.5, 0.9], args.step_ms, args.warmup, args.window * 2,
                                  Path(tmp))
            for t in timing:
                t["capacity_chunks_per_cpu_s"] = round(capacity)
    load_after = os.getloadavg()
    meta = {"cpus": os.cpu_count(), "pinned": bool(shutil.which("taskset")) and (os.cpu_count() or 1) > 1,
            "load_average_1m_before": round(load_before[0], 2), "load_average_1m_after": round(load_after[0], 2),
            "server_burst": args.burst, "window_s": args.window, "windows": args.windows, "rounds": args.rounds,
            "warmup_s": args.warmup, "tokens_per_reply": MAX_TOKENS}
    if args.json:
        print(json.dumps({"clients": [{k: r[k] for k in ("name", "concurrency", "chunks_per_cpu_s", "responses_per_s",
                                                           "chunks_per_s", "client_cpu_of_core", "rounds_chunks_per_cpu_s")}
                                      for r in results],
                          "ratios": ratios, "timing_error": timing, "meta": meta}, indent=1))
        return
    if results:
        print_capacity(results, ratios, args, meta)
    if timing:
        print_timing(timing, args)


def print_capacity(results: list[dict], ratios: list[dict], args, meta: dict) -> None:
    print(f"\n{MAX_TOKENS} token chunks per reply; medians of {args.rounds} round(s) x {args.windows} x {args.window:g} s "
          f"windows, each round after {args.warmup:g} s of warm-up, the clients taking turns round by round; server writes {args.burst} chunks per write; {meta['cpus']} CPUs, client pinned to CPU {CLIENT_CPU} and server to CPU {SERVER_CPU}: "
          f"{meta['pinned']}; load average {meta['load_average_1m_before']} before, {meta['load_average_1m_after']} after\n")
    print("| client | concurrency | chunks per CPU-second | replies/s | client CPU (of one core) |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['name']} | {r['concurrency']} | {r['chunks_per_cpu_s']:,.0f} | {r['responses_per_s']:.1f} "
              f"| {r['client_cpu_of_core']:.0%} |")
    if ratios:
        print("\n| client | against | concurrency | ratio per round (chunks per CPU-second) | median |")
        print("|---|---|---:|---|---:|")
        for q in ratios:
            print(f"| {q['name']} | {q['against']} | {q['concurrency']} | "
                  f"{', '.join(f'{x:.2f}x' for x in q['per_round'])} | {q['median']:.2f}x |")


def print_timing(timing: list[dict], args) -> None:
    print(f"\nkvlab's client-side timing error against the paced server ({args.step_ms:g} ms per chunk per stream, "
          "send times stamped by the server; error = client-measured minus server-stamped)\n")
    print("| load (of capacity) | users | chunks/s | client CPU | client waiting for its core | load average "
          "| TTFT error p50 / p99 (ms) | ITL error p50 / p99 (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for t in timing:
        wait = t["client_runqueue_wait_share"]
        print(f"| {t['fraction_of_capacity']:.0%} | {t['users']} | {t['measured_chunks_per_s']:,} "
              f"| {t['client_cpu_of_core']:.0%} | {'n/a' if wait is None else f'{wait:.1%}'} | {t['load_average_1m']} "
              f"| {t['ttft_error_ms_p50']} / {t['ttft_error_ms_p99']} | {t['itl_error_ms_p50']} / {t['itl_error_ms_p99']} |")


if __name__ == "__main__":
    main()
