"""vLLM's log lines, in vLLM's formats, for the simulated server.

Launchers read vLLM's startup log: the version banner, "Available KV cache memory: X GiB",
"GPU KV cache size: N tokens, Maximum concurrency for L tokens per request: C.CCx", "Starting vLLM
server on http://...", and uvicorn's "Application startup complete." The simulator prints the same
lines (vLLM's logger writes to stdout, uvicorn to stderr), plus lines that say it is simulated.
"""

from __future__ import annotations

import os
import sys
import time

from kvlab.models import memory
from kvlab.sim.config import SIM_VERSION, SimConfig, memory_release

_PID = os.getpid()


def vllm_line(process: str, level: str, where: str, message: str) -> str:
    """`(APIServer pid=N) INFO 11-28 18:40:07 [file.py:123] message` (vLLM's logger format)."""
    stamp = time.strftime("%m-%d %H:%M:%S")
    return f"({process} pid={_PID}) {level} {stamp} [{where}] {message}"


def log(process: str, where: str, message: str, level: str = "INFO") -> None:
    sys.stdout.write(vllm_line(process, level, where, message) + "\n")
    sys.stdout.flush()


def uvicorn(message: str) -> None:
    sys.stderr.write(f"INFO:     {message}\n")
    sys.stderr.flush()


def format_gib(n: float) -> str:
    return f"{round(n / memory.GiB, 2)}"  # vLLM's format_gib


