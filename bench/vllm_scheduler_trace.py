"""Drive vLLM's own V1 `Scheduler` through a scenario, without a model, and record what it schedules.

No kvlab import: run it with the Python of any vLLM install (tested with the CPU builds 0.11.0 and
0.32.0) to check kvlab's simulated scheduler against that release (bench/scheduler_conformance.py
runs it; tests/test_sim_scheduler_conformance.py imports it under the installed vLLM).

The model is not run: after each `schedule()` every request whose computed tokens reach its tokens
gets one sampled token (id 7, `ignore_eos`), the `ModelRunnerOutput` a real model runner would give
when no request stops early, and `update_from_output` takes it. The scheduler, its KV cache manager
and block pool are vLLM's, built as its engine core builds them (one full-attention KV cache group
of `num_blocks` blocks). Prompts are token ids; requests join the waiting queue before the step
numbered by their arrival.

Reads a JSON list of scenarios from the file IN ({"requests": [[id, prompt ids, max_tokens, arrival
step], ...], "num_blocks", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
"enable_prefix_caching", "block_size", "enable_chunked_prefill", "async_scheduling"}: `trace`'s
arguments) and writes to OUT the vLLM version and, per scenario, the steps as [{request id: tokens
scheduled}, [ids preempted in the step]] (to a file: vLLM logs on standard output). A trace ends
when nothing is left, or when nothing can be scheduled any more and nothing else will arrive (a
request the small cache can no longer hold keeps waiting).

Run: `PYTHON bench/vllm_scheduler_trace.py IN OUT`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import tempfile

SAMPLED_TOKEN = 7

_MODEL_DIR: str | None = None


def _model_dir() -> str:
    """A config.json vLLM's ModelConfig can read (the scheduler needs no weights or tokenizer); its
    torch_dtype keeps vLLM from looking the folder up as a hub id for the weights' dtype."""
    global _MODEL_DIR
    if _MODEL_DIR is None:
        _MODEL_DIR = tempfile.mkdtemp(prefix="kvlab-sched-")
        with open(os.path.join(_MODEL_DIR, "config.json"), "w") as f:
            json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                       "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                       "num_hidden_layers": 2, "vocab_size": 32000, "max_position_embeddings": 131072,
                       "torch_dtype": "bfloat16"}, f)
    return _MODEL_DIR


def trace(requests: list, num_blocks: int, max_num_seqs: int, max_num_batched_tokens: int,
          max_model_len: int = 4096, enable_prefix_caching: bool = True, block_size: int = 16,
          enable_chunked_prefill: bool = True, async_scheduling: bool = False) -> list:
    """The steps vLLM's scheduler runs for `requests` ([id, prompt ids, max_tokens, arrival step]).
    `async_scheduling`: vLLM's AsyncScheduler driven as its engine core's batch queue of two does
    (`EngineCore.step_with_batch_queue`): step N+1 is scheduled before step N's outputs are taken."""
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request, RequestStatus
    from vllm.v1.structured_output import StructuredOutputManager
    try:
        from vllm.utils.hashing import sha256
    except ImportError:  # before the utils package was split
        from vllm.utils import sha256

    async_kw = {"async_scheduling": True} if async_scheduling else {}
    sched_cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                max_model_len=max_model_len, enable_chunked_prefill=enable_chunked_prefill,
                                is_encoder_decoder=False, **async_kw)
    model_cfg = ModelConfig(model=_model_dir(), skip_tokenizer_init=True, dtype="bfloat16", max_model_len=max_model_len)
    cache_cfg = CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
    vllm_cfg = VllmConfig(model_config=model_cfg, scheduler_config=sched_cfg, cache_config=cache_cfg)
    spec = dict(block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float32)
    if "use_mla" in {f.name for f in dataclasses.fields(FullAttentionSpec)}:
        spec["use_mla"] = False
    kv_cfg = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(["layer"], FullAttentionSpec(**spec))])
    cache_cfg.num_gpu_blocks = num_blocks
    extra = {"block_size": block_size} if "block_size" in inspect.signature(Scheduler.__init__).parameters else {}
    if async_scheduling:
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler as Scheduler  # noqa: N814
    sched = Scheduler(vllm_config=vllm_cfg, kv_cache_config=kv_cfg,
                      structured_output_manager=StructuredOutputManager(vllm_cfg), log_stats=True, **extra)
    init_none_hash(sha256)
    hasher = get_request_block_hasher(block_size, sha256)
    req_kw = {"eos_token_id": 2} if "eos_token_id" in inspect.signature(Request.__init__).parameters else {}
    params = inspect.signature(ModelRunnerOutput).parameters
    out_kw = {k: ({} if k == "prompt_logprobs_dict" else None)
              for k in ("logprobs", "prompt_logprobs_dict", "pooler_output")
              if k in params and params[k].default is inspect.Parameter.empty}

    pending = sorted(requests, key=lambda r: r[3])

    def add_due(step: int) -> None:
        """Add the requests arriving before step `step + 1`."""
        while pending and pending[0][3] <= step:
            rid, prompt, max_tokens, _ = pending.pop(0)
            sched.add_request(Request(request_id=rid, prompt_token_ids=list(prompt),
                                      sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                      pooling_params=None, block_hasher=hasher, **req_kw))

    def schedule() -> tuple:
        """One `schedule()`: its output, the ids it preempted, and each request's output placeholders before."""
        status = {rid: r.status for rid, r in sched.requests.items()}
        placeholders = {rid: getattr(r, "num_output_placeholders", 0) for rid, r in sched.requests.items()}
        out = sched.schedule()
        preempted = sorted(rid for rid, r in sched.requests.items()
                           if r.status == RequestStatus.PREEMPTED and status.get(rid) != r.status)
        return out, preempted, placeholders

    def take(out, samples) -> None:
        """`update_from_output` with one sampled token for each request in `samples`."""
        ids = list(out.num_scheduled_tokens)
        sched.update_from_output(out, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=[[SAMPLED_TOKEN] if r in samples else [] for r in ids], **out_kw))

    steps = (_async_steps if async_scheduling else _sync_steps)(sched, pending, add_due, schedule, take)
    while steps and not steps[-1][0]:
        steps.pop()
    return steps


