"""The command line as a user runs it: JSON keys, exit codes, one-line errors."""

import json

import pytest


def test_kv_json_keys(kvlab):
    r = kvlab("kv", "deepseek-v2-lite", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for key in ("model", "attention", "num_layers", "kv_bytes_per_token", "kv_bytes_per_token_per_layer",
                "params_total", "params_active", "weight_bytes"):
        assert key in d
    assert d["attention"] == "MLA" and d["kv_bytes_per_token"] == 31_104 and d["num_layers"] == 27
    assert d["params_total"] == 15_706_484_224


def test_kv_fp8_and_awq(kvlab):
    d = json.loads(kvlab("kv", "llama-3.1-8b", "--kv-cache-dtype", "fp8", "--quantization", "awq", "--json").stdout)
    assert d["kv_bytes_per_token"] == 65_536
    assert d["weight_format"] == "awq"
    assert d["weight_bytes"] < 6 * 2**30  # int4 weights plus bf16 embeddings and LM head


def test_kv_and_capacity_take_gptq_int8_and_hf_overrides(kvlab):
    d = json.loads(kvlab("kv", "qwen3-8b", "--quantization", "gptq-int8", "--json").stdout)
    assert (d["weight_format"], d["weight_bytes"]) == ("gptq-int8", 9_603_803_136)
    half = json.loads(kvlab("kv", "qwen2.5-7b", "--hf-overrides", '{"num_hidden_layers": 14}', "--json").stdout)
    assert (half["num_layers"], half["kv_bytes_per_token"]) == (14, 28_672)  # 14 layers x 4 KV heads x 128 x 2 x 2 B
    yarn = '{"rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "max_position_embeddings": 131072}'
    r = kvlab("capacity", "qwen2.5-7b", "--gpu", "h100", "--max-model-len", "131072", "--json")
    assert r.returncode == 2 and "max_position_embeddings=32768.0" in r.stderr
    d = json.loads(kvlab("capacity", "qwen2.5-7b", "--gpu", "h100", "--max-model-len", "131072", "--hf-overrides", yarn,
                         "--json").stdout)
    assert d["max_model_len"] == 131072
    bad = kvlab("kv", "qwen2.5-7b", "--hf-overrides", "{nope")
    assert bad.returncode == 2 and "--hf-overrides: not JSON" in bad.stderr and "Traceback" not in bad.stderr
    # vLLM reads rope_scaling as a mapping (patch_rope_parameters); a scalar is one line, not a silent 1.0
    bad = kvlab("capacity", "qwen2.5-7b", "--gpu", "h100", "--hf-overrides", '{"rope_scaling": 5}')
    assert bad.returncode == 2 and "rope_scaling must be a JSON object" in bad.stderr and "Traceback" not in bad.stderr


def test_capacity_json_echoes_inputs(kvlab):
    r = kvlab("capacity", "deepseek-v2-lite", "--kv-memory-gib", "1", "--max-model-len", "4096", "--cpu", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for key in ("kv_bytes_per_token", "block_size", "num_blocks", "kv_cache_tokens", "max_concurrency",
                "max_model_len", "kv_cache_dtype", "tensor_parallel_size", "kv_budget_bytes"):
        assert key in d
    assert (d["num_blocks"], d["block_size"], d["kv_cache_tokens"]) == (2157, 16, 34_512)
    assert d["provenance"]["kv_budget_bytes"] == "given"


def test_capacity_gpu_tp(kvlab):
    d = json.loads(kvlab("capacity", "llama-3.1-8b", "--gpu", "h100", "-tp", "2", "--json").stdout)
    assert d["kv_bytes_per_token"] == 65_536 and d["num_gpus"] == 2
    assert d["provenance"]["kv_budget_bytes"].startswith("estimate")


def test_compare_table_and_json(kvlab):
    r = kvlab("compare", "llama-3.1-8b", "qwen2.5-7b", "deepseek-v2-lite", "--gpu", "h100", "--max-model-len", "32768")
    assert r.returncode == 0, r.stderr
    assert "76.3%" in r.stdout and "4.21x" in r.stdout  # MLA vs Llama-3.1-8B
    d = json.loads(kvlab("compare", "llama-3.1-8b", "deepseek-v2-lite", "--json").stdout)
    assert d["baseline"] == "llama-3.1-8b"
    assert round(d["models"][1]["kv_saved_vs_first_pct"], 2) == round(100 * (1 - 31104 / 131072), 2)


def test_compare_takes_capacitys_flags(kvlab):
    """compare sizes each model as `kvlab capacity` does with the same flags, --nnodes, -dp, -ep,
    --vllm-version and --sampler included."""
    flags = ("--gpu", "h100", "-tp", "16", "--nnodes", "2", "-dp", "2", "-ep", "--vllm-version", "0.20",
             "--sampler", "flashinfer", "--max-model-len", "32768")
    d = json.loads(kvlab("compare", "qwen3-30b-a3b", "deepseek-v2-lite", *flags, "--json").stdout)
    for row in d["models"]:
        alone = json.loads(kvlab("capacity", row["model"], *flags, "--json").stdout)
        assert row["capacity"] == alone
    assert d["models"][0]["capacity"]["kv_budget_bytes"] != json.loads(kvlab(
        "capacity", "qwen3-30b-a3b", *flags[:4], "--max-model-len", "32768", "--json").stdout)["kv_budget_bytes"]


def test_gpus_and_cards(kvlab):
    d = json.loads(kvlab("gpus", "--json").stdout)
    names = {g["name"] for g in d["gpus"]}
    assert {"h100", "h200", "a100-80gb", "b200", "l40s"} <= names
    # which presets the simulator prices from measured vLLM kernel tables (else the roofline)
    from kvlab.sim import kernels, timing

    data = {g["name"]: g["measured_kernel_data"] for g in d["gpus"]}
    assert data == {name: timing.gpu_kernel_data(name) for name in names}
    assert data["mi300x"] is None and data["l4"] is None
    # the Marlin fractions measured for a preset follow its tables (the RTX 4090 has no tables: the roofline)
    assert data["rtx-4090"] == ("— (roofline); Marlin int4 / 8-bit (vLLM 0.18 kernel benchmark): 1.07 / — x BF16 "
                                "GEMMs from 1,024 rows, 0.90 / 0.94 x cuBLAS's HBM rate at 1-16 rows")
    assert data["a100-80gb"].endswith("; Marlin int4 / 8-bit (vLLM 0.18 kernel benchmark): 0.89 / 0.81 x BF16 GEMMs "
                                      "from 1,024 rows, 0.62 / 0.84 x cuBLAS's HBM rate at 1-16 rows")
    assert "Marlin" not in (data["l40s"] or "")  # its fractions are fitted
    if kernels.available():
        assert data["h100"].startswith("h100_sxm, vLLM ")
        assert data["h100-pcie"].startswith("h100's, scaled by the data sheets' ratio: h100_sxm, vLLM ")
        for twin in ("a100-pcie", "a100-40gb"):
            assert data[twin].startswith("a100-80gb's, scaled by the data sheets' ratio: a100_sxm, vLLM ")
    # wide enough that rich keeps the header whole (CI's terminal is narrower)
    assert "measured kernel data" in kvlab("gpus", env={"COLUMNS": "250"}).stdout
    r = kvlab("cards")
    assert r.returncode == 0 and "deepseek-v2-lite" in r.stdout


@pytest.mark.parametrize("args,message", [
    (("kv", "deepseek-v2-lit"), "did you mean deepseek-v2-lite"),
    (("kv", "llama-3.1-8b", "--kv-cache-dtype", "fp4"), "unknown --kv-cache-dtype 'fp4'"),
    (("kv", "llama-3.1-8b", "--kv-cache-dtype", "fp8_ds_mla"), "MLA models only"),
    (("kv", "llama-3.1-8b", "--quantization", "int3"), "unknown quantization 'int3'"),
    (("capacity", "deepseek-v3", "--gpu", "h100"), "short by"),
    (("capacity", "llama-3.1-8b", "--gpu", "h100", "-tp", "3"), "does not divide the 32 attention heads"),
    (("capacity", "llama-3.1-8b", "--gpu", "h900"), "unknown GPU 'h900'"),
    (("serve", "llama-3.1-8b", "--gpu", "--dry-run"), "unknown GPU '--dry-run'"),  # once started a real server
    (("capacity", "llama-3.1-8b"), "give --gpu NAME"),
    (("capacity", "llama-3.1-8b", "--kv-memory-gib", "-1"), "must be positive"),
    (("kv", "some-org/not-cached"), "not in the local Hugging Face cache"),
    (("compare", "llama-3.1-8b"), "at least two models"),
])
def test_bad_input_is_one_line_exit_2(kvlab, args, message):
    r = kvlab(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("kvlab: error: ")


def test_local_folder_and_hf_cache(kvlab, tmp_path):
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
           "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 1000, "torch_dtype": "float32"}
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    d = json.loads(kvlab("kv", str(folder), "--json").stdout)
    assert d["source"] == "local" and d["kv_bytes_per_token"] == 4 * 2 * 2 * 64 * 4
    d = json.loads(kvlab("kv", str(folder / "config.json"), "--json").stdout)
    assert d["num_layers"] == 4
    # A Hugging Face cache laid out as huggingface_hub writes it.
    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    r = kvlab("kv", "acme/tiny", "--json", env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"] == "hf-cache"
    # A card's HF id resolves to the card.
    assert json.loads(kvlab("kv", "deepseek-ai/DeepSeek-V2-Lite-Chat", "--json").stdout)["model"] == "deepseek-v2-lite"


def test_config_missing_fields(kvlab, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    r = kvlab("kv", str(tmp_path))
    assert r.returncode == 2 and "config is missing num_hidden_layers" in r.stderr
    (tmp_path / "config.json").write_text("{not json")
    r = kvlab("kv", str(tmp_path))
    assert r.returncode == 2 and "not valid JSON" in r.stderr


def test_a_path_the_system_refuses_is_one_line(kvlab, capsys):
    """An OSError about a path (a folder that cannot be written, a file that is not there) is one
    line with the path and the system's reason, exit 2; one that names no path is a bug and keeps
    its traceback."""
    from kvlab.clikit import run_one_line_errors

    r = kvlab("tiny", "llama-3.1-8b", "--out", "/proc/no-such-dir/twin")
    assert r.returncode == 2 and r.stderr.strip() == "kvlab: error: cannot write the twin under /proc/no-such-dir: No such file or directory"

    def refuses(args, prog_name):
        raise PermissionError(13, "Permission denied", "/root/x.json")

    with pytest.raises(SystemExit) as e:
        run_one_line_errors(refuses, [])
    assert e.value.code == 2 and capsys.readouterr().err == "kvlab: error: /root/x.json: Permission denied\n"

    def bug(args, prog_name):
        raise OSError("no path")

    with pytest.raises(OSError, match="no path"):
        run_one_line_errors(bug, [])
