"""Parsing vLLM's exposition and its names across versions (real 0.32 fixture, synthetic old ones)."""

from pathlib import Path

import pandas as pd

from kvlab.metrics.exposition import RENAMED_FAMILIES, canonical_name, canonical_rows, parse_exposition

FIXTURES = Path(__file__).parent / "fixtures"
REAL = (FIXTURES / "vllm-0.32-cpu-deepseek-twin.metrics.txt").read_text()
OLD = (FIXTURES / "synthetic-vllm-0.8-old-names.metrics.txt").read_text()
BOTH = (FIXTURES / "synthetic-vllm-0.10-both-names.metrics.txt").read_text()


def _frame(text: str, ts: float = 1.0) -> pd.DataFrame:
    import json

    rows = [(ts, s.family, s.name, json.dumps(s.labels, sort_keys=True), s.value) for s in parse_exposition(text).samples]
    return pd.DataFrame(rows, columns=["ts", "family", "name", "labels", "value"])


def test_real_exposition_every_vllm_line_becomes_a_sample():
    r = parse_exposition(REAL)
    assert r.errors == []
    vllm_lines = [ln for ln in REAL.splitlines() if ln.startswith("vllm:")]
    assert len(r.samples) == len(vllm_lines) == 374
    by_name = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in r.samples}
    key = (("engine", "0"), ("model_name", "deepseek-v2-lite"))
    assert by_name[("vllm:prompt_tokens_total", key)] == 19.0
    assert by_name[("vllm:generation_tokens_total", key)] == 8.0
    assert by_name[("vllm:inter_token_latency_seconds_count", key)] == 7.0
    # counters keep `_total` in the sample name, not in the family
    fam = {s.name: s.family for s in r.samples}
    assert fam["vllm:prompt_tokens_total"] == "vllm:prompt_tokens"
    assert fam["vllm:time_to_first_token_seconds_bucket"] == "vllm:time_to_first_token_seconds"
    info = next(s for s in r.samples if s.name == "vllm:cache_config_info")
    assert (info.labels["num_gpu_blocks"], info.labels["block_size"], info.labels["kv_cache_size_tokens"]) == ("2157", "16", "34512")


def test_other_prefixes_are_left_out_unless_asked():
    assert all(s.name.startswith("vllm:") for s in parse_exposition(REAL).samples)
    everything = parse_exposition(REAL, prefix=None).samples
    assert any(s.name == "process_open_fds" for s in everything)


def test_garbage_never_raises():
    for text in ("", "<html><body>404</body></html>", "\x00\xff binary", "vllm:x{a=\"b\" 1\n", "{{{{ 1 2 3"):
        r = parse_exposition(text)
        assert r.samples == []


def test_one_bad_family_loses_only_that_family():
    broken = REAL.replace('vllm:num_preemptions_total{engine="0",model_name="deepseek-v2-lite"} 0.0',
                          'vllm:num_preemptions_total{engine="0",model_name="deepseek-v2-lite"} zero')
    r = parse_exposition(broken)
    assert len(r.errors) == 1 and r.errors[0].startswith("vllm:num_preemptions_total")
    names = {s.name for s in r.samples}
    assert "vllm:num_preemptions_total" not in names
    assert {"vllm:prompt_tokens_total", "vllm:kv_cache_usage_perc", "vllm:cache_config_info"} <= names


def test_canonical_names_table():
    assert canonical_name("vllm:gpu_cache_usage_perc") == "vllm:kv_cache_usage_perc"
    assert canonical_name("vllm:time_per_output_token_seconds_bucket") == "vllm:inter_token_latency_seconds_bucket"
    assert canonical_name("vllm:gpu_prefix_cache_hits_total") == "vllm:prefix_cache_hits_total"
    assert canonical_name("vllm:gpu_prefix_cache_queries") == "vllm:prefix_cache_queries"
    # a longer name that merely starts like an old one is not renamed
    assert canonical_name("vllm:gpu_cache_usage_percent") == "vllm:gpu_cache_usage_percent"
    assert canonical_name("vllm:kv_cache_usage_perc") == "vllm:kv_cache_usage_perc"
    assert set(RENAMED_FAMILIES.values()) <= {s.family for s in parse_exposition(REAL).samples}


def test_old_names_are_renamed_when_alone():
    df = canonical_rows(_frame(OLD))
    assert not df["name"].str.contains("gpu_cache_usage|time_per_output_token|gpu_prefix").any()
    usage = df[df["name"] == "vllm:kv_cache_usage_perc"]
    assert sorted(usage["value"]) == [0.25, 0.5]
    assert (df["name"] == "vllm:inter_token_latency_seconds_bucket").sum() == 8
    hits = df[df["name"] == "vllm:prefix_cache_hits_total"]
    assert set(hits["family"]) == {"vllm:prefix_cache_hits"} and hits["value"].sum() == 600


def test_both_names_at_one_scrape_are_not_counted_twice():
    df = canonical_rows(_frame(BOTH))
    assert (df["name"] == "vllm:kv_cache_usage_perc").sum() == 1
    assert (df["name"] == "vllm:inter_token_latency_seconds_count").sum() == 1
    assert len(df) == len(_frame(BOTH)) // 2
