"""Every GPU command kvlab builds (`kvlab serve CARD --quant LEVEL --engine vllm`, every level of
every card's profiles and of the profiles for models without a card) parsed by vLLM's own
`vllm serve` parser, from the installed vLLM (the CPU build is vLLM 0.32's source with the same
argument parser as the GPU wheel): a misspelt flag, a wrong choice or a bad value in a profile fails
here, without a GPU. Nothing is started."""

import argparse
import contextlib
import io
import json

import pytest

from kvlab.deploy.launcher import ServeSpec, Server
from kvlab.deploy.profiles import DEFAULT_MODEL, all_profiles
from kvlab.models.cards import builtin_cards, card
from kvlab.models.twins import twin_config

serve_cli = pytest.importorskip("vllm.entrypoints.cli.serve", reason="needs vLLM (CPU or GPU build)")
from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

LEVELS = [(m, q) for m, mp in sorted(all_profiles().items()) for q in mp.profiles]


@pytest.fixture(scope="module")
def vllm_cli() -> FlexibleArgumentParser:
    """`vllm`'s top-level parser with its `serve` subcommand, built as vllm.entrypoints.cli.main does."""
    parser = FlexibleArgumentParser(prog="vllm")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    serve_cli.ServeSubcommand().subparser_init(subparsers)
    return parser


@pytest.fixture(scope="module")
def uncarded_model(tmp_path_factory):
    """A local folder with a config.json: what `_default` levels serve (a model without a card)."""
    folder = tmp_path_factory.mktemp("uncarded")
    (folder / "config.json").write_text(json.dumps(twin_config(card("llama-3.1-8b"))))
    return folder


def vllm_parse(parser: FlexibleArgumentParser, argv: list[str]) -> argparse.Namespace:
    """argv (`vllm serve ...`) as vLLM reads it; argparse's complaint as the failure message."""
    assert argv[:2] == ["vllm", "serve"]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"vLLM's parser refused {' '.join(argv)}:\n{err.getvalue()}")
    validate_parsed_serve_args(args)
    return args


def gpu_server(model: str, level: str, **spec) -> Server:
    """`kvlab serve MODEL --quant LEVEL --engine vllm --port 8000 --gpu h100`, resolved (nothing starts)."""
    return Server(ServeSpec(model, quant=level, engine="vllm", port=8000, gpu="h100", **spec))


def test_every_level_of_every_card_is_covered():
    assert {m for m, _ in LEVELS} == {*builtin_cards(), DEFAULT_MODEL}
    assert len(LEVELS) == sum(len(mp.profiles) for mp in all_profiles().values())


@pytest.mark.parametrize("model, level", LEVELS, ids=[f"{m}-{q}" for m, q in LEVELS])
def test_vllm_parses_the_gpu_command(vllm_cli, uncarded_model, model, level):
    srv = gpu_server(str(uncarded_model) if model == DEFAULT_MODEL else model, level)
    argv, cfg = srv.argv, srv.config
    args = vllm_parse(vllm_cli, argv)
    assert args.subparser == "serve" and args.model_tag == argv[2] and args.port == 8000
    # What kvlab's typed config says the flags mean is what vLLM read from them.
    assert args.kv_cache_dtype == cfg.kv_cache_dtype and args.quantization == cfg.quantization_flag()
    assert args.served_model_name == list(cfg.served_model_names)
    for field in TYPED_FIELDS:
        if getattr(cfg, field) is not None:
            assert getattr(args, field) == getattr(cfg, field), field


# ServeConfig fields that are vLLM flags of the same name.
TYPED_FIELDS = ("dtype", "tensor_parallel_size", "pipeline_parallel_size", "max_model_len", "block_size",
                "attention_backend", "gpu_memory_utilization", "kv_cache_memory_bytes", "max_num_seqs",
                "max_num_batched_tokens", "num_gpu_blocks_override")


def test_kvlabs_own_flags_parse_as_vllms(vllm_cli):
    argv = gpu_server("llama-3.1-8b", "fp8+fp8-kv", kv_memory_gib=20, max_model_len=32768,
                      extra_args=["--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.85"]).argv
    args = vllm_parse(vllm_cli, argv)
    assert args.kv_cache_memory_bytes == 20 * 2**30 and args.max_model_len == 32768
    assert (args.tensor_parallel_size, args.gpu_memory_utilization) == (2, 0.85)


def test_hf_overrides_reach_vllm_as_its_parser_reads_them(vllm_cli):
    """--hf-overrides (a JSON object of config.json fields) passes through kvlab's typed config to vLLM's
    parser unchanged, and kvlab's prediction is of the overridden config: the YaRN context Qwen2.5's
    card does not have."""
    yarn = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
            "max_position_embeddings": 131072}
    srv = gpu_server("qwen2.5-7b", "bf16", max_model_len=131072, extra_args=["--hf-overrides", json.dumps(yarn)])
    args = vllm_parse(vllm_cli, srv.argv)
    assert args.hf_overrides == yarn and json.loads(srv.config.hf_overrides) == yarn
    assert srv.arch.max_position_embeddings == 131072 and srv.prediction.max_model_len == 131072


def test_a_misspelt_flag_fails_this_test(vllm_cli):
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments: --kv-cache-dtpye"):
        vllm_parse(vllm_cli, ["vllm", "serve", "m", "--kv-cache-dtpye", "fp8"])
    with pytest.raises(pytest.fail.Exception, match="invalid choice"):
        vllm_parse(vllm_cli, ["vllm", "serve", "m", "--kv-cache-dtype", "fp9"])


@pytest.mark.parametrize("flags", [
    [], ["-O0"], ["-O", "0"], ["--optimization-level", "3"], ["--optimization-level=0"],
    ["-cc", '{"cudagraph_mode": "NONE"}'], ["-cc.cudagraph_mode=NONE"], ["--compilation-config.cudagraph_mode", "FULL"],
    ["-O0", "-cc", '{"cudagraph_mode": "PIECEWISE"}'], ["--compilation-config", '{"mode": 3}'], ["--enforce-eager"],
])
def test_cuda_graph_flags_are_read_as_vllm_parses_them(vllm_cli, flags):
    """The flags that decide whether vLLM captures CUDA graphs (and so whether a 0.21+ budget loses
    graph memory), read by kvlab (`ServeConfig.cuda_graphs`) as vLLM's own parser reads them: the
    optimization level, the compilation config's cudagraph_mode (which wins over the level's
    default, `VllmConfig._apply_optimization_level_defaults`) and --enforce-eager."""
    from kvlab.serve_config import graph_flags, parse_serve_config

    ns = vllm_cli.parse_args(["serve", "m", *flags])
    mode = ns.compilation_config.cudagraph_mode
    vllm_mode = None if mode is None else mode.name
    vllm_level = int(ns.optimization_level)  # vLLM's default 2 where no flag gives it
    level_given = any(f.startswith(("-O", "--optimization-level")) for f in flags)
    config = parse_serve_config("m", flags)
    assert graph_flags(config.vllm_args) == (vllm_level if level_given else None, vllm_mode)
    graphs = not ns.enforce_eager and (vllm_mode != "NONE" if vllm_mode is not None else vllm_level != 0)
    assert config.cuda_graphs == graphs
    # torch.compile (whose absence turns vLLM's custom ops on): the compilation mode, NONE with
    # --enforce-eager and by default at -O0 (`VllmConfig.__post_init__`)
    compile_mode = ns.compilation_config.mode
    compiled = not ns.enforce_eager and (int(compile_mode) != 0 if compile_mode is not None else vllm_level != 0)
    assert config.torch_compile == compiled
