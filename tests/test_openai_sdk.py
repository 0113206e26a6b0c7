"""The official `openai` Python SDK against `kvlab sim serve`: what a user's own client sees —
streamed chat with usage, completions, and vLLM's refusals raised as the SDK's exception classes.
(The same calls against the CPU build of vLLM: tests/integration/test_openai_sdk_vllm.py.)"""

import pytest

from sim_process import SimServer

openai = pytest.importorskip("openai", reason="the openai SDK comes with vLLM (the cpu and gpu extras)")

MODEL = "llama-3.1-8b"
MAX_MODEL_LEN = 4096


@pytest.fixture(scope="module")
def client():
    s = SimServer(MODEL, "--gpu", "h100", "--max-model-len", str(MAX_MODEL_LEN), "--speedup", "20",
                  "--disable-uvicorn-access-log")
    try:
        with openai.OpenAI(base_url=s.url + "/v1", api_key="EMPTY", max_retries=0, timeout=60) as c:
            yield c
    finally:
        s.stop()


def test_streamed_chat_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "plan the next tool call"}], max_tokens=8, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 8 and text
    assert usage.total_tokens == usage.prompt_tokens + 8 > 8


def test_completion(client):
    r = client.completions.create(model=MODEL, prompt="Hello world, this is a test", max_tokens=5, n=2)
    assert [c.index for c in r.choices] == [0, 1] and all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 10 and r.usage.prompt_tokens == 7
    assert r.model == MODEL and r.object == "text_completion"


def test_streamed_completion(client):
    parts = list(client.completions.create(model=MODEL, prompt="x", max_tokens=3, stream=True,
                                           stream_options={"include_usage": True}))
    assert sum(1 for p in parts if p.choices) == 3 and parts[-1].usage.completion_tokens == 3


def test_models_list(client):
    assert [m.id for m in client.models.list()] == [MODEL]


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": MAX_MODEL_LEN + 1}, "max_tokens"),
    ({"prompt": "word " * (MAX_MODEL_LEN + 10)}, "input_tokens"),
    ({"presence_penalty": 3}, None),
])
def test_refusals_are_bad_request_errors(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**{"model": MODEL, "prompt": "x", "max_tokens": 2, **kwargs})
    assert e.value.status_code == 400 and e.value.param == param
    assert e.value.body["type"] == "BadRequestError"


def test_chat_refusal_is_a_bad_request_error(client):
    with pytest.raises(openai.BadRequestError, match="temperature must be non-negative, got -0.5"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-0.5)


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4o` does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
