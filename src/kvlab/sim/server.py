"""vLLM's OpenAI-compatible HTTP front for the simulated engine (aiohttp).

Routes: GET /health, /version, /v1/models, /metrics; POST /v1/completions, /v1/chat/completions,
/tokenize, /detokenize. Bodies, SSE framing, usage and error objects follow vLLM 0.32 field by
field: requests are read and refused as vLLM does in `kvlab.sim.api`, answers are built in
`kvlab.sim.responses`; here are the routes, the engine loop and the streams. An unknown path or a
wrong method answers FastAPI's JSON 404/405; /metrics adds the `http_*` families of the
instrumentator vLLM attaches; a client that goes away is aborted and logged in one line.

Time: the engine runs on a simulated clock, `speedup` x the wall clock since start; every
latency in /metrics is in simulated seconds (clients see wall latencies `speedup` times shorter).
/metrics also carries kvlab's own `kvlab:sim_timing_info` and `kvlab:sim_steps_priced_total`
(the step-time source and steps priced per provenance; `kvlab.sim.metrics`).
The simulated model never emits EOS: a request generates `max_tokens` tokens (finish_reason
"length"), as vLLM with `ignore_eos`, cut to what max_model_len leaves after the prompt; without
`max_tokens` a chat request runs to max_model_len.

Faults (`--fault`, kvlab.sim.faults): 5xx answers, stalled and malformed streams, /metrics gone,
/health 503, and the process dying mid-run, each injected on purpose and logged.
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from dataclasses import dataclass, field
from http import HTTPStatus

from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kvlab.sim import api, faults, logs, responses, tokens
from kvlab.sim.api import ApiError, json_response
from kvlab.sim.args import ServeArgs
from kvlab.sim.config import SIM_VERSION, SimConfig
from kvlab.sim.engine import Engine, StepResult
from kvlab.sim.faults import Fault, FaultPlan
from kvlab.sim.metrics import HttpMetrics
from kvlab.sim.sequence import Sequence

ROUTES = [("/health", "GET"), ("/version", "GET"), ("/metrics", "GET"), ("/tokenize", "POST"),
          ("/detokenize", "POST"), ("/v1/models", "GET"), ("/v1/chat/completions", "POST"),
          ("/v1/completions", "POST")]
STATS_INTERVAL_S = 10.0
# The app's background tasks (aiohttp's typed application keys)
ENGINE_LOOP = web.AppKey("engine_loop", asyncio.Task)
STATS_LOOP = web.AppKey("stats_loop", asyncio.Task)


class Clock:
    """Simulated seconds since start: the wall clock times `speedup`."""

    def __init__(self, speedup: float):
        self.speedup = speedup
        self.t0 = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self.t0) * self.speedup

    def wall_delay(self, sim_s: float) -> float:
        return (sim_s - self.now()) / self.speedup


@dataclass
class Choice:
    """One generated sequence of a request (n > 1 or several prompts make several)."""

    index: int
    seq: Sequence
    emitted: int = 0
    finish_reason: str | None = None


@dataclass
class Pending:
    """A request waiting on the engine: its choices and the events the engine loop pushes."""

    choices: list[Choice]
    n: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    open_choices: int = 0

    def first_choices(self) -> list[Choice]:
        """One choice per prompt (the n choices of a prompt share it)."""
        return [c for c in self.choices if c.index % self.n == 0]


class SimServer:
    def __init__(self, cfg: SimConfig, args: ServeArgs):
        self.cfg = cfg
        self.args = args
        self.clock = Clock(args.speedup)
        self.engine = Engine(cfg, emit_decodes=True, created_s=time.time())
        self.engine.mfu_metrics = args.enable_mfu_metrics
        self.engine.metrics.timing = cfg.cost  # kvlab:sim_timing_info, kvlab:sim_steps_priced_total
        self.engine.metrics.host_source = cfg.host_source()  # kvlab:sim_timing_info's host_source label
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self.registry.register(self.engine.metrics)
        self.http_metrics = HttpMetrics(self.registry)  # after vLLM's own families, as in a real /metrics
        self.vocab: dict[int, bytes] = {}  # token id -> its bytes, for /detokenize (see `_learn`)
        self.wake = asyncio.Event()
        self.lag_s = 0.0  # simulated seconds steps ended later than the roofline said (host too slow)
        self.in_intake: set[int] = set()  # ids of requests still in the front end's input processing
        self.ids = 0
        self.created = int(time.time())
        self.faults = FaultPlan(args.faults)

    # -- app

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._http_metrics, self._access_log, self._fastapi_errors, self._auth],
                              client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.on_startup.append(self._start_background)
        app.on_cleanup.append(self._stop_background)
        return app

    async def _start_background(self, app: web.Application) -> None:
        app[ENGINE_LOOP] = asyncio.create_task(self.engine_loop())
        if not self.args.disable_log_stats and self.cfg.api_server_count == 1:  # vLLM: no stats logging above 1
            app[STATS_LOOP] = asyncio.create_task(self.stats_loop())

    async def _stop_background(self, app: web.Application) -> None:
        for key in (ENGINE_LOOP, STATS_LOOP):
            task = app.get(key)
            if task is not None:
                task.cancel()

    @web.middleware
    async def _access_log(self, request: web.Request, handler):
        # Read first: a client that has left takes its transport with it.
        peer = request.transport.get_extra_info("peername") if request.transport else None
        try:
            resp = await handler(request)
        except web.HTTPException as e:
            resp = e
        if not self.args.disable_access_log:
            who = f"{peer[0]}:{peer[1]}" if peer else "-"
            phrase = HTTPStatus(resp.status).phrase if resp.status in HTTPStatus._value2member_map_ else ""
            logs.uvicorn(f'{who} - "{request.method} {request.path_qs} HTTP/{request.version.major}.'
                         f'{request.version.minor}" {resp.status} {phrase}')
        if isinstance(resp, web.HTTPException):
            raise resp
        return resp

    @web.middleware
    async def _http_metrics(self, request: web.Request, handler):
        """The instrumentator's http_* families; durations in simulated seconds, like every latency here."""
        start = time.monotonic()
        route = request.match_info.route.resource
        template = route.canonical if route is not None else None
        status, size = 500, 0  # an exception that escapes: the instrumentator's 500 without a body
        try:
            resp = await handler(request)
            status, size = resp.status, (resp.content_length or 0) if isinstance(resp, web.Response) else 0
            return resp
        except web.HTTPException as e:
            status, size = e.status, getattr(e, "content_length", None) or 0
            raise
        finally:
            if not HttpMetrics.excluded(template or request.path):
                self.http_metrics.observe(request.method, template or "none", status,
                                          (time.monotonic() - start) * self.clock.speedup,
                                          int(request.headers.get("Content-Length", 0)), size)

    @web.middleware
    async def _fastapi_errors(self, request: web.Request, handler):
        """An unknown path or a wrong method answers as FastAPI does: {"detail": ...} in JSON."""
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return json_response({"detail": "Not Found"}, status=404)
        except web.HTTPMethodNotAllowed as e:
            resp = json_response({"detail": "Method Not Allowed"}, status=405)
            resp.headers["Allow"] = ", ".join(sorted(e.allowed_methods))
            return resp

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        keys = self.args.api_keys
        if keys and request.path.startswith("/v1") and request.method != "OPTIONS":
            given = request.headers.get("Authorization", "")
            if not any(secrets.compare_digest(given, f"Bearer {k}") for k in keys):
                return json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    # -- simple routes

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.faults.get("never-healthy") else 200)

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": SIM_VERSION})

    async def metrics(self, request: web.Request) -> web.Response:
        if self.faults.metrics_gone():
            return json_response({"detail": "Not Found"}, status=404)  # FastAPI's 404
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        data = [{
            "id": name, "object": "model", "created": self.created, "owned_by": "vllm", "root": self.cfg.model,
            "parent": None, "max_model_len": self.cfg.max_model_len,
            "permission": [{"id": f"modelperm-{secrets.token_hex(8)}", "object": "model_permission",
                            "created": self.created, "allow_create_engine": False, "allow_sampling": True,
                            "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                            "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False}],
        } for name in self.cfg.served_model_names]
        return json_response({"object": "list", "data": data})

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: a prompt or a chat, counted without the max_model_len check."""
        try:
            body = await api.read_json(request)
            api.served_model(body, self.cfg.served_model_names)
            if "messages" in body:
                text = tokens.render_chat(api.chat_messages(body), body.get("add_generation_prompt", True))
            else:
                text = api.tokenize_prompt(body)
        except ApiError as e:
            return e.response()
        pieces = tokens.pieces(text)
        self._learn(pieces)
        ids = [tokens.piece_id(p) for p in pieces]
        strs = [p.decode(errors="replace") for p in pieces] if body.get("return_token_strs") else None
        return json_response({"count": len(ids), "max_model_len": self.cfg.max_model_len, "tokens": ids,
                              "token_strs": strs})

    async def detokenize(self, request: web.Request) -> web.Response:
        """vLLM's /detokenize: the text of token ids this server handed out (by /tokenize or as
        generated tokens); any other id is out of its vocabulary (the simulated tokenizer has no
        fixed one: an id is the CRC-32 of its text)."""
        try:
            body = await api.read_json(request)
            api.served_model(body, self.cfg.served_model_names)
            text = b"".join(self._token_bytes(t) for t in api.token_ids(body)).decode(errors="replace")
        except ApiError as e:
            return e.response()
        return json_response({"prompt": text})

    VOCAB_LIMIT = 1 << 20  # ids remembered for /detokenize; the oldest are forgotten first

    def _learn(self, pieces: list[bytes]) -> None:
        for p in pieces:
            self.vocab[tokens.piece_id(p)] = p
        while len(self.vocab) > self.VOCAB_LIMIT:
            del self.vocab[next(iter(self.vocab))]

    def _token_bytes(self, token_id: int) -> bytes:
        piece = self.vocab.get(token_id)
        if piece is None:
            piece = tokens.decode([token_id]).encode()
        if not piece:
            raise ApiError(400, f"Token id {token_id} is out of vocabulary", "tokens")
        return piece

    # -- the engine's side of a request

    def _submit(self, prompts: list[list[int]], n: int, max_tokens: list[int], chat: bool = False) -> Pending:
        """Each prompt's n choices to the engine; `max_tokens`: each prompt's, after api.output_limit
        (vLLM reports that value, not the request's, as max_tokens_param); `chat`: a chat request (at a
        release that parses the chat template on each, that work comes first: kvlab.sim.engine)."""
        now = self.clock.now()
        choices = []
        for p, (ids, mt) in enumerate(zip(prompts, max_tokens)):
            seed = tokens.prompt_seed(ids)
            for j in range(n):
                self.ids += 1
                seq = Sequence(f"req-{self.ids}", list(ids), mt, now, output_seed=seed + j, max_tokens_param=mt)
                choices.append(Choice(p * n + j, seq))
        pending = Pending(choices, n, open_choices=len(choices))
        for c in choices:
            c.seq.tag = (pending, c)
        for p in range(len(prompts)):  # each prompt through the API server's input processing first
            seqs = [c.seq for c in choices[p * n:(p + 1) * n]]
            if self.engine.parses_template(chat):  # the chat template's work, then the input processing
                done = self.engine.template(now)
                self._hold(seqs, done, self._take_in, seqs, done, False)
            else:
                self._take_in(seqs, now, True)
        return pending

    def _take_in(self, seqs: list[Sequence], at_s: float, latency: bool) -> None:
        """A prompt's choices through the API server's input processing, then to the engine."""
        ready = self.engine.intake(at_s, seqs[0].num_prompt_tokens, latency)
        if ready > at_s:
            self._hold(seqs, ready, self._add, seqs)
        else:
            self._add(seqs)

    def _hold(self, seqs: list[Sequence], until_s: float, then, *args) -> None:
        """A prompt's choices held in the front end until simulated `until_s`, then `then(*args)`."""
        for seq in seqs:
            seq.queued_s = until_s
        self.in_intake.update(map(id, seqs))
        asyncio.get_running_loop().call_later(self.clock.wall_delay(until_s), then, *args)

    def _add(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.in_intake.discard(id(seq))
            if not seq.aborted:
                self.engine.add_request(seq)
        self.wake.set()

    def _abort(self, pending: Pending, rid: str | None = None) -> None:
        """Stop a request's unfinished choices; `rid`: a client went away, logged in one line as
        vLLM's AsyncLLM.abort logs it (its engine ids: the chat id, or the completion id per prompt)."""
        for c in pending.choices:
            if id(c.seq) in self.in_intake:
                c.seq.aborted = True  # still in the front end's input processing: never added
            elif c.finish_reason is None:
                self.engine.abort(c.seq)
        self.wake.set()
        if rid is not None:
            ids = [rid] if rid.startswith("chatcmpl-") else [f"{rid}-{i}" for i in range(len(pending.first_choices()))]
            logs.log("APIServer", "async_llm.py:922", f"Aborted request(s) {','.join(ids)}.")

    # -- the engine loop

    async def engine_loop(self) -> None:
        eng, clock = self.engine, self.clock
        while True:
            if not eng.has_work:
                self.wake.clear()
                await self.wake.wait()
                continue
            plan = eng.schedule(clock.now())
            if plan is None:
                self.wake.clear()
                await self.wake.wait()
                continue
            end = plan.start_s + plan.duration_s
            delay = clock.wall_delay(end)
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)
            now = clock.now()
            if now > end:
                self.lag_s += now - end
            end = max(end, now)
            res = eng.complete(plan, end)
            if res.out_s > end:  # the front end is behind: the tokens go out when it is through
                asyncio.get_running_loop().call_later(clock.wall_delay(res.out_s), self._dispatch, res)
            else:
                self._dispatch(res)

    def _dispatch(self, res: StepResult) -> None:
        finished = {id(s) for s in res.finished}
        for seq in res.decoded + res.prefilled:
            if seq.tag is None:
                continue
            pending, choice = seq.tag
            token = tokens.output_token(seq.output_seed, choice.emitted)
            choice.emitted += 1
            done = id(seq) in finished
            if done:
                choice.finish_reason = "length"
            pending.queue.put_nowait((choice, token, done))

    async def stats_loop(self) -> None:
        m = self.engine.metrics
        last = (m.counters["vllm:prompt_tokens"], m.counters["vllm:generation_tokens"], self.clock.now())
        was_busy = False
        last_lag = 0.0
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            prompt, gen, now = m.counters["vllm:prompt_tokens"], m.counters["vllm:generation_tokens"], self.clock.now()
            lag = self.lag_s - last_lag
            if lag > 0.05 * (now - last[2]):
                logs.log("APIServer", "kvlab_sim", (
                    f"the host fell behind the simulated GPU: steps ended {lag:.2f} simulated s late in the last "
                    f"{now - last[2]:.1f} s (--speedup {self.clock.speedup:g}); latencies and throughput include "
                    "the delay, lower --speedup"), level="WARNING")
            last_lag = self.lag_s
            busy = m.num_running or m.num_waiting or gen != last[1] or prompt != last[0]
            if busy or was_busy:
                span = max(now - last[2], 1e-9)
                q = m.counters["vllm:prefix_cache_queries"]
                logs.stats_line((prompt - last[0]) / span, (gen - last[1]) / span, m.num_running, m.num_waiting,
                                m.kv_cache_usage, m.counters["vllm:prefix_cache_hits"] / q if q else 0.0)
            was_busy = bool(busy)
            last = (prompt, gen, now)

    # -- completions

    def _usage(self, pending: Pending, chat: bool, stream: bool) -> dict:
        firsts = pending.first_choices()
        cached = created = None
        if self.args.enable_prompt_tokens_details:
            cached = sum(max(c.seq.num_cached_tokens, 0) for c in firsts)
            created = sum(self._created_cache_tokens(c.seq) for c in firsts) if chat else None
        return responses.usage(self._prompt_tokens(pending), sum(c.emitted for c in pending.choices), chat, stream,
                               self.args.enable_prompt_tokens_details, cached, created)

    def _prompt_tokens(self, pending: Pending) -> int:
        return sum(c.seq.num_prompt_tokens for c in pending.first_choices())

    def _created_cache_tokens(self, seq: Sequence) -> int:
        """Prompt tokens this request wrote into the prefix cache (vLLM's created_cache_tokens)."""
        if not self.cfg.enable_prefix_caching:
            return 0
        full = seq.num_prompt_tokens // self.cfg.block_size * self.cfg.block_size
        return max(0, full - max(seq.num_cached_tokens, 0))

    def _include_usage(self, body: dict) -> tuple[bool, bool]:
        opts = body.get("stream_options") or {}
        include = bool(opts.get("include_usage")) or self.args.enable_force_include_usage
        return include, include and bool(opts.get("continuous_usage_stats"))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=True)

    async def _answer(self, request: web.Request, chat: bool) -> web.StreamResponse:
        number, fault = self.faults.next_request()
        if fault is not None and fault.kind == "http-5xx":
            return self._http_5xx(fault, number)
        try:
            body = await api.read_json(request)
            model = api.served_model(body, self.cfg.served_model_names)
            parse = api.chat_request if chat else api.completion_request
            prompts, max_tokens, n = parse(body, self.cfg.max_model_len)  # max_tokens: one per prompt
        except ApiError as e:
            return e.response()
        pending = self._submit(prompts, n, max_tokens, chat)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(8)}"
        created = int(time.time())
        if body.get("stream"):
            return await self._stream(request, pending, rid, created, model, body, chat=chat, fault=fault,
                                      number=number)
        texts = await self._collect(request, pending, rid)
        if texts is None:
            return web.Response(status=499)  # nobody reads it: the client went away
        answer = responses.chat_completion if chat else responses.completion
        choices = [(c.index, texts[c.index], c.finish_reason) for c in pending.choices]
        return json_response(answer(rid, created, model, choices, self._usage(pending, chat, False)))

    def _http_5xx(self, fault: Fault, number: int) -> web.Response:
        faults.injected(fault, f"request {number} answered HTTP 500")
        return ApiError(500, f"injected fault {fault.spec} (kvlab sim serve --fault)",
                        kind="InternalServerError").response()

    async def _collect(self, request: web.Request, pending: Pending, rid: str) -> dict[int, str] | None:
        """Each choice's text, or None when the client went away first (the request is aborted, as
        vLLM aborts a request whose client disconnects)."""
        parts: dict[int, list[int]] = {c.index: [] for c in pending.choices}
        try:
            while pending.open_choices:
                choice, token, done = await pending.queue.get()
                if request.transport is None or request.transport.is_closing():
                    self._abort(pending, rid)
                    return None
                parts[choice.index].append(token)
                if done:
                    pending.open_choices -= 1
        except asyncio.CancelledError:
            self._abort(pending)
            raise
        return {i: tokens.decode(ids) for i, ids in parts.items()}

    async def _stream(self, request: web.Request, pending: Pending, rid: str, created: int, model: str,
                      body: dict, chat: bool, fault: Fault | None = None, number: int = 0) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        include_usage, continuous = self._include_usage(body)
        head = responses.stream_head(rid, created, model, chat)
        prompt_tokens = self._prompt_tokens(pending)

        def usage(completion_tokens: int) -> dict | None:
            return responses.chunk_usage(prompt_tokens, completion_tokens, chat) if continuous else None

        async def send(event: dict) -> None:
            await resp.write(b"data: " + api.dumps(event).encode() + b"\n\n")

        first = {c.index: True for c in pending.choices}
        stall = fault if fault is not None and fault.kind == "stall" else None
        cut = fault if fault is not None and fault.kind == "malformed-sse" else None
        sent = 0  # token events sent
        try:
            while pending.open_choices:
                choice, token, done = await pending.queue.get()
                if stall is not None and sent == stall.after:
                    faults.injected(stall, f"request {number}'s stream silent for {stall.seconds:g} s after "
                                           f"{sent} tokens")
                    await asyncio.sleep(stall.seconds)
                    stall = None
                if chat and first[choice.index]:
                    first[choice.index] = False
                    await send(responses.role_event(head, choice.index, usage(0)))
                event = responses.token_event(head, choice.index, tokens.decode([token]), done, chat,
                                              fingerprint=not include_usage, usage=usage(choice.emitted))
                if cut is not None and sent == 1:  # mid-stream: the second token's event, cut short
                    faults.injected(cut, f"request {number}'s stream sent a truncated event after 1 token and ended")
                    text = api.dumps(event)
                    await resp.write(b"data: " + text[: len(text) // 2].encode() + b"\n\n")
                    self._abort(pending)
                    return resp
                await send(event)
                sent += 1
                if done:
                    pending.open_choices -= 1
            if include_usage:
                await send(responses.usage_event(head, self._usage(pending, chat, True)))
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionResetError:  # the client went away mid-stream: one log line, no traceback
            self._abort(pending, rid)
        except asyncio.CancelledError:
            self._abort(pending, rid)
            raise
        return resp


async def serve(cfg: SimConfig, args: ServeArgs) -> None:
    server = SimServer(cfg, args)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    logs.server_lines(args.host, args.port, ROUTES)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    _schedule_server_faults(server.faults, loop)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logs.uvicorn("Shutting down")
    await runner.cleanup()
    logs.uvicorn("Finished server process [%d]" % logs._PID)


def _schedule_server_faults(plan: FaultPlan, loop: asyncio.AbstractEventLoop) -> None:
    """The faults of the whole server, from the moment it answers: never healthy, dying later."""
    sick = plan.get("never-healthy")
    if sick is not None:
        faults.injected(sick, "/health answers 503 for as long as the server runs")
    death = plan.get("die-after")
    if death is not None:
        loop.call_later(death.seconds, faults.die, death)
