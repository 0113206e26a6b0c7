"""One serve configuration: a profile level (plus the user's extra vLLM flags) parsed once, typed.

    config = parse_serve_config("llama-3.1-8b", ["--quantization", "fp8", "--kv-cache-dtype", "fp8"],
                                level="fp8+fp8-kv")
    config.weights, config.kv_cache_dtype   # "fp8", "fp8" (kvlab's weight format; the KV-cache dtype)
    config.to_argv()                        # ["--quantization", "fp8", "--kv-cache-dtype", "fp8"]

The launcher, the memory model (`capacity_kwargs`), the simulator (`kvlab.sim.config.build_config`)
and the planner take it as is. Weight formats are kvlab's (`kvlab.models.weights`); vLLM's
`--quantization` method names appear only in argv (`to_argv`), mapped by the two tables below. The
KV-cache dtype keeps vLLM's `--kv-cache-dtype` values, which are also the memory model's names.
Flags kvlab does not type are kept verbatim, in order, in `vllm_args`.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict

from kvlab.errors import KvlabError

# vLLM's --quantization methods -> kvlab's weight formats (kvlab.models.weights.WEIGHT_FORMATS).
METHOD_WEIGHTS = {
    "fp8": "fp8", "fp8_per_tensor": "fp8", "fbgemm_fp8": "fp8", "fp8_per_channel": "fp8",
    "fp8_per_block": "fp8-block", "awq": "awq", "awq_marlin": "awq", "auto_awq": "awq",
    "gptq": "gptq", "gptq_marlin": "gptq", "auto_gptq": "gptq", "compressed-tensors": "int8",
    "bitsandbytes": "nf4",
}
# kvlab's weight formats -> the --quantization method that names each one to vLLM.
WEIGHTS_METHOD = {"fp8": "fp8", "fp8-block": "fp8_per_block", "int8": "compressed-tensors", "awq": "awq",
                  "gptq": "gptq", "gptq-int8": "gptq", "nf4": "bitsandbytes"}
_DTYPES = {"auto": None, "bfloat16": "bfloat16", "float16": "float16", "half": "float16", "float": "float32",
           "float32": "float32"}


def human_readable_int(value: str) -> int:
    """vLLM's human_readable_int: '32k' = 32,000, '32K' = 32,768, '25.6k' = 25,600."""
    value = value.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", value)
    if match:
        number, suffix = match.groups()
        if suffix.islower():
            return int(float(number) * {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}[suffix])
        return int(number) * {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[suffix]
    return int(value)


def add_serve_flags(p: argparse.ArgumentParser, *, kv_cache_dtypes: Sequence[str] | None = None,
                    dtypes: Sequence[str] | None = None) -> None:
    """The `vllm serve` flags a ServeConfig types, as vLLM declares them (choices where given)."""
    p.add_argument("--quantization", "-q", default=None)
    p.add_argument("--kv-cache-dtype", choices=kv_cache_dtypes, default="auto")
    p.add_argument("--dtype", choices=dtypes, default="auto")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    p.add_argument("--enable-expert-parallel", "-ep", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--speculative-config", "-sc", type=_json_object, default=None)
    p.add_argument("--hf-overrides", type=_json_object, default=None)
    p.add_argument("--max-model-len", type=human_readable_int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--kv-cache-memory-bytes", type=human_readable_int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=human_readable_int, default=None)
    p.add_argument("--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--api-server-count", "-asc", type=int, default=None)


def _json_object(value: str) -> str:
    """vLLM parses --speculative-config with json.loads; kvlab keeps the text (compact) for argv."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e.msg}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("a JSON object is needed")
    return json.dumps(parsed, separators=(",", ":"))


def json_flag(text: str | None, flag: str = "--speculative-config") -> str | None:
    """A JSON-object flag (--speculative-config, --hf-overrides) as a ServeConfig keeps it: vLLM's JSON
    object, compact."""
    try:
        return _json_object(text) if text is not None else None
    except argparse.ArgumentTypeError as e:
        raise KvlabError(f"{flag}: {e}") from None


HF_OVERRIDES_HELP = ("vLLM's JSON object of config.json fields to override (e.g. rope_scaling and "
                     "max_position_embeddings for a longer context): the model's layers, context limit and "
                     "quantization as vLLM builds them from the overridden config")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit 2
        raise KvlabError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(add_help=False, allow_abbrev=False)
    add_serve_flags(p)
    return p


class ServeConfig(BaseModel):
    """A model served at one quantization level with vLLM's flags, typed. Frozen: records embed it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str  # the card name, or the model as given (local folder, HF id)
    level: str | None = None  # the profile level (QUANT=), e.g. "fp8+fp8-kv"; None: flags alone
    checkpoint: str | None = None  # a pre-quantized checkpoint served instead of the card's model
    weights: str | None = None  # kvlab weight format; None: the checkpoint's own (unquantized or declared)
    weights_from_checkpoint: bool = False  # the checkpoint declares `weights` (vLLM is not told; kvlab's simulator is)
    quantization_method: str | None = None  # vLLM's method, only where it is not the format's own (awq_marlin, ...)
    kv_cache_dtype: str = "auto"
    dtype: str | None = None  # bfloat16, float16, float32; None: the checkpoint's
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    # no CUDA graphs: vLLM takes no graph memory from the KV budget; None: not given (vLLM's False)
    enforce_eager: bool | None = None
    speculative_config: str | None = None  # vLLM's JSON, compact
    hf_overrides: str | None = None  # vLLM's JSON object of config.json fields, compact (kvlab.models.cards.with_hf_overrides)
    max_model_len: int | None = None
    block_size: int | None = None
    attention_backend: str | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_memory_bytes: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    num_gpu_blocks_override: int | None = None
    served_model_names: tuple[str, ...] = ()
    api_server_count: int | None = None  # API-server processes; None: vLLM's default (data_parallel_size)
    vllm_args: tuple[str, ...] = ()  # the other vLLM flags, verbatim and in order

    @property
    def label(self) -> str:
        """What records and reports show: the level name (the flags' own summary without one)."""
        return self.level or f"weights={self.weights or 'auto'},kv={self.kv_cache_dtype}"

    @property
    def served_model_name(self) -> str | None:
        return self.served_model_names[0] if self.served_model_names else None

    @property
    def cuda_graphs(self) -> bool:
        """Whether vLLM captures CUDA graphs (and so takes their memory from a 0.21+ KV budget):
        not with --enforce-eager, nor at -O0 (`--optimization-level 0`, whose default
        `cudagraph_mode` is NONE), nor with a --compilation-config (-cc) whose `cudagraph_mode` is
        NONE, which wins over the level (vllm/config/vllm.py: OPTIMIZATION_LEVEL_00,
        `VllmConfig.__post_init__`)."""
        if self.enforce_eager:
            return False
        level, mode = graph_flags(self.vllm_args)
        return mode != "NONE" if mode is not None else level != 0

    @property
    def torch_compile(self) -> bool:
        """Whether vLLM compiles the model (and so leaves its custom ops off by default): not with
        --enforce-eager nor at -O0, where the compilation mode is NONE and CompilationConfig.custom_ops
        "all" (vllm/config/vllm.py `VllmConfig.__post_init__`)."""
        return not self.enforce_eager and graph_flags(self.vllm_args)[0] != 0

    def has_vllm_flag(self, *names: str) -> bool:
        """Whether one of the untyped flags (`vllm_args`) is given."""
        return any(a.split("=", 1)[0] in names for a in self.vllm_args)

    def with_flags(self, args: Sequence[str]) -> "ServeConfig":
        """This config with more `vllm serve` flags on top (later flags win, as in vLLM's argparse)."""
        return _parse(self, list(args))

    # -- vLLM's spelling: argv only -----------------------------------------------------------

    def quantization_flag(self) -> str | None:
        """The --quantization value the engine gets (None: vLLM reads the checkpoint's own)."""
        if self.quantization_method:
            return self.quantization_method
        if self.weights is None or self.weights_from_checkpoint:
            return None
        return WEIGHTS_METHOD[self.weights]

    def checkpoint_weights_flag(self) -> str | None:
        """kvlab's --checkpoint-weights value (kvlab.sim.args.checkpoint_fields) for kvlab's simulator, which is given
        the card in the checkpoint's place: the format a checkpoint declares, and a format whose bits
        vLLM's method does not say (gptq-int8); None where --quantization says it all."""
        if self.weights is None:
            return None
        said = METHOD_WEIGHTS[WEIGHTS_METHOD[self.weights]]  # the format vLLM's method names back
        return self.weights if self.weights_from_checkpoint or said != self.weights else None

    def to_argv(self, *, name_checkpoint_weights: bool = False) -> list[str]:
        """The `vllm serve` flags of this config (no MODEL, no --served-model-name: the engine places
        those); name_checkpoint_weights: for kvlab's simulator (`kvlab sim serve/run/bench`), given the
        card, not the checkpoint: the checkpoint's format as kvlab's --checkpoint-weights."""
        q = self.quantization_flag()
        ckpt = self.checkpoint_weights_flag() if name_checkpoint_weights else None
        out: list[str] = ["--checkpoint-weights", ckpt] if ckpt else []
        for flag, value, default in (
                ("--quantization", q, None), ("--kv-cache-dtype", self.kv_cache_dtype, "auto"),
                ("--dtype", self.dtype, None), ("--tensor-parallel-size", self.tensor_parallel_size, 1),
                ("--pipeline-parallel-size", self.pipeline_parallel_size, 1),
                ("--data-parallel-size", self.data_parallel_size, 1),
                ("--speculative-config", self.speculative_config, None),
                ("--hf-overrides", self.hf_overrides, None),
                ("--max-model-len", self.max_model_len, None), ("--block-size", self.block_size, None),
                ("--attention-backend", self.attention_backend, None),
                ("--gpu-memory-utilization", self.gpu_memory_utilization, None),
                ("--kv-cache-memory-bytes", self.kv_cache_memory_bytes, None),
                ("--max-num-seqs", self.max_num_seqs, None),
                ("--max-num-batched-tokens", self.max_num_batched_tokens, None),
                ("--num-gpu-blocks-override", self.num_gpu_blocks_override, None),
                ("--api-server-count", self.api_server_count, None)):
            if value != default:
                out += [flag, str(value)]
        if self.enable_expert_parallel:
            out.append("--enable-expert-parallel")
        if self.enforce_eager is not None:
            out.append("--enforce-eager" if self.enforce_eager else "--no-enforce-eager")
        return out + list(self.vllm_args)

    # -- the memory model -----------------------------------------------------------------------

    def capacity_kwargs(self) -> dict[str, Any]:
        """`kvlab.models.memory.capacity` keywords (all but the arch, the GPU and the defaults an
        engine fills in). KvlabError where the weights are a vLLM method kvlab does not size."""
        if self.quantization_method and self.quantization_method not in METHOD_WEIGHTS:
            raise KvlabError(f"--quantization {self.quantization_method} is a vLLM method kvlab's memory model "
                             f"does not size (it sizes: {', '.join(sorted(METHOD_WEIGHTS))})")
        kw = dict(kv_cache_dtype=self.kv_cache_dtype, quantization=self.weights, dtype=self.dtype,
                  max_model_len=self.max_model_len, block_size=self.block_size,
                  attention_backend=self.attention_backend, tensor_parallel_size=self.tensor_parallel_size,
                  pipeline_parallel_size=self.pipeline_parallel_size, kv_budget_bytes=self.kv_cache_memory_bytes,
                  data_parallel_size=self.data_parallel_size, enable_expert_parallel=self.enable_expert_parallel,
                  speculative_config=self.speculative_config,
                  max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=self.max_num_seqs,
                  num_gpu_blocks_override=self.num_gpu_blocks_override, cuda_graphs=self.cuda_graphs,
                  torch_compile=self.torch_compile)
        if self.gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = self.gpu_memory_utilization
        return kw


GRAPH_LEVEL_FLAGS = ("-O", "--optimization-level")
GRAPH_CONFIG_FLAGS = ("-cc", "--compilation-config")


def graph_flags(args: Sequence[str]) -> tuple[int | None, str | None]:
    """(optimization level, compilation config's cudagraph_mode) as vLLM reads them from untyped
    flags, the last given of each winning: `-O0` / `-O 0` / `--optimization-level[=]0`, and
    `-cc`/`--compilation-config` as JSON or dotted (`-cc.cudagraph_mode=NONE`); None where not given
    or not readable (vLLM then refuses the flag itself)."""
    level: int | None = None
    mode: str | None = None
    args = list(args)
    for i, a in enumerate(args):
        nxt = args[i + 1] if i + 1 < len(args) else None
        name, eq, val = a.partition("=")
        if a.startswith("-O") and a[2:].isdigit():
            level = int(a[2:])
        elif name in GRAPH_LEVEL_FLAGS:
            value = val if eq else nxt
            if value is not None and value.strip().isdigit():
                level = int(value)
        elif name in GRAPH_CONFIG_FLAGS:
            value = val if eq else nxt
            try:
                parsed = json.loads(value) if value is not None else None
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict) and parsed.get("cudagraph_mode") is not None:
                mode = str(parsed["cudagraph_mode"]).upper()
        elif name in tuple(f"{f}.cudagraph_mode" for f in GRAPH_CONFIG_FLAGS):
            value = val if eq else nxt
            if value is not None:
                mode = value.strip().upper()
    return level, mode


def graph_value_args(optimization_level: int | str | None, compilation_config: str | None) -> tuple[str, ...]:
    """--optimization-level and --compilation-config as untyped flags (long form), the ones given."""
    return tuple(a for flag, value in (("--optimization-level", optimization_level),
                                       ("--compilation-config", compilation_config))
                 if value is not None for a in (flag, str(value)))


def graph_argv(args: Sequence[str]) -> list[str]:
    """The untyped flags' CUDA-graph settings (`graph_flags`) as flags again, in their long form."""
    level, mode = graph_flags(args)
    return list(graph_value_args(level, json.dumps({"cudagraph_mode": mode}) if mode is not None else None))


def parse_serve_config(model: str, args: Sequence[str], *, level: str | None = None, checkpoint: str | None = None,
                       weights: str | None = None) -> ServeConfig:
    """MODEL with `vllm serve` flags `args` (a profile level's, then the user's); `weights`: the
    profile's weight format for a checkpoint that declares it (used when no --quantization says it)."""
    base = ServeConfig(model=model, level=level, checkpoint=checkpoint, weights=weights,
                       weights_from_checkpoint=weights is not None)
    return _parse(base, list(args))


def _parse(base: ServeConfig, args: list[str]) -> ServeConfig:
    try:
        ns, rest = _parser().parse_known_args(args)
    except KvlabError as e:  # a malformed value, e.g. --block-size abc
        raise KvlabError(f"vllm flags {' '.join(args)!r}: {e}") from None
    given = {a.split("=", 1)[0] for a in args}
    values = config_values(ns)
    # Only the flags given override: a later `--quantization` replaces the profile's, an absent one keeps it.
    keep = {"--quantization": ("weights", "weights_from_checkpoint", "quantization_method"),
            "--served-model-name": ("served_model_names",)}
    update: dict[str, Any] = {}
    for action in _parser()._actions:
        if not given & set(action.option_strings):
            continue
        for name in keep.get(action.option_strings[0], (action.dest,)):
            update[name] = values[name]
    update["vllm_args"] = base.vllm_args + tuple(rest)
    return base.model_copy(update=update)


def config_values(ns: argparse.Namespace) -> dict[str, Any]:
    """ServeConfig fields from a namespace of `add_serve_flags` (the one place vLLM's spellings become
    kvlab's: the --quantization method to a weight format, --dtype aliases to torch names)."""
    return dict(
        **quantization_fields(ns.quantization), kv_cache_dtype=ns.kv_cache_dtype, dtype=_dtype(ns.dtype), tensor_parallel_size=ns.tensor_parallel_size,
        pipeline_parallel_size=ns.pipeline_parallel_size, data_parallel_size=ns.data_parallel_size,
        enable_expert_parallel=ns.enable_expert_parallel, enforce_eager=ns.enforce_eager,
        speculative_config=ns.speculative_config, hf_overrides=ns.hf_overrides, max_model_len=ns.max_model_len,
        block_size=ns.block_size,
        attention_backend=ns.attention_backend, gpu_memory_utilization=ns.gpu_memory_utilization,
        kv_cache_memory_bytes=ns.kv_cache_memory_bytes, max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens, num_gpu_blocks_override=ns.num_gpu_blocks_override,
        served_model_names=tuple(ns.served_model_name or ()), api_server_count=ns.api_server_count,
    )


def quantization_fields(method: str | None) -> dict[str, Any]:
    """The ServeConfig fields of a `--quantization` value (vLLM's method name; None: not given)."""
    weights = METHOD_WEIGHTS.get(method) if method else None
    own = weights is not None and WEIGHTS_METHOD[weights] == method
    return dict(weights=weights, weights_from_checkpoint=False,
                quantization_method=None if own or method is None else method)


def options_config(model: str, *, quantization: str | None = None, dtype: str | None = None,
                   weights: dict[str, Any] | None = None, **fields: Any) -> ServeConfig:
    """A ServeConfig from a command's options named as vLLM's flags (`quantization`: vLLM's method;
    `weights`: the weight fields instead, where kvlab's --checkpoint-weights was given beside it:
    kvlab.sim.args.checkpoint_fields)."""
    return ServeConfig(model=model, **(weights or quantization_fields(quantization)),
                       dtype=None if dtype in (None, "auto") else dtype, **fields)


def _dtype(value: str | None) -> str | None:
    if value is None:
        return None
    if value not in _DTYPES:
        raise KvlabError(f"--dtype {value}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[value]
