"""What vLLM V1's multiprocess executor (`-tp` > 1) adds to an engine step per scheduled request on the
host, measured on the release's own classes: the check of the hypothesis that the older generation's
fitted 100 us per request (kvlab.sim.timing.HOST_FITTED) is a cost of broadcasting the step to the
workers (docs/simulator-validation.md, "session 43").

At `-tp 1` the engine core calls its model runner in-process (UniProcExecutor). At `-tp` > 1
(MultiprocExecutor) each step goes through shared-memory queues (vllm/distributed/device_communicators/
shm_broadcast.py MessageQueue, pickle protocol 5): the engine core pickles ("execute_model",
(SchedulerOutput,), {}, ...) into the broadcast queue, every worker unpickles it (in parallel), worker 0
pickles (status, ModelRunnerOutput) back and the engine core unpickles it. Those four are serial on the
step's path and grow with the requests; the rest of a worker's step is what the one in-process runner
does at `-tp 1` (bench/engine_core_host.py). This builds a decode step of N cached requests the way the
release's scheduler does (request ids as vLLM's OpenAI server makes them, one new token each, a new KV
block every 16th, per request dataclasses up to 0.8.x and the batched CachedRequestData from 0.9),
times the four (medians of repeated calls) and fits per step + per request by least squares. The
queue's polling and the shared-memory copy (a few tens of kB at 512 requests) are not in it.

Run: `python bench/tp_broadcast_cost.py [--vllm-python PY] [--json]` (under a minute; any release's
Python: this checkout's virtualenv, or one of bench/vllm_cpu_venv.py's, e.g. 0.8.5 or 0.9.2).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from frontend_cost import fit  # noqa: E402  (the same least-squares line)
from sim_speed import cpu_probe_s  # noqa: E402

BATCHES = (1, 8, 32, 128, 256, 512)
REFERENCE_PROBE_S = 0.30  # the reference probe of kvlab's other measured host terms (bench/engine_core_host.py)

DRIVER = r'''
import dataclasses, json, pickle, statistics, sys, time, uuid
import vllm
from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
from vllm.v1.outputs import ModelRunnerOutput

batches, out = json.loads(sys.argv[1]), sys.argv[2]
P = pickle.HIGHEST_PROTOCOL


def build(cls, **given):
    """An instance of one of the release's dataclasses: the fields it has, each from `given` or empty."""
    empty = {"list": [], "dict": {}, "set": set()}
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            kw[f.name] = given[f.name]
        elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            continue
        else:
            t = str(f.type)
            kw[f.name] = next((v for k, v in empty.items() if t.startswith(k) or t.startswith("typing." + k.title())),
                              0 if t == "int" else None)
    return cls(**kw)


def step(n):
    ids = [f"cmpl-{uuid.uuid4().hex}-0" for _ in range(n)]
    blocks = [[1000 + i] if i % 16 == 0 else [] for i in range(n)]
    per_request = "req_id" in {f.name for f in dataclasses.fields(CachedRequestData)}
    if per_request:  # up to vLLM 0.8.x: one record per request
        cached = [CachedRequestData(req_id=r, resumed_from_preemption=False, new_token_ids=[1234],
                                    new_block_ids=b, num_computed_tokens=1000) for r, b in zip(ids, blocks)]
    else:  # from 0.9: one record of lists (new token ids only with pipeline parallelism)
        cached = build(CachedRequestData, req_ids=ids, resumed_from_preemption=[False] * n,
                       new_token_ids=[], new_block_ids=[(b,) if b else None for b in blocks],
                       num_computed_tokens=[1000] * n)
    so = build(SchedulerOutput, scheduled_new_reqs=[], scheduled_cached_reqs=cached,
               num_scheduled_tokens=dict.fromkeys(ids, 1), total_num_scheduled_tokens=n, finished_req_ids=set())
    mro = build(ModelRunnerOutput, req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                sampled_token_ids=[[4321] for _ in ids], prompt_logprobs_dict={})
    return ("execute_model", (so,), {}, 0), (1, mro), per_request


def median_s(f, reps):
    xs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        xs.append(time.perf_counter() - t0)
    return statistics.median(xs)


result = {"vllm": vllm.__version__, "batches": {}}
for n in batches:
    msg, resp, per_request = step(n)
    b_msg, b_resp = pickle.dumps(msg, protocol=P), pickle.dumps(resp, protocol=P)
    ids = list(msg[1][0].num_scheduled_tokens)
    round_trip = (list(pickle.loads(b_msg)[1][0].num_scheduled_tokens) == ids
                  and pickle.loads(b_resp)[1].req_ids == ids and len(ids) == n)
    reps = 400 if n <= 128 else 150
    parts = [median_s(lambda: pickle.dumps(msg, protocol=P), reps), median_s(lambda: pickle.loads(b_msg), reps),
             median_s(lambda: pickle.dumps(resp, protocol=P), reps), median_s(lambda: pickle.loads(b_resp), reps)]
    result["batches"][n] = {"step_bytes": len(b_msg), "output_bytes": len(b_resp), "parts_s": parts,
                            "total_s": sum(parts), "round_trip": round_trip}
result["per_request_records"] = per_request
with open(out, "w") as f:
    json.dump(result, f)
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", default=sys.executable,
                    help="the Python of the vLLM release to measure (default: this one)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script, out = Path(tmp) / "driver.py", Path(tmp) / "result.json"
        script.write_text(DRIVER)
        probe_before = cpu_probe_s()
        proc = subprocess.run([a.vllm_python, str(script), json.dumps(BATCHES), str(out)],
                              capture_output=True, text=True)
        probe_after = cpu_probe_s()
        if proc.returncode != 0:
            print(f"error: the driver failed under {a.vllm_python}: {proc.stderr.strip().splitlines()[-1:]}",
                  file=sys.stderr)
            return 1
        result = json.loads(out.read_text())
    probe = (probe_before + probe_after) / 2
    ns = sorted(int(n) for n in result["batches"])
    per_step, per_request = fit(ns, [result["batches"][str(n)]["total_s"] for n in ns])
    scale = REFERENCE_PROBE_S / probe
    result.update(cpu_probe_10M_loop_s=round(probe, 3), per_step_s=per_step, per_request_s=per_request,
                  at_reference_probe={"per_step_s": per_step * scale, "per_request_s": per_request * scale})
    if a.json:
        print(json.dumps(result, indent=1))
        return 0
    kind = "a record per request" if result["per_request_records"] else "batched records"
    print(f"vLLM {result['vllm']} multiprocess executor's step broadcast ({kind}), CPU probe {probe:.2f} s "
          f"(10M-loop; reference {REFERENCE_PROBE_S} s)")
    print("requests  step bytes  output bytes  pickle step  unpickle step  pickle output  unpickle output  total")
    for n in ns:
        b = result["batches"][str(n)]
        print(f"{n:8d}  {b['step_bytes']:10,d}  {b['output_bytes']:12,d}  "
              + "  ".join(f"{1e6 * p:11.1f} us" for p in b["parts_s"]) + f"  {1e6 * b['total_s']:7.1f} us")
    print(f"per step + per request: {per_step * 1e6:.1f} us + {per_request * 1e6:.2f} us (least squares); at the "
          f"reference probe {per_step * scale * 1e6:.1f} us + {per_request * scale * 1e6:.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
