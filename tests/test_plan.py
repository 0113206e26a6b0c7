"""The fleet planner (`kvlab plan`): its figures are the simulator's runs of the same configs, the
memory model's HBM, and arithmetic on them; bad input is said plainly with the nearest config."""

import json
import os
from math import ceil
from pathlib import Path

import numpy as np
import pytest
import yaml

from kvlab.schema.plan import PlanRecord
from kvlab.schema.slo import SLO
from kvlab.models import memory
from kvlab.models.cards import card
from kvlab.plan.fleet import shapley
from kvlab.plan.probe import ERROR, INCOMPLETE, OK, Probe, Window, _arrays, probe_meta
from kvlab.plan.rebound import rebound
from kvlab.sim.timing import host_label

# Short sessions and a tight SLO keep the sessions per GPU small, so every probe takes a fraction
# of a second; the planner's arithmetic is the same as for the agent workload.
WORKLOAD = {
    "description": "planner tests",
    "apps": {"count": 2, "system_tokens": {"dist": "uniform", "low": 800, "high": 1200}},
    "session": {"turns": {"dist": "uniform", "low": 2, "high": 4},
                "task_tokens": {"dist": "uniform", "low": 100, "high": 200},
                "tool_result_tokens": {"dist": "lognormal", "median": 150, "sigma": 0.5, "max": 600},
                "max_tokens": {"dist": "uniform", "low": 32, "high": 96},
                "think_time_s": {"dist": "exponential", "mean": 1.0, "max": 5}},
    "limits": {"max_context_tokens": 4000},
    "slo": {"ttft_s": 0.3, "itl_p95_s": 0.012},
}
MODELS = ["deepseek-v2-lite", "llama-3.1-8b"]
QUANTS = ["bf16", "fp8-kv"]
AGENTS = 1000
SIM_S = 40.0


def _probe(rows, sim_s=100.0, warmup_s=20.0):
    cols = ("start_s", "state", "ttft_s", "itl_p95_s")
    a = {k: np.array([r[i] for r in rows], dtype=float) for i, k in enumerate(cols)}
    a["state"] = a["state"].astype(np.int8)
    n = len(rows)
    a.update({k: np.full(n, np.nan) for k in ("tpot_s", "e2e_s")})
    return Probe(1, Window(sim_s, warmup_s), a, {})


def test_judging_counts_unfinished_requests_once_their_outcome_is_known():
    nan = np.nan
    p = _probe([
        (10, OK, 9.0, 9.0),  # in the warm-up: not judged
        (30, OK, 0.5, 0.05),  # worst ratio 0.5: met
        (40, OK, 3.0, 0.05),  # TTFT 1.5x the bound
        (50, ERROR, nan, nan),  # failed: inf
        (60, OK, 1.0, nan),  # one-token reply: no gap to judge
        (99, INCOMPLETE, nan, nan),  # waited 1 s for its first token: not known yet
        (90, INCOMPLETE, nan, nan),  # waited 10 s: 5x the TTFT bound
        (70, INCOMPLETE, 0.5, 0.2),  # its gaps so far are 2x the ITL bound
        (80, INCOMPLETE, 0.5, 0.05),  # within every bound so far: not known yet
    ])
    slo = SLO(ttft_s=2.0, itl_p95_s=0.1)
    v = p.judge(slo, 0.3)
    assert (v.judged, v.met, v.attainment) == (6, 2, 2 / 6)
    assert v.passed and v.margin == 0.5  # 2 of 6 requests must meet it: the 2nd smallest ratio
    v = p.judge(slo, 0.5)
    assert not v.passed and v.margin == 1.5  # sorted ratios 0.5, 0.5, 1.5, 2, 5, inf
    # without a TTFT bound the requests still waiting for a first token are not known to miss
    assert (p.judge(SLO(ttft_s=None, itl_p95_s=0.1), 0.5).judged, p.judge(SLO(ttft_s=None, itl_p95_s=0.1), 0.5).met) == (5, 3)
    # what the finished or failed requests reach: TTFT 0.5, 1.0, 3.0, inf
    assert (v.reached["ttft_s"], p.judge(slo, 0.75).reached["ttft_s"]) == (1.0, 3.0)
    assert set(v.reached) == {"ttft_s", "itl_p95_s"}  # no TPOT or E2E in these records


