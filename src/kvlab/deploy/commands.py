"""The exact command line and environment of a server, per engine (an argv list, never a shell string)."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field, replace

from kvlab.deploy.flags import has_flag
from kvlab.redact import redact_env  # the one redaction (kvlab.redact)

GiB = 1 << 30
CPU_DEFAULT_KV_GIB = 1
CPU_DEFAULT_MAX_MODEL_LEN = 4096  # twins keep the real context length, which 1 GiB of KV cannot hold


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # set on top of the inherited environment
    unset: tuple[str, ...] = ()  # removed from the inherited environment

    @property
    def display_env(self) -> dict[str, str]:
        """env with secrets redacted: what may be printed or recorded."""
        return redact_env(self.env)

    def child_env(self, base: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in base.items() if k not in self.unset}
        env.update(self.env)
        return env

    def shell_line(self) -> str:
        """For display only: the environment and argv quoted as a POSIX shell would need."""
        assigns = [f"{k}={shlex.quote(v)}" for k, v in self.display_env.items()]
        unsets = [f"-u {k}" for k in self.unset]
        prefix = " ".join((["env", *unsets] if unsets else []) + assigns)
        return (prefix + " " if prefix else "") + shlex.join(self.argv)


@dataclass(frozen=True)
class CommandInputs:
    """What every engine's command needs (resolved from a ServeSpec and its profile)."""

    model_arg: str  # what the engine loads: HF id / checkpoint, twin folder, or card name (sim)
    served_model_name: str
    host: str
    port: int
    profile_args: list[str]
    extra_args: list[str]
    kv_memory_gib: float | None
    max_model_len: int | None
    api_key: str | None
    gpu: str | None = None
    weights: str | None = None  # the profile's weight format, told to the simulator for checkpoints


def _common_tail(c: CommandInputs, budget: bool = True) -> list[str]:
    tail = list(c.profile_args)
    if c.max_model_len is not None and not has_flag(c.extra_args, "--max-model-len"):
        tail += ["--max-model-len", str(c.max_model_len)]
    if budget and c.kv_memory_gib is not None and not has_flag(c.extra_args, "--kv-cache-memory-bytes"):
        tail += ["--kv-cache-memory-bytes", str(int(c.kv_memory_gib * GiB))]
    return tail


def _served_name(c: CommandInputs) -> list[str]:
    return [] if has_flag(c.extra_args, "--served-model-name") else ["--served-model-name", c.served_model_name]


def _api_key_env(c: CommandInputs) -> dict[str, str]:
    # Through the environment, not --api-key: vLLM logs its non-default args, and argv shows in `ps`.
    return {"VLLM_API_KEY": c.api_key} if c.api_key else {}


def vllm_gpu_command(c: CommandInputs) -> Command:
    argv = ["vllm", "serve", c.model_arg, "--host", c.host, "--port", str(c.port), *_served_name(c),
            *_common_tail(c), *c.extra_args]
    return Command(argv, _api_key_env(c))


def vllm_cpu_command(c: CommandInputs, python: str = sys.executable) -> Command:
    """The CPU build: KV space from VLLM_CPU_KVCACHE_SPACE (whole GiB), eager mode, a 4K context."""
    gib = CPU_DEFAULT_KV_GIB if c.kv_memory_gib is None else c.kv_memory_gib
    whole = float(gib).is_integer()
    inputs = replace(c, kv_memory_gib=None if whole else gib,
                     max_model_len=c.max_model_len or CPU_DEFAULT_MAX_MODEL_LEN)
    eager = [] if has_flag(c.extra_args, "--enforce-eager", "--no-enforce-eager") else ["--enforce-eager"]
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", c.model_arg, *_served_name(c),
            "--host", c.host, "--port", str(c.port), *eager, *_common_tail(inputs), *c.extra_args]
    env = {"VLLM_CPU_KVCACHE_SPACE": str(int(gib))} if whole else {}
    # A fraction of a GiB goes through --kv-cache-memory-bytes; the env var (whole GiB) would override it.
    unset = () if whole else ("VLLM_CPU_KVCACHE_SPACE",)
    return Command(argv, {**env, **_api_key_env(c)}, unset)


def sim_command(c: CommandInputs, python: str = sys.executable) -> Command:
    argv = [python, "-m", "kvlab", "sim", "serve", c.model_arg, "--gpu", str(c.gpu), "--port", str(c.port),
            "--host", c.host, *_common_tail(c)]
    if c.weights and not has_flag(c.profile_args + c.extra_args, "--quantization", "-q"):
        argv += ["--quantization", c.weights]  # a pre-quantized checkpoint: the simulator models its format
    return Command(argv + list(c.extra_args), _api_key_env(c))


BUILDERS = {"vllm": vllm_gpu_command, "vllm-cpu": vllm_cpu_command, "sim": sim_command}
