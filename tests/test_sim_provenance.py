"""Every simulated figure names what priced its steps: `kvlab sim run`'s results.json says the
timing source and the run's engine steps per provenance (measured, interpolated, extrapolated,
roofline); the runner reads the same from the sim server's kvlab:sim_* series."""

from kvlab.experiments.runner import sim_timing
from kvlab.metrics.samples import SampleWriter
from kvlab.replay.run import run_offline
from kvlab.sim.config import build_config


def test_sim_run_results_say_the_timing_source_and_steps_per_provenance(tmp_path):
    cfg = build_config("llama-3.1-8b", "h100", max_model_len=8192)
    first = run_offline("llama-3.1-8b", "h100", "agent-smoke", 20, concurrency=2, config=cfg, out_dir=tmp_path / "a")
    res = first.results
    assert res["timing_source"] == cfg.cost.timing_source
    assert set(res["timing_provenance"]) <= {"measured", "interpolated", "extrapolated", "roofline"}
    assert sum(res["timing_provenance"].values()) == res["engine_steps"] > 0
    # the same config again: this run's steps only
    again = run_offline("llama-3.1-8b", "h100", "agent-smoke", 20, concurrency=2, config=cfg).results
    assert again["timing_provenance"] == res["timing_provenance"]
    import json

    written = json.loads((first.out_dir / "results.json").read_text())
    assert written["timing_source"] == cfg.cost.timing_source and written["timing_provenance"] == res["timing_provenance"]


def test_runner_reads_the_window_of_the_steps_counter(tmp_path):
    w = SampleWriter(tmp_path / "metrics.csv")
    lab = {"engine": "0", "model_name": "m"}
    w.append([(5.0, "kvlab:sim_timing_info", "kvlab:sim_timing_info", {**lab, "timing_source": "roofline"}, 1.0)]
             + [(ts, "kvlab:sim_steps_priced", "kvlab:sim_steps_priced_total", {**lab, "provenance": p}, v)
                for ts, p, v in ((5.0, "roofline", 7.0), (10.0, "roofline", 50.0), (20.0, "roofline", 90.0),
                                 (30.0, "roofline", 95.0), (10.0, "measured", 0.0), (20.0, "measured", 0.0))])
    w.close()
    t = sim_timing(tmp_path / "metrics.csv", 10.0, 20.0, None)
    assert (t.timing_source, t.steps_priced) == ("roofline", {"roofline": 40})
    assert sim_timing(tmp_path / "missing.csv", 0, 1, None) is None  # vLLM: no series, no source
    assert sim_timing(tmp_path / "missing.csv", 0, 1, "from the log").timing_source == "from the log"