def test_shapley_shares_add_up_to_the_saving():
    values = {frozenset(): 100.0, frozenset({"model"}): 60.0, frozenset({"kv_cache_dtype"}): 80.0,
              frozenset({"model", "kv_cache_dtype"}): 30.0}
    shares = shapley(values, ["model", "kv_cache_dtype"])
    assert shares == {"model": 45.0, "kv_cache_dtype": 25.0}  # (40 + 50) / 2 and (20 + 30) / 2
    assert sum(shares.values()) == 100.0 - 30.0


def test_rebound_demand_is_volume_times_the_cost_left():
    base = {"gpus": 10, "gpu_demand": 9.5, "hbm_total_gib": 700.0, "hbm_per_gpu_gib": 70.0, "calls_per_day": 1e6}
    half = {"gpus": 5, "gpu_demand": 4.75, "hbm_total_gib": 300.0, "hbm_per_gpu_gib": 60.0, "calls_per_day": 1e6}
    r = rebound("base", base, 1, {"half": (half, 1)}, [50.0, 90.0], [1.0, 2.0, 10.0])
    cell = {(c["cost_drop_pct"], c["volume_x"]): c for c in r["grid"]}
    assert cell[(50.0, 2.0)]["gpus"] == 10 and cell[(50.0, 2.0)]["hbm_vs_today"] == 1.0  # break-even
    assert cell[(90.0, 10.0)]["gpus"] == 10 and cell[(50.0, 10.0)]["gpus"] == ceil(9.5 * 5)
    row = r["configs"][0]
    assert row["cost_drop_pct"] == pytest.approx(50.0) and row["break_even_volume_x"] == pytest.approx(2.0)
    assert [c["gpus"] for c in row["cells"]] == [5, 10, 48]
    assert row["cells"][2]["hbm_vs_today"] == pytest.approx(48 * 60.0 / 700.0)


# -- a plan on the simulator, checked against direct simulator runs --------------------------------


def _plan_in(root: Path, **kw) -> dict:
    """`plan()` with its probe cache in `root`."""
    from kvlab.plan.planner import PlanRequest, plan

    old = os.environ.get("KVLAB_CACHE")
    os.environ["KVLAB_CACHE"] = str(root / "cache")
    try:
        return plan(PlanRequest(**{"workload": str(root / "plan-test.yaml"), "agents": AGENTS, "gpu": "h100",
                                   "models": MODELS, "quants": QUANTS, "gpu_price_per_hour": 2.5, "sim_s": SIM_S,
                                   "tolerance": 0.1, "workers": 2, "out": root / "out", "verbose": False, **kw}))
    finally:
        if old is None:
            os.environ.pop("KVLAB_CACHE", None)
        else:
            os.environ["KVLAB_CACHE"] = old


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    wl_path = root / "plan-test.yaml"
    wl_path.write_text(yaml.safe_dump(WORKLOAD))
    return root, wl_path, _plan_in(root)


def _direct_run(row, wl_path, users):
    """The simulator run of the same config, as `kvlab sim run` makes it."""
    from kvlab.loadtest.workload import load_workload
    from kvlab.sim.config import build_config
    from kvlab.replay.run import run_offline

    kv = {"fp8": "fp8"}.get(row["kv_cache_dtype"], "auto")
    cfg = build_config(row["model"], "h100", max_model_len=4096, kv_cache_dtype=kv)
    res = run_offline(row["model"], "h100", load_workload(wl_path), SIM_S, concurrency=users, seed=0, config=cfg,
                      scrape_interval_s=2.0)
    probe = Probe(users, Window(SIM_S, SIM_S / 3), _arrays(res.records, res.samples), probe_meta(cfg, res.results))
    probe.engine, probe.records, probe.cfg = res.engine, res.records, cfg
    return probe


