"""Tiny geometry twins keep the real KV geometry and build deterministically."""

import json

import pytest

from kvlab.models import memory
from kvlab.models.arch import arch_from_config
from kvlab.models.cards import builtin_cards, card
from kvlab.models.twins import build_twin, twin_config

pytest.importorskip("torch")
pytest.importorskip("tokenizers")


@pytest.mark.parametrize("name", sorted(builtin_cards()))
def test_twin_config_keeps_kv_geometry(name):
    c = card(name)
    twin = arch_from_config(twin_config(c))
    for dtype in ("auto", "fp8"):
        assert memory.kv_footprint(twin, dtype).kv_bytes_per_token == memory.kv_footprint(c.arch, dtype).kv_bytes_per_token
    assert twin.attention == c.arch.attention and twin.num_layers == c.arch.num_layers
    if c.arch.model_type in ("qwen2", "qwen2_moe"):  # vLLM: head_dim = hidden / heads
        assert twin.hidden_size == twin.num_attention_heads * c.arch.head_dim
    else:
        assert twin.hidden_size == 256


def test_build_is_cached_and_deterministic(tmp_path):
    import hashlib

    a = build_twin(card("deepseek-v2-lite"), tmp_path / "a")
    b = build_twin(card("deepseek-v2-lite"), tmp_path / "b")
    digest = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(a) == digest(b)
    mtime = (a / "model.safetensors").stat().st_mtime
    assert build_twin(card("deepseek-v2-lite"), tmp_path / "a") == a
    assert (a / "model.safetensors").stat().st_mtime == mtime  # reused, not rebuilt
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["kv_lora_rank"] == 512 and cfg["qk_rope_head_dim"] == 64 and cfg["num_hidden_layers"] == 27


def test_twin_tokenizer_has_chat_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = build_twin(card("llama-3.1-8b"), tmp_path / "t")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert len(tok) == 1000
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nhi</s>\n<|assistant|>\n"
    ids = tok("search the file path", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "search the file path"
