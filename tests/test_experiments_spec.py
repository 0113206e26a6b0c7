"""Spec validation: every bad input is a one-line error naming the field, before anything starts."""

import pytest

from kvlab.errors import KvlabError
from kvlab.experiments.spec import cells, load_spec, validate_spec

GOOD = {"name": "t", "models": ["deepseek-v2-lite", "llama-3.1-8b"], "quants": ["bf16"],
        "workloads": ["agent-smoke"], "load": {"users": [2]}, "duration_s": "30s"}


@pytest.mark.parametrize("name", ["cpu-smoke", "mla-vs-gqa", "quant-sweep", "agents-ladder"])
def test_shipped_specs_are_valid(name):
    spec = load_spec(f"experiments/{name}.yaml")
    assert cells(spec)


def test_quant_sweep_skips_levels_a_model_lacks():
    spec = load_spec("experiments/quant-sweep.yaml")
    pairs = {(c.model, c.quant) for c in cells(spec)}
    assert ("deepseek-v2-lite", "awq") in pairs and ("deepseek-v2-lite", "gptq") in pairs
    assert ("qwen3-30b-a3b", "awq") not in pairs and ("qwen3-30b-a3b", "fp8") in pairs


@pytest.mark.parametrize("change,message", [
    ({"models": ["deepseek-v2-lit"]}, "field models: unknown model 'deepseek-v2-lit': did you mean deepseek-v2-lite"),
    ({"quants": ["int3"]}, "field quants: deepseek-v2-lite has no quantization level 'int3'"),
    ({"quants": ["awq"], "models": ["qwen3-30b-a3b"]}, "or set skip_missing: true"),
    ({"workloads": ["nope"]}, "nope"),
    ({"colour": "red"}, "field colour: Extra inputs are not permitted"),
    ({"duration_s": "soon"}, "field duration_s: not a duration: 'soon'"),
    ({"duration_s": "-5s"}, "field duration_s"),
    ({"load": {"users": [0]}}, "field load.users: every load level must be at least 1 user"),
    ({"load": {"shape": "steps", "users": [8], "step_s": 120}}, "load.step_s is longer than duration_s"),
    ({"engine": "tpu"}, "field engine"),
    ({"gpu": "h900"}, "unknown GPU 'h900'"),
    ({"repeats": 0}, "field repeats"),
    ({"name": "../escape"}, "field name"),
    ({"models": ["llama-3.1-8b", "llama-3.1-8b"]}, "models lists an entry twice"),
])
def test_bad_specs_name_the_field(change, message):
    with pytest.raises(KvlabError, match=None) as e:
        validate_spec({**GOOD, **change}, "spec.yaml")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_spec_file(kvlab):
    r = kvlab("experiment", "run", "no-such-spec")
    assert r.returncode == 2 and "no experiment spec at no-such-spec" in r.stderr


def test_one_slo_type_with_the_same_keys_in_a_spec_and_a_workload():
    from kvlab.loadtest.workload import Workload, load_workload
    from kvlab.schema.slo import SLO

    spec = validate_spec({**GOOD, "slo": {"ttft_s": 1.5, "itl_p95_s": None, "e2e_s": 9}})
    assert type(spec.slo) is SLO and spec.slo_given == SLO(ttft_s=1.5, itl_p95_s=None, e2e_s=9)
    assert type(load_workload("agent-smoke").slo) is SLO
    assert Workload.model_fields["slo"].annotation is SLO
    # a spec without slo: leaves each workload's SLO to score its cells
    assert validate_spec(GOOD).slo_given is None
    with pytest.raises(KvlabError, match="slo"):
        validate_spec({**GOOD, "slo": {"ttft": 1}})
    with pytest.raises(KvlabError, match="slo"):
        validate_spec({**GOOD, "slo": {"ttft_s": 0}})
