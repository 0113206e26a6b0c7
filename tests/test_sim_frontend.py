"""The simulated API server (front end): one serial resource apart from the engine core, taking each
arriving request's input processing and each step's outputs (kvlab.sim.engine)."""

import dataclasses

import pytest

from kvlab.loadtest.plan import SessionPlan, TurnPlan
from kvlab.replay.run import run_offline
from kvlab.sim.config import build_config
from kvlab.sim.engine import Engine
from kvlab.sim.sequence import Sequence

TURN = TurnPlan(100, 64, 0.0)  # 100 words in, 64 tokens out, no think time


def _burst(n: int) -> list[SessionPlan]:
    return [SessionPlan(f"u{i}", "app0", 0, (TURN,)) for i in range(n)]


def _cfg(**frontend):
    cfg = build_config("llama-3.1-8b", "h100", max_model_len=4096, timing="roofline")
    return dataclasses.replace(cfg, **{"frontend_per_output_s": 0.0, "frontend_per_request_s": 0.0,
                                       "frontend_per_prompt_token_s": 0.0, "frontend_per_step_s": 0.0,
                                       "frontend_latency_s": 0.0, **frontend})


def _play(cfg, n=16, **kw):
    return run_offline("llama-3.1-8b", "h100", _burst(n), 600.0, concurrency=n, config=cfg, **kw)


def _hist_sum(engine, name):
    return engine.metrics.hist[name].sum


def test_a_front_end_that_keeps_up_adds_its_time_once():
    """One request: each step's output leaves the front end `c` after the step ends, so the client's
    TTFT is the engine's plus c, its ITLs are the engine's, and vLLM's histograms (engine-core
    timestamps; TTFT when the front end starts on the step) do not move."""
    c = 0.0002  # far below one decode step of an 8B model on an H100
    base, fe = _play(_cfg(), n=1), _play(_cfg(frontend_per_output_s=c), n=1)
    (a,), (b,) = base.records, fe.records
    assert b["ttft_s"] == pytest.approx(a["ttft_s"] + c, abs=1e-12)
    assert b["itl_s"] == pytest.approx(a["itl_s"], abs=1e-12)
    assert b["e2e_s"] == pytest.approx(a["e2e_s"] + c, abs=1e-12)
    for name in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds"):
        assert _hist_sum(fe.engine, name) == pytest.approx(_hist_sum(base.engine, name), abs=1e-12)


def test_a_front_end_that_falls_behind_paces_the_stream():
    """16 streams at 5 ms of front end per output: 80 ms per step of outputs, far longer than a
    decode step, so once the front end is behind every client gap is exactly 16 x 5 ms while the
    engine's ITL histogram keeps the engine's steps."""
    n, c = 16, 0.005
    res = _play(_cfg(frontend_per_output_s=c), n=n)
    gaps = [g for r in res.records for g in r["itl_s"][8:]]
    assert len(gaps) == n * (TURN.max_tokens - 1 - 8)
    assert gaps == pytest.approx([n * c] * len(gaps), abs=1e-9)
    itl = res.engine.metrics.hist["vllm:inter_token_latency_seconds"]
    assert itl.sum / sum(itl.counts) < n * c / 4  # the engine stepped on, outputs queued (no backpressure)
    for r in res.records:  # the records still add up
        assert r["ttft_s"] + sum(r["itl_s"]) == pytest.approx(r["e2e_s"])


def test_a_steps_outputs_cost_a_share_of_the_step_and_each_output():
    """The front end takes `frontend_per_step_s` per step with outputs plus `frontend_per_output_s`
    per output: 16 streams at 4 ms per step + 1 ms per output pace the clients at 20 ms per token once
    behind; one stream alone sees the two once on its first token."""
    n, step, out = 16, 0.004, 0.001
    res = _play(_cfg(frontend_per_step_s=step, frontend_per_output_s=out), n=n)
    gaps = [g for r in res.records for g in r["itl_s"][8:]]
    assert gaps == pytest.approx([step + n * out] * len(gaps), abs=1e-9)
    base, one = _play(_cfg(), n=1), _play(_cfg(frontend_per_step_s=step, frontend_per_output_s=out), n=1)
    assert one.records[0]["ttft_s"] == pytest.approx(base.records[0]["ttft_s"] + step + out, abs=1e-12)
    from kvlab.sim import timing
    assert build_config("llama-3.1-8b", "h100", max_model_len=4096).frontend_per_step_s == timing.FRONTEND_PER_STEP_S


