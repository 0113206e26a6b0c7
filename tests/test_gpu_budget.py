"""The `--gpu` KV budget against public vLLM startup logs (tests/fixtures/gpu_budget_logs.yaml):
every row's `kv_budget_gib` from `kvlab capacity --json` within 3 % of the logged
"Available KV cache memory", the declared train/test split, and the version switch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kvlab import hardware
from kvlab.cli import app
from kvlab.errors import KvlabError
from kvlab.models import budget, memory
from kvlab.models.cards import card
from kvlab.units import GiB

FIXTURES = Path(__file__).parent / "fixtures"
TABLE = yaml.safe_load((FIXTURES / "gpu_budget_logs.yaml").read_text())
ROWS = TABLE["rows"]
TOLERANCE = 0.03


def capacity_argv(row: dict) -> list[str]:
    """The `kvlab capacity` command line that sizes one fixture row, as a user would type it."""
    model = row["kvlab_model"]
    if model.startswith("gpu_budget_configs/"):
        model = str(FIXTURES / model)
    argv = ["capacity", model, "--gpu", row["gpu"], "--gpu-memory-utilization", str(row["gpu_memory_utilization"]),
            "-tp", str(row["tp"]), "--max-model-len", str(row["max_model_len"]),
            "--max-num-batched-tokens", str(row["max_num_batched_tokens"]), "--max-num-seqs", str(row["max_num_seqs"]),
            "--vllm-version", row["accounting"], "--sampler", row["sampler"], "--json"]
    if row["quantization"]:
        argv += ["--quantization", row["quantization"]]
    if row.get("nnodes", 1) > 1:
        argv += ["--nnodes", str(row["nnodes"])]
    if "--enable-expert-parallel" in row["flags"]:  # as the logged command ran (the sizing is the same)
        argv += ["--enable-expert-parallel"]
    return argv


def predicted(row: dict) -> dict:
    r = CliRunner().invoke(app, capacity_argv(row))
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_the_table_has_sources_and_the_declared_split():
    assert len(ROWS) >= 12
    assert sum("known_miss" in r for r in ROWS) <= 1
    assert len({r["id"] for r in ROWS}) == len(ROWS)
    for r in ROWS:
        odd = int(hashlib.sha256(r["id"].encode("utf-8")).hexdigest(), 16) % 2 == 1
        assert r["split"] == ("test" if odd else "train"), r["id"]
        assert r["source_url"].startswith("https://github.com/") and "/blob/" in r["source_url"]
        assert r["logged"]["available_kv_gib"] > 0
    assert {r["split"] for r in ROWS} == {"train", "test"}
    assert len({r["gpu"] for r in ROWS}) >= 3 and any(r["tp"] > 1 for r in ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_budget_within_3_percent_of_the_log(row):
    d = predicted(row)
    logged = row["logged"]["available_kv_gib"]
    assert d["kv_budget_source"] == "estimate"
    if "known_miss" in row:  # declared in the table with its cause: it must still be a miss
        assert d["kv_budget_gib"] != pytest.approx(logged, rel=TOLERANCE), row["known_miss"]
        assert d["kv_budget_gib"] == pytest.approx(logged, rel=2 * TOLERANCE)
        return
    assert d["kv_budget_gib"] == pytest.approx(logged, rel=TOLERANCE), (d["kv_budget_gib"], logged)
    if "model_weights_gib" in row["logged"]:  # kvlab's weight model, per GPU
        assert d["weight_bytes_per_gpu"] / GiB == pytest.approx(row["logged"]["model_weights_gib"], abs=0.25)


@pytest.mark.parametrize("row", [r for r in ROWS if "peak_activation_gib" in r["logged"]],
                         ids=lambda r: r["id"])
def test_the_terms_match_the_logged_split(row):
    """Where the log itemises the profiling run, each estimated term is close to vLLM's."""
    mem = predicted(row)["memory"]
    assert mem["activation_bytes"] / GiB == pytest.approx(row["logged"]["peak_activation_gib"], abs=0.2)
    assert mem["non_torch_bytes"] / GiB == pytest.approx(row["logged"]["non_torch_gib"], abs=0.35)
    assert mem["cudagraph_bytes"] == 0  # none of these versions subtracts CUDA graphs


