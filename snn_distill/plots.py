"""training_curves.png from training_log.csv: loss, learning rate, and spike rate per layer over steps.

matplotlib is imported only when a figure is drawn, with the non-interactive Agg backend (no display).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path


def _float(s: str | None) -> float:
    try:
        return float(s) if s not in (None, "") else math.nan
    except ValueError:
        return math.nan


def read_training_log(csv_path: str | Path) -> dict[str, list[float]]:
    """training_log.csv -> {column: values}; empty cells become NaN."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols: dict[str, list[float]] = {name: [] for name in reader.fieldnames or []}
        for row in reader:
            for name in cols:
                cols[name].append(_float(row.get(name)))
    return cols


def write_training_curves(csv_path: str | Path, png_path: str | Path) -> Path:
    """Draw loss (total and KD) and learning rate over steps, and the spike rate of every LIF layer,
    into `png_path`. A log without rows (e.g. --log-interval 0) still gives a figure that says so."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    cols = read_training_log(csv_path)
    steps = cols.get("step", [])
    layer_cols = [c for c in cols if c.startswith("rate:")]
    fig = Figure(figsize=(12, 3.6), dpi=100, layout="constrained")
    ax_loss, ax_lr, ax_rate = fig.subplots(1, 3)

    def has(name: str) -> bool:
        return any(not math.isnan(v) for v in cols.get(name, []))

    if steps:
        ax_loss.plot(steps, cols["loss"], label="loss", color="C0")
        if has("kd_loss") and cols["kd_loss"] != cols["loss"]:
            ax_loss.plot(steps, cols["kd_loss"], label="KD loss", color="C1", linestyle="--")
        if has("ce_loss") and any(v > 0 for v in cols["ce_loss"] if not math.isnan(v)):
            ax_loss.plot(steps, cols["ce_loss"], label="CE loss", color="C2", linestyle=":")
        ax_loss.legend(loc="upper right", fontsize=8)
        ax_lr.plot(steps, cols.get("lr", []), color="C3")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    else:
        for ax in (ax_loss, ax_lr, ax_rate):
            ax.text(0.5, 0.5, "no logged steps\n(--log-interval 0?)", ha="center", va="center", transform=ax.transAxes)
    ax_loss.set(title="distillation loss", xlabel="step", ylabel="loss")
    ax_lr.set(title="learning rate", xlabel="step", ylabel="lr")
    if steps and layer_cols:
        for i, name in enumerate(layer_cols):
            ax_rate.plot(steps, cols[name], label=name[len("rate:") :], color=f"C{i % 10}")
        if has("spike_rate"):
            ax_rate.plot(steps, cols["spike_rate"], label="mean", color="black", linestyle="--")
        ax_rate.legend(loc="best", fontsize=7)
        ax_rate.set_ylim(bottom=0)
    elif steps:
        ax_rate.text(0.5, 0.5, "no spiking layers (ANN student)", ha="center", va="center", transform=ax_rate.transAxes)
    ax_rate.set(title="spike rate per layer", xlabel="step", ylabel="spikes / neuron / timestep")
    for ax in (ax_loss, ax_lr, ax_rate):
        ax.grid(alpha=0.3)
    png_path = Path(png_path)
    fig.savefig(png_path)
    return png_path
