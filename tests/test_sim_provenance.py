"""Every simulated figure names what priced its steps: `kvlab sim run`'s results.json says the
timing source and the run's engine steps per provenance (measured, interpolated, extrapolated,
roofline); the runner reads the same from the sim server's kvlab:sim_* series."""

from kvlab.experiments.runner import sim_timing
from kvlab.replay.run import run_offline
from kvlab.sim.config import build_config
from kvlab.sim.timing import host_label


def test_sim_run_results_say_the_timing_source_and_steps_per_provenance(tmp_path):
    cfg = build_config("llama-3.1-8b", "h100", max_model_len=8192)
    first = run_offline("llama-3.1-8b", "h100", "agent-smoke", 20, concurrency=2, config=cfg, out_dir=tmp_path / "a")
    res = first.results.model_dump()
    assert res["timing_source"] == cfg.cost.timing_source
    assert set(res["timing_provenance"]) <= {"measured", "interpolated", "extrapolated", "scaled", "composed", "roofline"}
    assert sum(res["timing_provenance"].values()) == res["engine_steps"] > 0
    # the same config again: this run's steps only
    again = run_offline("llama-3.1-8b", "h100", "agent-smoke", 20, concurrency=2, config=cfg).results.model_dump()
    assert again["timing_provenance"] == res["timing_provenance"]
    import json

    written = json.loads((first.out_dir / "results.json").read_text())
    assert written["timing_source"] == cfg.cost.timing_source and written["timing_provenance"] == res["timing_provenance"]


def test_runner_counts_the_steps_priced_during_the_load_run():
    """The runner reads kvlab's own series (the scraper keeps vllm:* only) at the load run's start
    and end: the steps priced between them, per provenance."""
    from prometheus_client import CollectorRegistry, generate_latest

    from kvlab.sim.metrics import EngineMetrics
    from kvlab.sim.timing import StepWork

    cfg = build_config("llama-3.1-8b", "h100", max_model_len=4096)
    m = EngineMetrics("llama-3.1-8b", 4096, cfg.cache_config_labels())
    m.timing = cfg.cost
    registry = CollectorRegistry()
    registry.register(m)
    cfg.cost.decode_step_s(4, 4000)
    before = generate_latest(registry).decode()
    for _ in range(5):
        cfg.cost.decode_step_s(8, 8000)
    cfg.cost.step_time_s(StepWork(512, 1, 1, 512, 0, 512 * 512 // 2, 0))
    t = sim_timing(before, generate_latest(registry).decode(), None)
    assert t.timing_source == cfg.cost.timing_source and sum(t.steps_priced.values()) == 6
    assert t.host_source is None  # a server that does not say (kvlab's before it did)
    m.host_source = cfg.host_source()  # kvlab's simulated server says it (kvlab.sim.server)
    t = sim_timing(before, generate_latest(registry).decode(), None)
    assert t.host_source == cfg.host_source() and t.host_source.startswith(host_label("0.32.0"))
    assert sim_timing(None, None, None) is None  # vLLM: no series, no source
    assert sim_timing(None, None, "from the log").timing_source == "from the log"
    assert sim_timing("<html>not metrics</html>", None, None) is None
