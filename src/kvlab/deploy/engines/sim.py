"""`sim`: kvlab's simulated vLLM (`kvlab sim serve`), same endpoints, metrics and log lines."""

from __future__ import annotations

import importlib.util
import sys

from kvlab.deploy.commands import Command
from kvlab.deploy.engines.base import Engine, Launch, _api_key_env, _served_names
from kvlab.errors import KvlabError
from kvlab.models import memory
from kvlab.models.cards import ResolvedModel
from kvlab.serve_config import ServeConfig


class SimEngine(Engine):
    name = "sim"
    simulated = True

    @property
    def reported_label(self) -> str:
        return "simulated (kvlab sim)"

    @property
    def reported_column(self) -> str:
        return "reported (sim)"

    def check_request(self, gpu: str | None) -> None:
        if not gpu:
            raise KvlabError("the sim engine needs a GPU preset: --gpu NAME (kvlab gpus)")

    def model_arg(self, resolved: ResolvedModel, config: ServeConfig) -> str:
        return resolved.card.name if resolved.card else config.model

    def command(self, launch: Launch, config: ServeConfig, python: str = sys.executable) -> Command:
        # A pre-quantized checkpoint's format is named: the simulator is given the card, not the checkpoint.
        argv = [python, "-m", "kvlab", "sim", "serve", launch.model_arg, "--gpu", str(launch.gpu),
                "--port", str(launch.port), "--host", launch.host, *_served_names(config),
                *config.to_argv(name_checkpoint_weights=True)]
        return Command(argv, _api_key_env(launch))

    def default_utilization(self) -> float:
        return memory.DEFAULT_GPU_MEMORY_UTILIZATION  # the simulator's, vLLM 0.32's

    def check_installed(self) -> None:
        if importlib.util.find_spec("kvlab.sim") is None:
            raise KvlabError("the simulated engine (kvlab sim) is not part of this installation")