@pytest.mark.parametrize("release, measured", [("0.32.0", "0.32.0"), ("0.11.0", "0.11.0"), ("0.24.0", "0.11.0"),
                                               ("0.9.2", "0.11.0")])
def test_each_release_streams_at_the_measured_release_at_or_before_it(release, measured):
    """The API server's streaming cost per output and per step is bench/frontend_cost.py's measurement
    of the latest measured release at or before the run's (the earliest for older ones), as the host time."""
    from kvlab.sim import timing

    cfg = build_config("llama-3.1-8b", "h100", max_model_len=4096, vllm_version=release)
    per_output, per_step = timing.FRONTEND_STREAMING_MEASURED[tuple(map(int, measured.split(".")))]
    assert (cfg.frontend_per_output_s, cfg.frontend_per_step_s) == (per_output, per_step)
    assert timing.frontend_streaming(release) == (per_output, per_step, measured)
    assert {(0, 11, 0): (0.000068, 0.00047), (0, 32, 0): (0.000117, 0.0008)} == timing.FRONTEND_STREAMING_MEASURED


@pytest.mark.parametrize("arrive_s", [0.5, 0.5005, 0.5011, 0.5017])
def test_a_request_arriving_during_a_step_is_processed_before_that_steps_outputs(arrive_s):
    """A request that reaches the API server while a decode step runs is taken in before that step's
    outputs (which reach the front end later), so its input processing overlaps the step: its TTFT
    grows by its input processing and its first output's share, not by a step it would wait out
    behind outputs that came after it."""
    long = SessionPlan("a", "app0", 0, (TurnPlan(100, 400, 0.0),))
    late = SessionPlan("b", "app0", 0, (TurnPlan(100, 8, 0.0),), start_offset_s=arrive_s)
    step, out, intake = 0.0005, 0.0001, 0.002
    plain = run_offline("llama-3.1-8b", "h100", [long, late], 60.0, concurrency=2, config=_cfg())
    both = run_offline("llama-3.1-8b", "h100", [long, late], 60.0, concurrency=2,
                       config=_cfg(frontend_per_request_s=intake, frontend_per_step_s=step, frontend_per_output_s=out))
    ttft = {r["session_id"]: r["ttft_s"] for r in plain.records}
    ttft_fe = {r["session_id"]: r["ttft_s"] for r in both.records}
    decode_step = min(plain.records[0]["itl_s"])
    # at most: its input processing, one step it may miss by it, the first output of the step (two streams)
    assert ttft_fe["b"] - ttft["b"] <= intake + step + 2 * out + 1e-9 or \
        ttft_fe["b"] - ttft["b"] <= decode_step + step + 2 * out + 1e-9
    assert ttft_fe["b"] - ttft["b"] < decode_step + intake  # never a whole step behind later outputs


def test_input_processing_admits_a_burst_one_request_after_another():
    """A burst of 8 requests at t=0, 4 ms of input processing each plus 10 us per prompt token: the
    engine core sees the k-th at k x (4 ms + its tokens' share); vLLM's queue time (from the engine
    core's QUEUED event) leaves that out, the TTFT histogram and the client's TTFT have it."""
    cfg = _cfg(frontend_per_request_s=0.004, frontend_per_prompt_token_s=1e-5)
    eng = Engine(cfg)
    seqs = []
    for k in range(8):
        seq = Sequence(f"r{k}", list(range(k * 1000, k * 1000 + 200)), 4, 0.0)
        seq.queued_s = eng.intake(0.0, seq.num_prompt_tokens)
        seqs.append(seq)
    assert [s.queued_s for s in seqs] == pytest.approx([(k + 1) * (0.004 + 200 * 1e-5) for k in range(8)])
    # the front end is busy until the last one is through: a step ending before then waits for it
    start, out = eng._front_end(0.01, 3)
    assert start == pytest.approx(seqs[-1].queued_s)