def test_the_sampler_sets_the_peak_with_vllms_default_max_num_seqs():
    a = card("llama-3.1-8b").arch
    for s in budget.SAMPLERS:
        assert budget.sampler_peak_bytes(a, 8192, 1024, s) == 1024 * 128_256 * budget.SAMPLER_BYTES_PER_LOGIT[s]
        assert budget.activation_estimate_bytes(a, 8192, 1024, 1, s) == budget.sampler_peak_bytes(a, 8192, 1024, s)
    # a long batch with few sequences: the forward pass is the larger
    assert budget.activation_estimate_bytes(a, 65536, 8, 1, "pytorch") == budget.forward_peak_bytes(a, 65536, 1)


def test_the_default_sampler_is_the_releases_own():
    """vLLM's top-k/top-p sampler by release (its topk_topp_sampler.py and envs.py): PyTorch's from
    0.11.1 to 0.20 unless VLLM_USE_FLASHINFER_SAMPLER=1 (and before, in the pip wheel without the
    flashinfer extra), FlashInfer's from 0.21 on a CUDA GPU FlashInfer supports (compute capability
    8.0+); not on ROCm. The estimate says which it assumed, and an explicit --sampler wins."""
    h100, mi300x = hardware.gpu("h100"), hardware.gpu("mi300x")
    assert [budget.default_sampler(v, h100) for v in ("0.10.2", "0.11", "0.19.1", "0.20", "0.21", "0.32")] == \
        ["pytorch"] * 4 + ["flashinfer"] * 2
    assert budget.default_sampler("0.32", mi300x) == "pytorch" and budget.default_sampler("0.32", None) == "pytorch"
    a = card("llama-3.1-8b").arch
    new, old = (memory.capacity(a, gpu="h100", max_model_len=8192, vllm_version=v) for v in ("0.32", "0.20"))
    assert (new.memory.sampler, old.memory.sampler) == ("flashinfer", "pytorch")
    forced = memory.capacity(a, gpu="h100", max_model_len=8192, vllm_version="0.20", sampler="flashinfer")
    assert forced.memory.sampler == "flashinfer" and forced.num_blocks > old.num_blocks  # 10 B a logit, not 14
    assert forced.memory.activation_bytes == budget.sampler_peak_bytes(a, 8192, 1024, "flashinfer") == 1024 * 128_256 * 10


