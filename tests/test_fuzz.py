"""Fuzzed inputs (hypothesis): experiment specs, workload files, model configs, serve profiles, CLI
arguments, the Prometheus exposition parser and the SSE reader. Whatever the input: never a
traceback; bad input is a KvlabError whose one-line message names where it was wrong.

Few examples by default so that `make test` stays quick; KVLAB_FUZZ_EXAMPLES=5000 (say) fuzzes for
real. Failing examples are kept in .hypothesis/ and replayed first.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from kvlab.errors import KvlabError

EXAMPLES = int(os.environ.get("KVLAB_FUZZ_EXAMPLES", "30"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])
REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"


def refused_or_ok(fn, *args, where: str | None = None, **kw):
    """fn(*args) either returns or raises KvlabError with a one-line message (naming `where`)."""
    try:
        return fn(*args, **kw)
    except KvlabError as e:
        msg = str(e)
        assert msg.strip(), "an empty error message"
        assert "Traceback" not in msg
        if where is not None:
            assert msg.startswith(where) or where in msg, msg
        return None


# --- strategies ------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "0", "-1", "1e309", "nan", "inf", "30s", "2m", "-5s", "1h30m", "..", "/", "../x", "~"]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


def mutated(base: dict, keys_values: dict) -> st.SearchStrategy[dict]:
    """`base` with some keys replaced by fuzzed or plausible values, some deleted, some added."""
    def build(draw):
        d = json.loads(json.dumps(base))
        for key in draw(st.lists(st.sampled_from(sorted(keys_values)), max_size=4, unique=True)):
            d[key] = draw(st.one_of(keys_values[key], json_values))
        for key in draw(st.lists(st.sampled_from(sorted(d) or ["x"]), max_size=2, unique=True)):
            d.pop(key, None)
        if draw(st.booleans()):
            d[draw(st.text(max_size=8))] = draw(json_values)
        return d
    return st.composite(lambda draw: build(draw))()


yaml_text = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    json_values.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
    st.sampled_from(["!!python/object/apply:os.system ['echo hacked']", "a: &x [*x]", "{", "- - -", "a: b: c",
                     "%YAML 9.9\n---\n", "\t\x00", "name: [unclosed"]),
)
file_bytes = st.one_of(yaml_text.map(lambda s: s.encode("utf-8", "surrogateescape")), st.binary(max_size=200))


# --- experiment specs ------------------------------------------------------------------------

SPEC = yaml.safe_load((REPO / "experiments" / "cpu-smoke.yaml").read_text())
SPEC_VALUES = {
    "name": st.sampled_from(["x", "../escape", "/abs", "a b", "", "é"]),
    "engine": st.sampled_from(["auto", "vllm", "vllm-cpu", "sim", "gpu", ""]),
    "models": st.lists(st.sampled_from(["deepseek-v2-lite", "llama-3.1-8b", "nope", "../x", "/etc", "org/m", ""]),
                       max_size=3),
    "quants": st.lists(st.sampled_from(["bf16", "fp8", "awq", "fp8+fp8-kv", "int3", ""]), max_size=3),
    "workloads": st.lists(st.sampled_from(["agent", "agent-smoke", "missing", "/dev/null", "../../x"]), max_size=2),
    "load": st.fixed_dictionaries({}, optional={"shape": st.sampled_from(["constant", "steps", "zigzag"]),
                                                "users": st.lists(st.integers(-3, 10**12), max_size=3),
                                                "spawn_rate": scalars, "step_s": scalars}),
    "duration_s": scalars, "warmup_s": scalars, "repeats": scalars, "seed": scalars,
    "slo": st.dictionaries(st.sampled_from(["ttft_s", "itl_p95_s", "tpot_s", "e2e_s", "x"]), scalars, max_size=3),
    "gpu": st.sampled_from(["h100", "h200", "tpu", None]), "kv_memory_gib": scalars, "max_model_len": scalars,
    "scrape_interval_s": scalars, "serve_args": st.lists(st.text(max_size=10), max_size=3),
}


@fuzz
@given(data=mutated(SPEC, SPEC_VALUES))
def test_fuzzed_spec_is_valid_or_refused_naming_the_field(data):
    from kvlab.experiments.spec import cells, validate_spec

    spec = refused_or_ok(validate_spec, data, "spec.yaml", where="spec.yaml")
    if spec is not None:
        for c in cells(spec):
            assert "/" not in c.cell_id and not c.cell_id.startswith(".")


# --- workload files --------------------------------------------------------------------------

WORKLOAD = yaml.safe_load((REPO / "loadtest" / "agent-smoke.yaml").read_text())
dists = st.one_of(
    scalars,
    st.fixed_dictionaries({"dist": st.sampled_from(["uniform", "lognormal", "exponential", "choice", "fixed", "zipf"])},
                          optional={k: st.one_of(scalars, st.lists(scalars, max_size=3))
                                    for k in ("low", "high", "median", "sigma", "mean", "values", "weights", "min",
                                              "max", "value")}),
)
WORKLOAD_VALUES = {
    "apps": st.fixed_dictionaries({}, optional={"count": scalars, "system_tokens": dists}),
    "session": st.fixed_dictionaries({}, optional={k: dists for k in ("turns", "task_tokens", "tool_result_tokens",
                                                                      "max_tokens", "think_time_s")}),
    "request": st.fixed_dictionaries({}, optional={k: scalars for k in ("endpoint", "model", "temperature", "ignore_eos",
                                                                        "timeout_s", "stall_timeout_s")}),
    "limits": st.fixed_dictionaries({}, optional={"max_context_tokens": scalars}),
    "load": st.fixed_dictionaries({}, optional={"users": scalars, "duration_s": scalars, "max_requests": scalars,
                                                "shape": st.dictionaries(st.sampled_from(["kind", "steps", "period_s",
                                                                                          "sessions_per_min", "hourly_weights"]),
                                                                         json_values, max_size=3)}),
    "slo": st.dictionaries(st.sampled_from(["ttft_s", "itl_p95_s", "e2e_s"]), scalars, max_size=2),
    "name": st.sampled_from(["w", "../x", ""]),
}


@fuzz
@given(data=mutated(WORKLOAD, WORKLOAD_VALUES), seed=st.integers(0, 2**32))
def test_fuzzed_workload_is_valid_or_refused_and_plays(tmp_path_factory, data, seed):
    from kvlab.loadtest.shapes import ShapePlan
    from kvlab.loadtest.workload import load_workload

    p = tmp_path_factory.mktemp("wl") / "w.yaml"
    p.write_text(yaml.safe_dump(data))
    wl = refused_or_ok(load_workload, p, where=str(p))
    if wl is None:
        return
    sessions = wl.sessions(seed)
    for _ in range(3):  # a valid workload plays: sessions inside the context limit
        plan = next(sessions)
        assert 1 <= len(plan.turns) and plan.system_tokens >= 0
    plan = ShapePlan(wl.load.shape, wl.load.users, wl.load.duration_s)
    plan.schedule()


# --- model configs (config.json) ---------------------------------------------------------------

LLAMA = json.loads(json.dumps(__import__("kvlab.models.cards", fromlist=["card"]).card("llama-3.1-8b").config))
DEEPSEEK = json.loads(json.dumps(__import__("kvlab.models.cards", fromlist=["card"]).card("deepseek-v2-lite").config))
config_ints = st.one_of(st.integers(-2, 2**40), scalars)
CONFIG_VALUES = {k: config_ints for k in (
    "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    "intermediate_size", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "q_lora_rank",
    "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "first_k_dense_replace", "moe_layer_freq",
    "sliding_window", "max_window_layers", "max_position_embeddings", "num_experts", "decoder_sparse_step")}
CONFIG_VALUES.update({
    "model_type": st.sampled_from(["llama", "deepseek_v2", "qwen2", "qwen2_moe", "qwen3_moe", "mistral", "gpt2", ""]),
    "torch_dtype": st.sampled_from(["bfloat16", "float16", "int4", "", "torch.float32"]),
    "layer_types": st.lists(st.sampled_from(["full_attention", "sliding_attention", 3]), max_size=4),
    "architectures": st.one_of(st.lists(scalars, max_size=2), scalars),
    "text_config": json_values, "quantization_config": json_values, "use_sliding_window": scalars,
    "mlp_only_layers": st.one_of(st.lists(scalars, max_size=3), scalars),
})


@fuzz
@given(cfg=st.one_of(mutated(LLAMA, CONFIG_VALUES), mutated(DEEPSEEK, CONFIG_VALUES)))
def test_fuzzed_model_config_is_read_or_refused(tmp_path_factory, cfg):
    from kvlab.models import memory
    from kvlab.models.cards import resolve_model

    folder = tmp_path_factory.mktemp("model")
    (folder / "config.json").write_text(json.dumps(cfg, default=str))
    m = refused_or_ok(resolve_model, str(folder), where=str(folder))
    if m is None:
        return
    refused_or_ok(memory.capacity, m.arch, model_name="fuzz", kv_budget_bytes=1 << 30, max_model_len=4096)
    refused_or_ok(memory.capacity, m.arch, model_name="fuzz", gpu="h100", max_model_len=None)


@fuzz
@given(raw=st.binary(max_size=300))
def test_fuzzed_config_json_bytes(tmp_path_factory, raw):
    from kvlab.models.cards import resolve_model

    folder = tmp_path_factory.mktemp("model")
    (folder / "config.json").write_bytes(raw)
    refused_or_ok(resolve_model, str(folder), where=str(folder))


# --- serve profiles --------------------------------------------------------------------------

PROFILE = yaml.safe_load((REPO / "deploy" / "profiles" / "llama-3.1-8b.yaml").read_text())
VLLM_FLAGS = ["--quantization", "-q", "--kv-cache-dtype", "--dtype", "--block-size", "--max-model-len",
              "--attention-backend", "-tp", "--tensor-parallel-size", "-pp", "--gpu-memory-utilization",
              "--kv-cache-memory-bytes", "--max-num-seqs", "--max-num-batched-tokens", "--num-gpu-blocks-override",
              "--served-model-name", "--api-key", "--model", "--port", "--enforce-eager"]
flag_args = st.lists(st.one_of(st.sampled_from(VLLM_FLAGS), st.sampled_from(["0", "-1", "abc", "fp8", "1e9", "16",
                                                                              "FLASHMLA", "=", ""]),
                               st.text(max_size=8)), max_size=8)


@fuzz
@given(profiles=st.dictionaries(st.sampled_from(["bf16", "fp8", "Bad Name", "fp8-kv", ""]),
                                st.one_of(json_values, st.fixed_dictionaries(
                                    {"description": st.text(max_size=10)},
                                    optional={"args": flag_args, "checkpoint": scalars, "weights": scalars,
                                              "note": scalars})), max_size=3),
       model=st.sampled_from(["llama-3.1-8b", "other"]), quant=st.sampled_from(["bf16", "fp8", "awq"]),
       extra=flag_args)
def test_fuzzed_serve_profile_is_read_or_refused(tmp_path_factory, monkeypatch, profiles, model, quant, extra):
    from kvlab.deploy.launcher import ServeSpec, Server

    folder = tmp_path_factory.mktemp("profiles")
    (folder / "llama-3.1-8b.yaml").write_text(yaml.safe_dump({"model": model, "profiles": profiles}))
    monkeypatch.setenv("KVLAB_PROFILES", str(folder))
    srv = refused_or_ok(Server, ServeSpec("llama-3.1-8b", quant=quant, engine="vllm", port=8500, extra_args=extra))
    if srv is not None:
        assert srv.argv[:2] == ["vllm", "serve"] and "--api-key" not in srv.argv
        srv.record()


# --- any YAML file, bytes as they come --------------------------------------------------------


def _read_spec(path: Path, monkeypatch) -> None:
    from kvlab.experiments.spec import load_spec

    load_spec(path)


def _read_workload(path: Path, monkeypatch) -> None:
    from kvlab.loadtest.workload import load_workload

    load_workload(path)


def _read_profiles(path: Path, monkeypatch) -> None:
    from kvlab.deploy.profiles import model_profiles

    monkeypatch.setenv("KVLAB_PROFILES", str(path.parent))
    model_profiles(path.stem)


@pytest.mark.parametrize("read", [_read_spec, _read_workload, _read_profiles], ids=["spec", "workload", "profile"])
@fuzz
@given(raw=file_bytes)
def test_fuzzed_yaml_file_bytes(tmp_path_factory, monkeypatch, read, raw):
    p = tmp_path_factory.mktemp("yaml") / "llama-3.1-8b.yaml"
    p.write_bytes(raw)
    refused_or_ok(read, p, monkeypatch, where=str(p))


# --- CLI arguments ---------------------------------------------------------------------------

MODELS = st.sampled_from(["deepseek-v2-lite", "llama-3.1-8b", "qwen2.5-7b", "nope", "org/none", "", "../x", "/"])
values = st.one_of(st.sampled_from(["0", "-1", "1", "0.5", "1e400", "nan", "inf", "abc", "", "32768", "h100", "fp8",
                                    "auto", "fp8_ds_mla", "bitsandbytes", "FLASHMLA", "CPU_ATTN", "--json",
                                    "model=x", "status", "=", "a=b,c"]),
                   st.text(max_size=6))
# Addresses that resolve or fail without a DNS lookup (a name would wait for the resolver's timeout).
HOSTS = st.sampled_from(["127.0.0.1", "0.0.0.0", "::1", "", "localhost", "192.0.2.1", "::", "--dry-run", "1.2.3"])
CAPACITY_OPTS = ["--gpu", "--gpu-memory-utilization", "--kv-memory-gib", "--kv-cache-memory-bytes", "--max-model-len",
                 "--block-size", "--attention-backend", "--kv-cache-dtype", "--quantization", "--dtype", "-tp", "-pp",
                 "--max-num-batched-tokens", "--max-num-seqs"]
COMMANDS = {
    "kv": (1, ["--kv-cache-dtype", "--quantization", "--dtype"]),
    "capacity": (1, CAPACITY_OPTS),
    "compare": (3, [o for o in CAPACITY_OPTS if o != "--attention-backend"]),
    "profiles": (1, []),
    "serve": (1, ["--quant", "--engine", "--port", "--host", "--kv-memory-gib", "--max-model-len", "--gpu",
                  "--health-timeout"]),
    "gpus": (0, []),
    "cards": (0, []),
    "experiment ls": (1, ["--where"]),
    "metrics summarize": (1, ["--start-ts", "--end-ts", "--model-name", "--mean-session-context-tokens",
                              "--kv-bytes-per-token"]),
}
PATHS = st.sampled_from([str(FIXTURES), str(FIXTURES / "vllm-0.32-cpu-deepseek-twin.metrics.txt"), "/nonexistent",
                         "", ".", str(REPO / "experiments"), "/dev/null"])


@st.composite
def cli_args(draw):
    cmd = draw(st.sampled_from(sorted(COMMANDS)))
    n_models, opts = COMMANDS[cmd]
    targets = PATHS if " " in cmd else MODELS  # the subcommands read a folder or file
    argv = [*cmd.split(), *draw(st.lists(targets, min_size=0, max_size=n_models))]
    if cmd == "serve":
        # never start anything: first, so that no option drawn below can take it as its value (a
        # trailing `--gpu --dry-run` once started a real server here)
        argv.append("--dry-run")
    for opt in draw(st.lists(st.sampled_from(opts + ["--json", "--cpu", "--bogus"]) if opts else st.just("--json"),
                             max_size=4)):
        argv.append(opt)
        if opt not in ("--json", "--cpu") and draw(st.booleans()):
            argv.append(draw(HOSTS if opt == "--host" else values))
    if cmd == "serve":
        if draw(st.booleans()):
            argv += ["--", *draw(flag_args)]
    return argv


@fuzz
@given(argv=cli_args())
def test_fuzzed_cli_arguments_exit_cleanly(argv, capsys):
    from kvlab.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
        sys.exit(0)
    out = capsys.readouterr()
    assert e.value.code in (0, 2, None), (argv, out.err[-2000:])
    assert "Traceback" not in out.err
    if e.value.code == 2:
        assert out.err.strip(), argv


# --- Prometheus exposition ---------------------------------------------------------------------

EXPOSITION = (FIXTURES / "vllm-0.32-cpu-deepseek-twin.metrics.txt").read_text()
EXPOSITION_LINES = EXPOSITION.splitlines(keepends=True)


@st.composite
def garbled_exposition(draw):
    """The real exposition with some lines replaced, cut, duplicated or sprinkled with bytes."""
    lines = list(EXPOSITION_LINES[draw(st.integers(0, 40)): draw(st.integers(60, len(EXPOSITION_LINES)))])
    for _ in range(draw(st.integers(0, 6))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["cut", "noise", "drop", "dup", "value", "labels"]))
        if how == "cut":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        elif how == "noise":
            lines[i] = draw(st.text(max_size=30)) + lines[i]
        elif how == "drop":
            del lines[i]
        elif how == "dup":
            lines.insert(i, lines[i])
        elif how == "value":
            lines[i] = lines[i].rsplit(" ", 1)[0] + " " + draw(st.sampled_from(["NaN", "+Inf", "x", "", "1e999", "-0"])) + "\n"
        else:
            lines[i] = lines[i].replace("{", "{" + draw(st.text(max_size=10)), 1)
    return "".join(lines)


@fuzz
@given(text=st.one_of(garbled_exposition(), st.text(max_size=300),
                      st.binary(max_size=300).map(lambda b: b.decode("utf-8", "replace"))))
def test_fuzzed_exposition_never_raises(text):
    from kvlab.metrics.exposition import parse_exposition

    r = parse_exposition(text)
    for s in r.samples:
        assert s.family.startswith("vllm:") and isinstance(s.value, float)
    for e in r.errors:
        assert e.strip()


@fuzz
@given(body=st.one_of(garbled_exposition(), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))),
       status=st.sampled_from([200, 200, 200, 404, 500]))
def test_fuzzed_scrape_is_a_sample_or_a_gap_and_summarizes(tmp_path_factory, body, status):
    """A scrape of a garbled /metrics answer writes samples or a gap row; the file still reads and
    summarizes (figures missing where families are)."""
    import httpx

    from kvlab.metrics.figures import summarize_all
    from kvlab.metrics.samples import GAP, SampleWriter, read_samples
    from kvlab.metrics.scraper import Scraper

    path = tmp_path_factory.mktemp("scrape") / "metrics.csv"
    s = Scraper("http://127.0.0.1:9/metrics", path, gpu=False)
    s._writer = SampleWriter(path)
    s._client = httpx.Client(transport=httpx.MockTransport(lambda req: httpx.Response(status, text=body)))
    scrapes = [s.scrape_once() for _ in range(2)]
    s._writer.close()
    assert all(r.samples > 0 or r.error for r in scrapes)
    df = read_samples(path)
    assert (df["name"] == GAP).sum() == sum(r.error is not None for r in scrapes)
    refused_or_ok(summarize_all, path)


@fuzz
@given(raw=st.binary(max_size=400))
def test_fuzzed_samples_file_reads_or_is_refused(tmp_path_factory, raw):
    from kvlab.metrics.samples import read_samples

    p = tmp_path_factory.mktemp("samples") / "metrics.csv"
    p.write_bytes(b"ts,family,name,labels,value\n" + raw if raw[:1] != b"!" else raw)
    refused_or_ok(read_samples, p)


# --- the SSE reader --------------------------------------------------------------------------

chunk_json = st.fixed_dictionaries({}, optional={
    "choices": st.one_of(json_values, st.lists(st.fixed_dictionaries({}, optional={
        "delta": st.one_of(json_values, st.fixed_dictionaries({}, optional={"content": json_values, "role": json_values})),
        "finish_reason": json_values}), max_size=2)),
    "usage": st.one_of(json_values, st.fixed_dictionaries({}, optional={
        "prompt_tokens": json_values, "completion_tokens": json_values, "prompt_tokens_details": json_values})),
    "error": json_values,
})
sse_events = st.one_of(
    chunk_json.map(lambda d: b"data: " + json.dumps(d).encode() + b"\n\n"),
    json_values.map(lambda v: b"data: " + json.dumps(v).encode() + b"\n\n"),
    st.sampled_from([b"data: [DONE]\n\n", b": keep-alive\n\n", b"data: {\n\n", b"event: x\n", b"\r\n", b"\r",
                     b"data:", b"data: [DONE]", b"\xff\xfe\n", b"id: 1\nretry: 5\n\n"]),
    st.binary(max_size=40),
)


@fuzz
@given(events=st.lists(sse_events, max_size=12), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_fuzzed_sse_stream_is_measured_or_an_error_kind(events, cuts):
    from kvlab.loadtest.stream import ERROR_KINDS, ChatStream, LineSplitter

    raw = b"".join(events)
    pieces, last = [], 0
    for c in sorted(set(min(c, len(raw)) for c in cuts)) + [len(raw)]:
        pieces.append(raw[last:c])
        last = c
    stream, split, now = ChatStream(0.0), LineSplitter(), 0.0
    for piece in pieces:
        for line in split.feed(piece):
            now += 0.01
            if stream.feed_line(line, now):
                break
    for line in split.flush():
        stream.feed_line(line, now)
    r = stream.finish(now + 0.01)
    assert r.error_kind in (None, *ERROR_KINDS)
    assert isinstance(r.text, str) and r.chunks >= 0 and all(x >= 0 for x in r.itl_s)
    if r.ok:
        assert r.e2e_s is not None
        for n in (r.prompt_tokens, r.completion_tokens, r.cached_tokens):
            assert n is None or (isinstance(n, int) and n >= 0)
        json.dumps(r.__dict__)  # a record can be written
    else:
        assert r.error_detail


@fuzz
@given(raw=st.binary(max_size=300))
def test_fuzzed_request_records_read_or_are_refused(tmp_path_factory, raw):
    from kvlab.loadtest.records import read_requests

    folder = tmp_path_factory.mktemp("records")
    (folder / "requests-x.jsonl").write_bytes(raw)
    refused_or_ok(read_requests, folder)