def test_a_burst_waits_for_input_processing_in_the_replay():
    n, c_in = 8, 0.05  # 50 ms each: far longer than an 8B prefill of ~130 tokens
    base, fe = _play(_cfg(), n=n), _play(_cfg(frontend_per_request_s=c_in), n=n)
    ttft_base = sorted(r["ttft_s"] for r in base.records)
    ttft_fe = sorted(r["ttft_s"] for r in fe.records)
    for k, (a, b) in enumerate(zip(ttft_base, ttft_fe)):
        assert b >= (k + 1) * c_in  # the k-th waited for k + 1 intakes
        assert b > a
    q = fe.engine.metrics.hist["vllm:request_queue_time_seconds"]
    assert q.sum < c_in  # the engine had nothing else queued: the wait is the front end's


def test_request_latency_delays_each_request_and_occupies_nothing():
    """A burst of 8 with 40 ms of latency on the way in: every request reaches the engine core 40 ms
    after it was sent, none waits for another's latency, so the whole run is the same run 40 ms
    later: each TTFT and end-to-end time 40 ms longer, each ITL the same, and vLLM's queue time
    (from the engine core's QUEUED event) unchanged. With serial input processing as well, the k-th
    request is through at 40 ms + (k + 1) x its processing."""
    n, lat = 8, 0.04
    base, late = _play(_cfg(), n=n), _play(_cfg(frontend_latency_s=lat), n=n)
    for a, b in zip(base.records, late.records):
        assert b["ttft_s"] == pytest.approx(a["ttft_s"] + lat, abs=1e-9)
        assert b["e2e_s"] == pytest.approx(a["e2e_s"] + lat, abs=1e-9)
        assert b["itl_s"] == pytest.approx(a["itl_s"], abs=1e-9)
    q = "vllm:request_queue_time_seconds"
    assert _hist_sum(late.engine, q) == pytest.approx(_hist_sum(base.engine, q), abs=1e-9)
    eng = Engine(_cfg(frontend_latency_s=lat, frontend_per_request_s=0.004))
    assert [eng.intake(0.0, 200) for _ in range(3)] == pytest.approx([lat + 0.004 * (k + 1) for k in range(3)])


@pytest.mark.parametrize("frontend", [dict(frontend_per_output_s=0.0004),
                                      dict(frontend_per_request_s=0.003, frontend_per_prompt_token_s=2e-6,
                                           frontend_per_output_s=0.0001)])
def test_decode_fast_path_changes_nothing_with_a_front_end(frontend):
    cfg = _cfg(**frontend)
    fast, slow = _play(cfg, n=24), _play(cfg, n=24, fast_decode=False)
    assert fast.records == slow.records
    assert fast.samples == slow.samples


def test_the_http_server_streams_through_the_front_end():
    """`kvlab sim serve` with a front end: two requests at once, 40 ms of input processing each and
    20 ms per output, at --speedup 10: the second waits for the first's intake, every token leaves
    the front end after its step; the streams are whole and the engine's counters agree."""
    import asyncio
    import time

    from aiohttp.test_utils import TestClient, TestServer

    from kvlab.sim.args import parse_serve_args
    from kvlab.sim.server import SimServer

    args = parse_serve_args(["llama-3.1-8b", "--gpu", "h100", "--max-model-len", "4096", "--speedup", "10",
                             "--disable-log-stats"])
    cfg = dataclasses.replace(build_config(args.config, args.gpu, timing="roofline"),
                              frontend_per_request_s=0.04, frontend_per_prompt_token_s=0.0, frontend_per_output_s=0.02)

    async def go():
        sim = SimServer(cfg, args)
        async with TestClient(TestServer(sim.app())) as client:
            async def one(i):
                t0 = time.monotonic()
                r = await client.post("/v1/completions", json={"model": "llama-3.1-8b", "prompt": f"hello {i}",
                                                               "max_tokens": 4, "stream": True})
                stamps = []
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        stamps.append(time.monotonic() - t0)
                return stamps
            a, b = await asyncio.gather(one(0), one(1))
            return sim, a, b

    sim, a, b = asyncio.run(go())
    assert len(a) == len(b) == 4
    # simulated: the intakes end at 40 and 80 ms, and the front end has 8 outputs x 20 ms to do after
    # them, so the last token cannot leave before 240 ms; at --speedup 10, a tenth of that in wall
    # time (the client shares the server's event loop: only lower bounds are sure)
    assert min(a[0], b[0]) >= 0.004 and max(a[0], b[0]) >= 0.008
    assert max(a[-1], b[-1]) >= 0.024
    assert sim.engine.metrics.counters["vllm:generation_tokens"] == 8
    assert not sim.in_intake


