"""`kvlab sim serve` as a launcher sees it: started with vLLM's argv, read from its log, polled on
/health, and answering like the real vLLM 0.32 responses captured in tests/fixtures."""

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvlab.sim import tokens
from sim_process import SimServer

FIXTURES = Path(__file__).parent / "fixtures"
API_KEY = "sim-test-key"


@pytest.fixture(scope="module")
def server():
    s = SimServer("llama-3.1-8b", "--gpu", "h100", "--max-model-len", "4096", "--block-size", "32",
                  "--served-model-name", "llama-3.1-8b", "--enable-prompt-tokens-details", "--speedup", "20",
                  "--api-key", API_KEY, "--disable-uvicorn-access-log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def shape(x):
    """A JSON value's structure: keys in order, element shapes, leaf types (values ignored)."""
    if isinstance(x, dict):
        return [(k, shape(v)) for k, v in x.items()]
    if isinstance(x, list):
        return [shape(v) for v in x]
    return None if x is None else type(x).__name__


def events(body: str) -> list:
    out = []
    for block in body.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


CAPTURED = [json.loads(line) for line in (FIXTURES / "vllm-0.32-cpu-llama-twin.http.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", CAPTURED, ids=[f"{c['path']}-{i}" for i, c in enumerate(CAPTURED)])
def test_responses_have_vllms_shape(client, case):
    if isinstance(case["request"], str):
        r = client.request(case["method"], case["path"], content=case["request"],
                           headers={"content-type": "application/json"})
    else:
        r = client.request(case["method"], case["path"], json=case["request"])
    assert r.status_code == case["status"]
    assert r.headers["content-type"].split(";")[0] == case["content_type"].split(";")[0]
    if case["content_type"].startswith("text/event-stream"):
        got, want = events(r.text), events(case["body"])
        assert [shape(e) for e in got] == [shape(e) for e in want]
        return
    got, want = r.json(), json.loads(case["body"])
    assert shape(got) == shape(want)
    if r.status_code in (400, 404) and "validation error" not in want["error"]["message"]:
        assert got == want  # vLLM's exact error message


def test_startup_log_is_vllms(server):
    log = "".join(server.lines)
    assert re.search(r"version 0\.32\.0\+kvlab\.sim", log)
    assert re.search(r"\[gpu_worker\.py:\d+\] Available KV cache memory: 55\.68 GiB", log)
    assert re.search(r"\[topk_topp_sampler\.py:\d+\] Using FlashInfer for top-p & top-k sampling\.", log)
    assert "GPU KV cache size: 456,128 tokens, Maximum concurrency for 4,096 tokens per request: 111.36x" in log
    assert log.index("Starting vLLM server on http://127.0.0.1:") < log.index("Application startup complete.")


def test_usage_counts_the_documented_tokenization(client):
    prompt = "Count these words exactly, please: alpha beta gamma 12345."
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3})
    # Count| these| words| exactly|,| please|:| alpha| beta| gamma| 123|45|.
    assert r.json()["usage"]["prompt_tokens"] == len(tokens.encode(prompt)) == 13
    assert client.post("/tokenize", json={"prompt": prompt}).json()["count"] == 13
    msgs = [{"role": "user", "content": prompt}]
    chat = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2}).json()
    assert chat["usage"]["prompt_tokens"] == client.post("/tokenize", json={"messages": msgs}).json()["count"]


def test_reply_appended_verbatim_is_a_prefix_cache_hit(client):
    system = "You are an agent with tools. " * 40
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "task one"}]
    first = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 40}).json()
    reply = first["choices"][0]["message"]["content"]
    assert len(tokens.encode(reply)) == 40
    msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "tool result: ok"}]
    second = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2}).json()
    shared = tokens.encode(tokens.render_chat(msgs[:2]) + reply)
    details = second["usage"]["prompt_tokens_details"]
    assert details["cached_tokens"] == (len(shared) - 1) // 32 * 32  # all but the reply's last token


def test_shared_system_prompt_hits_across_requests(client):
    system = "Shared tool schema and rules for every session. " * 30
    def ask(user):
        return client.post("/v1/chat/completions", json={
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}})
    ask("first session")
    usage = events(ask("second session").text)[-2]["usage"]
    common = len(tokens.encode(tokens.render_chat([{"role": "system", "content": system}], False) + "<|user|>\n"))
    assert usage["prompt_tokens_details"]["cached_tokens"] == common // 32 * 32 > 0


