"""One serve configuration from a profile level to every stage, and engines as classes.

A level is parsed once (kvlab.serve_config.ServeConfig); the launcher's argv, the memory model's
prediction, the simulator's config and the planner's config all take that one object, and the
level's name is the one name records show."""

import re
import sys
from pathlib import Path

import pytest

from kvlab.deploy import engines
from kvlab.deploy.launcher import ServeSpec, Server
from kvlab.deploy.profiles import all_profiles, profile
from kvlab.errors import KvlabError
from kvlab.models import memory
from kvlab.models.cards import card
from kvlab.plan.configs import resolve_config
from kvlab.serve_config import ServeConfig, parse_serve_config
from kvlab.sim.args import parse_serve_args
from kvlab.sim.config import build_config

SRC = Path(__file__).resolve().parents[1] / "src" / "kvlab"
ALL = [(m, q) for m, mp in all_profiles().items() if m != "_default" for q in mp.profiles]
# What the simulator's own parse of the sim engine's argv cannot know: the level's name and checkpoint.
_PROFILE_ONLY = {"level", "checkpoint"}  # a checkpoint's format reaches the simulator (--checkpoint-weights)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.delenv("ENGINE", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")


def test_fp8_fp8_kv_from_the_profile_to_every_stage(no_gpu):
    level = "fp8+fp8-kv"
    config = profile("llama-3.1-8b", level).serve_config("llama-3.1-8b")
    assert (config.level, config.label, config.weights, config.kv_cache_dtype) == (level, level, "fp8", "fp8")
    assert config.to_argv() == ["--quantization", "fp8", "--kv-cache-dtype", "fp8"]  # vLLM's values, in argv only

    # The launcher: the same config, rendered into vLLM's command line.
    srv = Server(ServeSpec("llama-3.1-8b", quant=level, engine="vllm", port=8000, kv_memory_gib=20))
    assert srv.config == config.model_copy(update={"kv_cache_memory_bytes": 20 << 30,
                                                   "served_model_names": ("llama-3.1-8b",)})
    assert srv.argv[-6:] == ["--quantization", "fp8", "--kv-cache-dtype", "fp8",
                             "--kv-cache-memory-bytes", str(20 << 30)]
    # The memory model: the prediction is capacity() of that config, weights and KV dtype as typed.
    direct = memory.capacity(card("llama-3.1-8b").arch, model_name="llama-3.1-8b", **{
        **srv.config.capacity_kwargs(), "gpu_memory_utilization": memory.DEFAULT_GPU_MEMORY_UTILIZATION})
    assert (srv.prediction.quantization, srv.prediction.kv_cache_dtype) == ("fp8", "fp8")
    assert srv.prediction.num_blocks == direct.num_blocks and srv.prediction.kv_bytes_per_token == 65_536
    # The record: one name for the level, the typed config beside it.
    rec = srv.record()
    assert rec["quant"] == level and rec["serve_config"]["level"] == level
    assert (rec["serve_config"]["weights"], rec["serve_config"]["kv_cache_dtype"]) == ("fp8", "fp8")

    # The simulator: the sim engine's argv, parsed by `kvlab sim serve`, gives the same typed config.
    sim = Server(ServeSpec("llama-3.1-8b", quant=level, engine="sim", gpu="h100", port=8150))
    args = parse_serve_args(sim.argv[5:])
    assert args.config.model_dump(exclude=_PROFILE_ONLY) == sim.config.model_dump(exclude=_PROFILE_ONLY)
    sim_cfg = build_config(sim.config, "h100")
    assert sim_cfg.serve is sim.config and sim_cfg.kv_cache_dtype == "fp8"
    assert sim_cfg.capacity.quantization == "fp8" and sim_cfg.num_blocks == sim.prediction.num_blocks

    # The planner: the same level, held as a ServeConfig, no argv in between.
    plan = resolve_config("llama-3.1-8b", level, "h100", 1, 32768)
    assert plan.serve == config.model_copy(update={"max_model_len": 32768})
    assert (plan.quant, plan.label, plan.factors["weights"], plan.factors["kv_cache_dtype"]) == (
        level, f"llama-3.1-8b/{level}", "fp8", "fp8")
    assert plan.sim_config().capacity.kv_bytes_per_token == 65_536