def test_the_profiling_run_is_the_default_model_runners():
    """The model runner vLLM takes by default (vllm/config/vllm.py, official wheels 0.21-0.32): V1 up to 0.21;
    Model Runner V2 for allowlisted unquantized dense architectures at 0.22-0.23 (Qwen3; then Llama, Mistral),
    for the allowlist quantized too at 0.24 (DeepSeek-V2 joins), for every model that is not MoE (and the
    allowlisted MoE) at 0.25-0.28, for every generate model from 0.29; ngram and draft-model speculation keep
    V1 while V2 lacks them. Its dummy sampler run is greedy without top-k/top-p: the bf16 logits and, up to
    0.25, their fp32 copy (6 B a logit; 2 B from 0.26), whatever --sampler; it reserves no CUDA-graph memory
    up to 0.28 (`profile_cudagraph_memory` returns 0). V1 from 0.21 calls the sampler a second time on the
    PyTorch-native path (a seeded generator): 14 B a logit even with FlashInfer's."""
    llama, qwen3, qwen2, moe, mla = (card(c).arch for c in ("llama-3.1-8b", "qwen3-8b", "qwen2.5-7b", "qwen3-30b-a3b",
                                                             "deepseek-v2-lite"))
    runner = budget.model_runner
    assert [runner(qwen3, v) for v in ("0.21", "0.22", "0.32")] == ["v1", "v2", "v2"]
    assert [runner(llama, v) for v in ("0.22", "0.23", "0.24", "0.25", "0.29")] == ["v1", "v2", "v2", "v2", "v2"]
    assert runner(llama, "0.23", quantized=True) == "v1" and runner(llama, "0.24", quantized=True) == "v2"
    assert [runner(qwen2, v) for v in ("0.24", "0.25")] == ["v1", "v2"]
    assert [runner(moe, v) for v in ("0.25", "0.28", "0.29")] == ["v1", "v1", "v2"]
    assert [runner(mla, v) for v in ("0.23", "0.24", "0.28")] == ["v1", "v2", "v2"]
    assert [runner(llama, v, speculative_method="ngram") for v in ("0.31", "0.32")] == ["v1", "v2"]
    assert [runner(llama, v, speculative_method="draft_model") for v in ("0.30", "0.31")] == ["v1", "v2"]
    assert runner(llama, "0.30", speculative_method="eagle3") == "v2"
    assert runner(llama, "0.32", preset=hardware.gpu("mi300x")) == "v1"  # ROCm: V1's accounting kept
    n = 1024 * 128_256
    assert budget.sampler_peak_bytes(llama, 8192, 1024, "flashinfer", (0, 25), "v2") == 6 * n
    assert budget.sampler_peak_bytes(llama, 8192, 1024, "pytorch", (0, 26), "v2") == 2 * n
    assert budget.sampler_peak_bytes(llama, 8192, 1024, "flashinfer", (0, 21), "v1") == 14 * n
    assert budget.sampler_peak_bytes(llama, 8192, 4, "flashinfer", (0, 21), "v1") == 4 * 128_256 * 39  # sorted
    assert budget.cudagraph_estimate_bytes(32, (0, 28), runner="v2") == 0
    assert budget.cudagraph_estimate_bytes(32, (0, 29), runner="v2") == budget.cudagraph_estimate_bytes(32, (0, 29))
    # Model Runner V2's penalty state (vllm/v1/worker/gpu/sample/penalties.py), counted from 0.27: int32 counts
    # [seqs, vocab] and an int32 bitmask [seqs, ceil(vocab / 32)]; 135,438,336 B at an A100's 256 sequences
    assert budget.runner_buffer_bytes(llama, 256, (0, 31), "v2") == 256 * (4 * 128_256 + 4 * 4_008) == 135_438_336
    assert budget.runner_buffer_bytes(llama, 256, (0, 26), "v2") == 0  # not in vLLM's budget before 0.27
    assert budget.runner_buffer_bytes(llama, 256, (0, 31), "v1") == 0
    # Llama-3.1-8B on an H100 at 0.32's defaults: V2, the forward pass's peak binds (the sampler's 2 B a logit is
    # 263 MB), the penalty state of 1,024 sequences takes 0.50 GiB; 28,509 blocks (28,525 without the 32 MiB rope
    # cache, 28,783 without that state either, kvlab's figure in session 35; 28,419 under V1's accounting, its
    # second sampler call's 14 B a logit)
    est = memory.capacity(llama, gpu="h100", max_model_len=8192)
    assert est.memory.model_runner == "v2" and est.num_blocks == 28_509
    assert est.memory.runner_buffer_bytes == 1024 * 4 * (128_256 + 4_008)
    assert est.memory.activation_bytes == budget.forward_peak_bytes(llama, 8192, 1) > 2 * n
    v1 = memory.capacity(llama, gpu="h100", max_model_len=8192, vllm_version="0.22")
    assert v1.memory.model_runner == "v1" and v1.num_blocks == 28_419 and v1.memory.activation_bytes == 14 * n


