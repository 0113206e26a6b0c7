"""Weight bytes per format, and card validation."""

import pytest

from kvlab.errors import KvlabError
from kvlab.models.cards import builtin_cards, card, load_card_file
from kvlab.models.params import EXPERT, LINEAR, Tensor, param_counts
from kvlab.models.weights import WEIGHT_FORMATS, weight_bytes, weight_format


def test_unquantized_weights_are_params_times_dtype():
    a = card("llama-3.1-8b").arch
    assert weight_bytes(a, weight_format(None, a)) == 2 * 8_030_261_248
    assert weight_bytes(a, weight_format(None, a), "float32") == 4 * 8_030_261_248


def test_linear_bytes_per_format():
    t = Tensor("w", (4096, 4096), LINEAR)
    n = 4096 * 4096
    f = WEIGHT_FORMATS
    assert f["fp8"].linear_bytes(t, 2) == n + 4
    assert f["fp8-block"].linear_bytes(t, 2) == n + 4 * 32 * 32
    assert f["int8"].linear_bytes(t, 2) == n + 4 * 4096
    assert f["awq"].linear_bytes(t, 2) == n / 2 + 32 * 4096 * 2.5
    assert f["gptq"].linear_bytes(t, 2) == n / 2 + 32 * 4096 * 2.5 + 4 * 4096
    assert f["nf4"].linear_bytes(t, 2) == n / 2 + n / 64 + 4 * (n / 64 / 256)
    experts = Tensor("e", (1408, 2048), EXPERT, count=64)
    assert f["fp8"].linear_bytes(experts, 2) == 64 * (1408 * 2048 + 4)


def test_quantized_model_keeps_embeddings_in_dtype():
    a = card("llama-3.1-8b").arch
    emb = 2 * 128256 * 4096 * 2  # embedding + LM head, bf16
    linear = param_counts(a).total - 2 * 128256 * 4096 - (2 * 32 + 1) * 4096  # minus norms
    fp8 = weight_bytes(a, weight_format("fp8", a))
    assert fp8 == emb + (2 * 32 + 1) * 4096 * 2 + linear + 4 * 32 * 7  # 7 linear weights per layer


def test_checkpoint_quantization_is_detected():
    a = card("deepseek-v3").arch
    assert weight_format(None, a).name == "fp8-block"
    with pytest.raises(KvlabError, match="already quantized as fp8-block"):
        weight_format("awq", a)
    # 671B weights at 1 byte, block scales, bf16 embeddings/norms: the FP8 checkpoint without its MTP layer
    assert 671e9 < weight_bytes(a, weight_format(None, a)) < 676e9


def test_all_cards_valid_and_sourced():
    cards = builtin_cards()
    assert set(cards) == {"deepseek-v2-lite", "deepseek-v2", "deepseek-v3", "llama-3.1-8b", "llama-2-7b",
                          "qwen2.5-7b", "qwen3-8b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "mistral-7b"}
    for c in cards.values():
        assert c.sources and c.hf_id.count("/") == 1
    assert card("deepseek-v2-lite").quantized["awq"].hf_id == "TechxGenus/DeepSeek-V2-Lite-Chat-AWQ"


def test_bad_card_names_the_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nhf_id: a/b\nfamily: f\npublished_params: {total: 1}\ncontext_length: -1\n"
                 "sources: [s]\nconfig: {}\n")
    with pytest.raises(KvlabError, match="field context_length"):
        load_card_file(p)
    p.write_text("name: [unclosed\n")
    with pytest.raises(KvlabError, match="not valid YAML"):
        load_card_file(p)


def test_weight_bytes_by_role_add_up_to_the_total():
    from kvlab.models.params import EMBEDDING, LM_HEAD, OTHER
    from kvlab.models.weights import weight_bytes_by_role

    a = card("llama-3.1-8b").arch
    roles = weight_bytes_by_role(a, weight_format(None, a))
    assert roles[EMBEDDING] == roles[LM_HEAD] == 128256 * 4096 * 2
    assert roles[EXPERT] == 0 and roles[OTHER] == (2 * 32 + 1) * 4096 * 2  # norms
    assert sum(roles.values()) == weight_bytes(a, weight_format(None, a)) == 2 * 8_030_261_248
    ds = card("deepseek-v2-lite").arch
    for q in (None, "fp8", "awq", "gptq", "nf4"):
        fmt = weight_format(q, ds)
        by_role = weight_bytes_by_role(ds, fmt)
        assert weight_bytes(ds, fmt) - 1 < sum(by_role.values()) <= weight_bytes(ds, fmt)
    # 26 MoE layers x 64 routed experts x (gate, up, down) of 1408 x 2048, bf16
    assert weight_bytes_by_role(ds, weight_format(None, ds))[EXPERT] == 26 * 64 * 3 * 1408 * 2048 * 2
    assert weight_bytes_by_role(ds, weight_format("fp8", ds))[EXPERT] == 26 * 64 * 3 * (1408 * 2048 + 4)
