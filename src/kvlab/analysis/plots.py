"""The report's plots: titles, axes with units, one colour per model kept across every plot.
Each returns PNG bytes (embedded in the HTML as data URIs) or None when there is nothing to draw."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from kvlab.analysis import series  # noqa: E402

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]


class Colours:
    """One colour per model, in order of first appearance, the same in every plot."""

    def __init__(self, models: list[str]):
        self.map = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(dict.fromkeys(models))}

    def __call__(self, model: str) -> str:
        return self.map.get(model, "#333333")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _model(config: str) -> str:
    return config.split("/", 1)[0]


def kv_bytes_per_token(head: pd.DataFrame, colours: Colours) -> bytes | None:
    if head.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.barh(head["config"], head["kv_bytes_per_token"] / 1024, color=[colours(_model(c)) for c in head["config"]])
    for i, v in enumerate(head["kv_bytes_per_token"]):
        ax.text(v / 1024, i, f" {v:,.0f} B", va="center", fontsize=8)
    ax.set_xlabel("KV cache per token (KiB, all layers, one GPU)")
    ax.set_title("KV bytes per token (computed)")
    ax.invert_yaxis()
    return _png(fig)


def kv_capacity(head: pd.DataFrame, colours: Colours, kind: str = "measured") -> bytes | None:
    if head.empty or head["kv_cache_tokens_reported"].isna().all():
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    y = range(len(head))
    ax.barh([i - 0.2 for i in y], head["kv_cache_tokens_reported"].fillna(0), height=0.4,
            color=[colours(_model(c)) for c in head["config"]], label=f"reported by the server ({kind})")
    ax.barh([i + 0.2 for i in y], head["kv_cache_tokens_predicted"].fillna(0), height=0.4, color="none",
            edgecolor=[colours(_model(c)) for c in head["config"]], hatch="//", label="kvlab memory model (predicted)")
    ax.set_yticks(list(y), head["config"])
    ax.set_xlabel("KV cache capacity (tokens)")
    ax.set_title(f"KV capacity: {kind} vs predicted")
    ax.legend(fontsize=8, loc="lower right")
    ax.invert_yaxis()
    return _png(fig)


def memory_breakdown(mem: pd.DataFrame, colours: Colours) -> bytes | None:
    if mem.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    w = mem["weights_gib"].fillna(0)
    kv = mem["kv_cache_gib"].fillna(0)
    rest = mem["rest_gib"].fillna(0)
    ax.barh(mem["config"], w, color="#999999", label="weights")
    ax.barh(mem["config"], kv, left=w, color=[colours(_model(c)) for c in mem["config"]], label="KV cache")
    ax.barh(mem["config"], rest, left=w + kv, color="#dddddd", label="rest (activations, overhead)")
    ax.set_xlabel("GiB per GPU (as served: a twin's weights on the CPU build)")
    ax.set_title("Memory breakdown per config")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)
    ax.invert_yaxis()
    return _png(fig)


def _per_users(load: pd.DataFrame, col: str, colours: Colours, title: str, ylabel: str,
               quantiles: tuple[str, ...] = ()) -> bytes | None:
    """Against concurrency when a config ran at several load levels; as bars at one level."""
    cols = [c for c in ((col,) if not quantiles else quantiles) if c in load and load[c].notna().any()]
    if load.empty or not cols:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.8))
    if load.groupby("config")["users"].nunique().max() == 1:
        width = 0.8 / len(cols)
        for j, c in enumerate(cols):
            xs = [i + (j - (len(cols) - 1) / 2) * width for i in range(len(load))]
            ax.bar(xs, load[c].fillna(0), width=width * 0.95, color=[colours(_model(x)) for x in load["config"]],
                   alpha=1.0 - 0.25 * j, label=c.split("_")[-2] if len(cols) > 1 else None)
        ax.set_xticks(range(len(load)), [f"{c}\n@ {u} agents" for c, u in zip(load["config"], load["users"])],
                      fontsize=8)
        if len(cols) > 1:
            ax.legend(fontsize=7, title="shade", title_fontsize=7)
    else:
        styles = ["-", "--", ":"]
        for config, g in load.groupby("config", sort=False):
            g = g.sort_values("users")
            for c, ls in zip(cols, styles):
                label = config if len(cols) == 1 else f"{config} {c.split('_')[-2]}"
                ax.plot(g["users"], g[c], ls, marker="o", color=colours(_model(config)), label=label)
        ax.set_xlabel("concurrent agents (Locust users)")
        ax.legend(fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _png(fig)


def throughput(load, colours, kind="measured"):
    return _per_users(load, "output_tokens_per_s", colours, f"Output tokens/s against concurrency ({kind})",
                      "output tokens/s")


def ttft(load, colours, kind="measured"):
    return _per_users(load, "", colours, f"Time to first token p50 / p95 / p99 ({kind})", "seconds",
                      ("ttft_p50_s", "ttft_p95_s", "ttft_p99_s"))


def itl(load, colours, kind="measured"):
    return _per_users(load, "", colours, f"Inter-token latency p50 / p95 / p99 ({kind})", "seconds",
                      ("itl_p50_s", "itl_p95_s", "itl_p99_s"))


def goodput(load, colours, kind="measured"):
    return _per_users(load, "goodput_requests_per_min", colours, f"Goodput at the SLO ({kind})",
                      "requests meeting the SLO per minute")


def _bars(values: pd.DataFrame, col: str, colours: Colours, title: str, xlabel: str) -> bytes | None:
    v = values.dropna(subset=[col]) if col in values else pd.DataFrame()
    if v.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.4))
    labels = [f"{c} @ {u}" for c, u in zip(v["config"], v["users"])]
    ax.barh(labels, v[col], color=[colours(_model(c)) for c in v["config"]])
    for i, x in enumerate(v[col]):
        ax.text(x, i, f" {x:.3g}", va="center", fontsize=8)
    if (v[col] == 0).all():
        ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.invert_yaxis()
    return _png(fig)


def preemptions(load, colours, kind="measured"):
    return _bars(load, "preemptions", colours, f"Preemptions during the run ({kind}, vllm:num_preemptions)",
                 "preemptions")


def prefix_hits(load, colours, kind="measured"):
    return _bars(load, "prefix_cache_hit_rate", colours, f"Prefix-cache hit rate ({kind}, token-weighted)",
                 "hit rate (0-1)")


def cost(costs, colours):
    return _bars(costs, "usd_per_1m_output_tokens", colours, "Cost per 1M output tokens (computed)",
                 "$ per 1M output tokens")


def cliff(cliffs: pd.DataFrame, colours: Colours, kind: str = "measured") -> bytes | None:
    v = cliffs.dropna(subset=["sessions_before_first_preemption"]) if len(cliffs) else cliffs
    if v.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.barh(v["config"], v["sessions_before_first_preemption"], color=[colours(_model(c)) for c in v["config"]],
            hatch=["" if p else "//" for p in v["preempted"]])
    ax.set_xlabel("concurrent agent sessions before the first preemption (hatched: none seen)")
    ax.set_title(f"The preemption cliff ({kind})")
    ax.invert_yaxis()
    return _png(fig)


def kv_over_time(repeats: pd.DataFrame, colours: Colours, kind: str = "measured") -> bytes | None:
    """KV usage over each run in tokens and as a fraction of the pool, with running and waiting
    requests (the highest load level of each config)."""
    if repeats.empty:
        return None
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    drawn = False
    for config, g in repeats.groupby("config", sort=False):
        r = g.sort_values(["users", "repeat"]).iloc[-1]
        df = series.read_samples(Path(r["folder"]) / "metrics.csv")
        t0 = r["window_start_ts"]
        frac = series.metric(df, series.KV_USAGE)
        toks = series.kv_tokens_in_use(df)
        run = series.metric(df, series.RUNNING)
        wait = series.metric(df, series.WAITING)
        if frac.empty and run.empty:
            continue
        drawn = True
        c = colours(_model(config))
        if not toks.empty:
            ax1.plot(toks.index - t0, toks.values, color=c, label=f"{config} @ {r['users']}")
        if not frac.empty:
            ax2.plot(frac.index - t0, 100 * frac.values, color=c, label=config)
        if not run.empty:
            ax3.plot(run.index - t0, run.values, color=c, label=f"{config} running")
        if not wait.empty and wait.max() > 0:
            ax3.plot(wait.index - t0, wait.values, "--", color=c, label=f"{config} waiting")
    if not drawn:
        plt.close(fig)
        return None
    ax1.set_ylabel("KV tokens in use")
    ax1.set_title(f"KV cache in use, running and waiting requests ({kind})")
    ax1.legend(fontsize=7)
    ax2.set_ylabel("% of the KV pool")
    ax3.set_ylabel("requests")
    ax3.set_xlabel("seconds since the load started")
    ax3.legend(fontsize=7)
    for a in (ax1, ax2, ax3):
        a.grid(alpha=0.3)
    return _png(fig)