def test_cuda_graphs_count_from_vllm_0_21():
    a = card("llama-3.1-8b").arch
    # (the same sampler on both sides: 0.21 also takes FlashInfer's by default, test_the_default_sampler_...)
    old = memory.capacity(a, gpu="h100", max_model_len=8192, vllm_version="0.20", sampler="pytorch")
    new = memory.capacity(a, gpu="h100", max_model_len=8192, vllm_version="0.21.0", sampler="pytorch")
    assert old.memory.cudagraph_bytes == 0
    assert new.memory.cudagraph_bytes == 32 * budget.CUDAGRAPH_BYTES_PER_LAYER
    assert old.kv_budget_bytes - new.kv_budget_bytes == new.memory.cudagraph_bytes
    default = memory.capacity(a, gpu="h100", max_model_len=8192, sampler="pytorch")  # 0.32, kvlab's vLLM: V2's
    assert default.memory.cudagraph_bytes == new.memory.cudagraph_bytes  # estimate, priced as V1's (from 0.29)
    with pytest.raises(KvlabError, match="from vLLM 0.10 on"):
        memory.capacity(a, gpu="h100", vllm_version="0.9")
    with pytest.raises(KvlabError, match="not a version"):
        budget.parse_vllm_version("latest")


def test_the_default_utilization_is_the_releases(kvlab):
    """vLLM's CacheConfig default: 0.9 up to 0.19, 0.92 from 0.20; `capacity` and `kvlab capacity`
    take the one of --vllm-version unless --gpu-memory-utilization is given."""
    assert memory.default_gpu_memory_utilization("0.19.1") == 0.9
    assert memory.default_gpu_memory_utilization("v0.20.0") == 0.92 == memory.default_gpu_memory_utilization()
    with pytest.raises(KvlabError, match="not a version"):
        memory.default_gpu_memory_utilization("latest")
    a = card("llama-3.1-8b").arch
    old = memory.capacity(a, gpu="h100", max_model_len=8192, vllm_version="0.11")
    assert old.memory.gpu_memory_utilization == 0.9
    assert old.kv_budget_bytes == memory.capacity(a, gpu="h100", max_model_len=8192, vllm_version="0.11",
                                                  gpu_memory_utilization=0.9).kv_budget_bytes
    assert memory.capacity(a, gpu="h100", max_model_len=8192).memory.gpu_memory_utilization == 0.92
    r = kvlab("capacity", "llama-3.1-8b", "--gpu", "h100", "--vllm-version", "0.11", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["memory"]["gpu_memory_utilization"] == 0.9
    r = kvlab("capacity", "llama-3.1-8b", "--gpu", "h100", "--vllm-version", "0.11", "--gpu-memory-utilization", "0.8",
              "--json")
    assert json.loads(r.stdout)["memory"]["gpu_memory_utilization"] == 0.8


def test_bad_version_is_one_line(kvlab):
    r = kvlab("capacity", "llama-3.1-8b", "--gpu", "h100", "--vllm-version", "0.8")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "0.10" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_simulator_and_planner_take_the_same_budget():
    """The sim engine (and the planner, which sizes through it) call the same estimate."""
    from kvlab.sim.config import build_config

    sim = build_config("llama-3.1-8b", "h100")
    cap = memory.capacity(card("llama-3.1-8b").arch, model_name="llama-3.1-8b", gpu="h100",
                          max_model_len=card("llama-3.1-8b").context_length)
    assert sim.capacity.kv_budget_bytes == cap.kv_budget_bytes
    assert sim.capacity.memory.activation_bytes == budget.activation_estimate_bytes(
        sim.arch, 8192, 1024, 1, "flashinfer", (0, 32), "v2")
    assert sim.sampler == "flashinfer"  # vLLM 0.32's own on an H100


def test_nccl_between_nodes_counts_as_host_buffers():
    """--nnodes: a TP group spanning nodes runs NCCL over the network (buffers in host memory, the
    same figure as PCIe GPUs without P2P); a TP group within a node keeps its board's link."""
    t = budget.nccl_transport
    assert t("a100-40gb", 1, 1) is None and t("a100-40gb", 1, 1, nnodes=1) is None
    assert t("a100-40gb", 2, 1) == "nvlink" and t("l40s", 2, 1) == "pcie"
    assert t("a100-40gb", 2, 1, nnodes=2) == "network"  # one GPU a node
    assert t("h100", 16, 1, nnodes=2) == "network"  # TP16 over two 8-GPU nodes
    assert t("h100", 8, 2, nnodes=2) == "nvlink"  # TP within a node, PP between the nodes
    assert t("h100", 1, 2, nnodes=2) == "network"  # PP only, over the network
    assert t("h100", 4, 1, dp=2, nnodes=2) == "nvlink"  # one DP replica a node
    assert budget.non_torch_estimate_bytes("network") == budget.non_torch_estimate_bytes("pcie")
    assert budget.non_torch_estimate_bytes("network") < budget.non_torch_estimate_bytes("nvlink")
    a = card("qwen2.5-7b").arch
    one = memory.capacity(a, gpu="a100-40gb", tensor_parallel_size=2, max_model_len=16384)
    two = memory.capacity(a, gpu="a100-40gb", tensor_parallel_size=2, max_model_len=16384, nnodes=2)
    assert two.kv_budget_bytes - one.kv_budget_bytes == (budget.NON_TORCH_DISTRIBUTED_BYTES["nvlink"]
                                                         - budget.NON_TORCH_DISTRIBUTED_BYTES["pcie"])
    given = memory.capacity(a, kv_budget_bytes=10 * GiB, tensor_parallel_size=2, nnodes=2)
    assert given.kv_budget_bytes == 10 * GiB  # an exact budget is what vLLM measured, nodes or not
    with pytest.raises(KvlabError, match="evenly divide the total world size"):
        memory.capacity(a, gpu="a100-40gb", tensor_parallel_size=2, nnodes=3)
    with pytest.raises(KvlabError, match="at least 1"):
        memory.capacity(a, gpu="a100-40gb", nnodes=0)


def test_bad_nnodes_is_one_line(kvlab):
    r = kvlab("capacity", "qwen2.5-7b", "--gpu", "a100-40gb", "-tp", "2", "--nnodes", "4")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--nnodes 4" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_pytorch_sampler_truncates_in_place_from_vllm_0_17():
    """vLLM PR #33538 (0.17.0): `apply_top_k_top_p` runs an in-place Triton kernel from 8 rows on, the sort
    below that up to 0.29 (from 0.30 the kernel takes any rows: `if HAS_TRITON:`); the profiling peak per logit falls from the sort's 39 B to 14 B (counted from the code).
    vLLM 0.18.0's logs of one H100 server (tests/fixtures/gpu_budget_logs.yaml, vllm-bench-h100-qwen3-8b-v0.18-*)
    differ by 7,456 KV tokens of 147,456 B between --max-num-seqs 512 and 1,024: 14.1 B a logit."""
    a = card("qwen3-8b").arch
    assert a.vocab_size == 151_936
    assert budget.sampler_peak_bytes(a, 8192, 1024, "pytorch", (0, 16)) == 1024 * 151_936 * 39
    assert budget.sampler_peak_bytes(a, 8192, 1024, "pytorch", (0, 17)) == 1024 * 151_936 * 14
    assert budget.sampler_peak_bytes(a, 8192, 4, "pytorch", (0, 18)) == 4 * 151_936 * 39  # fewer than 8 rows: sorted
    assert budget.sampler_peak_bytes(a, 8192, 4, "pytorch", (0, 29)) == 4 * 151_936 * 39  # ... up to 0.29
    assert budget.sampler_peak_bytes(a, 8192, 4, "pytorch", (0, 30)) == 4 * 151_936 * 14  # any rows from 0.30
    assert budget.sampler_peak_bytes(a, 8192, 8, "pytorch", (0, 17)) == 8 * 151_936 * 14  # 8 rows: the kernel
    assert budget.sampler_peak_bytes(a, 8192, 1024, "flashinfer", (0, 18)) == 1024 * 151_936 * 10
    assert 7_456 * 147_456 / (512 * 151_936) == pytest.approx(14.1, abs=0.05)
    old, new = (memory.capacity(a, gpu="h100", max_model_len=8128, gpu_memory_utilization=0.95, vllm_version=v,
                                sampler="pytorch") for v in ("0.16", "0.18"))
    assert new.kv_budget_bytes - old.kv_budget_bytes == 1024 * 151_936 * (39 - 14)
