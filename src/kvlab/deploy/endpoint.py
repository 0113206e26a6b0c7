"""A server kvlab did not start (engine `external`): an OpenAI-compatible vLLM at a URL.

    srv = ExternalServer(ServeSpec("llama-3.1-8b", engine="external", gpu="h100"),
                         Endpoint(url="http://10.0.0.5:8000")).start()

kvlab starts and stops nothing here: `start()` checks /health and /v1/models, reads the KV pool
from `vllm:cache_config_info` on the metrics URL and the version from /version; `alive()` is
whether /health still answers. The prediction is the memory model's for the card (or config.json)
and level named, exactly as for a launched server."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

import httpx

from kvlab.deploy import facts as factsmod
from kvlab.deploy.launcher import ServeSpec, Server
from kvlab.errors import KvlabError

HEALTH_TIMEOUT_S = 5.0


class Endpoint(BaseModel):
    """Where a server kvlab did not start answers; its API key by environment variable name only."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    url: str = Field(pattern=r"^https?://[^/\s]+(/[^\s]*)?$")
    metrics_url: str | None = Field(None, pattern=r"^https?://[^/\s]+(/[^\s]*)?$")  # default: URL/metrics
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # the variable's name, never the key

    @field_validator("url", "metrics_url")
    @classmethod
    def _no_trailing_slash(cls, v: str | None) -> str | None:
        return v.rstrip("/") if v else v

    @property
    def metrics(self) -> str:
        return self.metrics_url or f"{self.url}/metrics"


class ExternalServer(Server):
    """A Server whose process is someone else's: resolved and predicted as Server does, never started."""

    launched_by_kvlab = False

    def __init__(self, spec: ServeSpec, endpoint: Endpoint):
        self.endpoint = endpoint
        super().__init__(spec)
        self.served_models: list[str] = []
        self.version: dict = {}
        self.gone: str | None = None  # why it stopped answering, once it did

    @property
    def base_url(self) -> str:
        return self.endpoint.url

    @property
    def pool_source(self) -> str:
        return f"vllm:cache_config_info on {self.endpoint.metrics}"

    @property
    def facts_source(self) -> str:
        return (f"reported by a server kvlab did not start ({self.endpoint.url}): "
                f"{self.pool_source}, /version")

    def start(self) -> "ExternalServer":
        why = self._unanswered()
        if why:
            raise KvlabError(f"the endpoint {self.endpoint.url} {why}; kvlab starts nothing for engine external")
        self.healthy = True
        self._read_facts()
        if self.facts.kv_cache_tokens is None and self.facts.num_gpu_blocks is None:
            raise KvlabError(f"{self.endpoint.metrics} has no vllm:cache_config_info: the KV pool is unknown "
                             "(is it vLLM's /metrics? set metrics_url)")
        return self

    def stop(self) -> None:
        self.healthy = False  # not ours to stop

    def alive(self) -> bool:
        why = self._unanswered()
        if why:
            self.gone = f"the endpoint {self.endpoint.url} {why}"
        return why is None

    def log_text(self) -> str:
        return ""  # its log is where it runs, not kvlab's

    def _unanswered(self) -> str | None:
        """Why /health or /v1/models does not answer as a vLLM server does, or None."""
        headers = {"Authorization": f"Bearer {self.spec.api_key}"} if self.spec.api_key else {}
        try:
            r = httpx.get(f"{self.endpoint.url}/health", timeout=HEALTH_TIMEOUT_S)
            if r.status_code != 200:
                return f"answered /health with HTTP {r.status_code}"
            r = httpx.get(f"{self.endpoint.url}/v1/models", headers=headers, timeout=HEALTH_TIMEOUT_S)
            if r.status_code != 200:
                return f"answered /v1/models with HTTP {r.status_code}"
            models = [m.get("id") for m in r.json().get("data", [])]
        except httpx.HTTPError as e:
            return f"does not answer ({type(e).__name__}: {e})"
        except (ValueError, AttributeError):
            return "answered /v1/models with no model list"
        if not models:
            return "serves no model (/v1/models is empty)"
        self.served_models = models
        return None

    def _read_facts(self) -> None:
        try:
            text = httpx.get(self.endpoint.metrics, timeout=10.0).text
        except httpx.HTTPError as e:
            raise KvlabError(f"cannot read {self.endpoint.metrics}: {type(e).__name__}: {e}") from None
        facts = factsmod.parse_cache_config_info(text)
        try:
            self.version = httpx.get(f"{self.endpoint.url}/version", timeout=HEALTH_TIMEOUT_S).json()
        except (httpx.HTTPError, ValueError):
            self.version = {}
        version = self.version.get("version") if isinstance(self.version, dict) else None
        self.facts = factsmod.StartupFacts(vllm_version=version).merged(facts)