def test_later_flags_win_and_untyped_flags_stay_verbatim():
    c = parse_serve_config("m", ["--quantization", "fp8", "-tp", "2", "--max-model-len=32k", "--trust-remote-code",
                                 "--max-num-seqs", "8", "--quantization", "awq_marlin", "--seed", "3"], level="x")
    assert (c.weights, c.quantization_method, c.tensor_parallel_size, c.max_model_len) == ("awq", "awq_marlin", 2, 32_000)
    assert c.vllm_args == ("--trust-remote-code", "--seed", "3") and c.has_vllm_flag("--trust-remote-code")
    assert c.to_argv() == ["--quantization", "awq_marlin", "--tensor-parallel-size", "2", "--max-model-len", "32000",
                           "--max-num-seqs", "8", "--trust-remote-code", "--seed", "3"]
    assert c.with_flags(["--max-model-len", "4096"]).max_model_len == 4096
    # A checkpoint's own format: vLLM is not told it, kvlab's simulator is; a flag replaces it.
    awq = parse_serve_config("m", [], checkpoint="org/m-AWQ", weights="awq")
    assert awq.to_argv() == [] and awq.to_argv(name_checkpoint_weights=True) == ["--checkpoint-weights", "awq"]
    assert awq.with_flags(["--quantization", "gptq"]).to_argv() == ["--quantization", "gptq"]
    assert parse_serve_config("m", ["--dtype", "half"]).dtype == "float16"


def test_a_method_kvlab_does_not_size_is_served_but_not_predicted(no_gpu):
    c = parse_serve_config("m", ["--quantization", "modelopt"])
    assert c.to_argv() == ["--quantization", "modelopt"] and c.weights is None
    with pytest.raises(KvlabError, match="modelopt is a vLLM method kvlab's memory model does not size"):
        c.capacity_kwargs()
    srv = Server(ServeSpec("llama-3.1-8b", engine="vllm", port=8000, gpu="h100", extra_args=["-q", "modelopt"]))
    assert srv.prediction is None and "does not size" in srv.prediction_note
    assert srv.argv[-2:] == ["--quantization", "modelopt"]


@pytest.mark.parametrize("bad, message", [
    (["--block-size", "abc"], "argument --block-size: invalid int value: 'abc'"),
    (["--max-model-len", "lots"], "argument --max-model-len: invalid human_readable_int value"),
    (["--dtype", "int3"], "--dtype int3: use one of"),
])
def test_bad_flag_values_are_one_line_errors(bad, message):
    with pytest.raises(KvlabError, match=re.escape(message)):
        parse_serve_config("m", bad)


@pytest.mark.parametrize("model, quant", ALL)
def test_the_simulator_derives_the_launchers_config_for_every_profile(model, quant, no_gpu):
    """`kvlab serve --engine sim` renders the config; `kvlab sim serve` parses it back: equal."""
    srv = Server(ServeSpec(model, quant=quant, engine="sim", gpu="h100", port=8150, max_model_len=4096))
    if quant == "bnb4":  # vLLM 0.32 has no in-tree bitsandbytes, and the simulator says so as vLLM would
        with pytest.raises(KvlabError, match="Unknown quantization method: bitsandbytes"):
            parse_serve_args(srv.argv[5:])
        return
    args = parse_serve_args(srv.argv[5:])
    assert args.config.model_dump(exclude=_PROFILE_ONLY) == srv.config.model_dump(exclude=_PROFILE_ONLY)
    assert args.config.served_model_name == model


