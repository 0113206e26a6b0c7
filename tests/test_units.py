"""The shared pieces every stage uses: the one duration grammar, the one nvidia-smi reader, GiB."""

from __future__ import annotations

import ast
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from kvlab import nvidia_smi
from kvlab.errors import KvlabError
from kvlab.units import DurationError, parse_duration_s

SRC = Path(__file__).resolve().parents[1] / "src" / "kvlab"


# -- durations: the union of the three former grammars (scrape, spec, load) -------------------------


@pytest.mark.parametrize("text, seconds", [
    ("90", 90), ("1.5", 1.5), (" 60s ", 60), ("2m", 120), ("1.5h", 5400), ("500ms", 0.5),  # scrape's and spec's
    ("1h30m", 5400), ("2m30s", 150), ("1h0m5s", 3605), ("5M", 300), ("1h 30m", 5400),  # Locust's -t (kvlab load)
    (90, 90), (2.5, 2.5),  # numbers, as a spec or run_load(duration_s=) give them
])
def test_every_former_grammar_parses(text, seconds):
    assert parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["soon", "", "-5s", "30m1h", "5s5s", "1h30", "5 minutes", True, None, [1]])
def test_what_is_not_a_duration_is_one_error(bad):
    with pytest.raises(DurationError, match="not a duration"):
        parse_duration_s(bad)


def test_zero_only_where_allowed_and_never_negative():
    for zero in (0, "0", "0s"):
        with pytest.raises(DurationError, match="must be positive"):
            parse_duration_s(zero)
        assert parse_duration_s(zero, allow_zero=True) == 0
    with pytest.raises(DurationError, match="must be positive"):
        parse_duration_s(-1, allow_zero=True)


def test_a_duration_error_is_a_kvlab_error_and_a_value_error():
    """One line on the command line; a field error in a pydantic spec."""
    from kvlab.experiments.spec import validate_spec

    with pytest.raises(KvlabError, match="^duration: not a duration: 'soon'"):
        parse_duration_s("soon", what="duration")
    assert issubclass(DurationError, ValueError)
    spec = {"name": "s", "models": ["llama-3.1-8b"], "duration_s": "1h30m", "warmup_s": "0s"}
    assert (validate_spec(spec, "s.yaml").duration_s, validate_spec(spec, "s.yaml").warmup_s) == (5400, 0)
    with pytest.raises(KvlabError, match="field warmup_s: not a duration"):
        validate_spec({**spec, "warmup_s": "later"}, "s.yaml")


def test_the_three_former_parsers_are_the_one():
    from kvlab.experiments import spec
    from kvlab.loadtest import runner
    from kvlab.metrics import cli

    assert spec.parse_duration_s is cli.parse_duration_s is parse_duration_s
    assert runner.parse_duration("1h30m") == 5400 and runner.parse_duration("90s") == 90  # kvlab load's -t
    assert runner.parse_duration("1.5h") == 5400  # what kvlab load refused before


def test_units_are_defined_once():
    """GiB (and MiB) live in kvlab.units; every other module imports them."""
    defs = [f"{p.relative_to(SRC)}:{n.lineno}" for p in SRC.rglob("*.py")
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Name) and t.id in ("GiB", "MiB", "KiB")]
    assert len(defs) == 3 and {d.split(":")[0] for d in defs} == {"units.py"}, defs


# -- nvidia-smi: one reader --------------------------------------------------------------------------


def _fake_smi(folder: Path, body: str, rc: int = 0) -> str:
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\necho \"$@\" > {folder / 'args'}\ncat <<'EOF'\n{body}EOF\nexit {rc}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