def _sync_steps(sched, pending, add_due, schedule, take) -> list:
    """`trace`'s loop for the synchronous Scheduler: schedule a step, take its outputs. A request
    samples when its computed tokens reach its tokens."""
    steps: list = []
    step = 0
    while pending or sched.running or len(sched.waiting):
        add_due(step)
        step += 1
        out, preempted, _ = schedule()
        steps.append([dict(out.num_scheduled_tokens), preempted])
        if not out.num_scheduled_tokens:
            if not pending:
                break  # nothing left, or nothing schedulable ever again (a request the cache cannot hold)
            continue
        take(out, {r for r in out.num_scheduled_tokens
                   if sched.requests[r].num_computed_tokens >= sched.requests[r].num_tokens})
    return steps


def _async_steps(sched, pending, add_due, schedule, take) -> list:
    """`trace`'s loop for the AsyncScheduler with a batch queue of two: schedule while the queue has
    room and there is work, else take the oldest step's outputs. A request samples in a step where the
    scheduler gave it an output placeholder."""
    steps: list = []
    queue: list = []
    step = idle = 0
    while pending or sched.has_requests() or queue:
        if idle > 2 and not pending:
            break  # nothing schedulable ever again (a request the cache cannot hold): the sync trace ends here too
        add_due(step)
        if sched.has_requests():
            step += 1
            out, preempted, placeholders = schedule()
            samples = {rid for rid in out.num_scheduled_tokens
                       if sched.requests[rid].num_output_placeholders > placeholders.get(rid, 0)}
            steps.append([dict(out.num_scheduled_tokens), preempted])
            idle = 0 if out.total_num_scheduled_tokens > 0 else idle + 1
            queue.insert(0, (out, samples))
            if len(queue) < 2 and (out.total_num_scheduled_tokens > 0 or sched.has_requests()):
                continue
        elif not queue:
            step += 1  # nothing to run until the next arrival
            continue
        take(*queue.pop())
    return steps


def version() -> str:
    import vllm
    return vllm.__version__


def main() -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    src, dst = sys.argv[1:3]
    with open(src) as f:
        scenarios = json.load(f)
    traces = [trace(**s) for s in scenarios]
    with open(dst, "w") as f:
        json.dump({"vllm_version": version(), "traces": traces}, f)


if __name__ == "__main__":
    main()