def test_a_checkpoints_format_reaches_the_simulator_as_kvlabs_flag(no_gpu):
    """The simulator is given the card in a pre-quantized checkpoint's place: `--checkpoint-weights` says
    what the checkpoint declares (vLLM reads it there, without --quantization, so no legacy kernel at any
    release) and the bits vLLM's method leaves to it (8-bit GPTQ); a method that cannot serve it, or an
    unquantized format, is a one-line error."""
    from kvlab.sim.config import build_config

    int8 = profile("qwen2.5-7b", "gptq-int8").serve_config("qwen2.5-7b")
    assert int8.to_argv() == [] and int8.to_argv(name_checkpoint_weights=True) == ["--checkpoint-weights", "gptq-int8"]
    sim = parse_serve_args(["qwen2.5-7b", "--gpu", "a100-80gb", *int8.to_argv(name_checkpoint_weights=True)]).config
    assert (sim.weights, sim.weights_from_checkpoint, sim.quantization_method) == ("gptq-int8", True, None)
    old = build_config(sim, "a100-80gb", timing="roofline", vllm_version="0.9.2").cost
    assert old.weight_kernel == "marlin" and "0.64 of the BF16 GEMM rate" in old.timing_source  # 8-bit Marlin, group 128
    named = parse_serve_args(["qwen2.5-7b", "--gpu", "a100-80gb", "-q", "gptq", "--checkpoint-weights", "gptq-int8"])
    assert (named.config.weights, named.config.weights_from_checkpoint) == ("gptq-int8", False)
    assert build_config(named.config, "a100-80gb", timing="roofline", vllm_version="0.9.2").cost.weight_kernel == "dequant"
    assert named.config.to_argv(name_checkpoint_weights=True) == ["--checkpoint-weights", "gptq-int8", "--quantization",
                                                                 "gptq"]
    for argv, message in ((["-q", "awq", "--checkpoint-weights", "gptq-int8"], "--quantization awq does not serve a gptq-int8"),
                          (["--checkpoint-weights", "bf16"], "--checkpoint-weights bf16: not a weight format; use one of: awq,"),
                          (["--checkpoint-weights", "auto"], "name the quantized format the checkpoint declares")):
        with pytest.raises(KvlabError, match=re.escape(message)):
            parse_serve_args(["qwen2.5-7b", "--gpu", "h100", *argv])


def test_the_simulators_startup_line_names_the_method_vllm_settles_on(no_gpu, capsys):
    """The simulated engine's 'Initializing a V1 LLM engine' line prints vLLM's ModelConfig.quantization, as
    vLLM does (vLLM PR #23066's log of a GPTQ checkpoint served without -q: `quantization=gptq_marlin`;
    vLLM issue #20112: an explicit -q awq kept at 0.9 'forcing awq'), not kvlab's format names: an
    unquantized model None (it printed kvlab's "auto"); an AWQ/GPTQ checkpoint by the config class that
    claims it: auto_awq / auto_gptq at vLLM 0.32 (its auto_awq.py, auto_gptq.py: every AWQ / GPTQ name
    maps to them, -q awq too), awq_marlin / gptq_marlin before (it printed "gptq-int8"), the legacy method
    where vLLM kept it; a -q method as given."""
    from kvlab.sim import logs
    from kvlab.sim.config import build_config

    def method(argv, version="0.32.0"):
        args = parse_serve_args(["qwen2.5-7b", "--gpu", "a100-80gb", *argv])
        cfg = build_config(args.config, "a100-80gb", timing="roofline", vllm_version=version)
        logs.startup_lines(cfg, args.non_default, args.not_simulated)
        line = next(x for x in capsys.readouterr().out.splitlines() if "Initializing a V1 LLM engine" in x)
        assert f"quantization={cfg.quantization_method}," in line
        return cfg.quantization_method

    assert method([]) is None
    assert method(["--checkpoint-weights", "gptq-int8"]) == "auto_gptq"
    assert method(["--checkpoint-weights", "gptq-int8"], "0.10.1") == "gptq_marlin"  # PR #23066's release
    assert method(["--checkpoint-weights", "awq"]) == method(["-q", "awq"]) == "auto_awq"
    assert method(["--checkpoint-weights", "awq"], "0.9.2") == "awq_marlin"
    assert method(["-q", "awq"], "0.9.2") == "awq" and method(["-q", "gptq"], "0.9.2") == "gptq"
    assert method(["--checkpoint-weights", "fp8-block"]) == "fp8" and method(["-q", "fp8_per_block"]) == "fp8_per_block"
    assert method(["--checkpoint-weights", "int8"]) == "compressed-tensors"