def test_sessions_per_gpu_agree_with_the_simulator(planned):
    root, wl_path, result = planned
    slo = SLO(**WORKLOAD["slo"])
    rows = {r["config"]: r for r in result["configs"]}
    assert set(rows) == {f"{m}/{q}" for m in MODELS for q in QUANTS}
    for row in rows.values():
        s, f = row["search"], row["figures"]
        c = s["sessions_per_replica"]
        assert s["status"] == "ok" and c >= 1 and s["missed_at"] > c
        direct = _direct_run(row, wl_path, c)
        v = direct.judge(slo, 0.95)
        assert v.passed and v.attainment == f["probe"]["attainment"]
        fig = direct.figures()
        for key in ("requests_completed", "output_tokens", "calls_per_s", "kv_in_use_bytes_mean", "prompt_tokens_per_s",
                    "api_server_load"):
            assert f["probe"][key] == pytest.approx(fig[key], rel=1e-12), key
        assert not _direct_run(row, wl_path, s["missed_at"]).judge(slo, 0.95).passed
        # the fleet: every config serves the calls of AGENTS agents as busy as the baseline's sessions
        assert f["concurrent_sessions"] == pytest.approx(AGENTS * result["inputs"]["calls_per_agent_hour"]
                                                         / f["calls_per_session_hour"])
        assert f["calls_per_day"] == pytest.approx(AGENTS * result["inputs"]["calls_per_agent_hour"] * 24)
        assert f["gpus"] == ceil(f["concurrent_sessions"] / c - 1e-9)
        assert f["usd_per_day"] == f["gpus"] * 2.5 * 24
    base = rows[result["baseline"]]["figures"]
    assert base["concurrent_sessions"] == pytest.approx(AGENTS) and base["gpus"] == ceil(AGENTS / base["sessions_per_replica"])


def test_the_api_server_load_is_the_simulated_front_ends_work(planned):
    """The planner's API-server load (work per second computed from the window's requests, prompt
    tokens and outputs at the front end's per-unit costs) counts what the simulated front end did:
    over a whole run, the same formula on every request taken in gives the engine's own tally of
    front-end work; and the plan's line names the configs near one process's limit."""
    from kvlab.plan.tables import api_server_line

    root, wl_path, result = planned
    for row in result["configs"]:
        direct = _direct_run(row, wl_path, row["search"]["sessions_per_replica"])
        cfg, recs = direct.cfg, direct.records
        assert cfg.frontend_per_prompt_token_s > 0  # the measured tokenising cost is on
        # every request taken in (unfinished ones too: their records keep no partial output, so the
        # outputs are the engine's own count of generated tokens, one streamed output each)
        generated = direct.engine.metrics.counters["vllm:generation_tokens"]
        assert generated >= sum(r["completion_tokens"] or 0 for r in recs)
        # and each step with outputs its per-step cost (the release's measured streaming): nearly every step
        assert 0.9 * direct.engine.num_steps < direct.engine.frontend_steps <= direct.engine.num_steps
        expected = (sum(cfg.frontend_per_request_s + cfg.frontend_per_prompt_token_s * r["prompt_tokens"] for r in recs)
                    + cfg.frontend_per_output_s * generated + cfg.frontend_per_step_s * direct.engine.frontend_steps)
        assert cfg.frontend_per_step_s > 0 and direct.engine.frontend_work_s == pytest.approx(expected, rel=1e-9)
        load = row["figures"]["probe"]["api_server_load"]
        assert 0 < load == pytest.approx(direct.figures()["api_server_load"], rel=1e-12)
    line = api_server_line(result)
    assert line.startswith("API server (per process), seconds of work per second at the planned load (computed: "
                           "2 us per prompt token, 117 us per streamed output, 0.8 ms per engine step, 2.5 ms per "
                           "request; streaming measured on vLLM 0.32.0): ")
    heavy = {**result, "configs": [{**result["configs"][0], "figures": {"probe": {"api_server_load": 0.93}}}]}
    assert api_server_line(heavy).endswith(f"{result['configs'][0]['config']} 0.93; near one process's limit: "
                                           f"{result['configs'][0]['config']} (vLLM's --api-server-count N in "
                                           "serve_args runs N API-server processes, each taking 1/N of the work)")


