"""The `vllm serve` flags that change KV sizing, read from a profile's args plus the user's extras.

Only reads them (vLLM receives the argv as it is); later flags win, as in vLLM's argparse.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from kvlab.errors import KvlabError


@dataclass(frozen=True)
class VllmFlags:
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    dtype: str | None = None
    block_size: int | None = None
    max_model_len: int | None = None
    attention_backend: str | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    kv_cache_memory_bytes: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    num_gpu_blocks_override: int | None = None
    served_model_name: str | None = None
    api_key: str | None = None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    p.add_argument("--quantization", "-q")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--dtype")
    p.add_argument("--block-size", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--attention-backend")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--kv-cache-memory-bytes", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--num-gpu-blocks-override", type=int)
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--api-key")
    return p


def parse_flags(args: list[str]) -> VllmFlags:
    try:
        ns, _ = _parser().parse_known_args(args)
    except (argparse.ArgumentError, SystemExit) as e:  # a malformed value, e.g. --block-size abc
        raise KvlabError(f"vllm flags {' '.join(args)!r}: {e}") from None
    served = ns.served_model_name[0] if ns.served_model_name else None
    values = {k: v for k, v in vars(ns).items() if k != "served_model_name"}
    return VllmFlags(served_model_name=served, **values)


def has_flag(args: list[str], *names: str) -> bool:
    return any(a.split("=", 1)[0] in names for a in args)


def without_flag(args: list[str], name: str) -> tuple[list[str], str | None]:
    """args without `name VALUE` / `name=VALUE`, and the (last) value removed."""
    out: list[str] = []
    value = None
    i = 0
    while i < len(args):
        a = args[i]
        if a == name and i + 1 < len(args):
            value = args[i + 1]
            i += 2
            continue
        if a.startswith(name + "="):
            value = a.split("=", 1)[1]
        else:
            out.append(a)
        i += 1
    return out, value
