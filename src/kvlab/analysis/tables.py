"""The report's tables, from a RunSet. Each table's row is a type (below) whose figure columns
declare their source (measured, predicted, simulated, computed): the report's headings say what
the type says, never a heading string of their own."""

from __future__ import annotations

from typing import Any

import pandas as pd

from kvlab.analysis.runs import RunSet, config_label
from kvlab.errors import KvlabError
from kvlab.units import GiB
from kvlab.schema import Part
from kvlab.schema.report import table_row

ConfigRow = table_row(
    "ConfigRow", ["model", "quant", "attention", "kv_cache_dtype", "kv_cache_dtype_predicted", "engine", "source",
                  "kv_bytes_per_token", "kv_cache_tokens_reported", "kv_cache_tokens_predicted",
                  "num_blocks_reported", "num_blocks_predicted", "block_size", "max_concurrency_reported",
                  "max_model_len", "weights_gib_reported", "weights_gib_predicted", "gpu_memory_bytes_predicted",
                  "gpu_memory_utilization", "num_gpus", "gpu"],
    config=None, kv_cache_memory_gib="served", kv_tokens_error_pct="computed", kv_tokens_per_gib_reported="computed")
HeadlineRow = table_row(
    "HeadlineRow", ["attention", "kv_cache_dtype", "kv_bytes_per_token", "kv_cache_tokens_reported",
                    "kv_cache_tokens_predicted", "source"],
    config=None, kv_saved_pct="computed", kv_tokens_error_pct="computed", tokens_x_reported="computed",
    tokens_x_predicted="computed", capacity_x_reported="computed")
MemoryRow = table_row("MemoryRow", [], config=None, weights_gib=None, weights_source=None, kv_cache_gib="served",
                      kv_source=None, rest_gib="computed", rest_source=None)


def frame(row_type: type[Part], rows: list[dict]) -> pd.DataFrame:
    """The table: every row validated against its type (no column more, none less), in its order."""
    clean = [row_type.model_validate({k: _plain(v) for k, v in r.items()}).model_dump() for r in rows]
    return pd.DataFrame(clean, columns=list(row_type.model_fields))


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _first(s: pd.Series) -> Any:
    s = s.dropna()
    return s.iloc[0] if len(s) else None


def _mean(s: pd.Series) -> float | None:
    s = pd.to_numeric(s, errors="coerce").dropna()
    return float(s.mean()) if len(s) else None


def configs(rs: RunSet) -> pd.DataFrame:
    """One row per (model, quant): capacity as reported and as predicted."""
    df = rs.repeats
    ok = df[df["kv_cache_tokens_reported"].notna() | df["kv_cache_tokens_predicted"].notna()]
    if ok.empty:
        return pd.DataFrame()
    rows = []
    for (model, quant), g in ok.groupby(["model", "quant"], sort=False):
        reported = _first(g["kv_cache_tokens_reported"])
        predicted = _first(g["kv_cache_tokens_predicted"])
        kv_mem = _first(g["kv_cache_memory_bytes"])
        rows.append({
            "config": config_label(model, quant),
            "model": model,
            "quant": quant,
            "attention": _first(g["attention"]),
            "kv_cache_dtype": _first(g["kv_cache_dtype"]),
            "kv_cache_dtype_predicted": _first(g["kv_cache_dtype_predicted"]),
            "engine": _first(g["engine"]),
            "source": _first(g["source"]),
            "kv_bytes_per_token": _first(g["kv_bytes_per_token"]),
            "kv_cache_memory_gib": kv_mem / GiB if kv_mem else None,
            "kv_cache_tokens_reported": reported,
            "kv_cache_tokens_predicted": predicted,
            "kv_tokens_error_pct": (100.0 * (reported - predicted) / predicted) if reported and predicted else None,
            "kv_tokens_per_gib_reported": reported / (kv_mem / GiB) if reported and kv_mem else None,
            "num_blocks_reported": _first(g["num_blocks_reported"]),
            "num_blocks_predicted": _first(g["num_blocks_predicted"]),
            "block_size": _first(g["block_size"]),
            "max_concurrency_reported": _first(g["max_concurrency_reported"]),
            "max_model_len": _first(g["max_model_len"]),
            "weights_gib_reported": _first(g["weights_gib_reported"]),
            "weights_gib_predicted": _first(g["weights_gib_predicted"]),
            "gpu_memory_bytes_predicted": _first(g["gpu_memory_bytes_predicted"]),
            "gpu_memory_utilization": _first(g["gpu_memory_utilization"]),
            "num_gpus": _first(g["num_gpus"]) or 1,
            "gpu": _first(g["gpu"]),
        })
    return frame(ConfigRow, rows)


