"""One quantization name per level, end to end: `fp8+fp8-kv` in a spec is the name every record,
the index, `kvlab experiment ls` and the report show; the weight format and KV-cache dtype are
typed fields beside it; vLLM's flag values (`--quantization fp8 --kv-cache-dtype fp8`) appear in
the server's argv and nowhere else in the records."""

import json

import pytest

from kvlab.analysis import tables
from kvlab.analysis.runs import load_runs
from kvlab.experiments import index
from kvlab.schema.experiment import Manifest

LEVEL = "fp8+fp8-kv"
MODEL = "llama-3.1-8b"
SPEC = {
    "name": "one-name",
    "gpu": "h100",
    "models": [MODEL],
    "quants": [LEVEL],
    "workloads": ["agent-smoke"],
    "load": {"shape": "constant", "users": [2]},
    "duration_s": "3s",
    "warmup_s": 0,
    "max_model_len": 4096,
}
# The other spellings the same choice had before the serve configuration type: none may appear.
OTHER_NAMES = ("fp8_per_block", "fp8-block", "fp8_e4m3", "fp8_per_tensor")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import run_sim_cell

    return run_sim_cell(tmp_path_factory.mktemp("one-name"), SPEC, f"{MODEL}__{LEVEL}__agent-smoke__u2")


def test_the_level_is_the_name_and_the_formats_are_typed_fields(run):
    out, rdir, res = run
    assert res.cell.quant == LEVEL
    assert res.prediction.quantization == "fp8"  # the memory model's weight format
    assert res.prediction.kv_cache_dtype == "fp8"
    assert res.server.cache_dtype == "fp8"  # what the (simulated) server reports
    argv = Manifest.read(rdir / "manifest.json").server_argv
    i, j = argv.index("--quantization"), argv.index("--kv-cache-dtype")
    assert (argv[i + 1], argv[j + 1]) == ("fp8", "fp8")  # vLLM's flag values, in the argv


def test_index_ls_and_report_show_the_one_name(run, kvlab, tmp_path):
    from kvlab.analysis.report import build_report

    out, _, _ = run
    (row,) = index.query(out)
    assert row["quant"] == LEVEL
    listed = json.loads(kvlab("experiment", "ls", str(out), "--json").stdout)
    assert [r["quant"] for r in listed["repeats"]] == [LEVEL]
    rs = load_runs([out])
    cfg = tables.configs(rs).to_dict(orient="records")[0]
    assert cfg["quant"] == LEVEL and LEVEL in cfg["config"]
    rep = build_report([out], out=tmp_path / "rep")
    assert LEVEL in rep.html.read_text() and LEVEL in rep.summary_md.read_text()


def test_no_other_spelling_in_any_record(run):
    out, _, _ = run
    for path in out.rglob("*.json"):
        text = path.read_text()
        for name in OTHER_NAMES:
            assert name not in text, f"{path} says {name}"
