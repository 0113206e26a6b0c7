"""bench/published_runs.yaml loads, validates and keeps its declared train/test split."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from kvlab.errors import KvlabError

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("published_runs", ROOT / "bench" / "published_runs.py")
published_runs = importlib.util.module_from_spec(_spec)
sys.modules["published_runs"] = published_runs  # pydantic resolves the module's annotations through it
_spec.loader.exec_module(published_runs)


@pytest.fixture(scope="module")
def pub():
    return published_runs.load()


@pytest.fixture(scope="module")
def _raw() -> dict:
    return yaml.safe_load(published_runs.PATH.read_text())


@pytest.fixture
def raw(_raw) -> dict:
    return copy.deepcopy(_raw)


def _check(data: dict):
    return published_runs.validate(data, "runs.yaml")


def test_file_loads_with_enough_rows_and_a_declared_split(pub):
    assert len(pub.runs) >= 30
    assert pub.split_rule == published_runs.SPLIT_RULE
    assert 0.4 <= pub.test_share() <= 0.6
    assert all(r.split == published_runs.split_of(r.split_group) for r in pub.runs)


def test_every_ratio_pairs_two_runs_on_one_gpu_and_one_side(pub):
    by_id = pub.by_id()
    assert len(pub.ratios) >= 10
    for q in pub.ratios:
        a, b = by_id[q.a], by_id[q.b]
        assert a.gpu == b.gpu and a.split == b.split and a.id != b.id


def test_rows_cover_the_gpus_formats_and_figures_the_issue_asks_for(pub):
    gpus = {r.gpu for r in pub.runs}
    assert {"h100", "h200", "a100-80gb", "l40s", "rtx-4090"} <= gpus
    formats = {r.quantization for r in pub.runs} | {r.kv_cache_dtype for r in pub.runs}
    assert {None, "fp8", "awq", "fp8_e4m3"} <= formats
    figures = set().union(*(r.measured.figures() for r in pub.runs))
    assert {"output_throughput", "mean_ttft_ms", "mean_tpot_ms", "median_itl_ms"} <= figures


def test_markdown_lists_every_run_and_ratio(pub):
    text = published_runs.markdown(pub)
    assert text.count("\n| ") >= len(pub.runs) + len(pub.ratios)
    assert all(r.id in text for r in pub.runs) and all(q.id in text for q in pub.ratios)
    assert all(f"| {c.id} | {c.doc} |" in text for c in pub.miss_causes)


def test_main_prints_the_table(capsys):
    assert published_runs.main([]) == 0
    assert "| id | model | GPU |" in capsys.readouterr().out


def test_duplicate_id_is_refused(raw):
    raw["runs"].append(dict(raw["runs"][0]))
    with pytest.raises(KvlabError, match="duplicate id: gpustack-q8-rtx4090-bf16"):
        _check(raw)
    del raw["runs"][-1]
    raw["miss_causes"].append(dict(raw["miss_causes"][0]))
    with pytest.raises(KvlabError, match=f"duplicate id: {raw['miss_causes'][0]['id']}"):
        _check(raw)


def test_ratio_naming_an_unknown_run_is_refused(raw):
    raw["ratios"][0]["b"] = "no-such-run"
    with pytest.raises(KvlabError, match="names no run no-such-run"):
        _check(raw)


def test_hand_moved_split_is_refused(raw):
    run = raw["runs"][0]
    run["split"] = "test" if run["split"] == "train" else "train"
    with pytest.raises(KvlabError, match=r"runs\[0\] \(gpustack-q8-rtx4090-bf16\): split is"):
        _check(raw)


def test_missing_split_and_bad_figure_are_one_line_errors(raw):
    del raw["runs"][1]["split"]
    with pytest.raises(KvlabError, match=r"runs\[1\] \(gpustack-q8-rtx4090-awq\)\.split: Field required") as e:
        _check(raw)
    assert "\n" not in str(e.value)
    raw["runs"][1]["split"] = "train"
    raw["runs"][0]["measured"] = {"mean_ttft_ms": -1}
    with pytest.raises(KvlabError, match="positive and finite"):
        _check(raw)


def test_bad_path_exits_2_with_one_line(tmp_path, capsys):
    assert published_runs.main([str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_a_range_ratio_on_sharegpt_or_out_of_range_is_refused(raw):
    sharegpt = next(i for i, r in enumerate(raw["runs"]) if r["dataset"] == "sharegpt")
    raw["runs"][sharegpt]["random_range_ratio"] = 0.1
    with pytest.raises(KvlabError, match="random_range_ratio applies to the random datasets"):
        _check(raw)
    del raw["runs"][sharegpt]["random_range_ratio"]
    raw["runs"][sharegpt]["dataset"] = "random"
    raw["runs"][sharegpt]["random_range_ratio"] = 1.0
    with pytest.raises(KvlabError, match="random_range_ratio: Input should be less than 1"):
        _check(raw)


def test_a_random_runs_generated_total_is_at_most_what_it_asked_for(raw):
    run = next(r for r in raw["runs"] if r["dataset"] == "random" and r.get("total_output_tokens")
               and not r.get("random_range_ratio"))
    run["total_output_tokens"] = run["num_prompts"] * run["output_len"] + 1
    with pytest.raises(KvlabError, match="total_output_tokens .* is more than the"):
        _check(raw)


def test_a_miss_names_a_stated_figure_and_a_stated_cause(raw):
    run = next(r for r in raw["runs"] if r.get("misses"))
    unstated = next(f for f in published_runs.Measured.model_fields if f not in run["measured"])
    run["misses"] = {unstated: raw["miss_causes"][0]["id"]}
    with pytest.raises(KvlabError, match=f"misses names a figure the run does not state: {unstated}"):
        _check(raw)
    figure = next(iter(run["measured"]))
    run["misses"] = {figure: "no-such-cause"}
    with pytest.raises(KvlabError, match=f"run {run['id']} names no stated miss cause no-such-cause"):
        _check(raw)


def test_every_stated_cause_is_told_in_the_validation_docs(pub):
    """Each cause's `doc` is the bold heading of an entry in docs/simulator-validation.md, where its
    evidence is; and each is named by at least one figure."""
    doc = (ROOT / "docs" / "simulator-validation.md").read_text(encoding="utf-8")
    named = {c for r in pub.runs for c in r.misses.values()}
    for c in pub.miss_causes:
        assert f"- **{c.doc}**" in doc, c.id
        assert c.id in named, c.id


def test_a_closed_loop_window_needs_its_users_and_fixed_lengths(raw):
    loop = next(r for r in raw["runs"] if r.get("closed_loop"))
    assert loop["max_concurrency"] and loop["input_len"] == 512
    loop["max_concurrency"] = None
    with pytest.raises(KvlabError, match="a closed-loop window needs max_concurrency"):
        _check(raw)