def test_the_reader_asks_for_fields_and_returns_rows(tmp_path):
    exe = _fake_smi(tmp_path, "NVIDIA H100 80GB HBM3, 81559\nNVIDIA H100 80GB HBM3, [N/A]\n")
    rows = nvidia_smi.query_gpus(("name", "memory.total"), exe)
    assert (tmp_path / "args").read_text().split() == ["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]
    assert rows == [{"name": "NVIDIA H100 80GB HBM3", "memory.total": "81559"},
                    {"name": "NVIDIA H100 80GB HBM3", "memory.total": "[N/A]"}]
    assert [nvidia_smi.number(r["memory.total"]) for r in rows] == [81559.0, None]


def test_the_reader_says_why_it_failed(tmp_path):
    _fake_smi(tmp_path, "")
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    with pytest.raises(nvidia_smi.NvidiaSmiError, match="exited 9: NVIDIA-SMI has failed"):
        nvidia_smi.query_gpus(("name",), str(tmp_path / "nvidia-smi"))
    _fake_smi(tmp_path, "a, b, c\n")
    with pytest.raises(nvidia_smi.NvidiaSmiError, match="output: expected 2 fields, got 3"):
        nvidia_smi.query_gpus(("name", "uuid"), str(tmp_path / "nvidia-smi"))
    with pytest.raises(nvidia_smi.NvidiaSmiError):
        nvidia_smi.query_gpus(("name",), str(tmp_path / "absent"))


def test_host_facts_manifest_and_telemetry_all_read_through_it(monkeypatch):
    from kvlab.deploy import host
    from kvlab.experiments import records
    from kvlab.metrics.gpu import NvidiaSmi

    asked = []
    cells = {"name": "NVIDIA H100 80GB HBM3", "memory.total": "81559", "driver_version": "550.54.15",
             "compute_cap": "9.0", "uuid": "GPU-0", "index": "0", "memory.used": "1024",
             "utilization.gpu": "50", "power.draw": "[N/A]"}

    def fake_query(fields, executable=None, timeout_s=10.0):
        asked.append(tuple(fields))
        return [{f: cells[f] for f in fields}]

    monkeypatch.setattr(nvidia_smi, "query_gpus", fake_query)
    monkeypatch.setattr(nvidia_smi, "find", lambda: "/fake/nvidia-smi")
    assert host.gpu_facts()["gpus"][0]["memory_total_mib"] == 81559.0
    assert records.gpu_info() == {"present": True, "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559,
                                                             "driver": "550.54.15"}]}
    rows = NvidiaSmi().sample(1.0)
    assert {r[1] for r in rows} == {"nvidia_smi_memory_used_bytes", "nvidia_smi_memory_total_bytes",
                                    "nvidia_smi_utilization_gpu_ratio"}  # power [N/A]: left out
    assert len(asked) == 3 and all("name" in f for f in asked)
    runners = {p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")  # nothing else runs it
               for n in ast.walk(ast.parse(p.read_text()))
               if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("--format=csv")}
    assert runners == {"nvidia_smi.py"}


def test_absent_and_failing_nvidia_smi_in_the_manifest(monkeypatch, tmp_path):
    from kvlab.experiments import records

    monkeypatch.setenv("PATH", str(tmp_path))
    assert records.gpu_info() == {"present": False}
    _fake_smi(tmp_path, "", rc=3)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    info = records.gpu_info()
    assert info["present"] is False and "exited 3" in info["error"]


# -- the plan request: one type for kvlab plan, the Python API and a spec's plan: block ----------------


def test_a_plan_request_takes_the_spec_keys_and_the_former_names():
    from kvlab.plan.request import PlanRequest

    base = {"workload": "agent", "agents": 10, "gpu": "h100", "models": ["llama-3.1-8b"]}
    new = PlanRequest(**base, slo_attainment=0.9, tensor_parallel_size=2, cost_drop_pct=[50], volume_growth=[1, 3])
    old = PlanRequest(**base, attainment=0.9, tp=2, cost_drops_pct=[50], volume_x=[1, 3])
    assert new == old and new.quants == ["bf16"] and new.sim_s == 180
    assert (new.tensor_parallel_size, new.cost_drop_pct, new.volume_growth) == (2, [50.0], [1.0, 3.0])


@pytest.mark.parametrize("field, value, message", [
    ("agents", 0, "--agents must be at least 1, got 0"),
    ("slo_attainment", 1.5, "--slo-attainment must be in (0, 1], got 1.5"),
    ("tp", 0, "-tp must be at least 1, got 0"),
    ("cost_drop_pct", [120], "--cost-drop values are percentages in [0, 100)"),
    ("volume_x", [0], "--volume-growth values must be positive"),
    ("sim_s", 10, "--sim-s must be at least 30 simulated seconds"),
    ("tolerance", 1, "--tolerance must be in (0, 1)"),
    ("surprise", 1, "surprise: Extra inputs are not permitted"),
])
def test_a_bad_plan_request_is_one_line_naming_the_flag(field, value, message):
    from kvlab.plan.request import PlanRequest

    with pytest.raises(KvlabError) as e:
        PlanRequest(**{"workload": "agent", "agents": 10, "gpu": "h100", "models": ["llama-3.1-8b"], field: value})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_specs_plan_block_is_the_plan_request_type():
    from kvlab.experiments.spec import Spec, validate_spec
    from kvlab.plan.request import PlanBlock, PlanRequest, request_from_spec

    assert Spec.model_fields["plan"].annotation == PlanBlock | None and issubclass(PlanRequest, PlanBlock)
    data = {"name": "s", "models": ["llama-3.1-8b"], "gpu": "h100", "gpu_price_per_hour": 2.5,
            "plan": {"agents": 100, "tensor_parallel_size": 2, "cost_drop_pct": [50]}}
    req = request_from_spec(validate_spec(data, "s.yaml"), Path("out"))
    assert (req.agents, req.tensor_parallel_size, req.cost_drop_pct, req.gpu_price_per_hour) == (100, 2, [50.0], 2.5)
    with pytest.raises(KvlabError, match="s.yaml: field plan.agents: must be at least 1, got 0"):
        validate_spec({**data, "plan": {"agents": 0}}, "s.yaml")
    with pytest.raises(ValidationError):
        PlanBlock.model_validate({"agents": 1, "extra_key": 1})


