"""The rebound scenario: cheaper calls, more calls. Does total HBM demand fall anyway?

Today: the baseline config serving the fleet. A scenario lowers the cost per call by X % (GPU
time per call falls by X %, at the same price per GPU-hour) and multiplies the call volume by K:
GPU demand becomes K x (1 - X) of today's, rounded up to whole replicas, and HBM follows the GPUs
(each holds the baseline's weights and KV pool). Demand returns to today's at K = 1 / (1 - X);
beyond it, the efficiency gain is spent and more memory is needed than before.

Each planned config is also a scenario of its own: its X is its measured saving in GPU time per
call against the baseline, and its fleet at K x today's calls is planned with its own sessions per
replica, weights and KV pool.
"""

from __future__ import annotations

from math import ceil
from pathlib import Path

from kvlab.io import atomic_path


def _whole_replicas(gpu_demand: float, tp: int) -> int:
    return ceil(gpu_demand / tp - 1e-9) * tp


def rebound(base_label: str, base_fig: dict, base_tp: int, configs: dict[str, tuple[dict, int]],
            cost_drops_pct: list[float], growths: list[float]) -> dict:
    """The grid over X (cost per call -%) and K (call volume x), and each config's own X."""
    today_gpus, today_hbm = base_fig["gpus"], base_fig["hbm_total_gib"]
    hbm_per_gpu = base_fig["hbm_per_gpu_gib"]
    grid = []
    for x in cost_drops_pct:
        for k in growths:
            gpus = _whole_replicas(base_fig["gpu_demand"] * k * (1 - x / 100), base_tp)
            grid.append({"cost_drop_pct": x, "volume_x": k, "demand_x": k * (1 - x / 100), "gpus": gpus,
                         "hbm_gib": gpus * hbm_per_gpu, "gpus_vs_today": gpus / today_gpus,
                         "hbm_vs_today": gpus * hbm_per_gpu / today_hbm})
    rows = []
    base_cost = base_fig["gpu_demand"] / base_fig["calls_per_day"]
    for label, (fig, tp) in configs.items():
        x = 100 * (1 - (fig["gpu_demand"] / fig["calls_per_day"]) / base_cost)
        cells = []
        for k in growths:
            # K x today's calls (the baseline's), served at this config's calls per GPU
            demand = fig["gpu_demand"] * k * base_fig["calls_per_day"] / fig["calls_per_day"]
            gpus = _whole_replicas(demand, tp)
            cells.append({"volume_x": k, "gpus": gpus, "hbm_gib": gpus * fig["hbm_per_gpu_gib"],
                          "gpus_vs_today": gpus / today_gpus, "hbm_vs_today": gpus * fig["hbm_per_gpu_gib"] / today_hbm})
        rows.append({"config": label, "cost_drop_pct": x, "break_even_volume_x": 1 / (1 - x / 100) if x < 100 else None,
                     "cells": cells})
    return {"today": {"config": base_label, "gpus": today_gpus, "hbm_gib": today_hbm},
            "cost_drops_pct": cost_drops_pct, "volume_x": growths, "grid": grid, "configs": rows,
            "provenance": "computed from the simulated sessions per replica and the memory model's HBM per GPU"}


def plot(reb: dict, path: Path) -> Path:
    """Net HBM demand against today's over X and K, the break-even curve, and the configs' own X."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    k_max = max(reb["volume_x"]) * 1.15
    xs = np.linspace(0, 95, 191)
    ks = np.geomspace(0.9, k_max, 200)
    X, K = np.meshgrid(xs, ks)
    demand = K * (1 - X / 100)
    fig, ax = plt.subplots(figsize=(8, 6.5))
    mesh = ax.pcolormesh(X, K, demand, cmap="RdYlGn_r", norm=LogNorm(vmin=0.1, vmax=10), shading="auto")
    fig.colorbar(mesh, ax=ax, label="HBM demand vs today (x)")
    ax.contour(X, K, demand, levels=[1.0], colors="black", linewidths=1.5)
    handles = [plt.Line2D([], [], color="black", label="break-even: K = 1 / (1 - X)")]
    for cell in reb["grid"]:
        ax.annotate(f"{cell['hbm_vs_today']:.2g}x", (cell["cost_drop_pct"], cell["volume_x"]), ha="center",
                    va="center", fontsize=8)
    for row, color in zip(reb["configs"], plt.cm.tab10.colors):
        if 0 <= row["cost_drop_pct"] <= 95:
            handles.append(ax.axvline(row["cost_drop_pct"], color=color, linestyle="--", linewidth=1.2,
                                      label=f"{row['config']}: X = {row['cost_drop_pct']:.0f} %"))
    ax.set_yscale("log")
    ax.set_ylim(0.9, k_max)
    ax.set_yticks(reb["volume_x"], [f"{k:g}x" for k in reb["volume_x"]])
    ax.minorticks_off()
    ax.set_xlabel("cost per call falls by X %")
    ax.set_ylabel("call volume grows K-fold")
    ax.set_title(f"Rebound: fleet HBM against today's ({reb['today']['config']}, {reb['today']['hbm_gib']:,.0f} GiB)\n"
                 "computed from simulated sessions per GPU", fontsize=10)
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path