def test_metrics_parse_like_real_vllm(client):
    def families(text):
        out = {}
        for f in text_string_to_metric_families(text):
            if f.name.startswith("vllm:"):
                labels = sorted({tuple(sorted(s.labels)) for s in f.samples})
                buckets = sorted({s.labels["le"] for s in f.samples if "le" in s.labels}, key=float)
                out[f.name] = (f.type, labels, buckets)
        return out

    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    real = families((FIXTURES / "vllm-0.32-cpu-llama-twin.metrics.txt").read_text())
    sim = families(r.text)
    assert sim == real
    samples = {(s.name, s.labels.get("finished_reason")): s.value
               for f in text_string_to_metric_families(r.text) for s in f.samples}
    assert samples[("vllm:request_success_total", "length")] > 0
    assert samples[("vllm:prefix_cache_hits_total", None)] > 0
    info = next(s.labels for f in text_string_to_metric_families(r.text) if f.name == "vllm:cache_config_info"
                for s in f.samples)
    assert (info["num_gpu_blocks"], info["block_size"], info["kv_cache_size_tokens"]) == ("14254", "32", "456128")
    # kvlab's own series, beside vLLM's: what prices the steps, and the steps priced per provenance
    timing = next(s.labels for f in text_string_to_metric_families(r.text) if f.name == "kvlab:sim_timing_info"
                  for s in f.samples)
    assert "roofline" in timing["timing_source"] or "kernel tables" in timing["timing_source"]
    steps = {s.labels["provenance"]: s.value for f in text_string_to_metric_families(r.text)
             if f.name == "kvlab:sim_steps_priced" for s in f.samples if s.name.endswith("_total")}
    assert set(steps) == {"measured", "interpolated", "extrapolated", "scaled", "composed", "roofline"} and sum(steps.values()) > 0


