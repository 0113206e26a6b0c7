"""`external`: a vLLM server kvlab did not start (a Kubernetes deployment, a shared endpoint, another
team's node), reached at a URL (kvlab.deploy.endpoint). No command, no install check, no model to
prepare; the prediction is the memory model's for the card (or config.json) and level named."""

from __future__ import annotations

from typing import Any

from kvlab.deploy.commands import Command
from kvlab.deploy.engines.base import Engine, Launch
from kvlab.errors import KvlabError
from kvlab.models.cards import ResolvedModel
from kvlab.serve_config import ServeConfig


class ExternalEngine(Engine):
    name = "external"
    launched_by_kvlab = False

    @property
    def reported_label(self) -> str:
        return "measured (a server kvlab did not start: /metrics and /version)"

    @property
    def reported_column(self) -> str:
        return "reported (endpoint)"

    def command(self, launch: Launch, config: ServeConfig) -> Command:
        return Command([])  # kvlab runs nothing

    def check_installed(self) -> None:
        """Nothing to install; reached only when something tries to launch it (`kvlab serve`)."""
        raise KvlabError("engine external starts no server: name its endpoint in an experiment spec "
                         "(endpoint: URL), or use kvlab load / kvlab scrape on the URL")

    def prepare_model(self, resolved: ResolvedModel, model_arg: str) -> None:
        """Nothing to prepare: the server loaded its model itself."""

    @classmethod
    def open_server(cls, spec: Any, endpoint: Any = None) -> Any:
        from kvlab.deploy.endpoint import ExternalServer

        if endpoint is None:
            raise KvlabError(f"engine external needs an endpoint for {spec.model} {spec.quant}: "
                             "the spec's endpoint: URL (or an endpoints: entry for this model and level)")
        return ExternalServer(spec, endpoint)
