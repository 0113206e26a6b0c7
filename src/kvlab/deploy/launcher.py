"""The launcher: a serve profile -> the exact command -> a server process -> its startup facts.

    with Server(ServeSpec("deepseek-v2-lite", quant="bf16")) as srv:
        srv.base_url, srv.facts.kv_cache_tokens, srv.prediction.kv_cache_tokens

`Server(spec)` resolves everything (profile, engine, argv, environment, prediction) without
starting anything, so a dry run is `Server(spec).argv`. `start()` runs the server in its own
process group, waits for /health, reads the facts; `stop()` ends the whole group.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import httpx

from kvlab import hardware
from kvlab.deploy import commands, engines, facts as factsmod, host
from kvlab.deploy.compare import Comparison, compare
from kvlab.deploy.engines import preset_for_gpu_name  # noqa: F401  (kept importable from here)
from kvlab.deploy.process import ProcessGroup, StopReport
from kvlab.deploy.profiles import ServeProfile, profile
from kvlab.errors import KvlabError
from kvlab.ports import free_port, port_in_use  # noqa: F401  (importable from here, as before)
from kvlab.redact import redact_argv, redact_env
from kvlab.schema.server import Prediction, ServerFacts, ServerRecord
from kvlab.models import memory
from kvlab.models.arch import ModelArch
from kvlab.models.cards import ResolvedModel, resolve_model, with_hf_overrides
from kvlab.serve_config import ServeConfig

LOG_TAIL_LINES = 40
POLL_S = 0.5


@dataclass
class ServeSpec:
    model: str                      # card name (or local folder / HF id for the GPU engine)
    quant: str = "bf16"             # profile name: bf16, fp8, fp8-kv, fp8+fp8-kv, awq, gptq, gptq-int8, bnb4
    engine: str | None = None       # "vllm", "vllm-cpu", "sim"; None = auto (GPU visible -> vllm, else vllm-cpu)
    host: str = "127.0.0.1"
    port: int | None = None         # None = a free port
    kv_memory_gib: float | None = None   # CPU: VLLM_CPU_KVCACHE_SPACE (default 1); GPU: --kv-cache-memory-bytes
    max_model_len: int | None = None
    extra_args: list[str] = field(default_factory=list)   # passed through to vllm serve
    api_key: str | None = None
    allocation_only: bool = False
    log_path: Path | None = None
    health_timeout_s: float = 600
    gpu: str | None = None          # GPU preset, for the sim engine and predictions
    lease_path: Path | None = None  # names the running server's process group (deploy.process.stop_leftover)

    def __repr__(self) -> str:  # never show the key
        return f"ServeSpec(model={self.model!r}, quant={self.quant!r}, engine={self.engine!r}, port={self.port!r})"


class ServerStartError(KvlabError):
    """The server died at start or never became healthy; the message carries the log tail."""


def _validate(spec: ServeSpec) -> ServeSpec:
    if spec.port is not None and not 1 <= spec.port <= 65535:
        raise KvlabError(f"--port must be in 1..65535, got {spec.port}")
    if spec.kv_memory_gib is not None and spec.kv_memory_gib <= 0:
        raise KvlabError(f"--kv-memory-gib must be positive, got {spec.kv_memory_gib}")
    if spec.max_model_len is not None and spec.max_model_len < 1:
        raise KvlabError(f"--max-model-len must be positive, got {spec.max_model_len}")
    if spec.health_timeout_s <= 0:
        raise KvlabError(f"the health timeout must be positive, got {spec.health_timeout_s}")
    if spec.gpu is not None:
        hardware.gpu(spec.gpu)  # an unknown preset is refused on every engine, not only the simulator's
    extra, key = without_flag(list(spec.extra_args), "--api-key")  # keys go through the environment
    return replace(spec, extra_args=extra, api_key=spec.api_key or key)


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


def _connect_host(host_: str) -> str:
    """Where a client on this machine reaches a server bound to host_."""
    if host_ in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host_ == "::":
        return "[::1]"
    return f"[{host_}]" if ":" in host_ else host_


def default_log_path(name: str, quant: str, engine: str) -> Path:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{name}-{quant}-{engine}")
    return Path("results") / "serve" / f"{safe}-{stamp}.log"


class Server:
    """One server: resolved on construction, started by start() (or `with`), ended by stop()."""

    def __init__(self, spec: ServeSpec):
        self.spec = spec = _validate(spec)
        self.engine, self.engine_reason = engines.choose_engine(spec.engine)  # the name, as records keep it
        self.cpu = host.cpu_features()
        self.install = host.vllm_install()
        self.engine_impl: engines.Engine = engines.make_engine(self.engine, self.cpu, self.install)
        self.engine_impl.check_request(spec.gpu)
        self.resolved: ResolvedModel = resolve_model(spec.model)
        card = self.resolved.card
        self.profile: ServeProfile = profile(card.name if card else None, spec.quant)
        flags = self.engine_impl.config_flags(spec.kv_memory_gib, spec.max_model_len)
        config = self.profile.serve_config(card.name if card else self.resolved.name, [*flags, *spec.extra_args])
        if not config.served_model_names:  # the card's name (the model's, without a card) unless the user names it
            config = config.model_copy(update={"served_model_names": (config.model,)})
        self.config: ServeConfig = config
        self.resolved = with_hf_overrides(self.resolved, config.hf_overrides)  # what vLLM builds from config.json
        self.served_model_name: str = config.served_model_names[0]
        self.refusal = self.engine_impl.refusal(self.config, self.resolved, spec.allocation_only)
        self.arch: ModelArch = self.engine_impl.served_arch(self.resolved, config.hf_overrides)
        self.port: int = spec.port if spec.port is not None else free_port(spec.host)
        self.command = self._command()
        self.prediction, self.prediction_note = self._predict()
        self.facts = factsmod.StartupFacts()
        self.log_path: Path = spec.log_path or default_log_path(self.served_model_name, spec.quant, self.engine)
        self._log_start = 0  # where this server's lines begin in a log that earlier starts appended to
        self.stop_report: StopReport | None = None
        self.exit_code: int | None = None
        self.healthy = False
        self._group: ProcessGroup | None = None
        self._pid: int | None = None
        self.allocation_error: str | None = None  # allocation-only: what failed after the KV sizing
        # Called while start() waits for /health with (seconds waited, the phase its log reached);
        # what `kvlab serve` shows as progress.
        self.on_wait: Callable[[float, str | None], None] | None = None

    # -- resolution --------------------------------------------------------------------------

    @property
    def mla(self) -> bool:
        return self.resolved.arch.mla is not None

    @property
    def base_url(self) -> str:
        return f"http://{_connect_host(self.spec.host)}:{self.port}"

    @property
    def argv(self) -> list[str]:
        return list(self.command.argv)

    @property
    def env(self) -> dict[str, str]:
        """What kvlab sets in the server's environment, secrets redacted."""
        return self.command.display_env

    @property
    def model_arg(self) -> str:
        return self.engine_impl.model_arg(self.resolved, self.config)

    def _command(self) -> commands.Command:
        launch = engines.Launch(model_arg=self.model_arg, host=self.spec.host, port=self.port, api_key=self.spec.api_key,
                                kv_memory_gib=self.spec.kv_memory_gib, gpu=self.spec.gpu)
        return self.engine_impl.command(launch, self.config)

    # -- prediction --------------------------------------------------------------------------

    @property
    def predicted_backend(self) -> str | None:
        if self.prediction is None:
            return None
        return self.engine_impl.predicted_backend(self.prediction.attention_backend, self.config, self.mla)

    def _predict(self) -> tuple[memory.CapacityResult | None, str]:
        budget, gpu = self.engine_impl.kv_budget(self.config, self.spec.gpu, self.spec.kv_memory_gib)
        if budget is None and gpu is None:
            return None, "no prediction: give --kv-memory-gib (exact) or --gpu NAME (estimate)"
        try:
            kwargs = self.engine_impl.capacity_kwargs(self.config, self.mla)
            r = memory.capacity(self.arch, model_name=self.served_model_name,
                                **{**kwargs, "kv_budget_bytes": budget, "gpu": gpu})
        except KvlabError as e:
            return None, f"no prediction: {e}"
        source = "exact budget" if r.kv_budget_source == "given" else f"budget estimated for {r.gpu}"
        return r, f"predicted by kvlab's memory model ({source})"

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "Server":
        if self._group is not None:
            raise KvlabError("this server is already started")
        self.engine_impl.check_installed()
        self._claim_port()
        self.engine_impl.prepare_model(self.resolved, self.model_arg)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._log_start = self.log_path.stat().st_size
        except OSError:
            self._log_start = 0
        try:
            self._group = ProcessGroup(self.argv, self.command.child_env(dict(os.environ)), self.log_path,
                                       lease=self.spec.lease_path)
        except OSError as e:
            raise KvlabError(f"cannot start {self.argv[0]}: {e.strerror or e}") from None
        self._pid = self._group.pid
        try:
            self._wait_ready()
            self._read_facts()
        except BaseException:
            self.stop()
            raise
        if self.spec.allocation_only:
            self.stop()
        return self

    def stop(self) -> None:
        if self._group is None:
            return
        group, self._group = self._group, None
        self.stop_report = group.stop()
        self.exit_code = self.stop_report.exit_code
        self.healthy = False

    def alive(self) -> bool:
        return self._group is not None and self._group.exit_code() is None

    @property
    def pid(self) -> int | None:
        """The server's pid, which is also its process group id (kept after stop)."""
        return self._pid

    def wait(self, poll_s: float = 1.0) -> int | None:
        """Block until the server exits on its own (returns its exit code); Ctrl-C propagates."""
        while self.alive():
            time.sleep(poll_s)
        code = self._group.exit_code() if self._group else self.exit_code
        self.stop()
        return code

    def _claim_port(self) -> None:
        why = port_in_use(self.spec.host, self.port)
        if why is None:
            return
        if self.spec.port is not None:
            raise KvlabError(f"port {self.port} on {self.spec.host} is in use ({why}): pick another --port")
        self.port = free_port(self.spec.host)
        self.command = self._command()

    def log_text(self) -> str:
        """This server's log lines (the log file is appended to by every start; earlier starts'
        lines, a crashed server's included, are not this server's facts)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def _health_ok(self) -> bool:
        return self.engine_impl.healthy(self.base_url, self.served_model_name, self.spec.api_key)

    def _wait_ready(self) -> None:
        """Until /health answers; allocation-only: or until vLLM, having sized its KV cache, fails."""
        assert self._group is not None
        t0 = time.monotonic()
        deadline = t0 + self.spec.health_timeout_s
        phase = _PhaseReader()
        while True:
            if self.on_wait is not None:
                self.on_wait(time.monotonic() - t0, phase.read(self.log_path, self._log_start))
            code = self._group.exit_code()
            if self.spec.allocation_only and self._sized_then_failed(code):
                return
            if code is not None:  # checked once more after the deadline: one that exited did not hang
                self._fail(f"the server exited with code {code} during start")
            if time.monotonic() >= deadline:
                self._fail(f"no answer on {self.base_url}/health within {self.spec.health_timeout_s:g} s")
            if self._health_ok():
                self.healthy = True
                return
            time.sleep(POLL_S)

    def _sized_then_failed(self, code: int | None) -> bool:
        """vLLM logged its KV size, then exited or raised: the sizing is recorded, nothing serves."""
        text = self.log_text()
        if not factsmod.kv_size_logged(text):
            return False
        self.allocation_error = factsmod.error_after_kv_size(text)
        if code is not None:
            self.exit_code = code
        return code is not None or self.allocation_error is not None

    def _fail(self, what: str) -> None:
        self.stop()
        raise ServerStartError(f"{what} ({self.engine}, log: {self.log_path}); nothing is left running. "
                               f"Last {LOG_TAIL_LINES} log lines:\n{self.log_tail()}")

    def _read_facts(self) -> None:
        from_log = factsmod.parse_log(self.log_text())
        from_metrics = factsmod.StartupFacts()
        if self.healthy:
            try:
                text = httpx.get(f"{self.base_url}/metrics", timeout=10.0).text
                from_metrics = factsmod.parse_cache_config_info(text)
            except httpx.HTTPError:
                pass
        self.facts = from_log.merged(from_metrics)

    # -- what to show and record -------------------------------------------------------------

    @property
    def reported_label(self) -> str:
        return self.engine_impl.reported_label + (", allocation-only start" if self.spec.allocation_only else "")

    def comparison(self) -> list[Comparison]:
        if self.prediction is None:
            return []
        return compare(self.prediction, self.facts, self.predicted_backend)

    def record(self) -> dict:
        """Everything about this server as plain data (no secrets): kvlab.schema.server.ServerRecord."""
        return self.server_record().to_data()

    def server_record(self) -> ServerRecord:
        return ServerRecord(
            model=self.spec.model, served_model_name=self.served_model_name, quant=self.spec.quant,
            profile=self.profile.model_dump(), serve_config=self.config, engine=self.engine, engine_reason=self.engine_reason,
            allocation_only=self.spec.allocation_only, refusal=self.refusal.reason if self.refusal else None,
            argv=redact_argv(self.argv), env=redact_env(self.env), command=self.command.shell_line(),
            base_url=self.base_url, log_path=str(self.log_path),
            facts=ServerFacts.from_facts(self.facts, source=self.reported_label),
            prediction=Prediction.from_capacity(self.prediction, source=self.prediction_note,
                                                attention_backend=self.predicted_backend),
            comparison=[r.to_dict() for r in self.comparison()],
            exit_code=self.exit_code, allocation_error=self.allocation_error,
            stop=None if self.stop_report is None else asdict(self.stop_report),
            host={"cpu": self.cpu.to_dict(), "gpu": host.gpu_facts(),
                  "vllm": {"distribution": self.install.distribution, "version": self.install.version}})

    def write_record(self, path: Path) -> Path:
        """Atomically: a temporary file in the same folder, then a rename."""
        return self.server_record().write(path)


class _PhaseReader:
    """The startup phase of a growing log, reading only what was appended since the last call."""

    def __init__(self) -> None:
        self.offset: int | None = None
        self.phase: str | None = None
        self.rest = ""  # a line not yet finished

    def read(self, path: Path, start: int) -> str | None:
        if self.offset is None:
            self.offset = start
        try:
            with open(path, "rb") as f:
                f.seek(self.offset)
                data = f.read(1 << 22)
        except OSError:
            return self.phase
        self.offset += len(data)
        text = self.rest + data.decode("utf-8", errors="replace")
        cut = max(text.rfind("\n"), text.rfind("\r")) + 1
        text, self.rest = text[:cut], text[cut:]
        self.phase = factsmod.startup_phase(text) or self.phase
        return self.phase
