"""Serve profiles: one file per card, levels that exist, checkpoints as the cards name them."""

import pytest

from kvlab import resources
from kvlab.deploy.profiles import all_profiles, model_profiles, profile
from kvlab.errors import KvlabError
from kvlab.models.cards import builtin_cards


# The level names the shipped profiles use (QUANT=); a user's profile file may add its own.
SHIPPED_LEVELS = ("bf16", "fp8", "fp8-kv", "fp8+fp8-kv", "awq", "gptq", "gptq-int8", "bnb4")


def test_every_card_has_profiles_and_a_bf16_or_native_baseline():
    profiles = all_profiles()
    assert set(builtin_cards()) | {"_default"} == set(profiles)
    for name, mp in profiles.items():
        assert set(mp.profiles) <= set(SHIPPED_LEVELS), name
        assert "bf16" in mp.profiles or name == "deepseek-v3", name


def test_int4_levels_are_exactly_the_cards_checkpoints():
    for name, c in builtin_cards().items():
        mp = model_profiles(name)
        for level in ("awq", "gptq", "gptq-int8"):
            if level in c.quantized:
                assert mp.profiles[level].checkpoint == c.quantized[level].hf_id
                assert mp.profiles[level].weights == level
            else:
                assert level not in mp.profiles, f"{name} has no {level} checkpoint"


def test_the_named_levels_carry_the_named_flags():
    for name, mp in all_profiles().items():
        for q, p in mp.profiles.items():
            c = p.serve_config(name)
            assert c.level == q and c.label == q, (name, q)
            assert (c.kv_cache_dtype == "fp8") == q.endswith("fp8-kv"), (name, q)
            if q in ("fp8", "fp8+fp8-kv") and name != "deepseek-v3":
                assert (c.weights, c.weights_from_checkpoint) == ("fp8", False), (name, q)
                assert c.to_argv()[:2] == ["--quantization", "fp8"]
            if q == "bnb4":
                assert c.weights == "nf4" and c.to_argv() == ["--quantization", "bitsandbytes"]
            if p.checkpoint:  # the checkpoint declares its format: vLLM is not told, the simulator is
                assert c.weights == p.weights and c.weights_from_checkpoint and "--quantization" not in c.to_argv()
                assert c.to_argv(name_checkpoint_weights=True)[:2] == ["--checkpoint-weights", p.weights]


def test_deepseek_v3_is_fp8_only():
    mp = model_profiles("deepseek-v3")
    assert list(mp.profiles) == ["fp8", "fp8+fp8-kv"]
    assert mp.profiles["fp8"].args == [] and mp.profiles["fp8"].weights is None


def test_unknown_level_lists_those_that_exist():
    with pytest.raises(KvlabError, match=r"has no quantization level 'int4'; it has: bf16, fp8, fp8-kv, fp8\+fp8-kv, awq, bnb4"):
        profile("llama-3.1-8b", "int4")


def test_a_broken_profile_file_names_the_field(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_PROFILES", str(tmp_path))
    (tmp_path / "llama-3.1-8b.yaml").write_text("model: llama-3.1-8b\nprofiles:\n  bf16: {args: []}\n")
    with pytest.raises(KvlabError, match=r"field profiles\.bf16\.description: Field required"):
        profile("llama-3.1-8b", "bf16")
    (tmp_path / "llama-3.1-8b.yaml").write_text(
        "model: llama-3.1-8b\nprofiles:\n  bf16: {description: x, args: [--port, '9000']}\n")
    with pytest.raises(KvlabError, match=r"--port is set by kvlab serve"):
        profile("llama-3.1-8b", "bf16")
    (tmp_path / "mistral-7b.yaml").write_text("model: llama\nprofiles:\n  bf16: {description: x}\n")
    with pytest.raises(KvlabError, match="must match the file name"):
        profile("mistral-7b", "bf16")
    with pytest.raises(KvlabError, match="no serve profiles for qwen3-8b"):
        profile("qwen3-8b", "bf16")


def test_profiles_live_in_the_top_level_deploy_folder():
    # ./deploy/profiles from a checkout, else the package's data/deploy/profiles (tests/test_package_data.py)
    assert resources.find(resources.PROFILES, "llama-3.1-8b.yaml").parent.parts[-2:] == ("deploy", "profiles")