def test_api_key_is_required(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
    assert httpx.get(server.url + "/health").status_code == 200


def test_done_when_blocks_times_block_size_is_kvlab_capacity(kvlab):
    # The issue's done-when, with both defaults (vLLM 0.32's --gpu-memory-utilization, 0.92).
    cap = json.loads(kvlab("capacity", "deepseek-v2-lite", "--gpu", "h100", "--json").stdout)
    assert cap["memory"]["gpu_memory_utilization"] == 0.92
    s = SimServer("deepseek-v2-lite", "--gpu", "h100")
    try:
        log = "".join(s.lines)
        metrics = httpx.get(s.url + "/metrics").text
    finally:
        s.stop()
    info = next(smp.labels for f in text_string_to_metric_families(metrics) if f.name == "vllm:cache_config_info"
                for smp in f.samples)
    assert int(info["num_gpu_blocks"]) * int(info["block_size"]) == cap["num_blocks"] * cap["block_size"] == 1_447_136
    assert f"GPU KV cache size: {cap['kv_cache_tokens']:,} tokens" in log
    assert f"Available KV cache memory: {round(cap['kv_budget_bytes'] / 2**30, 2)} GiB" in log


@pytest.mark.parametrize("argv, message", [
    (["--kv-cache-dtype", "foo"], "argument --kv-cache-dtype: invalid choice: 'foo'"),
    (["--foo", "1"], "unrecognized arguments: --foo 1"),
    (["--port", "abc"], "argument --port: invalid int value: 'abc'"),
    (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization: Input should be less than or equal to 1"),
    (["--max-num-batched-tokens", "10"], "max_num_batched_tokens (10) must be greater than or equal to max_num_seqs (1024)."),
    (["--quantization", "nope"], "Unknown quantization method: nope."),
    (["--max-model-len", "999999"], "User-specified max_model_len (999999) is greater than the derived max_model_len"),
    (["--gpu", "h1000"], "unknown GPU 'h1000'"),
    (["--vllm-version", "next"], "vLLM version 'next' is not a version"),
])
def test_bad_flags_fail_like_vllm(kvlab, argv, message):
    args = ["sim", "serve", "llama-3.1-8b", *(argv if "--gpu" in argv else ["--gpu", "h100", *argv])]
    r = kvlab(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_vllm_version_is_passed_to_the_kernel_choice():
    """`kvlab sim serve ... -q awq --vllm-version 0.9.2` prices the legacy kernel that release kept;
    without it, kvlab's default release (AWQ on Machete on an H100)."""
    from kvlab.sim.args import parse_serve_args
    from kvlab.sim.config import build_config

    def kernel(*extra):
        args = parse_serve_args(["qwen3-8b", "--gpu", "h100", "-q", "awq", "--max-model-len", "4096", *extra])
        return build_config(args.config, args.gpu, timing="roofline", vllm_version=args.vllm_version).cost.weight_kernel

    assert kernel("--vllm-version", "0.9.2") == "dequant" and kernel() == "machete"


def test_weights_that_do_not_fit_fail(kvlab):
    r = kvlab("sim", "serve", "deepseek-v3", "--gpu", "h100")
    assert r.returncode == 2 and "do not fit h100" in r.stderr


# -- vLLM 0.32's refusals, endpoints and metric families beyond the captured responses

SAMPLING_BODIES = [
    {"temperature": -1}, {"temperature": 2.5}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"min_p": 1.5},
    {"presence_penalty": 3}, {"frequency_penalty": -2.5}, {"repetition_penalty": 0}, {"n": 0},
    {"n": 2, "temperature": 0}, {"min_tokens": -1}, {"min_tokens": 9, "max_tokens": 4}, {"stop": [""]},
    {"max_tokens": 0, "temperature": -0.5},  # the temperature is checked first
]


@pytest.mark.parametrize("extra", SAMPLING_BODIES, ids=[json.dumps(b) for b in SAMPLING_BODIES])
def test_sampling_values_vllm_refuses_are_refused_with_its_message(client, extra):
    """Each message and param as vLLM 0.32's own request and SamplingParams classes give them."""
    protocol = pytest.importorskip("vllm.entrypoints.openai.completion.protocol",
                                   reason="needs vLLM (CPU or GPU build)")
    from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
    from vllm.exceptions import VLLMValidationError

    body = {"model": "llama-3.1-8b", "prompt": "x", **extra}
    req = protocol.CompletionRequest(**body)
    with pytest.raises(VLLMValidationError) as vllm_error:
        req.to_sampling_params(get_max_tokens(4096, req.max_tokens, 1, {}), {})
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400
    assert r.json()["error"] == {"message": str(vllm_error.value), "type": "BadRequestError",
                                 "param": getattr(vllm_error.value, "parameter", None), "code": 400}


def test_max_tokens_beyond_the_context_is_cut_not_refused(client):
    # vLLM 0.32 (get_max_tokens): max_tokens = min(max_tokens, max_model_len - prompt tokens).
    prompt = " word" * 4000
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 500}).json()
    assert r["usage"]["prompt_tokens"] == 4000 and r["usage"]["completion_tokens"] == 96
    assert r["choices"][0]["finish_reason"] == "length"


def test_a_prompt_that_fills_the_context_leaves_no_output_token(client):
    r = client.post("/v1/completions", json={"prompt": " word" * 4096, "max_tokens": 5})
    assert r.status_code == 400
    assert r.json()["error"] == {"message": "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
                                 "type": "BadRequestError", "param": "max_tokens", "code": 400}


def test_detokenize_gives_back_what_tokenize_counted(client):
    prompt = "Hello wonderful world, supercalifragilistic 12345 ünïcödé"
    t = client.post("/tokenize", json={"model": "llama-3.1-8b", "prompt": prompt, "return_token_strs": True}).json()
    assert t["count"] == len(t["tokens"]) == len(t["token_strs"]) == len(tokens.encode(prompt))
    back = client.post("/detokenize", json={"model": "llama-3.1-8b", "tokens": t["tokens"]}).json()
    assert back == {"prompt": prompt}
    half = client.post("/detokenize", json={"tokens": t["tokens"][:3]}).json()["prompt"]
    assert len(tokens.encode(half)) == 3 and prompt.startswith(half)
    out = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4}).json()["choices"][0]["text"]
    assert client.post("/detokenize", json={"tokens": tokens.encode(out)}).json()["prompt"] == out
    bad = client.post("/detokenize", json={"tokens": [7]})
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "Token id 7 is out of vocabulary (parameter=tokens)"
    unknown = client.post("/detokenize", json={"model": "nope", "tokens": []})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "NotFoundError"


def test_tokenize_counts_a_prompt_longer_than_the_context(client):
    assert client.post("/tokenize", json={"prompt": " word" * 5000}).json()["count"] == 5000  # vLLM: no length check


