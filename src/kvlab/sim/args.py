"""`kvlab sim serve` takes `vllm serve`'s command line (plus `--gpu`, `--speedup`, `--timing` and the testing option `--fault`).

Flags keep vLLM 0.32's names, types, choices and defaults; errors carry vLLM's messages (argparse's
"invalid choice" / "unrecognized arguments", pydantic's range errors, the config checks). Flags
that change nothing in a simulation (`--enforce-eager`, `--trust-remote-code`, ...) are accepted;
flags whose effect the simulator does not model are accepted with a warning in the startup log.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from kvlab.errors import KvlabError
from kvlab.models.budget import DEFAULT_VLLM_VERSION, SAMPLERS
from kvlab.models.weights import WEIGHT_FORMATS, weight_format
from kvlab.serve_config import (ServeConfig, add_serve_flags, config_values, graph_flags, graph_value_args,
                                quantization_fields)
from kvlab.sim.config import ASYNC_SCHEDULING_HELP, RESERVE_FULL_ISL_HELP, SAMPLER_HELP
from kvlab.sim.faults import Fault, help_text, parse_faults
from kvlab.sim.timing import DEFAULT_TIMING, TIMING_SOURCES, VLLM_VERSION_HELP, vllm_release

# vLLM 0.32's --kv-cache-dtype choices (argparse choices in vllm/engine/arg_utils.py).
VLLM_KV_CACHE_DTYPES = (
    "auto", "bfloat16", "float16", "fp8", "fp8_ds_mla", "fp8_e4m3", "fp8_e5m2", "fp8_inc",
    "fp8_per_token_head", "int4_per_token_head", "int8_per_token_head", "nvfp4", "nvfp4_4over6",
    "nvfp4_ds_mla", "turboquant_3bit_nc", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_k8v4",
    "ultraquant_4bit",
)
# vLLM 0.32's quantization methods (ModelConfig: "Unknown quantization method").
VLLM_QUANTIZATIONS = (
    "awq", "auto_awq", "fp8", "fbgemm_fp8", "fp_quant", "modelopt", "modelopt_fp4", "modelopt_mxfp8",
    "modelopt_mixed", "auto_gptq", "gptq", "gptq_marlin", "awq_marlin", "humming", "compressed-tensors",
    "experts_int8", "quark", "moe_wna16", "torchao", "inc", "mxfp4", "gpt_oss_mxfp4", "deepseek_v4_fp8",
    "online", "fp8_per_tensor", "fp8_per_block", "fp8_per_channel", "int8_per_channel_weight_only",
    "nvfp4_per_token", "mxfp8",
)
VLLM_DTYPES = ("auto", "bfloat16", "float", "float16", "float32", "half")

# Accepted, no effect on a simulation.
NO_EFFECT_FLAGS = (
    "--trust-remote-code", "--disable-log-requests", "--enable-log-requests",
    "--disable-frontend-multiprocessing", "--disable-custom-all-reduce", "--skip-tokenizer-init",
    "--disable-fastapi-docs", "--enable-auto-tool-choice", "--disable-uvicorn-access-log",
    "--return-tokens-as-token-ids",
)
NO_EFFECT_VALUE_FLAGS = (
    "--tokenizer", "--revision", "--tokenizer-revision", "--download-dir", "--load-format", "--seed",
    "--swap-space", "--max-logprobs", "--generation-config", "--chat-template", "--response-role",
    "--root-path", "--allowed-origins", "--allowed-methods", "--allowed-headers", "--uvicorn-log-level",
    "--distributed-executor-backend", "--tool-call-parser", "--reasoning-parser", "--tokenizer-mode",
    "--override-generation-config", "--log-level", "--max-seq-len-to-capture",
    "--chat-template-content-format",
)
# Kept in the serve configuration's untyped flags, which the memory model reads for CUDA graphs
# (`ServeConfig.cuda_graphs`: -O0, a --compilation-config with cudagraph_mode NONE).
GRAPH_VALUE_FLAGS = (("-O", "--optimization-level"), ("-cc", "--compilation-config"))
# Accepted, not modelled: warned about at start.
NOT_SIMULATED_VALUE_FLAGS = (
    "--cpu-offload-gb",  # weights streamed from host memory: more KV cache, slower steps; neither modelled
    "--long-prefill-token-threshold", "--max-num-partial-prefills",
    "--scheduling-policy", "--kv-transfer-config", "--max-lora-rank",
)
NOT_SIMULATED_FLAGS = ("--enable-lora", "--enable-sleep-mode")
# Typed by ServeConfig (the memory model sizes them), not simulated: warned about at start.
NOT_SIMULATED_TYPED = {"data-parallel-size": lambda c: c.data_parallel_size > 1,
                       "enforce-eager": lambda c: bool(c.enforce_eager),
                       "optimization-level": lambda c: graph_flags(c.vllm_args)[0] is not None,
                       "compilation-config": lambda c: graph_flags(c.vllm_args)[1] is not None,
                       "speculative-config": lambda c: c.speculative_config is not None}


def not_simulated_typed(config: ServeConfig) -> tuple[str, ...]:
    """The typed flags of `config` the memory model sizes and the simulator does not simulate."""
    return tuple(name for name, given in NOT_SIMULATED_TYPED.items() if given(config))


def warn_not_simulated(config: ServeConfig, command: str) -> None:
    """One stderr line per typed flag of `config` that is sized but not simulated (`kvlab sim run`,
    `kvlab sim bench`; `kvlab sim serve` logs them as vLLM-style startup lines)."""
    import sys

    for flag in not_simulated_typed(config):
        print(f"{command}: --{flag} is accepted but not simulated (the memory model sizes it)", file=sys.stderr)


CHECKPOINT_WEIGHTS_HELP = (
    "The weight format the served checkpoint declares (kvlab option, not a vLLM flag: fp8, fp8-block, int8, awq, "
    "gptq, gptq-int8, nf4): MODEL (a card) stands in for a pre-quantized checkpoint of it, which vLLM reads the "
    "format from without --quantization (so AWQ/GPTQ run Marlin or Machete, not the legacy kernels -q names); "
    "beside --quantization, the bits that method leaves to the checkpoint (gptq-int8)")


def checkpoint_fields(checkpoint_weights: str | None, method: str | None) -> dict[str, Any]:
    """The ServeConfig fields of kvlab's --checkpoint-weights FORMAT (CHECKPOINT_WEIGHTS_HELP) beside a
    --quantization METHOD (either None: not given)."""
    fields = quantization_fields(method)
    if checkpoint_weights is None:
        return fields
    try:
        key = weight_format(checkpoint_weights).key
    except KvlabError:
        names = ", ".join(sorted(k for k in WEIGHT_FORMATS if k != "auto"))
        raise KvlabError(f"--checkpoint-weights {checkpoint_weights}: not a weight format; use one of: {names}") from None
    if key == "auto":
        raise KvlabError(f"--checkpoint-weights {checkpoint_weights}: name the quantized format the checkpoint "
                         "declares (an unquantized checkpoint needs no flag)")
    if method is not None and (fields["weights"] is None
                               or WEIGHT_FORMATS[fields["weights"]].name != WEIGHT_FORMATS[key].name):
        raise KvlabError(f"--quantization {method} does not serve a {key} checkpoint (--checkpoint-weights {key})")
    return {**fields, "weights": key, "weights_from_checkpoint": method is None}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit 2; kvlab prints one line
        raise KvlabError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvlab sim serve", description=(
        "A simulated vLLM: serves vLLM's OpenAI API and /metrics for MODEL on a GPU preset, with KV "
        "capacity from kvlab's memory model and step times from measured vLLM kernel tables or a roofline "
        "(--timing). Takes vllm serve's flags."))
    p.add_argument("model_tag", nargs="?", metavar="MODEL", help="card name, local folder with config.json, or HF id")
    p.add_argument("--model", dest="model_flag", help="MODEL (vLLM's api_server form)")
    p.add_argument("--gpu", required=True, help="GPU preset to simulate (kvlab gpus)")
    p.add_argument("--speedup", type=float, default=1.0,
                   help="run the simulated clock this many times faster than the wall clock (tests)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", nargs="+", default=None)
    add_serve_flags(p, kv_cache_dtypes=VLLM_KV_CACHE_DTYPES, dtypes=VLLM_DTYPES)  # the flags a ServeConfig types
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help=ASYNC_SCHEDULING_HELP)
    p.add_argument("--scheduler-reserve-full-isl", action=argparse.BooleanOptionalAction, default=None,
                   help=RESERVE_FULL_ISL_HELP)
    p.add_argument("--enable-prompt-tokens-details", action="store_true")
    p.add_argument("--enable-force-include-usage", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--enable-mfu-metrics", action="store_true")
    p.add_argument("--disable-log-stats", action="store_true")
    p.add_argument("--disable-uvicorn-access-log", action="store_true")
    kvlab_opts = p.add_argument_group("kvlab options (not vLLM flags)")
    kvlab_opts.add_argument("--timing", choices=TIMING_SOURCES, default=DEFAULT_TIMING, help=(
        "what prices the simulated steps: measured vLLM kernel tables (kernels; an error where there are "
        "none), the roofline, or auto (kernel tables where they cover the model, GPU and format; AWQ/GPTQ and "
        "FP8 on A100 from the BF16 tables scaled by the roofline's ratio; DeepSeek-V2-Lite on an H100/H200 from "
        "the GEMM tables at its layer shapes, its MoE experts measured and its attention from the measured MLA "
        "module tables; else the "
        "roofline, labelled); default "
        f"{DEFAULT_TIMING}"))
    kvlab_opts.add_argument("--vllm-version", default=DEFAULT_VLLM_VERSION,
                            help=f"{VLLM_VERSION_HELP}; default {DEFAULT_VLLM_VERSION}")
    kvlab_opts.add_argument("--sampler", choices=SAMPLERS, default=None, help=SAMPLER_HELP)
    kvlab_opts.add_argument("--checkpoint-weights", metavar="FORMAT", default=None, help=CHECKPOINT_WEIGHTS_HELP)
    testing = p.add_argument_group("kvlab testing options (not vLLM flags)")
    testing.add_argument("--fault", action="append", metavar="SPEC", help=(
        f"inject a fault on purpose, to rehearse failures (repeatable; also $KVLAB_SIM_FAULT, specs separated by "
        f"spaces). Kinds: {help_text()}. Requests are numbered in arrival order, probes included; each injected "
        "fault logs a line 'injected fault SPEC'"))
    for flag in NO_EFFECT_FLAGS:
        if flag != "--disable-uvicorn-access-log":
            p.add_argument(flag, action="store_true", dest=f"_ignored_{flag.strip('-')}")
    for flag in NO_EFFECT_VALUE_FLAGS:
        p.add_argument(flag, dest=f"_ignored_{flag.strip('-')}")
    for flag in NOT_SIMULATED_VALUE_FLAGS:
        p.add_argument(flag, dest=f"_unsim_{flag.strip('-')}")
    for short, long in GRAPH_VALUE_FLAGS:
        p.add_argument(short, long, dest=f"_graph_{long.strip('-')}")
    for flag in NOT_SIMULATED_FLAGS:
        p.add_argument(flag, action="store_true", dest=f"_unsim_{flag.strip('-')}")
    return p


@dataclass(frozen=True)
class ServeArgs:
    model: str
    gpu: str
    speedup: float
    host: str
    port: int
    api_keys: tuple[str, ...]
    config: ServeConfig  # the typed vLLM flags (kvlab.serve_config), as `kvlab serve` derives them
    enable_prefix_caching: bool
    enable_chunked_prefill: bool
    enable_prompt_tokens_details: bool
    enable_force_include_usage: bool
    enable_mfu_metrics: bool
    disable_log_stats: bool
    disable_access_log: bool
    non_default: dict  # flags given, for vLLM's "non-default args" line (API keys masked)
    not_simulated: tuple[str, ...]
    faults: tuple[Fault, ...] = ()  # --fault, then $KVLAB_SIM_FAULT (kvlab.sim.faults)
    timing: str = DEFAULT_TIMING  # --timing: the step-time backend (kvlab.sim.timing.step_timing)
    vllm_version: str = DEFAULT_VLLM_VERSION  # --vllm-version: the release simulated (kernels, memory)
    sampler: str | None = None  # --sampler: the profiling run's top-k/top-p sampler (memory); None: the release's
    scheduler_reserve_full_isl: bool | None = None  # None: the release's default (kvlab.sim.config)
    async_scheduling: bool | None = None  # None: the release's default (kvlab.sim.config)


def _pydantic_range(cls: str, field: str, value, rule: str, bound, kind: str) -> KvlabError:
    return KvlabError(
        f"1 validation error for {cls} {field}: Input should be {rule} {bound} "
        f"[type={kind}, input_value={value}, input_type={type(value).__name__}]"
    )


def check_config(config: ServeConfig) -> None:
    """What vLLM 0.32 (and so the simulator) refuses in a serve configuration, with vLLM's messages;
    also a --quantization method the memory model does not size."""
    util = config.gpu_memory_utilization
    if util is not None and util > 1:
        raise _pydantic_range("CacheConfig", "gpu_memory_utilization", util, "less than or equal to", 1, "less_than_equal")
    if util is not None and util <= 0:
        raise _pydantic_range("CacheConfig", "gpu_memory_utilization", util, "greater than", 0, "greater_than")
    if config.max_num_seqs is not None and config.max_num_seqs < 1:
        raise _pydantic_range("SchedulerConfig", "max_num_seqs", config.max_num_seqs, "greater than or equal to", 1,
                              "greater_than_equal")
    if config.max_num_batched_tokens is not None and config.max_num_batched_tokens < 1:
        raise _pydantic_range("SchedulerConfig", "max_num_batched_tokens", config.max_num_batched_tokens,
                              "greater than or equal to", 1, "greater_than_equal")
    if config.kv_cache_dtype not in VLLM_KV_CACHE_DTYPES:
        raise KvlabError(f"argument --kv-cache-dtype: invalid choice: {config.kv_cache_dtype!r} "
                         f"(choose from {', '.join(VLLM_KV_CACHE_DTYPES)})")
    method = config.quantization_flag()
    if method is not None and method not in VLLM_QUANTIZATIONS:
        raise KvlabError(f"Unknown quantization method: {method}. Must be one of {list(VLLM_QUANTIZATIONS)}.")
    config.capacity_kwargs()  # a method the memory model does not size


def parse_serve_args(argv: list[str], fault_env: str | None = None) -> ServeArgs:
    """argv: vllm serve's flags (and kvlab's --gpu, --speedup, --fault); fault_env: $KVLAB_SIM_FAULT."""
    ns = build_parser().parse_args(argv)
    model = ns.model_tag or ns.model_flag
    if not model:
        raise KvlabError("the following arguments are required: MODEL (or --model)")
    if ns.model_tag and ns.model_flag and ns.model_tag != ns.model_flag:
        raise KvlabError(f"give MODEL once: positional {ns.model_tag!r} and --model {ns.model_flag!r} differ")
    if not ns.speedup > 0:
        raise KvlabError(f"--speedup must be positive, got {ns.speedup}")
    vllm_release(ns.vllm_version)  # a version kvlab can read, or one line
    graph_args = graph_value_args(*(getattr(ns, f"_graph_{long.strip('-')}") for _, long in GRAPH_VALUE_FLAGS))
    config = ServeConfig(model=model, **{**config_values(ns), **checkpoint_fields(ns.checkpoint_weights, ns.quantization)},
                         vllm_args=graph_args)
    check_config(config)
    faults = parse_faults(ns.fault or [], fault_env)
    defaults = vars(build_parser().parse_args(["--gpu", ns.gpu, model]))
    non_default = {k: v for k, v in vars(ns).items()
                   if v != defaults.get(k) and not k.startswith("_") and k != "api_key"}
    if ns.api_key:
        non_default["api_key"] = ["<redacted>"]
    not_simulated = tuple(k.removeprefix("_unsim_") for k, v in vars(ns).items()
                          if k.startswith("_unsim_") and v not in (None, False)
                          and not (k == "_unsim_cpu-offload-gb" and v.strip() in ("0", "0.0")))  # vLLM's default
    not_simulated += not_simulated_typed(config)
    return ServeArgs(
        model=model, gpu=ns.gpu, speedup=ns.speedup, host=ns.host, port=ns.port,
        api_keys=tuple(ns.api_key or ()), config=config, enable_prefix_caching=ns.enable_prefix_caching,
        enable_chunked_prefill=ns.enable_chunked_prefill,
        enable_prompt_tokens_details=ns.enable_prompt_tokens_details,
        enable_force_include_usage=ns.enable_force_include_usage, enable_mfu_metrics=ns.enable_mfu_metrics,
        disable_log_stats=ns.disable_log_stats, disable_access_log=ns.disable_uvicorn_access_log,
        non_default=non_default, not_simulated=not_simulated, faults=faults, timing=ns.timing,
        vllm_version=ns.vllm_version, scheduler_reserve_full_isl=ns.scheduler_reserve_full_isl,
        async_scheduling=ns.async_scheduling, sampler=ns.sampler,
    )
