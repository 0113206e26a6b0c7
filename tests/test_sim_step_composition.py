"""bench/sim_step_composition.py: a published run's simulated steps, recorded and summed, add up to
the run (time, prefill and decode tokens, the kernel tables' GPU terms plus host time), and the
--gpu-scale what-if scales the GPU time only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import sim_step_composition as comp  # noqa: E402

from kvlab.sim import kernels  # noqa: E402
from kvlab.sim import timing as sim_timing  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="aiconfigurator-core is not installed (pip install aiconfigurator-core==0.12.0)")

RUN = "gpustack-q14-h100-random-2k"  # Qwen3-14B on an H100, 2,000-token prompts all at once
PROMPTS = 24


@pytest.fixture(scope="module")
def runs():
    return comp.compose(RUN, num_prompts=PROMPTS), comp.compose(RUN, gpu_scale=2.0, num_prompts=PROMPTS)


def test_recorded_steps_add_up_to_the_run(runs):
    c = runs[0]
    r, res = c.recorder, c.result
    assert r.mixed.steps and r.decode.steps
    # a burst at time 0 keeps the engine busy from the first request's input processing (the front
    # end's per-request and per-prompt-token time: the engine has nothing before it; the other
    # requests' input processing overlaps the first steps) to the last request: its steps are the run,
    # and then the front end streams the last step's outputs (the release's measured cost per engine step
    # and per request in it; at 24 requests it never falls behind the engine). The run's chat requests at vLLM 0.11.0 first
    # have their chat template parsed, all 24 before the first one's input processing (kvlab.sim.engine),
    # after the request latency every request takes on its way in (FRONTEND_LATENCY_S)
    per_output, per_step, _ = sim_timing.frontend_streaming(c.bench.vllm_version)
    chat_s, _ = sim_timing.chat_template_cost(c.bench.vllm_version, "qwen3")
    assert c.bench.workload["endpoint_type"] == "openai-chat" and chat_s > 0
    # the prompts are the run's printed total scaled to 24 requests (1,996-1,997 tokens each): the first
    # request's own length is within a token of the mean
    token_s = sim_timing.FRONTEND_PER_PROMPT_TOKEN_S
    head = (sim_timing.FRONTEND_LATENCY_S + PROMPTS * chat_s + sim_timing.FRONTEND_PER_REQUEST_S
            + token_s * res["total_input_tokens"] / res["completed"])
    tail = res["duration"] - head - (r.mixed.seconds + r.decode.seconds) - per_step
    if per_output:
        last = tail / per_output
        assert 1 <= round(last) <= PROMPTS and last == pytest.approx(round(last), abs=1e-6 + token_s / per_output)
    else:
        assert tail == pytest.approx(0, abs=1e-9 + token_s)
    # every prompt token is prefilled once (random prompts share no cached block; no preemption at 24)
    assert res["num_preemptions"] == 0
    assert r.mixed.prefill_tokens == res["total_input_tokens"]
    # each request's first token comes with its prefill; the others from decode rows
    decode_rows = r.mixed.tokens - r.mixed.prefill_tokens + r.decode.tokens
    assert decode_rows == res["total_output_tokens"] - res["completed"]


def test_the_kernel_tables_terms_plus_host_time_are_the_step_times(runs):
    r = runs[0].recorder
    assert runs[0].timing_source.startswith("aiconfigurator-core")
    for kind in (r.mixed, r.decode):
        assert sum(kind.terms_ms.values()) / 1000 + kind.host_s == pytest.approx(kind.seconds, rel=1e-6)
    assert r.mixed.terms_ms["non_attention"] > r.mixed.terms_ms["context_attention"] > 0
    assert r.decode.terms_ms["context_attention"] == 0


def test_gpu_scale_scales_the_gpu_time_and_keeps_the_schedule(runs):
    one, two = (c.recorder for c in runs)
    for a, b in ((one.mixed, two.mixed), (one.decode, two.decode)):
        assert (b.steps, b.tokens, b.rows, b.host_s) == (a.steps, a.tokens, a.rows, pytest.approx(a.host_s))
        assert b.seconds - b.host_s == pytest.approx(2 * (a.seconds - a.host_s), rel=1e-9)
    assert "WHAT-IF: GPU time x 2" in comp.report(runs[1])
    assert "| duration_s | 98.91 |" in comp.report(runs[0])


@pytest.mark.parametrize("args,message", [
    (["no-such-run"], "no published run 'no-such-run'"),
    (["lambda-v054-llama3-8b-h100-mml2048-np10"], "kvlab cannot model it"),  # a V0 engine
    ([RUN, "--gpu-scale", "0"], "--gpu-scale must be positive"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(capsys, args, message):
    assert comp.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_source_that_publishes_per_gpu_and_seconds_is_compared_in_its_units():
    # InferenceMAX's rows state throughput per GPU and latencies in seconds: the report compares the simulated
    # run's figures divided the same way (sim_validation.simulated_figures), as the validation table does
    c = comp.compose("inferencemax-llama33-70b-fp8-h100-tp2-1k1k-c4", num_prompts=8)
    assert c.result["total_token_throughput_per_gpu"] == pytest.approx(c.result["total_token_throughput"] / 2)
    assert c.result["mean_tpot_s"] == pytest.approx(c.result["mean_tpot_ms"] / 1000)
    text = comp.report(c)
    assert "| total_token_throughput_per_gpu |" in text and "| mean_tpot_s |" in text