def test_api_server_count_shares_the_front_ends_work():
    """--api-server-count N (vLLM: N API-server processes, each its own connections' requests and
    outputs): the front end's per-request, per-prompt-token and per-output work shared N ways, each
    process's own pass per step kept. 16 streams at 5 ms per output pace at 80 ms a step with one
    process, 40 ms with two."""
    n, c = 16, 0.005
    one = _cfg(frontend_per_output_s=c, frontend_per_step_s=1e-4)
    two = dataclasses.replace(one, api_server_count=2)
    assert two.frontend_costs() == (0.0, 0.0, c / 2, 1e-4)
    assert dataclasses.replace(two, frontend_per_prompt_token_s=1e-5, frontend_per_request_s=1e-3).frontend_costs()[:2] \
        == (5e-4, 5e-6)
    a, b = _play(one, n=n), _play(two, n=n)
    gaps_one = [g for r in a.records for g in r["itl_s"][8:]]
    gaps_two = [g for r in b.records for g in r["itl_s"][8:]]
    assert gaps_one == pytest.approx([n * c + 1e-4] * len(gaps_one), abs=1e-9)
    assert gaps_two == pytest.approx([n * c / 2 + 1e-4] * len(gaps_two), abs=1e-9)


def test_api_server_count_is_read_from_vllms_flag_and_refused_below_one():
    from kvlab.errors import KvlabError
    from kvlab.serve_config import parse_serve_config

    cfg = build_config(parse_serve_config("llama-3.1-8b", ["--api-server-count", "4", "--max-model-len", "4096"]), "h100")
    assert cfg.api_server_count == 4 and cfg.frontend_costs()[2] == cfg.frontend_per_output_s / 4
    # vLLM's default: --data-parallel-size (1 here)
    assert build_config("llama-3.1-8b", "h100", max_model_len=4096).api_server_count == 1
    with pytest.raises(KvlabError, match=r"^--api-server-count 0 runs vLLM without an API server \(headless\)"):
        build_config(parse_serve_config("llama-3.1-8b", ["-asc", "0"]), "h100")


def test_sim_serve_says_what_it_does_with_several_api_servers(capsys):
    """`kvlab sim serve --api-server-count 2`: vLLM's own warning (its stats logging off above one
    process) and kvlab's line on how the processes are simulated; one process prints neither."""
    from kvlab.sim import logs
    from kvlab.sim.args import parse_serve_args

    args = parse_serve_args(["llama-3.1-8b", "--gpu", "h100", "--max-model-len", "4096", "--api-server-count", "2"])
    assert args.config.api_server_count == 2 and args.non_default["api_server_count"] == 2
    logs.startup_lines(build_config(args.config, "h100"), args.non_default, args.not_simulated)
    out = capsys.readouterr().out
    assert "[loggers.py:1387] AsyncLLM created with api_server_count more than 1; disabling stats logging" in out
    assert "2 API-server processes (--api-server-count): simulated as one front end taking 1/2" in out
    one = parse_serve_args(["llama-3.1-8b", "--gpu", "h100", "--max-model-len", "4096"])
    logs.startup_lines(build_config(one.config, "h100"), one.non_default, one.not_simulated)
    assert "api_server_count" not in capsys.readouterr().out


# -- the chat template, parsed per chat request by vLLM 0.11.0 and releases before 0.9.2