def test_hf_overrides_are_typed_and_reach_the_simulator(no_gpu):
    """--hf-overrides is kept as vLLM's JSON object (compact), given back to vLLM, and the simulator builds
    the overridden model (it had accepted the flag and ignored it)."""
    from kvlab.sim.config import build_config

    flags = ["--hf-overrides", '{"max_position_embeddings": 65536,  "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}',
             "--max-model-len", "65536"]
    c = parse_serve_config("qwen2.5-7b", flags)
    assert c.hf_overrides == '{"max_position_embeddings":65536,"rope_scaling":{"rope_type":"yarn","factor":2.0}}'
    assert c.to_argv()[:2] == ["--hf-overrides", c.hf_overrides]
    sim = parse_serve_args(["qwen2.5-7b", "--gpu", "h100", *c.to_argv()]).config
    assert sim.hf_overrides == c.hf_overrides and build_config(sim, "h100").max_model_len == 65536
    with pytest.raises(KvlabError, match="--hf-overrides: a JSON object is needed"):
        parse_serve_config("qwen2.5-7b", ["--hf-overrides", "[1]"])


def test_every_engine_is_a_class_behind_one_protocol(no_gpu):
    assert engines.ENGINES == ("vllm", "vllm-cpu", "sim", "external")
    for name in engines.ENGINES:
        cls = engines.engine_class(name)
        assert issubclass(cls, engines.Engine) and cls.name == name
    assert [engines.served_source(e) for e in ("vllm", "vllm-cpu", "sim", "external", None)] == [
        "measured", "measured", "simulated", "measured", "measured"]
    assert engines.engine_class("vllm-cpu").cell_defaults() == {
        "workloads": ["agent-smoke"], "kv_memory_gib": 1, "max_model_len": 4096, "serve_args": ["--block-size", "32"]}
    assert engines.engine_class("vllm").cell_defaults() == {"workloads": ["agent"]}
    assert engines.choose_engine("auto")[0] == "vllm-cpu"  # a spec's "auto": as if none was requested
    srv = Server(ServeSpec("llama-3.1-8b", engine="sim", gpu="h100", port=8150))
    assert isinstance(srv.engine_impl, engines.SimEngine) and srv.engine == "sim"
    assert srv.argv == [sys.executable, "-m", "kvlab", "sim", "serve", "llama-3.1-8b", "--gpu", "h100", "--port",
                        "8150", "--host", "127.0.0.1", "--served-model-name", "llama-3.1-8b"]


def test_the_simulator_is_checked_by_name_like_every_engine(monkeypatch, no_gpu):
    """No special case: the sim engine passes --served-model-name, and /v1/models must name it."""
    srv = Server(ServeSpec("llama-3.1-8b", engine="sim", gpu="h100", port=8150))
    seen = []

    class Answer:
        def __init__(self, url):
            self.status_code = 200
            self.url = url

        def json(self):
            return {"data": [{"id": "another-model"}]}

    monkeypatch.setattr(engines.base.httpx, "get", lambda url, **kw: seen.append(url) or Answer(url))
    assert srv._health_ok() is False and seen[-1].endswith("/v1/models")