def test_each_config_names_its_timing_source(planned):
    """plan.json says per config what priced its simulated steps (the simulator's config, as
    `kvlab sim run` builds it) and how its chosen probe's steps were priced."""
    from kvlab.schema.plan import PlanRecord
    from kvlab.sim.config import build_config

    root, _, result = planned
    record = PlanRecord.read(root / "out" / "plan.json")
    for c in record.configs:
        kv = {"fp8": "fp8"}.get(c.kv_cache_dtype, "auto")
        assert c.timing_source == build_config(c.model, "h100", max_model_len=4096, kv_cache_dtype=kv).cost.timing_source
        assert c.timing_provenance and sum(c.timing_provenance.values()) > 0
        assert c.host_source.startswith(host_label("0.32.0") + "; API server")
        assert set(c.timing_provenance) <= {"measured", "interpolated", "extrapolated", "scaled", "composed", "roofline"}
    assert "timing_source" in result["provenance"]


def test_hbm_is_the_memory_models_per_gpu(planned):
    _, _, result = planned
    for row in result["configs"]:
        f = row["figures"]
        kv = "fp8" if row["kv_cache_dtype"] == "fp8" else "auto"
        cap = memory.capacity(card(row["model"]).arch, model_name=row["model"], gpu="h100", max_model_len=4096,
                              kv_cache_dtype=kv)
        per_gpu = cap.weight_bytes_per_gpu + cap.num_blocks * cap.bytes_per_block
        assert f["hbm_total_gib"] == pytest.approx(f["gpus"] * per_gpu / memory.GiB, rel=1e-12)
        assert f["hbm_kv_gib"] == pytest.approx(f["gpus"] * cap.num_blocks * cap.bytes_per_block / memory.GiB, rel=1e-12)
        assert f["kv_bytes_per_token"] == cap.kv_bytes_per_token_model
    by = {r["config"]: r["figures"] for r in result["configs"]}
    # MLA holds a session's context in fewer KV bytes: 31,104 vs 131,072 per token (bf16)
    assert by["deepseek-v2-lite/bf16"]["kv_final_context_mib_per_session"] / by["llama-3.1-8b/bf16"][
        "kv_final_context_mib_per_session"] == pytest.approx(31104 / 131072)


def test_savings_are_split_by_factor(planned):
    _, _, result = planned
    assert result["baseline"] == "llama-3.1-8b/bf16"  # the first GQA model
    rows = {r["config"]: r for r in result["configs"]}
    s = rows["deepseek-v2-lite/fp8-kv"]["savings"]
    assert s["factors_changed"] == ["model", "kv_cache_dtype"]
    assert s["via"] == {"baseline": "llama-3.1-8b/bf16", "model": "deepseek-v2-lite/bf16",
                        "kv_cache_dtype": "llama-3.1-8b/fp8-kv", "kv_cache_dtype+model": "deepseek-v2-lite/fp8-kv"}
    base_gpus = rows["llama-3.1-8b/bf16"]["figures"]["gpus"]
    for metric in ("gpus", "hbm_total_gib", "usd_per_day"):
        m = s[metric]
        assert m["saved"] == pytest.approx(m["baseline"] - m["config"])
        assert sum(m["by_factor"].values()) == pytest.approx(m["saved"])
    # one factor changed: all of the saving is that factor's
    one = rows["llama-3.1-8b/fp8-kv"]["savings"]["gpus"]
    assert one["baseline"] == base_gpus and one["by_factor"] == {"kv_cache_dtype": one["saved"]}
    assert result["attribution_configs"] == []  # the four configs span both factors themselves