def test_unknown_paths_and_methods_answer_fastapis_json(server):
    r = httpx.get(server.url + "/no/such/route")
    assert (r.status_code, r.headers["content-type"].split(";")[0], r.json()) == (404, "application/json",
                                                                                  {"detail": "Not Found"})
    r = httpx.get(server.url + "/detokenize")
    assert (r.status_code, r.json()) == (405, {"detail": "Method Not Allowed"}) and "POST" in r.headers["allow"]


def test_http_families_are_the_instrumentators(client):
    client.get("/no/such/route")
    client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    text = client.get("/metrics").text

    def families(text):
        out = {}
        for f in text_string_to_metric_families(text):
            if f.name.startswith("http_"):
                labels = sorted({tuple(sorted(set(s.labels) - {"le"})) for s in f.samples
                                 if not s.name.endswith("_created")})
                buckets = sorted({s.labels["le"] for s in f.samples if "le" in s.labels}, key=float)
                out[f.name] = (f.type, labels, buckets)
        return out

    real = (FIXTURES / "vllm-0.32-cpu-llama-twin.metrics.txt").read_text()
    assert families(text) == families(real)
    names = [f.name for f in text_string_to_metric_families(text)]
    assert names.index("vllm:cache_config_info") < names.index("http_requests")  # vLLM's families first
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text)
               for s in f.samples}
    assert samples[("http_requests_total", (("handler", "none"), ("method", "GET"), ("status", "4xx")))] >= 1
    ok = ("http_requests_total", (("handler", "/v1/completions"), ("method", "POST"), ("status", "2xx")))
    assert samples[ok] >= 1
    assert not any(dict(k).get("handler") in ("/metrics", "/health") for _, k in samples)  # vLLM excludes them


def test_a_client_that_leaves_is_aborted_in_one_log_line():
    s = SimServer("llama-3.1-8b", "--gpu", "h100", "--max-model-len", "4096", "--speedup", "2")
    try:
        body = {"messages": [{"role": "user", "content": "write a lot"}], "max_tokens": 3000, "stream": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=30) as r:
            rid = json.loads(next(line for line in r.iter_lines() if line.startswith("data: "))[6:])["id"]
        with pytest.raises(httpx.ReadTimeout):  # a whole answer it stops waiting for
            httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3000}, timeout=0.5)
        time.sleep(1.0)
        running = next(f for f in text_string_to_metric_families(httpx.get(s.url + "/metrics").text)
                       if f.name == "vllm:num_requests_running").samples[0].value
        assert running == 0
    finally:
        s.stop()
    log = "".join(s.lines) + s.proc.stdout.read()
    assert "Traceback" not in log and "Error handling request" not in log
    assert log.count("Aborted request(s)") == 2 and f"Aborted request(s) {rid}." in log
    assert re.search(r"Aborted request\(s\) cmpl-[0-9a-f]+-0\.", log)


def test_a_chat_request_at_0_11_0_pays_for_its_template():
    """`kvlab sim serve --vllm-version 0.11.0`: a chat request's TTFT (vLLM's histogram, simulated time)
    carries the API server's parse of the chat template (kvlab.sim.timing.chat_template_cost); a
    completion request of about the same length does not."""
    from kvlab.sim.timing import CHAT_TEMPLATE_COST_S

    # the simulated clock at a tenth of the wall clock's pace: the wall-clock jitter of a loaded test machine
    # (milliseconds) shrinks tenfold in the simulated TTFTs, the template's 14.5 ms does not
    s = SimServer("qwen3-8b", "--gpu", "h100", "--max-model-len", "4096", "--speedup", "0.1", "--vllm-version", "0.11.0")
    try:
        def ttft_sum() -> float:
            fam = next(f for f in text_string_to_metric_families(httpx.get(s.url + "/metrics").text)
                       if f.name == "vllm:time_to_first_token_seconds")
            return next(x.value for x in fam.samples if x.name.endswith("_sum"))

        before = ttft_sum()
        httpx.post(s.url + "/v1/completions", json={"prompt": "say something short", "max_tokens": 2},
                   timeout=30).raise_for_status()
        plain = ttft_sum() - before
        httpx.post(s.url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "say something short"}], "max_tokens": 2}).raise_for_status()
        chat = ttft_sum() - before - plain
    finally:
        s.stop()
    assert chat - plain > 0.9 * CHAT_TEMPLATE_COST_S["qwen3", "resolve_chat_template_kwargs"]