def test_no_engine_branches_outside_the_engine_classes():
    """Only deploy/engines/ knows engines by name (records keep the name as a plain string)."""
    # `engine ==`, `spec.engine != ...`, `engine in (...)`, `chosen == "vllm-cpu"` (not a package's name)
    pattern = re.compile(r"(engine|chosen)\w*\s*(==|!=)|engine\w*\s+(not\s+)?in\s*[(\[{]")
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("deploy/engines"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{rel}:{i}: {line.strip()}")
    assert found == []


def test_the_serve_config_is_low_in_the_import_graph():
    text = (SRC / "serve_config.py").read_text()
    imports = set(re.findall(r"^(?:from|import) (kvlab[\w.]*)", text, re.M))
    assert imports == {"kvlab.errors"}


def test_a_config_is_frozen_and_round_trips_as_json():
    c = parse_serve_config("llama-3.1-8b", ["--kv-cache-dtype", "fp8", "--foo"], level="fp8-kv")
    with pytest.raises(Exception):
        c.kv_cache_dtype = "auto"
    assert ServeConfig.model_validate(c.model_dump(mode="json")) == c


def test_api_server_count_is_typed_and_given_back_to_vllm():
    from kvlab.serve_config import parse_serve_config

    for argv in (["--api-server-count", "3"], ["-asc", "3"], ["--api-server-count=3"]):
        c = parse_serve_config("llama-3.1-8b", argv)
        assert c.api_server_count == 3 and c.to_argv() == ["--api-server-count", "3"] and c.vllm_args == ()
    assert parse_serve_config("llama-3.1-8b", []).api_server_count is None


def test_enforce_eager_is_typed_and_frees_the_cuda_graph_memory_from_vllm_0_21():
    """vLLM profiles CUDA-graph memory only when it will capture graphs (`Worker.determine_available_memory`:
    `cudagraph_mode != NONE`), so with --enforce-eager the 0.21+ budget keeps the layers' graph estimate;
    before 0.21 graphs were captured after the KV cache was sized: no change. The last of
    --enforce-eager / --no-enforce-eager wins, as with vLLM's BooleanOptionalAction."""
    from kvlab.models import budget
    from kvlab.serve_config import options_config
    from kvlab.sim.config import build_config

    eager = parse_serve_config("llama-3.1-8b", ["--enforce-eager", "--max-model-len", "8192"])
    assert eager.enforce_eager and eager.vllm_args == () and eager.to_argv() == ["--max-model-len", "8192", "--enforce-eager"]
    assert not parse_serve_config("m", ["--enforce-eager", "--no-enforce-eager"]).enforce_eager
    for version, freed in (("0.32", 32 * budget.CUDAGRAPH_BYTES_PER_LAYER), ("0.19", 0)):
        graphs = build_config(options_config("llama-3.1-8b", max_model_len=8192), "h100", vllm_version=version).capacity
        none = build_config(eager, "h100", vllm_version=version).capacity
        assert graphs.memory.cudagraph_bytes == freed and none.memory.cudagraph_bytes == 0
        assert none.kv_budget_bytes - graphs.kv_budget_bytes == freed
        assert none.num_blocks == none.kv_budget_bytes // none.bytes_per_block
    assert graphs.num_blocks == none.num_blocks  # 0.19


def test_enforce_eager_reaches_kvlab_capacity_sim_serve_and_sim_run(kvlab, capsys, tmp_path):
    """The flag sizes the budget in `kvlab capacity` and the simulator; the simulator says its step
    times stay those of CUDA-graph decode (eager launch overhead is not simulated)."""
    import json

    from kvlab.sim import logs
    from kvlab.sim.args import parse_serve_args
    from kvlab.sim.config import build_config

    flags = ["llama-3.1-8b", "--gpu", "h100", "--max-model-len", "8192", "--json"]
    graphs, eager = (json.loads(kvlab("capacity", *flags, *extra).stdout) for extra in ((), ("--enforce-eager",)))
    assert eager["memory"]["cudagraph_bytes"] == 0 < graphs["memory"]["cudagraph_bytes"]
    assert eager["num_blocks"] > graphs["num_blocks"]
    args = parse_serve_args(["--gpu", "h100", "llama-3.1-8b", "--max-model-len", "8192", "--enforce-eager"])
    assert args.config.enforce_eager and args.not_simulated == ("enforce-eager",)
    cfg = build_config(args.config, "h100")
    assert cfg.num_blocks == eager["num_blocks"]
    logs.startup_lines(cfg, args.non_default, args.not_simulated, stop_before_kv=True)
    assert "--enforce-eager is accepted but not simulated (the memory model sizes it)" in capsys.readouterr().out
    r = kvlab("sim", "run", "llama-3.1-8b", "--gpu", "h100", "--max-model-len", "8192", "--enforce-eager",
              "--users", "1", "--duration-s", "5", "--out", str(tmp_path / "run"), "--json")
    assert r.returncode == 0, r.stderr
    assert "--enforce-eager is accepted but not simulated" in r.stderr
