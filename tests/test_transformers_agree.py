"""Parameter counts and KV widths agree with the Hugging Face implementations themselves."""

import pytest

from kvlab.models import memory
from kvlab.models.arch import arch_from_config
from kvlab.models.cards import builtin_cards
from kvlab.models.params import inventory, param_counts

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _hf_config(cfg: dict):
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "quantization_config")}
    return transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)


@pytest.mark.parametrize("name", sorted(builtin_cards()))
def test_full_size_param_counts_equal_transformers(name):
    """Every card, full size, built on the meta device (no memory allocated)."""
    card = builtin_cards()[name]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(_hf_config(card.config))
    # state_dict: parameters and persistent buffers (DeepSeek-V3's e_score_correction_bias is a
    # buffer in transformers but a weight in the checkpoint); no card ties its embeddings.
    hf_total = sum(v.numel() for v in model.state_dict().values())
    ours = param_counts(card.arch)
    assert ours.total == hf_total
    # and agree with the published figure to its precision
    published = card.published_params["total"]
    assert abs(ours.total - published) / published < 0.01
    if "active" in card.published_params and name != "deepseek-v2-lite":
        assert abs(ours.active - card.published_params["active"]) / card.published_params["active"] < 0.05


def test_deepseek_v2_lite_active_params():
    """6 of 64 routed experts in 26 MoE layers, plus 2 shared experts and everything else."""
    c = param_counts(builtin_cards()["deepseek-v2-lite"].arch)
    routed_one = 3 * 2048 * 1408
    assert c.total - c.active == 26 * (64 - 6) * routed_one
    assert c.active == 2_661_150_208
    assert c.embedding == 2 * 102400 * 2048


def test_inventory_names_and_shapes_match_state_dict_for_dense_models():
    for model_type, extra in (("llama", {}), ("qwen2", {}), ("qwen3", {"head_dim": 32}), ("mistral", {})):
        cfg = dict(model_type=model_type, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128, **extra)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(_hf_config(cfg))
        hf = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        ours = {t.name: t.shape for t in inventory(arch_from_config(cfg))}
        assert ours == hf, model_type


def _cache_widths(model, seq=5):
    out = model(torch.arange(seq).unsqueeze(0), use_cache=True)
    cache = out.past_key_values
    widths = []
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        assert k.shape[-2] == seq and v.shape[-2] == seq
        widths.append((k.numel() + v.numel()) // seq * k.element_size())
    return widths


def test_gqa_kv_bytes_equal_the_cache_transformers_allocates():
    cfg = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128, torch_dtype="float32")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(cfg)).eval()
    with torch.no_grad():
        widths = _cache_widths(model)
    fp = memory.kv_footprint(arch_from_config(cfg), "float32")
    assert widths == [fp.kv_bytes_per_token_per_layer] * 3
    assert sum(widths) == fp.kv_bytes_per_token == 3 * 2 * 2 * 16 * 4


def test_mla_cache_is_the_latent_width():
    """transformers 5.x caches DeepSeek-V2's compressed latent: kv_lora_rank + qk_rope_head_dim per layer."""
    cfg = dict(model_type="deepseek_v2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, vocab_size=128, kv_lora_rank=32,
               qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, q_lora_rank=None,
               n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
               first_k_dense_replace=1, n_group=1, topk_group=1, torch_dtype="float32")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(cfg)).eval()
    with torch.no_grad():
        widths = _cache_widths(model)
    arch = arch_from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == param_counts(arch).total
    fp = memory.kv_footprint(arch, "float32")
    assert widths == [(32 + 16) * 4] * 2 == [fp.kv_bytes_per_token_per_layer] * 2