def test_a_plan_serves_its_configs_with_the_specs_flags_on_the_vllm_release_asked():
    """A spec's serve_args reach the plan's configs (on top of each level's flags) and its
    plan.vllm_version (or kvlab plan --vllm-version) the simulated release: both in the configs'
    simulator settings, their `kvlab sim run` reproduction and the plan's inputs."""
    from kvlab.experiments.spec import validate_spec
    from kvlab.plan.configs import resolve_config, with_factors
    from kvlab.plan.request import PlanRequest, request_from_spec

    data = {"name": "s", "models": ["llama-3.1-8b"], "gpu": "h100", "serve_args": ["--api-server-count", "2"],
            "plan": {"agents": 100, "vllm_version": "0.10"}}
    req = request_from_spec(validate_spec(data, "s.yaml"), Path("out"))
    assert (req.serve_args, req.vllm_version) == (["--api-server-count", "2"], "0.10")
    cfg = resolve_config("llama-3.1-8b", "fp8-kv", "h100", 1, 32768, tuple(req.serve_args), req.vllm_version)
    sim = cfg.sim_config()
    assert (cfg.serve.api_server_count, cfg.serve.kv_cache_dtype, sim.api_server_count, sim.vllm_version) == (2, "fp8", 2, "0.10")
    assert sim.gpu_memory_utilization == 0.9  # vLLM 0.10's default (0.92 from 0.20)
    flags = cfg.sim_run_flags()
    assert flags[-4:] == ["--api-server-count", "2", "--vllm-version", "0.10"] and "--kv-cache-dtype" in flags
    default = resolve_config("llama-3.1-8b", "fp8-kv", "h100", 1, 32768)
    assert default.simulated != cfg.simulated and "--vllm-version" not in default.sim_run_flags()
    for other in (cfg.at(tp=2), with_factors(cfg, "llama-3.1-8b", "bf16", "bf16", {})):
        assert (other.serve.api_server_count, other.vllm_version) == (2, "0.10")
    with pytest.raises(KvlabError, match=r"^--vllm-version '0\.x' is not a version; give X\.Y"):
        PlanRequest(workload="agent", agents=10, gpu="h100", models=["llama-3.1-8b"], vllm_version="0.x")


def test_a_plans_reproduction_runs_as_kvlab_sim_run(tmp_path):
    """Each planned config's `kvlab sim run` command (PlanConfig.sim_run_flags: its typed serve flags
    and the vLLM release) is one `kvlab sim run` accepts and runs the same configuration with."""
    import json
    import shlex

    from conftest import run_kvlab
    from kvlab.plan.configs import resolve_config

    cfg = resolve_config("llama-3.1-8b", "fp8-kv", "h100", 1, 8192,
                         ("--attention-backend", "FLASHINFER", "--api-server-count", "2"), "0.10")
    flags = cfg.sim_run_flags()
    assert "--attention-backend" in flags and "--vllm-version" in flags
    res = run_kvlab("sim", "run", "llama-3.1-8b", "--gpu", "h100", "--workload", "agent-smoke", "--users", "2",
                    "--duration-s", "30", "--out", str(tmp_path / "r"), "--json", *flags)
    assert res.returncode == 0, res.stderr
    run = json.loads(res.stdout)["runs"][0]
    assert (run["api_server_count"], run["vllm_version"], run["kv_cache_dtype"]) == (2, "0.10", "fp8")
    assert run["capacity"]["num_gpu_blocks"] == cfg.sim_config().num_blocks, shlex.join(flags)


@pytest.mark.parametrize("serve_args", [("-O0", "--seed", "3"), ("-cc", '{"cudagraph_mode": "NONE"}'), ("--enforce-eager",)])
def test_a_plan_without_cuda_graphs_reproduces_its_kv_cache_in_kvlab_sim_run(tmp_path, serve_args):
    """vLLM captures no CUDA graphs with --enforce-eager, -O0 or a compilation config whose
    cudagraph_mode is NONE, and from 0.21 then takes no graph memory from the KV budget: the planned
    config and its `kvlab sim run` reproduction size the same, larger cache (untyped flags other than
    those stay out of the reproduction)."""
    import json

    from conftest import run_kvlab
    from kvlab.plan.configs import resolve_config

    cfg = resolve_config("llama-3.1-8b", "bf16", "h100", 1, 8192, serve_args)
    graphs = resolve_config("llama-3.1-8b", "bf16", "h100", 1, 8192)
    assert not cfg.serve.cuda_graphs and cfg.sim_config().num_blocks > graphs.sim_config().num_blocks
    flags = cfg.sim_run_flags()
    assert "--seed" not in flags
    res = run_kvlab("sim", "run", "llama-3.1-8b", "--gpu", "h100", "--workload", "agent-smoke", "--users", "1",
                    "--duration-s", "5", "--out", str(tmp_path / "r"), "--json", *flags)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["runs"][0]["capacity"]["num_gpu_blocks"] == cfg.sim_config().num_blocks
    assert "is accepted but not simulated (the memory model sizes it)" in res.stderr
