"""`vllm`: the official vLLM on a GPU node, started as `vllm serve MODEL`."""

from __future__ import annotations

from kvlab.deploy import host
from kvlab.deploy.engines.base import Engine
from kvlab.serve_config import ServeConfig


class VllmEngine(Engine):
    name = "vllm"

    def notes(self, config: ServeConfig) -> list[str]:
        if config.weights == "nf4" and not config.weights_from_checkpoint:
            return [f"bitsandbytes: {host.bnb_route(self.install)}"]
        return []