def startup_lines(cfg: SimConfig, non_default: dict, not_simulated: tuple[str, ...], faults: tuple = (),
                  stop_before_kv: bool = False) -> None:
    """Everything vLLM prints from start to 'Starting vLLM server', in order (stop_before_kv: up to
    the KV cache sizing, where an injected fail-start fault fails)."""
    cap = cfg.capacity
    banner = [
        "",
        "       █     █     █▄   ▄█",
        f" ▄▄ ▄█ █     █     █ ▀▄▀ █  version {SIM_VERSION}",
        f"  █▄█▀ █     █     █     █  model   {cfg.model}",
        "   ▀▀  ▀▀▀▀▀ ▀▀▀▀▀ ▀     ▀",
        "",
    ]
    for line in banner:
        log("APIServer", "api_utils.py:347", line)
    log("APIServer", "api_utils.py:286", f"non-default args: {non_default}")
    log("APIServer", "kvlab_sim", (
        f"kvlab simulated engine: no model runs. KV capacity from kvlab's memory model, step times simulated "
        f"on {cfg.gpu.name} x{cap.num_gpus}"), level="WARNING")
    log("APIServer", "kvlab_sim", f"step timing source: {cfg.cost.timing_source}")
    log("APIServer", "kvlab_sim", f"time outside the steps: {cfg.host_source()}")
    if cfg.api_server_count > 1:
        log("APIServer", "kvlab_sim", (
            f"{cfg.api_server_count} API-server processes (--api-server-count): simulated as one front end taking "
            f"1/{cfg.api_server_count} of each request's, prompt token's and output's work, the processes' "
            "work in step"))
        log("APIServer", "loggers.py:1387", "AsyncLLM created with api_server_count more than 1; disabling stats "
            "logging to avoid incomplete stats.", level="WARNING")
    from kvlab.sim.args import NOT_SIMULATED_TYPED  # kvlab.sim.args imports this module (via faults)

    for flag in not_simulated:
        sized = " (the memory model sizes it)" if flag in NOT_SIMULATED_TYPED else ""
        log("APIServer", "kvlab_sim", f"--{flag} is accepted but not simulated{sized}", level="WARNING")
    if faults:
        log("APIServer", "kvlab_sim", (
            f"fault injection on (a kvlab testing option, not vLLM's): {' '.join(f.spec for f in faults)}; this "
            "server misbehaves on purpose"), level="WARNING")
    log("APIServer", "model.py:733", f"Resolved architecture: {cfg.arch.architecture}")
    log("APIServer", "model.py:2152", f"Using max model len {cfg.max_model_len}")
    if cfg.enable_chunked_prefill:
        log("APIServer", "scheduler.py:309",
            f"Chunked prefill is enabled with max_num_batched_tokens={cfg.max_num_batched_tokens}.")
    log("EngineCore", "core.py:133", (
        f"Initializing a V1 LLM engine (v{SIM_VERSION}) with config: model='{cfg.model}', "
        f"dtype=torch.{cfg.dtype}, max_seq_len={cfg.max_model_len}, tensor_parallel_size={cap.tensor_parallel_size}, "
        f"pipeline_parallel_size={cap.pipeline_parallel_size}, quantization={cfg.quantization_method}, "
        f"kv_cache_dtype={cfg.kv_cache_dtype}, device_config=cuda, served_model_name={cfg.served_model_name}, "
        f"enable_prefix_caching={cfg.enable_prefix_caching}, enable_chunked_prefill={cfg.enable_chunked_prefill}"))
    runner = (cap.memory.model_runner if cap.memory is not None  # the model runner the budget mirrors
              else memory.model_runner(cfg.arch, memory_release(cfg.vllm_version), preset=cfg.gpu))
    if runner == "v2":  # vllm/v1/worker/gpu_worker.py, and the weights from V2's model_runner.py
        log("Worker", "gpu_worker.py:518", "Using V2 Model Runner")
    log("Worker", "model_runner.py:428" if runner == "v2" else "gpu_model_runner.py:5150",
        f"Model loading took {format_gib(cap.weight_bytes_per_gpu)} GiB memory and 0.000000 seconds")
    log("Worker", "cuda.py:175", f"Using {cap.attention_backend} backend.")
    if cfg.sampler == "flashinfer":  # the profiling run's sampler (kvlab.models.budget.default_sampler)
        log("Worker", "topk_topp_sampler.py:124", "Using FlashInfer for top-p & top-k sampling.")
    elif memory.default_sampler(memory_release(cfg.vllm_version), cfg.gpu) == "flashinfer":  # --sampler pytorch
        log("Worker", "topk_topp_sampler.py:96",
            "FlashInfer top-p/top-k sampling disabled via VLLM_USE_FLASHINFER_SAMPLER=0.")
    if stop_before_kv:
        return
    if cfg.kv_cache_memory_bytes:
        log("Worker", "gpu_worker.py:668", (
            f"Initial free memory {format_gib(cfg.gpu.memory_bytes - cap.weight_bytes_per_gpu)} GiB, reserved "
            f"{format_gib(cfg.kv_cache_memory_bytes)} GiB memory for KV Cache as specified by kv_cache_memory_bytes "
            "config and skipped memory profiling. This does not respect the gpu_memory_utilization config."))
    else:
        log("Worker", "gpu_worker.py:760", f"Available KV cache memory: {format_gib(cap.kv_budget_bytes)} GiB")
    log("EngineCore", "kv_cache_utils.py:2327", (
        f"GPU KV cache size: {cap.kv_cache_tokens:,} tokens, Maximum concurrency for "
        f"{cfg.max_model_len:,} tokens per request: {cap.max_concurrency:.2f}x"))
    log("EngineCore", "kvlab_sim", (
        f"num_gpu_blocks={cap.num_blocks} block_size={cap.block_size} page_size_bytes={cap.page_size_bytes} "
        f"kv_bytes_per_token={cap.kv_bytes_per_token} (kvlab memory model; budget {cap.kv_budget_source})"))
    log("EngineCore", "core.py:402", "init engine (profile, create kv cache, warmup model) took 0.00 s")


def server_lines(host: str, port: int, routes: list[tuple[str, str]]) -> None:
    log("APIServer", "entry.py:140", f"Starting vLLM server on http://{host}:{port}")
    log("APIServer", "launcher.py:186", "Available routes are:")
    for path, methods in routes:
        log("APIServer", "launcher.py:195", f"Route: {path}, Methods: {methods}")
    uvicorn(f"Started server process [{_PID}]")
    uvicorn("Waiting for application startup.")
    uvicorn("Application startup complete.")
    uvicorn(f"Uvicorn running on http://{host}:{port} (Press CTRL+C to quit)")


def stats_line(prompt_tps: float, gen_tps: float, running: int, waiting: int, usage: float, hit_rate: float) -> None:
    """vLLM's periodic LoggingStatLogger line."""
    log("APIServer", "loggers.py:335", (
        f"Engine 000: Avg prompt throughput: {prompt_tps:.1f} tokens/s, Avg generation throughput: "
        f"{gen_tps:.1f} tokens/s, Running: {running} reqs, Waiting: {waiting} reqs, GPU KV cache usage: "
        f"{usage * 100:.1f}%, Prefix cache hit rate: {hit_rate * 100:.1f}%"))
