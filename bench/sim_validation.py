"""Simulated vs published figures, with the error. Prints a Markdown table (the README's).

Rows:
- vLLM 0.32 CPU-build logs (tests/fixtures): the KV cache vLLM allocated for the DeepSeek-V2-Lite
  and Llama-3.1-8B geometry twins with 1 GiB of KV space; the simulator started with the same
  flags (`--kv-cache-memory-bytes 1073741824`) must report the same blocks, tokens, concurrency.
- vLLM's offline throughput benchmark on an H100 (vllm-project/vllm pull request #7117, Aug 2024:
  `benchmark_throughput.py --input-len 256 --output-len 256 --model meta-llama/Meta-Llama-3-8B`,
  1,000 prompts, 24.24 requests/s mean of 3 runs on main). Simulated: 1,000 requests of 256 + 256
  tokens arriving at once, Llama-3.1-8B (same layers and widths), max_num_seqs 256 (vLLM's default
  then).
- DeepSeek-V2 report (arXiv 2405.04434, p.16): "maximum generation throughput exceeding 50K tokens
  per second" on one node of 8 H800 with FP8 weights and ~6-bit KV, and 5.76x DeepSeek 67B's.
  Simulated on 8 x H100 (the H800's compute and HBM; its NVLink is 400 GB/s, not 450) with -tp 8,
  FP8 weights and FP8 KV (vLLM has no 6-bit KV), 4,096 requests of 1,024 + 1,024 tokens; DeepSeek
  67B from its config (Llama architecture, 95 layers, 8 KV heads), BF16, -tp 8.

Run: `python bench/sim_validation.py` (a minute or two).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from kvlab.loadtest.plan import SessionPlan, TurnPlan
from kvlab.sim.config import build_config
from kvlab.replay.run import run_offline

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
GiB = 1 << 30

# deepseek-ai/deepseek-llm-67b-base config.json (the fields kvlab reads).
DEEPSEEK_67B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 22016,
    "num_hidden_layers": 95, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 102400,
    "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def cpu_log_row(model: str, log: str, block_size: int) -> list:
    line = re.search(r"CPU KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: "
                     r"([\d.]+)x", (FIXTURES / log).read_text())
    tokens, max_len, conc = int(line[1].replace(",", "")), int(line[2].replace(",", "")), float(line[3])
    from kvlab.models.cards import card
    from kvlab.models.twins import twin_config  # the twin's config: the real layers and KV widths

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(twin_config(card(model))))
        # The log says dtype=torch.bfloat16: vLLM's "auto" downcasts the twin's float32 on CPU.
        cfg = build_config(tmp, "h100", kv_cache_memory_bytes=GiB, max_model_len=max_len, block_size=block_size,
                           dtype="bfloat16")
    cap = cfg.capacity
    return [f"{model} twin: KV tokens at 1 GiB (vLLM 0.32 CPU log)", f"{tokens:,}", f"{cap.kv_cache_tokens:,}",
            _err(cap.kv_cache_tokens, tokens),
            f"max concurrency {conc:.2f}x vs {cap.max_concurrency:.2f}x; {cap.num_blocks:,} blocks x {cap.block_size}"]


def _requests(n: int, prompt: int, output: int) -> list[SessionPlan]:
    turn = TurnPlan(prompt, output, 0.0)
    return [SessionPlan(f"r{i}", f"a{i}", 0, (turn,)) for i in range(n)]


def throughput(model: str, n: int, prompt: int, output: int, **flags) -> dict:
    cfg = build_config(model, "h100", **flags)
    res = run_offline(model, "h100", _requests(n, prompt, output), 3600.0, config=cfg, scrape_interval_s=60)
    done = [r for r in res.records if r["error_kind"] is None]
    assert len(done) == n, f"{model}: {len(done)} of {n} finished in the hour"
    makespan = max(r["start_ts"] + r["e2e_s"] for r in done)
    return {"requests_per_s": n / makespan, "output_tokens_per_s": n * output / makespan,
            "preemptions": res.results.num_preemptions, "kv_tokens": cfg.capacity.kv_cache_tokens,
            "max_num_seqs": cfg.max_num_seqs}


def _err(sim: float, ref: float) -> str:
    return f"{100 * (sim - ref) / ref:+.1f} %"


def main() -> None:
    rows = [
        cpu_log_row("deepseek-v2-lite", "vllm-0.32-cpu-deepseek-twin.server.log", 16),
        cpu_log_row("llama-3.1-8b", "vllm-0.32-cpu-llama-twin.server.log", 32),
    ]
    ll = throughput("llama-3.1-8b", 1000, 256, 256, max_num_seqs=256, max_model_len=8192)
    rows.append(["Llama-3-8B, H100, 1,000 x (256 in + 256 out), requests/s (vLLM PR #7117)", "24.24",
                 f"{ll['requests_per_s']:.2f}", _err(ll["requests_per_s"], 24.24),
                 f"{ll['output_tokens_per_s']:,.0f} output tok/s simulated; vLLM 0.5 (V0 scheduler) measured"])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(DEEPSEEK_67B))
        d67 = throughput(tmp, 4096, 1024, 1024, tensor_parallel_size=8, max_model_len=4096)
        kv67 = build_config(tmp, "h100", tensor_parallel_size=8, max_model_len=4096).capacity.kv_bytes_per_token_model
    kv_v2 = build_config("deepseek-v2", "h100", tensor_parallel_size=8, quantization="fp8", kv_cache_dtype="fp8",
                         max_model_len=4096).capacity.kv_bytes_per_token_model
    saved = 1 - kv_v2 / kv67
    rows.append(["DeepSeek-V2 KV cache reduction vs DeepSeek 67B (report: 93.3 %)", "93.3 %", f"{100 * saved:.1f} %",
                 f"{100 * saved - 93.3:+.1f} pts", f"{kv_v2:,} vs {kv67:,} B/token (V2 FP8 latent vs 67B BF16 GQA); "
                 "the report's KV is ~6 bits/element: 0.75 B x 576 x 60 layers = 93.3 %"])
    v2 = throughput("deepseek-v2", 4096, 1024, 1024, tensor_parallel_size=8, quantization="fp8",
                    kv_cache_dtype="fp8", max_model_len=4096)
    rows.append(["DeepSeek-V2, 8 GPUs, FP8 weights + FP8 KV: generation tok/s (report: > 50K on 8 x H800)",
                 "> 50,000", f"{v2['output_tokens_per_s']:,.0f}", _err(v2["output_tokens_per_s"], 50000) + " (vs 50K)",
                 f"KV {v2['kv_tokens']:,} tokens per GPU (latent replicated on all 8), max_num_seqs {v2['max_num_seqs']}"])
    ratio = v2["output_tokens_per_s"] / d67["output_tokens_per_s"]
    rows.append(["DeepSeek-V2 / DeepSeek 67B maximum generation throughput (report: 5.76x)", "5.76x", f"{ratio:.2f}x",
                 _err(ratio, 5.76), f"67B BF16 -tp 8: {d67['output_tokens_per_s']:,.0f} tok/s, KV {d67['kv_tokens']:,} "
                                     "tokens per GPU (8 KV heads split over 8 GPUs)"])
    print("| figure | published | simulated | error | notes |\n|---|---:|---:|---:|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print(json.dumps({"llama_pr7117": ll, "deepseek_v2": v2, "deepseek_67b": d67}, indent=1))


if __name__ == "__main__":
    main()