def test_the_chat_template_cost_follows_the_releases_read_in_their_wheels():
    """0.11.0 and 0.6.4-0.9.1 parse the template per chat request (kvlab.sim.timing.CHAT_TEMPLATE_RELEASES);
    0.9.2-0.10.x and 0.11.1 on cache it. A version without its patch is read as its .0."""
    from kvlab.sim.timing import CHAT_TEMPLATE_COST_S, chat_template_cost

    assert chat_template_cost("0.11.0", "qwen3")[0] == CHAT_TEMPLATE_COST_S["qwen3", "resolve_chat_template_kwargs"]
    assert chat_template_cost("0.11", "qwen3_moe")[0] == CHAT_TEMPLATE_COST_S["qwen3", "resolve_chat_template_kwargs"]
    assert chat_template_cost("0.8.5", "deepseek_v3")[0] == CHAT_TEMPLATE_COST_S["deepseek_v3", "detect_content_format"]
    assert chat_template_cost("0.9.1", "llama")[0] == CHAT_TEMPLATE_COST_S["llama3_1", "detect_content_format"]
    for cached in ("0.9.2", "0.10.1.1", "0.10.2", "0.11.1", "0.11.2", "0.19.0", "0.32", "0.5.4"):
        assert chat_template_cost(cached, "qwen3")[0] == 0.0, cached
    cost, source = chat_template_cost("0.11.0", "mistral")  # no measurement of its template
    assert cost == CHAT_TEMPLATE_COST_S["deepseek_v3", "resolve_chat_template_kwargs"]  # the median of three
    assert source.startswith("assumed")


def test_the_installed_vllm_caches_the_template_parse():
    """The release kvlab serves with (vLLM 0.32, the CPU build) caches what 0.11.0 did on every request
    (`vllm/renderers/hf.py`), so its chat requests cost nothing for it."""
    hf = pytest.importorskip("vllm.renderers.hf")
    from kvlab.sim.timing import chat_template_cost

    assert hasattr(hf, "_cached_resolve_chat_template_kwargs")
    assert chat_template_cost("0.32", "qwen3") == (0.0, "vLLM 0.32 caches the chat template's parse")


def test_a_chat_burst_reaches_the_engine_core_after_every_template_is_parsed():
    """8 chat requests at t=0, 20 ms of template work each, then 4 ms of input processing: the API
    server's event loop parses all eight before it tokenises the first, so no request reaches the
    engine core before 8 x 20 ms, the k-th at 8 x 20 ms + (k + 1) x 4 ms; a lone request at t=1 s
    takes its own 20 + 4 ms."""
    n, tmpl, c_in = 8, 0.02, 0.004
    cfg = _cfg(frontend_per_request_s=c_in, frontend_per_chat_request_s=tmpl)
    eng = Engine(cfg)
    done = [eng.template(0.0) for _ in range(n)]
    assert done == pytest.approx([(k + 1) * tmpl for k in range(n)])
    # each is handed on when its template work is through: behind the templates queued before then
    entered = [eng.intake(t, 200, latency=False) for t in done]
    assert entered == pytest.approx([n * tmpl + (k + 1) * c_in for k in range(n)])
    assert eng.intake(eng.template(1.0), 200, latency=False) == pytest.approx(1.0 + tmpl + c_in)


def test_a_chat_burst_in_the_replay_and_the_completions_endpoint():
    """The replay puts chat requests through the template work (run_offline(chat=True)); the same
    burst sent to /v1/completions (chat=False) costs nothing for it."""
    n, tmpl = 8, 0.05  # far longer than an 8B prefill of ~130 tokens
    cfg = _cfg(frontend_per_chat_request_s=tmpl)
    chat, plain = _play(cfg, n=n, chat=True), _play(cfg, n=n, chat=False)
    assert min(r["ttft_s"] for r in chat.records) >= n * tmpl  # the first token after all n parses
    assert [r["ttft_s"] for r in plain.records] == pytest.approx([r["ttft_s"] for r in _play(_cfg(), n=n).records])


