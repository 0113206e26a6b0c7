"""Rebuild the report's headline from the run records alone, with pandas: KV tokens per config (as
the server reported them, and as the memory model predicted them), KV tokens per GiB of KV memory,
and every config against the baseline (the MLA / GQA ratio).

    python analysis/headline.py results/cpu-smoke [more results folders] [--baseline MODEL/QUANT]

It reads only the files `kvlab experiment run` writes, `<results>/<cell>/repeat-*/results.json`,
by path and field name (no kvlab import), so it is a check of `kvlab report`'s headline as well as a
starting point for one's own analysis. Simulated repeats (engine `sim`) are labelled so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

GiB = 1 << 30
COLUMNS = {  # column -> field of a repeat's results.json
    "model": "cell.model", "quant": "cell.quant", "status": "status", "engine": "engine",
    "attention": "prediction.attention", "kv_cache_dtype": "prediction.kv_cache_dtype",
    "kv_bytes_per_token": "prediction.kv_bytes_per_token",
    "kv_cache_tokens_predicted": "prediction.kv_cache_tokens",
    "kv_cache_tokens_reported": "server.kv_cache_tokens",
    "kv_cache_memory_bytes": "server.kv_cache_memory_bytes",
}


def read_repeats(folders: list[Path]) -> pd.DataFrame:
    """One row per repeat record found under the folders, with COLUMNS (absent fields are NaN)."""
    records = [json.loads(p.read_text()) for folder in folders for p in sorted(folder.glob("*/repeat-*/results.json"))]
    flat = pd.json_normalize(records) if records else pd.DataFrame()
    return pd.DataFrame({col: flat[field] if field in flat else pd.Series([None] * len(flat), dtype=object)
                         for col, field in COLUMNS.items()})


def headline(repeats: pd.DataFrame, baseline: str | None = None) -> tuple[str, pd.DataFrame]:
    """(the baseline config, one row per MODEL/QUANT): KV tokens reported and predicted, tokens per
    GiB of KV cache, and the ratios to the baseline."""
    ok = repeats[repeats["status"] == "complete"].copy()
    ok["config"] = ok["model"] + "/" + ok["quant"]
    cfg = ok.groupby("config", sort=False).first().reset_index()
    cfg = cfg[cfg["kv_cache_tokens_reported"].notna() | cfg["kv_cache_tokens_predicted"].notna()]
    if cfg.empty:
        raise SystemExit("no complete repeat with a KV capacity in these folders")
    if baseline is None:
        gqa = cfg[(cfg["attention"] != "MLA") & (cfg["quant"] == "bf16")]
        baseline = (gqa if len(gqa) else cfg)["config"].iloc[0]
    elif baseline not in set(cfg["config"]):
        raise SystemExit(f"--baseline {baseline} is not among the configs: {', '.join(cfg['config'])}")
    cfg["source"] = cfg["engine"].map(lambda e: "simulated" if e == "sim" else "measured")
    cfg["kv_tokens_per_gib_reported"] = cfg["kv_cache_tokens_reported"] / (cfg["kv_cache_memory_bytes"] / GiB)
    base = cfg.set_index("config").loc[baseline]
    cfg["tokens_x_reported"] = cfg["kv_tokens_per_gib_reported"] / base["kv_tokens_per_gib_reported"]
    cfg["tokens_x_predicted"] = base["kv_bytes_per_token"] / cfg["kv_bytes_per_token"]
    cfg["kv_saved_pct"] = 100.0 * (1 - cfg["kv_bytes_per_token"] / base["kv_bytes_per_token"])
    return baseline, cfg[["config", "attention", "kv_cache_dtype", "kv_bytes_per_token", "kv_cache_tokens_reported",
                          "kv_cache_tokens_predicted", "kv_tokens_per_gib_reported", "tokens_x_reported",
                          "tokens_x_predicted", "kv_saved_pct", "source"]]


def sentences(baseline: str, head: pd.DataFrame) -> list[str]:
    """The headline in words, as `kvlab report` prints it."""
    fmt = lambda x: f"{x:.2f}x" if pd.notna(x) else "n/a"  # noqa: E731

    def held(r) -> str:
        if pd.isna(r.tokens_x_reported) and pd.notna(r.tokens_x_predicted):  # no KV memory reported: no measured ratio
            return (f"would hold {fmt(r.tokens_x_predicted)} the KV tokens of {baseline} in the same KV memory "
                    f"(predicted; {r.source}: no KV memory reported)")
        return (f"holds {fmt(r.tokens_x_reported)} the KV tokens of {baseline} in the same KV memory "
                f"({r.source}; predicted {fmt(r.tokens_x_predicted)})")

    return [f"{r.config} ({r.attention}, KV {r.kv_cache_dtype}) {held(r)}; {r.kv_saved_pct:.1f} % fewer KV bytes per token."
            for r in head.itertuples() if r.config != baseline]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="results folders of `kvlab experiment run`")
    ap.add_argument("--baseline", help="MODEL/QUANT (default: the first GQA model at bf16)")
    args = ap.parse_args(argv)
    baseline, head = headline(read_repeats(args.results), args.baseline)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(head.to_string(index=False))
    for s in sentences(baseline, head):
        print(f"  {s}", file=sys.stderr)


if __name__ == "__main__":
    main()
