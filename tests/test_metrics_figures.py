"""Per-run figures on synthetic sample series: values worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from kvlab.errors import KvlabError
from kvlab.metrics.exposition import parse_exposition
from kvlab.metrics.figures import summarize, summarize_all
from kvlab.metrics.promql import family_of
from kvlab.metrics.samples import GAP, GPU_ABSENT, SampleWriter, read_samples
from kvlab.metrics.series import counter_increase, histogram_quantile, quantile_linear

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA = {"engine": "0", "model_name": "llama"}
GiB = 1 << 30


class Rows:
    """Samples as the scraper writes them."""

    def __init__(self):
        self.rows = []

    def add(self, ts_, name_, value_, **labels):
        self.rows.append((float(ts_), family_of(name_), name_, json.dumps(labels, sort_keys=True), float(value_)))
        return self

    def pool(self, ts, engine="0", num_gpu_blocks=257, block_size=32, **extra):
        labels = {"engine": engine, "num_gpu_blocks": str(num_gpu_blocks), "block_size": str(block_size),
                  "kv_cache_memory_bytes": str(num_gpu_blocks * block_size * 131072),
                  "kv_cache_size_tokens": str(num_gpu_blocks * block_size), "num_gpu_blocks_override": "None", **extra}
        return self.add(ts, "vllm:cache_config_info", 1.0, **labels)

    def frame(self):
        return pd.DataFrame(self.rows, columns=["ts", "family", "name", "labels", "value"])


def test_counter_increase_handles_resets_like_prometheus():
    assert counter_increase([100, 150, 200, 30, 80]) == (50 + 50 + 30 + 50, 1)
    assert counter_increase([5]) == (0.0, 0)
    assert counter_increase([]) == (0.0, 0)
    assert counter_increase([0, 0, 7, 7]) == (7, 0)


def test_histogram_quantile_is_promqls():
    b = [(0.1, 2), (0.5, 6), (1.0, 8), (float("inf"), 10)]
    assert histogram_quantile(0.5, b) == pytest.approx(0.1 + 0.4 * 3 / 4)  # rank 5 in (0.1, 0.5]
    assert histogram_quantile(0.1, b) == pytest.approx(0.05)  # rank 1 in (0, 0.1]
    assert histogram_quantile(0.95, b) == 1.0  # rank 9.5 in +Inf: the highest finite bound
    assert histogram_quantile(0.5, [(0.1, 0), (float("inf"), 0)]) is None
    assert histogram_quantile(0.5, [(0.1, 3)]) is None  # no +Inf bucket: PromQL gives NaN


def test_quantile_linear_matches_numpy_default():
    import numpy as np

    v = [3, 1, 4, 1, 5, 9, 2, 6]
    assert quantile_linear(0.95, v) == pytest.approx(float(np.quantile(v, 0.95)))
    assert quantile_linear(0.5, [7]) == 7


def test_kv_usage_in_blocks_tokens_and_gib():
    r = Rows().pool(0)
    blocks = [0, 64, 128, 256, 32]  # of 256 usable: vLLM leaves the null block out
    for t, b in enumerate(blocks):
        r.add(t, "vllm:kv_cache_usage_perc", b / 256, **LLAMA)
    f = summarize(r.frame())
    assert f.num_gpu_blocks == 257 and f.block_size == 32 and f.kv_cache_size_tokens == 257 * 32
    assert (f.kv_blocks_peak, f.kv_blocks_mean) == (256, sum(blocks) / 5)
    assert f.kv_blocks_p95 == pytest.approx(quantile_linear(0.95, blocks))
    assert f.kv_tokens_peak == 256 * 32 == 8192
    assert f.kv_usage_peak_frac == 1.0 and f.kv_usage_mean_frac == pytest.approx(96 / 256)
    # kv_cache_memory_bytes / num_gpu_blocks is exactly 32 x 131072 here: 256 blocks = 1 GiB
    assert f.kv_bytes_per_block == 32 * 131072
    assert f.kv_gib_peak == pytest.approx(1.0)
    assert f.kv_tokens_peak <= f.kv_cache_size_tokens


def test_gib_needs_bytes_when_block_count_was_overridden():
    r = Rows().pool(0, num_gpu_blocks=48, kv_cache_memory_bytes=str(GiB), num_gpu_blocks_override="48")
    r.add(0, "vllm:kv_cache_usage_perc", 0.5, **LLAMA)
    f = summarize(r.frame())
    assert f.kv_tokens_peak == round(0.5 * 47) * 32
    assert f.kv_gib_peak is None and "kv_bytes_per_token" in f.missing["kv_gib_peak"][0]
    g = summarize(r.frame(), kv_bytes_per_token=131072)
    assert g.kv_gib_peak == pytest.approx(round(0.5 * 47) * 32 * 131072 / GiB)
    assert g.provenance["kv_gib_peak"].startswith("computed")


def test_counters_over_a_window_bracket_it_and_survive_a_restart():
    r = Rows()
    gen = [0, 0, 100, 250, 400, 30, 130, 130, 130, 130, 130]  # server restarted between t=4 and t=5
    for t, v in enumerate(gen):
        r.add(t, "vllm:generation_tokens_total", v, **LLAMA)
        r.add(t, "vllm:num_requests_running", 4 if 2 <= t <= 6 else 0, **LLAMA)
    f = summarize(r.frame(), start_ts=1.5, end_ts=6.5)
    # brackets: t=1 (last at or before 1.5) .. t=7 (first at or after 6.5)
    assert f.generation_tokens == (100 + 150 + 150 + 30 + 100 + 0)
    assert f.counter_resets == 1
    assert f.duration_s == 5.0
    assert f.generation_tokens_per_s == pytest.approx(530 / 5.0)
    assert (f.running_peak, f.running_mean) == (4, 4)  # gauges: the scrapes inside 1.5..6.5 only
    whole = summarize(r.frame())
    assert whole.generation_tokens == 530 and whole.duration_s == 10.0


def test_window_must_be_ordered():
    r = Rows().add(0, "vllm:num_requests_running", 1, **LLAMA)
    with pytest.raises(KvlabError, match="after"):
        summarize(r.frame(), start_ts=5, end_ts=1)


def test_prefix_hit_rate_and_latency_from_histogram_increases():
    r = Rows()
    le = ["0.1", "0.5", "1.0", "+Inf"]
    before, after = [1, 1, 2, 2], [3, 7, 10, 12]  # increases 2, 6, 8, 10 per bucket
    for t, counts in ((0, before), (1, after)):
        for b, c in zip(le, counts):
            r.add(t, "vllm:time_to_first_token_seconds_bucket", c, le=b, **LLAMA)
        r.add(t, "vllm:time_to_first_token_seconds_count", counts[-1], **LLAMA)
        r.add(t, "vllm:time_to_first_token_seconds_sum", 0.3 if t == 0 else 4.3, **LLAMA)
    r.add(0, "vllm:prefix_cache_queries_total", 100, **LLAMA).add(1, "vllm:prefix_cache_queries_total", 1100, **LLAMA)
    r.add(0, "vllm:prefix_cache_hits_total", 40, **LLAMA).add(1, "vllm:prefix_cache_hits_total", 790, **LLAMA)
    f = summarize(r.frame())
    assert f.ttft.count == 10 and f.ttft.mean_s == pytest.approx(0.4)
    assert f.ttft.p50_s == pytest.approx(0.1 + 0.4 * 3 / 4)
    assert f.ttft.p99_s == 1.0
    assert f.prefix_cache_queries_tokens == 1000 and f.prefix_cache_hits_tokens == 750
    assert f.prefix_cache_hit_rate == 0.75
    assert f.missing["itl"] == ("vllm:inter_token_latency_seconds",)  # absent family: said, not a crash


def test_two_engines_weight_the_fraction_by_pool():
    r = Rows().pool(0, engine="0", num_gpu_blocks=101).pool(0, engine="1", num_gpu_blocks=301)
    for t in range(3):
        r.add(t, "vllm:kv_cache_usage_perc", 0.5, engine="0", model_name="m")
        r.add(t, "vllm:kv_cache_usage_perc", 0.1, engine="1", model_name="m")
        r.add(t, "vllm:num_requests_running", 2, engine="0", model_name="m")
        r.add(t, "vllm:num_requests_running", 3, engine="1", model_name="m")
    f = summarize(r.frame())
    assert f.engines == ("0", "1")
    assert f.num_gpu_blocks == 402
    assert f.kv_blocks_peak == 50 + 30
    assert f.kv_usage_peak_frac == pytest.approx(80 / 400)
    assert f.kv_tokens_peak == 80 * 32
    assert f.running_peak == 5


def test_several_models_need_a_choice():
    r = Rows()
    for m, v in (("a", 1), ("b", 7)):
        r.add(0, "vllm:num_requests_running", v, engine="0", model_name=m)
        r.add(1, "vllm:num_requests_running", v, engine="0", model_name=m)
    with pytest.raises(KvlabError, match="several models"):
        summarize(r.frame())
    with pytest.raises(KvlabError, match="no samples for model_name 'c'"):
        summarize(r.frame(), model_name="c")
    both = summarize_all(r.frame())
    assert {m: f.running_peak for m, f in both.items()} == {"a": 1, "b": 7}


def test_old_names_give_the_same_figures():
    """Two scrapes of a synthetic pre-0.9 server: every old name is read as its current one."""
    first = parse_exposition((FIXTURES / "synthetic-vllm-0.8-old-names.metrics.txt").read_text()).samples
    r = Rows()
    for s in first:
        r.add(0, s.name, s.value, **s.labels)
        # 100 more of everything; 100 new token latencies per engine, all in (0.01, 0.05]
        grow = 100 if s.name.endswith(("_total", "_count")) or s.labels.get("le") in ("0.05", "0.1", "+Inf") else 0
        grow = 3.0 if s.name.endswith("_sum") else grow
        r.add(1, s.name, s.value + grow, **s.labels)
    f = summarize(r.frame())
    assert f.model_name == "llama-old" and f.engines == ("0", "1")
    assert f.kv_usage_peak_frac == pytest.approx((0.5 * 1000 + 0.25 * 1000) / 2000)
    assert f.kv_tokens_peak == (500 + 250) * 16
    assert f.prefix_cache_hit_rate == pytest.approx(200 / 200)
    assert f.generation_tokens == 200
    assert f.itl.family == "vllm:inter_token_latency_seconds" and f.itl.count == 200
    assert f.itl.p50_s == pytest.approx(0.01 + 0.04 * 100 / 200)
    assert f.itl.mean_s == pytest.approx(6.0 / 200)


def test_missing_inputs_are_named():
    r = Rows()
    for t in range(3):
        r.add(t, "vllm:kv_cache_usage_perc", 0.25, **LLAMA)
    f = summarize(r.frame())
    assert f.kv_usage_peak_frac == 0.25  # the fraction needs nothing else
    assert f.kv_tokens_peak is None and f.missing["kv_tokens_peak"] == ("vllm:cache_config_info",)
    assert f.num_gpu_blocks is None and f.missing["num_gpu_blocks"] == ("vllm:cache_config_info",)
    assert f.generation_tokens_per_s is None and f.missing["generation_tokens_per_s"] == ("vllm:generation_tokens_total",)
    assert f.missing["running_peak"] == ("vllm:num_requests_running",)
    assert f.missing["resident_sessions_peak"] == ("mean_session_context_tokens (not given)",)
    assert all(v is None or k in f.provenance for k, v in f.to_dict().items() if k.startswith("kv_usage"))
    empty = summarize(Rows().add(0, GAP, 1.0, kind="unreachable", url="u", error="refused").frame())
    assert empty.model_name is None and empty.scrape_gaps == 1
    assert empty.missing["generation_tokens"] == ("no vllm:* samples",)
    assert empty.missing["ttft"] == ("no vllm:* samples",)


def test_gaps_are_counted_inside_the_window():
    r = Rows()
    for t in range(6):
        if t in (2, 3):
            r.add(t, GAP, 1.0, kind="unreachable", url="http://127.0.0.1:1/metrics", error="ConnectError")
        else:
            r.add(t, "vllm:generation_tokens_total", 10 * t, **LLAMA)
    r.add(9, GAP, 1.0, kind="unreachable", url="u", error="e")
    f = summarize(r.frame(), start_ts=0, end_ts=5)
    assert (f.scrapes, f.scrape_gaps) == (4, 2)
    assert f.generation_tokens == 50  # the gap loses no count: the counter is cumulative


def test_resident_sessions_divide_kv_tokens_by_the_mean_context():
    r = Rows().pool(0)
    for t, b in enumerate([16, 32, 48]):
        r.add(t, "vllm:kv_cache_usage_perc", b / 256, **LLAMA)
    f = summarize(r.frame(), mean_session_context_tokens=512)
    assert f.resident_sessions_peak == 48 * 32 / 512 == 3.0
    assert f.resident_sessions_mean == 32 * 32 / 512
    assert f.provenance["resident_sessions_peak"].startswith("estimate")
    with pytest.raises(KvlabError, match="positive"):
        summarize(r.frame(), mean_session_context_tokens=0)


def test_gpu_telemetry_figures_and_absence():
    r = Rows().add(0, "vllm:num_requests_running", 1, **LLAMA).add(1, "vllm:num_requests_running", 1, **LLAMA)
    for t in (0, 1):
        for i, (mem, util, watts) in enumerate(((40, 0.5, 300), (20, 0.9, 500))):
            g = {"index": str(i), "uuid": f"GPU-{i}", "name": "NVIDIA H100 80GB HBM3"}
            r.add(t, "nvidia_smi_memory_used_bytes", (mem + t) * GiB, **g)
            r.add(t, "nvidia_smi_utilization_gpu_ratio", util, **g)
            r.add(t, "nvidia_smi_power_draw_watts", watts, **g)
    f = summarize(r.frame())
    assert f.gpu_count == 2
    assert f.gpu_memory_used_peak_gib == 62
    assert f.gpu_utilization_mean_ratio == pytest.approx(0.7)
    assert f.gpu_power_mean_w == 800
    absent = Rows().add(0, GPU_ABSENT, 1.0, reason="nvidia-smi not found on PATH")
    absent.add(0, "vllm:num_requests_running", 0, **LLAMA)
    g = summarize(absent.frame())
    assert g.gpu_memory_used_peak_gib is None
    assert g.missing["gpu_memory_used_peak_gib"] == ("GPU telemetry: nvidia-smi not found on PATH",)


def test_samples_file_round_trip_and_a_torn_last_row(tmp_path):
    w = SampleWriter(tmp_path / "metrics.csv")
    w.append([(1.5, "vllm:prompt_tokens", "vllm:prompt_tokens_total", {"engine": "0", "model_name": "m,\"q\""}, 7.0)])
    w.append([(2.5, "vllm:prompt_tokens", "vllm:prompt_tokens_total", {"engine": "0", "model_name": "m,\"q\""}, 9.0)])
    w.close()
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write('3.5,vllm:prompt_tokens,vllm:prompt_tokens_total,"{""engine"":""0"",""mod')  # killed mid-write
    df = read_samples(tmp_path)
    assert list(df["value"]) == [7.0, 9.0]
    assert json.loads(df["labels"][0])["model_name"] == 'm,"q"'
    assert summarize(tmp_path).prompt_tokens == 2.0
    # a second writer appends without a second header
    w2 = SampleWriter(tmp_path / "more.csv")
    w2.close()
    w3 = SampleWriter(tmp_path / "more.csv")
    w3.append([(1.0, "vllm:x", "vllm:x", {}, 1.0)])
    w3.close()
    assert (tmp_path / "more.csv").read_text().count("ts,family") == 1


def test_bad_samples_files_are_one_line_errors(tmp_path):
    with pytest.raises(KvlabError, match="no samples file"):
        read_samples(tmp_path)
    (tmp_path / "metrics.csv").write_text("a,b\n1,2\n")
    with pytest.raises(KvlabError, match="missing column"):
        read_samples(tmp_path)
    (tmp_path / "metrics.csv").write_bytes(b"\x00\xff\xfe garbage")
    with pytest.raises(KvlabError):
        read_samples(tmp_path)
