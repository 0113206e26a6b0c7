"""`vllm bench serve` (vLLM's own benchmark client, from the installed vLLM) against
`kvlab sim serve`: it runs to the end, and the tokens it counts (the server's usage) are the
tokens the server's /metrics counted. Its prompt alignment (/tokenize, then /detokenize when the
server's tokenizer counts more) works against the simulator's tokenizer."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvlab.models.cards import card
from kvlab.models.twins import build_tokenizer, twin_config
from sim_process import SimServer

pytest.importorskip("vllm.benchmarks.serve", reason="needs vLLM (CPU or GPU build)")

MODEL = "llama-3.1-8b"
VLLM_CLI = Path(__file__).parent / "vllm_cli.py"


@pytest.fixture(scope="module")
def server():
    s = SimServer(MODEL, "--gpu", "h100", "--max-model-len", "4096", "--speedup", "20", "--disable-uvicorn-access-log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """The Llama twin's config and tokenizer (no weights: the client only tokenizes)."""
    folder = tmp_path_factory.mktemp("twin-tokenizer")
    (folder / "config.json").write_text(json.dumps(twin_config(card(MODEL))))
    build_tokenizer(folder)
    return folder


def token_counters(url: str) -> tuple[float, float]:
    values = {s.name: s.value for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)
              for s in f.samples}
    return values["vllm:prompt_tokens_total"], values["vllm:generation_tokens_total"]


@pytest.mark.parametrize("backend, endpoint", [("vllm", "/v1/completions"), ("openai-chat", "/v1/chat/completions")])
def test_bench_serve_counts_what_the_server_counted(server, tokenizer_folder, tmp_path, backend, endpoint):
    before = token_counters(server.url)
    r = subprocess.run(
        [sys.executable, str(VLLM_CLI), "bench", "serve", "--backend", backend, "--endpoint", endpoint,
         "--base-url", server.url, "--model", MODEL, "--tokenizer", str(tokenizer_folder),
         "--dataset-name", "random", "--random-input-len", "48", "--random-output-len", "12", "--num-prompts", "8",
         "--ignore-eos", "--max-concurrency", "4", "--disable-tqdm", "--save-result", "--save-detailed",
         "--result-dir", str(tmp_path), "--result-filename", "bench.json"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "/tokenize unavailable" not in r.stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    after = token_counters(server.url)
    assert (result["completed"], result["failed"]) == (8, 0)
    assert result["total_output_tokens"] == 8 * 12 == after[1] - before[1]
    assert result["total_input_tokens"] == after[0] - before[0] > 0
    # the gaps vLLM's client counts: a chat stream opens with the role chunk (its TTFT), so each of its 12 tokens
    # comes after a gap; a completion's first token is its TTFT. `kvlab sim bench` counts them alike.
    gaps = 12 if backend == "openai-chat" else 11
    assert [len(itl) for itl in result["itls"]] == [gaps] * 8
    from kvlab.replay.bench import run_bench

    sim = run_bench(MODEL, "h100", input_len=48, output_len=12, num_prompts=1, max_model_len=4096,
                    endpoint_type="openai-chat" if backend == "openai-chat" else "openai")
    assert sim.mean_itl_ms == pytest.approx(sim.mean_tpot_ms * 11 / gaps)


def test_bench_prompt_alignment_uses_detokenize(server):
    from vllm.benchmarks.datasets import SampleRequest
    from vllm.benchmarks.serve import _align_prompts_to_server_tokenizer

    long_words = "supercalifragilistic expialidocious " * 4  # 8-byte pieces: more tokens than the client asked for
    requests = [SampleRequest(prompt=long_words, prompt_len=5), SampleRequest(prompt="one two three four five six",
                                                                          prompt_len=5)]
    aligned = asyncio.run(_align_prompts_to_server_tokenizer(server.url, MODEL, requests))
    counts = [httpx.post(server.url + "/tokenize", json={"prompt": a.prompt}).json()["count"] for a in aligned]
    # supercal|ifragili|stic| expiali|docious
    assert counts == [5, 5] and aligned[0].prompt == "supercalifragilistic expialidocious"
