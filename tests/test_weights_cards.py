"""Weight bytes per format, and card validation."""

import dataclasses

import pytest

from kvlab.errors import KvlabError
from kvlab.models.cards import builtin_cards, card, load_card_file
from kvlab.models.params import EXPERT, LINEAR, Tensor, param_counts
from kvlab.models.weights import WEIGHT_FORMATS, format_from_checkpoint, weight_bytes, weight_format


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


# vLLM 0.11.0's GPTQLinearMethod.create_weights (vllm/model_executor/layers/quantization/gptq.py), run
# here under the CPU build with tensor parallelism 1: the bytes of qweight, qzeros, scales and g_idx
# of one linear layer, (input, output) features -> bytes, per (bits, group size; -1 channelwise).
VLLM_GPTQ_PARAM_BYTES = {
    (8, 128): {(4096, 11008): 46_161_920, (3584, 18944): 69_500_928, (18944, 3584): 69_562_368},
    (4, 128): {(4096, 11008): 23_441_408, (3584, 18944): 35_288_064, (18944, 3584): 35_349_504},
    (8, -1): {(4096, 11008): 45_138_176, (3584, 18944): 67_966_464, (18944, 3584): 67_981_824},
}


@pytest.mark.parametrize("bits, group", sorted(VLLM_GPTQ_PARAM_BYTES))
def test_gptq_layer_bytes_are_vllms_parameters(bits, group):
    fmt = format_from_checkpoint({"quant_method": "gptq", "bits": bits, "group_size": group})
    assert (fmt.bits, fmt.key) == (bits, "gptq-int8" if bits == 8 else "gptq")
    for (in_f, out_f), nbytes in VLLM_GPTQ_PARAM_BYTES[(bits, group)].items():
        assert fmt.linear_bytes(Tensor("w", (out_f, in_f), LINEAR), 2) == nbytes


def test_gptq_int8_checkpoints_and_the_kvlab_name():
    a = card("qwen3-8b").arch
    int8 = weight_format("gptq-int8", a)
    assert (int8.name, int8.key, int8.bits, int8.group_size) == ("gptq", "gptq-int8", 8, 128)
    assert weight_format("gptq_int8") == int8 and weight_format("gptq").bits == 4
    # an 8-bit checkpoint: vLLM's own method name takes the bits (and group) from it
    declared = dataclasses.replace(a, quantization_config={"quant_method": "gptq", "bits": 8, "group_size": 64})
    assert weight_format(None, declared).key == "gptq-int8"
    assert (weight_format("gptq", declared).bits, weight_format("gptq", declared).group_size) == (8, 64)
    four_bit = dataclasses.replace(a, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})
    with pytest.raises(KvlabError, match="already quantized as gptq;"):
        weight_format("gptq-int8", four_bit)
    # half the BF16 linear bytes plus scales, zeros and g_idx; embeddings and LM head stay BF16
    bf16, gptq4 = weight_bytes(a, weight_format(None, a)), weight_bytes(a, weight_format("gptq", a))
    assert gptq4 < weight_bytes(a, int8) < bf16
    for bad, message in (({"quant_method": "gptq", "bits": 3}, "3-bit weights is not modelled \\(4 or 8 bits\\)"),
                         ({"quant_method": "awq", "bits": 8}, "8-bit weights is not modelled \\(4-bit only\\)")):
        with pytest.raises(KvlabError, match=message):
            format_from_checkpoint(bad)


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