def test_sim_bench_records_its_endpoint_and_prices_chat_at_0_11_0():
    from kvlab.replay.bench import run_bench

    kw = dict(dataset="random", input_len=128, output_len=4, num_prompts=200, timing="roofline")
    chat = run_bench("qwen3-8b", "h100", endpoint_type="openai-chat", vllm_version="0.11.0", **kw)
    plain = run_bench("qwen3-8b", "h100", vllm_version="0.11.0", **kw)
    later = run_bench("qwen3-8b", "h100", endpoint_type="openai-chat", vllm_version="0.11.1", **kw)
    assert (chat.endpoint_type, plain.endpoint_type) == ("openai-chat", "openai")
    from kvlab.sim.timing import CHAT_TEMPLATE_COST_S

    floor = 200 * CHAT_TEMPLATE_COST_S["qwen3", "resolve_chat_template_kwargs"]
    assert chat.median_ttft_ms / 1e3 > floor > plain.p99_ttft_ms / 1e3
    assert later.mean_ttft_ms == pytest.approx(plain.mean_ttft_ms)
    assert run_bench("qwen3-8b", "h100", endpoint_type="vllm", num_prompts=5, input_len=16, output_len=2,
                     timing="roofline").endpoint_type == "openai"  # vllm bench's older name for the same client
    with pytest.raises(Exception, match="--endpoint-type must be one of openai, vllm, openai-chat"):
        run_bench("qwen3-8b", "h100", endpoint_type="openai-completions", **kw)


def test_a_plan_probe_sends_its_workloads_chat_requests_as_sim_run_does():
    """The planner's probe and `kvlab sim run` (the command a plan prints to reproduce it) play the same
    workload alike: its chat requests pay the template parse at vLLM 0.11.0."""
    import numpy as np

    from kvlab.loadtest.workload import load_workload
    from kvlab.plan import probe
    from kvlab.plan.configs import resolve_config

    wl = load_workload("agent")
    assert wl.request.endpoint == "/v1/chat/completions"
    window = probe.Window(sim_s=20.0, warmup_s=0.0)
    old, new = (probe.run_probe(resolve_config("qwen3-8b", "bf16", "h100", 1, 8192, vllm_version=v), wl, 0, 32,
                                window, use_cache=False)[0] for v in ("0.11.1", "0.11.0"))
    assert np.nanmean(new.a["ttft_s"]) > np.nanmean(old.a["ttft_s"])


def test_the_low_load_bench_reads_vllms_histograms_as_prometheus_does():
    """bench/frontend_burst.py --max-concurrency splits a request's time with vLLM's own histograms:
    its reading of a real vLLM 0.32 /metrics page (tests/fixtures) equals prometheus_client's parser,
    summed over label sets."""
    import sys
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import frontend_burst

    text = (Path(__file__).parent / "fixtures" / "vllm-0.32-cpu-llama-twin.metrics.txt").read_text()
    want: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if any(s.name in (f"vllm:{h}_sum", f"vllm:{h}_count") for h in frontend_burst.HISTOGRAMS):
                want[s.name] = want.get(s.name, 0.0) + s.value
    got = frontend_burst.histogram_totals(text)
    assert got == pytest.approx(want) and len(got) == 10  # five histograms, each a _sum and a _count
    assert got["vllm:request_prefill_time_seconds_count"] == 16.0
    assert got["vllm:request_prefill_time_seconds_sum"] == pytest.approx(15.255730633999747)


@pytest.mark.parametrize("release, streaming", [
    ("0.11.0", "streaming measured on vLLM 0.11.0's 68 us per output + 0.47 ms per step"),
    ("0.32.0", "streaming measured on vLLM 0.32.0's 117 us per output + 0.80 ms per step")])
def test_a_bench_record_says_what_priced_the_time_outside_the_steps(release, streaming):
    """`kvlab sim bench`'s record names the host time and the API server's costs of its release, with
    where each comes from (measured, or the request latency fitted), beside the steps' timing source."""
    from kvlab.replay.bench import run_bench
    from kvlab.sim.timing import host_label, host_time

    res = run_bench("llama-3.1-8b", "h100", num_prompts=4, input_len=64, output_len=8, max_concurrency=2,
                    vllm_version=release, max_model_len=4096)
    step_s, per_seq_s, measured_at = host_time(release)
    assert res.host_source.startswith(host_label(release) + "; API server")
    assert (f"host time measured on vLLM {measured_at}'s engine core" if measured_at else
            "host time fitted on the train rows at vLLM ") in res.host_source
    assert f"({1000 * step_s:.2f} ms per step + {1e6 * per_seq_s:.1f} us per scheduled request)" in res.host_source
    assert streaming in res.host_source and res.host_source.endswith("request latency 20 ms (fitted)")