def pick_baseline(cfg: pd.DataFrame, baseline: str | None) -> str:
    """--baseline MODEL/QUANT, else the first non-MLA model at bf16, else the first config."""
    if cfg.empty:
        raise KvlabError("no config reported a KV capacity: nothing to compare")
    if baseline:
        if baseline not in set(cfg["config"]):
            raise KvlabError(f"--baseline {baseline} is not among the configs run: {', '.join(cfg['config'])}")
        return baseline
    gqa = cfg[(cfg["attention"] != "MLA") & (cfg["quant"] == "bf16")]
    return (gqa if len(gqa) else cfg)["config"].iloc[0]


def headline(cfg: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """KV bytes per token and KV capacity of every config against the baseline, measured and predicted."""
    base = cfg.set_index("config").loc[baseline]
    out = []
    for _, r in cfg.iterrows():
        def ratio(col: str) -> float | None:
            a, b = r[col], base[col]
            return float(a) / float(b) if a and b and pd.notna(a) and pd.notna(b) else None
        out.append({
            "config": r["config"],
            "attention": r["attention"],
            "kv_cache_dtype": r["kv_cache_dtype"],
            "kv_bytes_per_token": r["kv_bytes_per_token"],
            "kv_saved_pct": 100.0 * (1 - r["kv_bytes_per_token"] / base["kv_bytes_per_token"])
            if r["kv_bytes_per_token"] and base["kv_bytes_per_token"] else None,
            "kv_cache_tokens_reported": r["kv_cache_tokens_reported"],
            "kv_cache_tokens_predicted": r["kv_cache_tokens_predicted"],
            "kv_tokens_error_pct": r["kv_tokens_error_pct"],
            # tokens per GiB of KV cache: the same memory budget for every config
            "tokens_x_reported": ratio("kv_tokens_per_gib_reported"),
            "tokens_x_predicted": (float(base["kv_bytes_per_token"]) / float(r["kv_bytes_per_token"]))
            if r["kv_bytes_per_token"] and base["kv_bytes_per_token"] else None,
            "capacity_x_reported": ratio("kv_cache_tokens_reported"),
            "source": r["source"],
        })
    return frame(HeadlineRow, out)


def headline_sentences(head: pd.DataFrame, baseline: str) -> list[str]:
    out = []
    for _, r in head.iterrows():
        if r["config"] == baseline:
            continue
        meas = f"{r['tokens_x_reported']:.2f}x" if pd.notna(r["tokens_x_reported"]) else "n/a"
        pred = f"{r['tokens_x_predicted']:.2f}x" if pd.notna(r["tokens_x_predicted"]) else "n/a"
        kv = r["kv_cache_dtype"] if pd.notna(r["kv_cache_dtype"]) else "not reported"
        if pd.isna(r["tokens_x_reported"]) and pd.notna(r["tokens_x_predicted"]):  # no KV memory reported: no measured ratio
            held = f"would hold {pred} the KV tokens of {baseline} in the same KV memory (predicted; {r['source']}: no KV memory reported)"
        else:
            held = f"holds {meas} the KV tokens of {baseline} in the same KV memory ({r['source']}; predicted {pred})"
        out.append(f"{r['config']} ({r['attention']}, KV {kv}) {held}; {r['kv_saved_pct']:.1f} % fewer KV bytes per token.")
    return out


def memory_breakdown(cfg: pd.DataFrame) -> pd.DataFrame:
    """Weights, KV cache and the rest per config, in GiB. Reported where the server said, else predicted."""
    rows = []
    for _, r in cfg.iterrows():
        weights = r["weights_gib_reported"] if pd.notna(r["weights_gib_reported"]) else r["weights_gib_predicted"]
        weights_src = r["source"] if pd.notna(r["weights_gib_reported"]) else "predicted"
        kv = r["kv_cache_memory_gib"]
        rest = None
        if r["gpu_memory_bytes_predicted"] and pd.notna(r["gpu_memory_bytes_predicted"]) and kv and weights:
            budget = r["gpu_memory_bytes_predicted"] * (r["gpu_memory_utilization"] or 0.9) / GiB
            rest = max(0.0, budget - weights - kv)
        rows.append({"config": r["config"], "weights_gib": weights, "weights_source": weights_src,
                     "kv_cache_gib": kv, "kv_source": r["source"] if kv else None, "rest_gib": rest,
                     "rest_source": "derived: GPU x utilization - weights - KV" if rest is not None else
                     "not known on this engine"})
    return frame(MemoryRow, rows)


LOAD_COLUMNS = ["output_tokens_per_s", "generation_tokens_per_s_server", "ttft_p50_s", "ttft_p95_s", "ttft_p99_s",
                "itl_p50_s", "itl_p95_s", "itl_p99_s", "e2e_p50_s", "goodput_requests_per_min",
                "goodput_sessions_per_min", "slo_attainment", "preemptions", "kv_usage_peak_frac",
                "kv_tokens_peak", "running_peak", "waiting_peak", "prefix_cache_hit_rate", "requests", "errors",
                "sessions", "resident_sessions_peak", "mean_session_context_tokens"]
LoadRow = table_row("LoadRow", ["model", "quant", "workload", "users", "source", *LOAD_COLUMNS],
                    config=None, repeats=None)
CostRow = table_row("CostRow", ["workload", "users", "gpu_price_per_hour", "num_gpus"], config=None,
                    usd_per_1m_output_tokens="computed", usd_per_session_at_slo="computed",
                    kv_gib_s_per_session="computed", source=None)


def under_load(rs: RunSet) -> pd.DataFrame:
    """One row per cell (config x workload x users): the mean over complete repeats."""
    df = rs.complete
    if df.empty:
        return pd.DataFrame()
    rows = []
    for (model, quant, workload, users), g in df.groupby(["model", "quant", "workload", "users"], sort=False):
        row = {"config": config_label(model, quant), "model": model, "quant": quant, "workload": workload,
               "users": int(users), "repeats": len(g), "source": _first(g["source"])}
        for c in LOAD_COLUMNS:
            row[c] = _mean(g[c])
        rows.append(row)
    return frame(LoadRow, rows)


def cost(load: pd.DataFrame, rs: RunSet, price_override: float | None) -> pd.DataFrame:
    """$ per 1M output tokens and per agent session at the SLO, KV GiB-seconds per session."""
    if load.empty:
        return pd.DataFrame()
    df = rs.complete
    rows = []
    for _, r in load.iterrows():
        g = df[(df["model"] == r["model"]) & (df["quant"] == r["quant"]) & (df["workload"] == r["workload"])
               & (df["users"] == r["users"])]
        price = price_override if price_override is not None else _first(g["gpu_price_per_hour"])
        gpus = _first(g["num_gpus"]) or 1
        window = _mean(g["window_s"])
        tps = r["output_tokens_per_s"]
        met = _mean(g["sessions_met_slo"])
        kv_gib = _mean(g["kv_gib_mean"])
        sessions = r["sessions"]
        rows.append({
            "config": r["config"], "workload": r["workload"], "users": r["users"],
            "gpu_price_per_hour": price, "num_gpus": gpus,
            "usd_per_1m_output_tokens": (price * gpus / 3600.0) / tps * 1e6 if price is not None and tps else None,
            "usd_per_session_at_slo": (price * gpus * window / 3600.0) / met if price is not None and met and window else None,
            "kv_gib_s_per_session": kv_gib * window / sessions if kv_gib is not None and window and sessions else None,
            "source": f"computed from {r['source']} throughput and the price per GPU-hour",
        })
    return frame(CostRow, rows)


def reproducibility(rs: RunSet) -> pd.DataFrame:
    df = rs.repeats
    if df.empty:
        return pd.DataFrame()
    cols = ["config", "engine", "server_argv", "vllm_version", "kvlab_version", "kvlab_git_commit", "torch_version",
            "transformers_version", "hardware", "seed", "folder"]
    d = df.assign(config=[config_label(m, q) for m, q in zip(df["model"], df["quant"])])
    return d.groupby("config", sort=False).first().reset_index()[cols]


# ---------------------------------------------------------------------------------------------
# Compare two run sets


COMPARE_METRICS = ["output_tokens_per_s", "ttft_p50_s", "ttft_p95_s", "itl_p95_s", "goodput_requests_per_min",
                   "preemptions", "kv_usage_peak_frac", "kv_cache_tokens_reported", "prefix_cache_hit_rate"]


def compare(a: RunSet, b: RunSet) -> pd.DataFrame:
    """Per cell and metric: A, B, the delta, and whether B lies outside A's 95 % interval over repeats."""
    from kvlab.experiments.records import mean_ci95

    rows = []
    key = ["model", "quant", "workload", "users"]
    ga = {k: g for k, g in a.complete.groupby(key)}
    gb = {k: g for k, g in b.complete.groupby(key)}
    for k in sorted(set(ga) & set(gb), key=str):
        for m in COMPARE_METRICS:
            sa = mean_ci95(pd.to_numeric(ga[k][m], errors="coerce").dropna().tolist())
            sb = mean_ci95(pd.to_numeric(gb[k][m], errors="coerce").dropna().tolist())
            if sa["mean"] is None or sb["mean"] is None:
                continue
            outside = None
            if sa["ci95_low"] is not None:
                outside = not (sa["ci95_low"] <= sb["mean"] <= sa["ci95_high"])
            rows.append({"config": config_label(k[0], k[1]), "workload": k[2], "users": k[3], "metric": m,
                         "a_mean": sa["mean"], "a_ci95_low": sa["ci95_low"], "a_ci95_high": sa["ci95_high"],
                         "b_mean": sb["mean"], "delta": sb["mean"] - sa["mean"],
                         "delta_pct": 100 * (sb["mean"] - sa["mean"]) / sa["mean"] if sa["mean"] else None,
                         "outside_a_interval": outside, "repeats_a": sa["n"], "repeats_b": sb["n"]})
    return pd.DataFrame(rows)