def test_rebound_table_and_plot(planned):
    _, _, result = planned
    reb = result["rebound"]
    base = {r["config"]: r for r in result["configs"]}[result["baseline"]]["figures"]
    assert reb["today"]["gpus"] == base["gpus"]
    figs = {r["config"]: r["figures"] for r in result["configs"]}
    for row in reb["configs"]:  # at today's calls (K = 1) a config's own fleet
        assert row["cells"][0]["volume_x"] == 1.0 and row["cells"][0]["gpus"] == figs[row["config"]]["gpus"]
    assert len(reb["grid"]) == 4 * 5 and {c["config"] for c in reb["configs"]} == {
        "deepseek-v2-lite/bf16", "deepseek-v2-lite/fp8-kv", "llama-3.1-8b/fp8-kv"}
    for c in reb["grid"]:
        assert c["gpus"] == ceil(base["gpu_demand"] * c["volume_x"] * (1 - c["cost_drop_pct"] / 100) - 1e-9)
    png = Path(reb["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_json_reuses_the_cached_probes_and_reproduces_with_sim_run(planned, kvlab, tmp_path):
    root, wl_path, result = planned
    env = {"KVLAB_CACHE": str(root / "cache")}
    r = kvlab("plan", "--workload", str(wl_path), "--agents", str(AGENTS), "--gpu", "h100", "--models", ",".join(MODELS),
              "--quants", ",".join(QUANTS), "--gpu-price", "2.5", "--sim-s", f"{SIM_S:g}", "--tolerance", "0.1",
              "--out", str(tmp_path / "cli"), "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["run"]["probes_cached"] == out["run"]["probes"] == result["run"]["probes"]
    assert [c["figures"]["gpus"] for c in out["configs"]] == [c["figures"]["gpus"] for c in result["configs"]]
    assert json.loads((tmp_path / "cli" / "plan.json").read_text())["configs"] == out["configs"]
    # plan.json is one typed record; a plan written before schema_version (the same keys) still reads
    typed = PlanRecord.read(tmp_path / "cli" / "plan.json")
    assert [c.figures.gpus for c in typed.configs] == [c["figures"]["gpus"] for c in out["configs"]]
    assert typed.rebound.today.config == out["baseline"] and typed.configs[0].search.probes
    (tmp_path / "old-plan.json").write_text(json.dumps({k: v for k, v in out.items() if k != "schema_version"}))
    assert PlanRecord.read(tmp_path / "old-plan.json") == typed
    # the reproducing command is a plain `kvlab sim run` of the probe at the answer
    row = next(c for c in out["configs"] if c["config"] == "deepseek-v2-lite/fp8-kv")
    argv = row["search"]["reproduce"].split()
    assert argv[:3] == ["kvlab", "sim", "run"]
    run = kvlab(*argv[1:], "--out", str(tmp_path / "sim"), "--json")
    assert run.returncode == 0, run.stderr
    sim = json.loads(run.stdout)["runs"][0]
    assert sim["requests_completed"] == row["figures"]["probe"]["requests_completed"]
    assert sim["output_tokens"] == row["figures"]["probe"]["output_tokens"]
    # the table prints the same plan
    t = kvlab("plan", "--workload", str(wl_path), "--agents", str(AGENTS), "--gpu", "h100", "--models", ",".join(MODELS),
              "--quants", ",".join(QUANTS), "--sim-s", f"{SIM_S:g}", "--tolerance", "0.1", "--out", str(tmp_path / "t"),
              env={**env, "COLUMNS": "250"})
    assert t.returncode == 0, t.stderr
    assert "Savings against llama-3.1-8b/bf16" in t.stdout and "break-even K" in t.stdout


def test_calls_per_agent_hour_and_another_baseline(planned):
    root, _, result = planned
    llama = {r["config"]: r for r in result["configs"]}["llama-3.1-8b/bf16"]["figures"]
    rate = llama["calls_per_session_hour"] / 4  # agents busy a quarter of the time
    r = _plan_in(root, calls_per_agent_hour=rate, baseline="deepseek-v2-lite/bf16", out=root / "quarter")
    assert r["run"]["probes_cached"] == r["run"]["probes"]  # only the demand changed: no new simulation
    rows = {x["config"]: x for x in r["configs"]}
    f = rows["llama-3.1-8b/bf16"]["figures"]
    assert f["concurrent_sessions"] == pytest.approx(AGENTS / 4)
    assert f["gpus"] == ceil(AGENTS / 4 / f["sessions_per_replica"] - 1e-9)
    assert r["baseline"] == "deepseek-v2-lite/bf16" and rows["deepseek-v2-lite/bf16"]["savings"]["gpus"]["saved"] == 0
    # savings are against the new baseline (which model needs fewer GPUs under this tight ITL bound
    # depends on the clock: Llama is priced from kernel tables, DeepSeek-V2-Lite by the roofline)
    assert rows["llama-3.1-8b/bf16"]["savings"]["gpus"]["saved"] == rows["deepseek-v2-lite/bf16"]["figures"]["gpus"] - f["gpus"]


def test_a_gpu_that_cannot_hold_one_session_names_the_nearest_config(kvlab, tmp_path):
    wl = tmp_path / "w.yaml"
    wl.write_text(yaml.safe_dump(WORKLOAD))
    r = kvlab("plan", "--workload", str(wl), "--agents", "10", "--gpu", "rtx-4090", "--models", "deepseek-v2-lite",
              "--quants", "bf16", "--out", str(tmp_path / "o"), env={"KVLAB_CACHE": str(tmp_path / "c")})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no config can be planned: deepseek-v2-lite/bf16: rtx-4090 cannot hold it" in r.stderr
    assert "nearest that works: deepseek-v2-lite/fp8 on rtx-4090 (--quant fp8)" in r.stderr


def test_an_slo_no_config_meets_says_what_one_session_reaches(kvlab, tmp_path):
    """6.5 ms per token: one session of Llama-3.1-8B on an H100 decodes slower than that (its 16 GB of
    weights are read every step: 4.8 ms at the data sheet's 3.35 TB/s, plus attention and 1 ms of
    host time: 7.3 ms simulated), on an H100 NVL (3.9 TB/s, the next preset up by bandwidth) faster:
    the nearest config that works is the H100 NVL."""
    wl = tmp_path / "w.yaml"
    wl.write_text(yaml.safe_dump(WORKLOAD))
    r = kvlab("plan", "--workload", str(wl), "--agents", "10", "--gpu", "h100", "--models", "llama-3.1-8b",
              "--quants", "bf16", "--slo", "itl_p95_s=0.0065", "--sim-s", "40", "--out", str(tmp_path / "o"),
              env={"KVLAB_CACHE": str(tmp_path / "c")})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no config meets the SLO: llama-3.1-8b/bf16: even one session misses the SLO" in r.stderr
    assert "at one session 95% of requests stay within" in r.stderr
    assert "nearest that works: llama-3.1-8b/bf16 on h100-nvl (--gpu h100-nvl)" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--agents", "0"], "--agents must be at least 1"),
    (["--slo", "ttft=1"], "--slo: unknown threshold 'ttft'"),
    (["--slo", "ttft_s"], "is not THRESHOLD=VALUE"),
    (["--quants", "int3"], "llama-3.1-8b has no quantization level 'int3'"),
    (["--cost-drop", "120"], "--cost-drop values are percentages"),
])
def test_bad_flags_are_one_line_errors(kvlab, tmp_path, args, message):
    base = {"--agents": "10", "--quants": "bf16"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    r = kvlab("plan", "--workload", "agent", "--gpu", "h100", "--models", "llama-3.1-8b",
              *[x for kv in base.items() for x in kv], "--out", str(tmp_path))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_configs_between_baseline_and_target_change_one_factor_at_a_time():
    from kvlab.plan.configs import resolve_config
    from kvlab.plan.planner import PlanRequest, _corners, _quant_names

    req = PlanRequest(workload="agent", agents=1, gpu="h100", models=["llama-3.1-8b", "deepseek-v2-lite"], quants=["bf16"])
    names = _quant_names(req, 32768)
    assert names[("llama-3.1-8b", "fp8", "bf16")] == "fp8-kv" and names[("deepseek-v2-lite", "bf16", "awq")] == "awq"
    base = resolve_config("llama-3.1-8b", "bf16", "h100", 1, 32768)
    target = resolve_config("deepseek-v2-lite", "fp8+fp8-kv", "h100", 1, 32768)
    assert (base.factors, target.factors) == ({"model": "llama-3.1-8b", "kv_cache_dtype": "bf16", "weights": "bf16"},
                                              {"model": "deepseek-v2-lite", "kv_cache_dtype": "fp8", "weights": "fp8"})
    corners = _corners(base, target, names)
    assert len(corners) == 8 and corners[frozenset()] is base and corners[frozenset(base.factors)] is target
    labels = {"+".join(sorted(k)): c.label for k, c in corners.items()}
    assert labels["kv_cache_dtype"] == "llama-3.1-8b/fp8-kv" and labels["weights"] == "llama-3.1-8b/fp8"
    assert labels["model"] == "deepseek-v2-lite/bf16" and labels["kv_cache_dtype+weights"] == "llama-3.1-8b/fp8+fp8-kv"
    assert corners[frozenset({"model", "kv_cache_dtype"})].serve.kv_cache_dtype == "fp8"
    assert corners[frozenset({"weights"})].sim_config().capacity.quantization == "fp8"
    assert target.sim_run_flags() == ["--quantization", "fp8", "--kv-cache-dtype", "fp8", "--max-model-len", "32768"]


def test_a_specs_plan_block_is_planned_into_its_results_and_reported(planned, tmp_path, monkeypatch):
    """`kvlab plan --spec` takes the configs, workload, GPU, SLO, price and plan: block of an
    experiment spec and writes results/<spec>/plan, where `kvlab report` finds it; `kvlab
    experiment run` plans the same way after its cells."""
    import subprocess
    import sys

    from kvlab.experiments.cli import _plan_after
    from kvlab.experiments.spec import load_spec

    root, wl_path, result = planned
    spec = {"name": "plan-spec", "engine": "sim", "gpu": "h100", "models": MODELS, "quants": QUANTS,
            "workloads": [str(wl_path)], "slo": WORKLOAD["slo"], "gpu_price_per_hour": 2.5,
            "plan": {"agents": AGENTS, "sim_s": SIM_S}}
    (tmp_path / "plan-spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "KVLAB_CACHE": str(root / "cache")}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "kvlab", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)

    r = run("plan", "--spec", "plan-spec.yaml", "--tolerance", "0.1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["out_dir"] == str(Path("results") / "plan-spec" / "plan")
    assert out["run"]["probes_cached"] == out["run"]["probes"]  # the same searches as the fixture's plan
    assert [(c["config"], c["figures"]["gpus"]) for c in out["configs"]] == \
        [(c["config"], c["figures"]["gpus"]) for c in result["configs"]]
    assert out["inputs"]["gpu_price_per_hour"] == 2.5 and out["inputs"]["agents"] == AGENTS
    # flags override the spec: another folder, another agent count (the same searches, cached)
    r = run("plan", "--spec", "plan-spec.yaml", "--tolerance", "0.1", "--out", "elsewhere", "--agents", "10", "--json")
    assert r.returncode == 0, r.stderr
    other = json.loads(r.stdout)
    assert (other["out_dir"], other["inputs"]["agents"]) == ("elsewhere", 10) and (tmp_path / "elsewhere" / "plan.json").is_file()
    assert other["run"]["probes_cached"] == other["run"]["probes"]

    r = run("report", "results/plan-spec")
    assert r.returncode == 0, r.stderr
    rep = tmp_path / "results" / "plan-spec" / "report"
    html = (rep / "index.html").read_text()
    timing = {c["timing_source"] for c in result["configs"]}
    label = f"simulated (timing: {'; '.join(dict.fromkeys(c['timing_source'] for c in result['configs']))})"
    assert f"Fleet plan ({label})" in html and "break-even K" in html and 'alt="rebound"' in html
    assert all(src in html for src in timing)
    fleet_rows = {x["config"]: x for x in json.loads((rep / "fleet-plan.json").read_text())}
    for c in result["configs"]:
        assert fleet_rows[c["config"]]["gpus"] == c["figures"]["gpus"]
        assert fleet_rows[c["config"]]["hbm_total_gib"] == pytest.approx(c["figures"]["hbm_total_gib"])
    assert fleet_rows["llama-3.1-8b/bf16"]["baseline"]
    assert f"## Fleet plan ({label})" in (rep / "summary.md").read_text()
    hosts = "; ".join(dict.fromkeys(c["host_source"] for c in result["configs"]))
    assert f"Simulated time outside the steps: {hosts}." in (rep / "summary.md").read_text()
    for c in result["configs"]:  # the planned load's throughput and latencies, and $ per 1M tokens, shown
        row = fleet_rows[c["config"]]
        assert row["output_tokens_per_s_per_gpu"] == pytest.approx(c["figures"]["probe"]["output_tokens_per_s"])
        assert row["ttft_p95_s"] == c["figures"]["probe"]["ttft_p95_s"]
        assert row["usd_per_1m_tokens"] == pytest.approx(c["figures"]["usd_per_1m_tokens"])
        assert row["api_server_load"] == c["figures"]["probe"]["api_server_load"] > 0  # the API server's load
        assert f'data-figure="api_server_load">{row["api_server_load"]:.2f}</td>' in html

    # experiment run's path: the plan: block after the cells, into the run's folder
    folder = tmp_path / "run"
    monkeypatch.setenv("KVLAB_CACHE", str(root / "cache"))
    assert _plan_after(load_spec(tmp_path / "plan-spec.yaml"), folder) is True
    assert json.loads((folder / "plan" / "plan.json").read_text())["baseline"] == "llama-3.1-8b/bf16"


def test_plan_from_a_spec_without_a_plan_block_or_gpu_says_what_to_add(kvlab, tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "models": ["llama-3.1-8b"]}))
    r = kvlab("plan", "--spec", str(spec))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "spec s has no plan: block; add one (plan: {agents: 10000}) or pass --agents" in r.stderr
    r = kvlab("plan", "--spec", str(spec), "--agents", "10")
    assert r.returncode == 2 and "spec s names no gpu: add gpu: h100 (kvlab gpus) or pass --gpu" in r.stderr
    r = kvlab("plan", "--workload", "agent")
    assert r.returncode == 2 and "kvlab plan needs --agents, --gpu, --models (or --spec SPEC with a plan: block)" in r.stderr
    r = kvlab("plan", "--gpu", "h100")  # the workload defaults to agent, as for kvlab load and kvlab sim run
    assert r.returncode == 2 and "kvlab plan needs --agents, --models (or --spec SPEC with a plan: block)" in r.stderr


def test_a_probes_cache_key_covers_the_kernel_data_and_the_host_time(monkeypatch):
    """A cached probe is reused only for the same simulation: the kernel data the steps are priced from
    (kvlab/data/kernels, beside aiconfigurator's tables) and the host time are in its key."""
    from kvlab.plan import probe
    from kvlab.plan.configs import resolve_config
    from kvlab.sim import timing

    root = Path(probe.__file__).resolve().parents[1]
    files = {f.relative_to(root).as_posix() for f in probe.digest_files()}
    assert {"data/kernels/gemm_perf.csv", "data/kernels/quant_gemm_perf.csv", "sim/timing.py", "sim/kernels.py"} <= files
    cfg = resolve_config("llama-3.1-8b", "bf16", "h100", 1, 8192)
    from kvlab.loadtest.workload import load_workload

    workload = load_workload("agent")

    def key():
        probe._sources.cache_clear()
        return probe.probe_key(cfg, workload, 0, 8, Window(sim_s=120.0, warmup_s=40.0))

    before = key()
    monkeypatch.setattr(timing, "HOST_FITTED", {(0, 0, 0): (0.002, 0.0)})
    monkeypatch.setattr(timing, "STEP_OVERHEAD_S", 0.002)
    after = key()
    monkeypatch.undo()
    probe._sources.cache_clear()
    assert after != before
