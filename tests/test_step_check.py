"""bench/step_check.py: vLLM's published stats lines parsed, mapped and priced by the declared rules."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from kvlab.serve_config import options_config
from kvlab.sim import stepcheck
from kvlab.sim.config import build_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
_spec = importlib.util.spec_from_file_location("step_check", ROOT / "bench" / "step_check.py")
step_check = importlib.util.module_from_spec(_spec)
sys.modules["step_check"] = step_check  # pydantic resolves the module's annotations through it
_spec.loader.exec_module(step_check)

# vLLM 0.32's own line (the CPU build's log in tests/fixtures: "CPU KV cache usage")
CPU_LINE = next(line for line in (ROOT / "tests/fixtures/vllm-0.32-cpu-llama-twin.server.log").read_text().splitlines()
                if "Avg generation throughput: 5.5 tokens/s" in line)
# A V0 engine's line as published (vLLM issue 8881, vLLM 0.6.1.post2 on 4 x H100)
V0_LINE = ("INFO 09-27 03:05:43 metrics.py:352] Avg prompt throughput: 3.2 tokens/s, Avg generation throughput: 0.1 "
           "tokens/s, Running: 2 reqs, Swapped: 0 reqs, Pending: 2 reqs, GPU KV cache usage: 46.5%, CPU KV cache usage: 0.0%.")


@pytest.fixture(scope="module")
def pub():
    return step_check.load()


def _row(pub, run: str, k: int):
    rows = [r for r in pub.rows if r.run == run]
    return rows[k - 1]


def test_it_parses_vllms_own_stats_line():
    p = stepcheck.parse_stats_line(CPU_LINE)
    assert (p.prompt_tok_s, p.gen_tok_s, p.running, p.waiting, p.stamp) == (30.1, 5.5, 1, 0, "11-28 18:47:04")
    assert p.usage == pytest.approx(0.047) and p.prefix_hit_rate == pytest.approx(0.214)
    assert stepcheck.parse_stats_line(V0_LINE) is None and stepcheck.is_v0_stats_line(V0_LINE)


def test_a_published_line_is_priced_at_the_logged_kv_cache_and_the_stated_flags(pub):
    row = _row(pub, "test5-p200-in1024-out1024", 2)
    c = step_check.check(row)
    assert c.reason is None
    assert (c.parsed.running, c.parsed.gen_tok_s, c.parsed.usage) == (195, 5737.5, pytest.approx(0.668))
    # the blocks the usage holds (66.8 % of the 464,848 logged tokens' blocks less the null one, which vLLM's
    # BlockPool.get_usage leaves out) less half a block per request
    context = (464_848 // 16 - 1) * 16 * 0.668 - 195 * 8
    assert c.step.context_per_request == round(context / 195) == 1584
    # the simulator's own pure-decode step at the server's stated flags (Qwen2-7B is priced as Qwen2.5-7B's layers)
    cfg = build_config(options_config("qwen2.5-7b", tensor_parallel_size=1, max_model_len=16384,
                                      gpu_memory_utilization=0.5, max_num_batched_tokens=2048),
                       "a100-80gb", vllm_version="0.10.1.1")
    step_s = cfg.cost.decode_step_s(195, round(context))
    assert c.step.step_s == pytest.approx(step_s)
    assert c.step.sim_gen_tok_s == pytest.approx(195 / step_s)
    assert c.error == pytest.approx(195 / step_s / 5737.5 - 1)
    assert "a100_sxm" in c.timing_source and "the source's log" in c.blocks_source


def _with_line(row, line: str, **changes):
    return row.model_copy(update={"line": line, **changes})


@pytest.mark.parametrize("line, reason", [
    (V0_LINE, "a V0 engine's line"),
    ("Engine 000: Avg prompt throughput: 1023.7 tokens/s, Avg generation throughput: 93.8 tokens/s, Running: 10 reqs, "
     "Waiting: 0 reqs, GPU KV cache usage: 2.3%, Prefix cache hit rate: 8.9%", "prefill in the interval"),
    ("Engine 000: Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 85.2 tokens/s, Running: 1 reqs, "
     "Waiting: 0 reqs, GPU KV cache usage: 0.4%, Prefix cache hit rate: 56.1%", "fewer than 8 requests running (1)"),
    ("Avg generation throughput: 85.2 tokens/s", "not vLLM's periodic stats line"),
])
def test_the_declared_rules_leave_a_line_unscored_with_its_reason(pub, line, reason):
    c = step_check.check(_with_line(_row(pub, "test5-p200-in1024-out1024", 2), line))
    assert c.step is None and c.reason.startswith(reason)


def test_a_row_without_a_kv_size_or_the_flags_it_follows_from_is_not_scored(pub):
    row = _row(pub, "test5-p200-in1024-out1024", 2).model_copy(update={"kv_cache_tokens": None,
                                                                        "gpu_memory_utilization": None})
    assert "neither in the source's log" in step_check.check(row).reason


def test_a_stated_cannot_model_is_kept_and_runs_link_their_previous_line(pub):
    tp2 = [step_check.check(r) for r in pub.rows if r.tp == 2]
    assert tp2 and all("lack P2P" in c.reason for c in tp2)
    results = [step_check.check(r) for r in pub.rows if r.run == "test5-p500-in1024-out1024"]
    step_check.link_runs(results)
    assert results[0].previous_running is None
    assert [c.previous_running for c in results[1:]] == [c.parsed.running for c in results[:-1]]


def test_the_command_prints_the_table_and_a_bad_file_is_one_line(tmp_path, capsys):
    assert step_check.main([]) == 0
    out = capsys.readouterr().out
    assert "| dennislee22-qwen2-7b-a100-test5-p200-in1024-out1024-2 |" in out
    assert "- at the simulator's host time" in out and "for comparison only, at the measured host time" in out
    bad = tmp_path / "steps.yaml"
    bad.write_text(yaml.safe_dump({"rows": [{"id": "x"}]}))
    assert step_check.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


# -- kvlab sim check-log: the same check on a user's own server log


def _server_log(tmp_path, pub, runs: str, startup: bool = True) -> Path:
    """A server log of published lines: dennislee22's Test 5 server (its startup log's version and KV lines)."""
    head = ["(APIServer pid=2739) INFO 09-04 01:28:28 [api_server.py:1805] vLLM API server version 0.10.1.1",
            "(EngineCore_0 pid=2881) INFO 09-04 01:29:26 [kv_cache_utils.py:849] GPU KV cache size: 464,848 tokens"]
    lines = [r.line for r in pub.rows if r.run.startswith(runs)]
    log = tmp_path / "server.log"
    log.write_text("\n".join((head if startup else []) + lines) + "\n")
    return log


SERVE = ("qwen2.5-7b", "--gpu", "a100-80gb", "--max-model-len", "16384", "--gpu-memory-utilization", "0.5",
         "--max-num-batched-tokens", "2048")


def test_check_log_prices_a_servers_own_lines_as_the_published_check_does(kvlab, tmp_path, pub):
    from kvlab.schema.stepcheck import StepCheckResult

    r = kvlab("sim", "check-log", str(_server_log(tmp_path, pub, "test5-")), *SERVE, "--json")
    assert r.returncode == 0, r.stderr
    res = StepCheckResult.from_data(json.loads(r.stdout), "stdout")
    assert (res.vllm_version, res.kv_cache_tokens, res.stats_lines) == ("0.10.1.1", 464_848, 25)
    assert res.kv_cache_source.startswith("the log's KV cache size line")
    assert res.unscored == {"prefill in the interval": 11, "fewer than 8 requests running": 1}
    published = {c.parsed.stamp: c for c in map(step_check.check, pub.rows)
                 if c.reason is None and c.row.run.startswith("test5-")}
    assert [c.stamp for c in res.lines] == list(published)
    for c in res.lines:
        assert c.simulated_gen_tok_s == pytest.approx(published[c.stamp].step.sim_gen_tok_s)
        assert c.measured_gen_tok_s == published[c.stamp].parsed.gen_tok_s
    assert res.within_25pct == 11 and res.median_error == pytest.approx(-0.125, abs=0.001)
    assert StepCheckResult.source_of("measured_gen_tok_s") is None  # a line's figure: on CheckedLine
    assert res.lines[0].source_of("measured_gen_tok_s") == "measured"
    assert res.lines[0].source_of("simulated_gen_tok_s") == "simulated"


def test_check_log_takes_the_sampler_the_log_names_for_the_memory_models_prediction(kvlab, tmp_path, pub):
    """dennislee22's Test 5 server logged "Using FlashInfer for top-p & top-k sampling" and 464,848 tokens of KV
    cache (log/vllm-7B-1gpuA10080GB-0.5GRAM.log at b474d1e). The memory model at that sampler predicts 465,936
    (+0.2 %); at the release's default sampler (PyTorch's for 0.10.1.1 here), 446,256 (-4.0 %)."""
    log = _server_log(tmp_path, pub, "test5-")
    r = kvlab("sim", "check-log", str(log), *SERVE)
    assert r.returncode == 0, r.stderr
    assert "the memory model predicts 446,256 tokens with the pytorch sampler)" in r.stdout
    flashinfer = ("(EngineCore_0 pid=2881) INFO 09-04 01:29:01 [topk_topp_sampler.py:50] Using FlashInfer for "
                  "top-p & top-k sampling.")
    log.write_text(flashinfer + "\n" + log.read_text())
    r = kvlab("sim", "check-log", str(log), *SERVE)
    assert r.returncode == 0, r.stderr
    assert "the memory model predicts 465,936 tokens with the flashinfer sampler the log names)" in r.stdout
    given = kvlab("sim", "check-log", str(log), *SERVE, "--sampler", "pytorch")  # what the command line gives wins
    assert given.returncode == 0 and "the memory model predicts 446,256 tokens with the pytorch sampler)" in given.stdout


def test_check_log_text_names_measured_and_simulated_and_takes_the_memory_models_cache_where_the_log_has_none(
        kvlab, tmp_path, pub):
    r = kvlab("sim", "check-log", str(_server_log(tmp_path, pub, "test5-p200", startup=False)), *SERVE)
    assert r.returncode == 0, r.stderr
    assert "stats lines of vLLM (measured) against kvlab's simulated engine" in r.stdout
    assert "predicted by the memory model (the log has no KV cache size line)" in r.stdout
    assert "| 09-04 01:35:00 | 195 | 0 | 66.8 % | 5,737.5 |" in r.stdout
    assert "decode steps priced: 2;" in r.stdout


@pytest.mark.parametrize("content, words", [
    (None, "cannot read"),
    ("INFO 09-04 01:28:28 [api_server.py:1805] vLLM API server version 0.10.1.1\n", "no vLLM stats line"),
    (V0_LINE + "\n", "a V0 engine's"),
])
def test_check_log_bad_input_is_one_line(kvlab, tmp_path, content, words):
    log = tmp_path / "server.log"
    if content is not None:
        log.write_text(content)
    r = kvlab("sim", "check-log", str(log), *SERVE)
    assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_check_log_takes_the_lines_stamped_in_a_window(kvlab, tmp_path, pub):
    log = str(_server_log(tmp_path, pub, "test5-"))
    every = kvlab("sim", "check-log", log, *SERVE, "--json")
    some = kvlab("sim", "check-log", log, "--since", "09-04 01:35:00", *SERVE, "--until=09-04 01:35:10", "--json")
    assert every.returncode == 0 and some.returncode == 0, some.stderr
    every, some = json.loads(every.stdout), json.loads(some.stdout)
    assert [c["stamp"] for c in some["lines"]] == [c["stamp"] for c in every["lines"]
                                                   if "09-04 01:35:00" <= c["stamp"] <= "09-04 01:35:10"]
    assert 0 < some["stats_lines"] < every["stats_lines"] and some["kv_cache_tokens"] == 464_848
    none = kvlab("sim", "check-log", log, *SERVE, "--since", "12-31 23:00:00")
    assert none.returncode != 0 and "no V1 stats line stamped from 12-31 23:00:00 to the end" in none.stderr
    bad = kvlab("sim", "check-log", log, *SERVE, "--since", "yesterday")
    assert bad.returncode != 0 and "MM-DD HH:MM:SS" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_check_log_needs_a_gpu_and_says_how_to_use_it(kvlab, tmp_path, pub):
    r = kvlab("sim", "check-log", str(_server_log(tmp_path, pub, "test5-p200")), "qwen2.5-7b")
    assert r.returncode != 0 and "--gpu" in r.stderr and "Traceback" not in r.stderr
    h = kvlab("sim", "check-log", "--help")
    assert h.returncode == 0 and "kvlab sim check-log LOG MODEL --gpu G, then vllm serve's flags" in h.stdout
    none = kvlab("sim", "check-log")
    assert none.returncode == 2 and "required: LOG MODEL" in none.stderr and "Traceback" not in none.stderr


# -- a real vLLM repeat: the runner records its step check, the report reads it


def test_a_real_vllm_repeat_records_its_step_check_and_the_report_says_it(tmp_path, pub):
    import pandas as pd

    from kvlab.analysis.report import step_check_label
    from kvlab.analysis.runs import RunSet, _row
    from kvlab.experiments.runner import step_check
    from kvlab.experiments.spec import Spec
    from kvlab.schema.stepcheck import StepCheckResult
    from kvlab.serve_config import options_config

    rdir = tmp_path / "repeat-1"
    rdir.mkdir()
    (rdir / "server.log").write_text(_server_log(tmp_path, pub, "test5-").read_text())

    class RealServer:  # what the runner reads of kvlab's launcher: the engine and the typed serve configuration
        engine = "vllm"
        config = options_config("qwen2.5-7b", max_model_len=16384, gpu_memory_utilization=0.5,
                                max_num_batched_tokens=2048)

    spec = Spec(name="s", models=["qwen2.5-7b"], quants=["bf16"], workloads=["agent"], gpu="a100-80gb")
    assert step_check(spec, RealServer(), rdir) == rdir / "step_check.json"
    res = StepCheckResult.read(rdir / "step_check.json")
    assert (len(res.lines), res.within_25pct, res.vllm_version) == (13, 11, "0.10.1.1")
    assert res.median_error == pytest.approx(-0.125, abs=0.001)
    # other engines, or no GPU preset: nothing to check, nothing written
    (rdir / "step_check.json").unlink()
    RealServer.engine = "vllm-cpu"
    assert step_check(spec, RealServer(), rdir) is None
    RealServer.engine = "vllm"
    assert step_check(spec.model_copy(update={"gpu": None}), RealServer(), rdir) is None
    assert not (rdir / "step_check.json").exists()

    # a server that served earlier repeats: only the lines after the mark the runner took at the load's start
    text = (rdir / "server.log").read_text()
    mark = text.index("09-04 01:35:00")  # the test5-p200 lines: the last two decode-dominated ones
    mark = text.rindex("\n", 0, mark) + 1
    assert step_check(spec, RealServer(), rdir, since=mark) == rdir / "step_check.json"
    res = StepCheckResult.read(rdir / "step_check.json")
    assert res.vllm_version == "0.10.1.1" and res.kv_cache_source.startswith("the log's KV cache size line")
    assert [c.stamp for c in res.lines][0] == "09-04 01:35:00" and len(res.lines) < 13
    assert res.log == "server.log, the lines of the repeat's load"
    assert step_check(spec, RealServer(), rdir, since=len(text)) is None  # no stats line in the load

    step_check(spec, RealServer(), rdir)
    row = _row(rdir, "s", {})
    assert (row.step_check_lines, row.step_check_within_25pct) == (13, 11)
    df = pd.DataFrame([row.model_dump() | {"model": "qwen2.5-7b", "quant": "bf16", "repeat": 1}])
    label = step_check_label(RunSet(folders=[tmp_path], specs={}, repeats=df))
    assert "13 lines priced in 1 repeat(s), 11 within ±25 %" in label and "qwen2.5-7b/bf16 (repeat 1) -12.5 %" in label
