"""Pictures: accuracy vs MACs per criterion, NAM gamma histograms, channels kept, spatial maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from nam_prune.checkpoint import atomic_write
from nam_prune.gates import channel_gates, spatial_gates
from nam_prune.prune import normalize_scores


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    _pyplot().close(fig)


def plot_accuracy_vs_macs(rows: list[dict], path: Path, score: str = "accuracy") -> None:
    """One line per criterion: the fine-tuned score (top-1, or ``map50_95`` for detectors) and the
    score right after the cut (BN recalibrated) against MACs, with std error bars; the unpruned
    ``dense`` arm is a dashed line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for criterion in dict.fromkeys(r["criterion"] for r in rows):
        mine = sorted((r for r in rows if r["criterion"] == criterion), key=lambda r: r["macs"])
        if criterion == "dense":
            axes[0].axhline(100 * mine[0][score], color="black", linestyle="--", label="dense (unpruned)")
            continue
        for axis, key in zip(axes, (score, f"{score}_recalibrated")):
            shown = [r for r in mine if key in r]  # no recalibrated score when recalibrate.batches is 0
            axis.errorbar(
                [r["macs"] / 1e6 for r in shown], [100 * r[key] for r in shown], yerr=[100 * r[f"{key}_std"] for r in shown],
                marker="o", capsize=3, label=criterion,
            )
    axes[0].set_title("after fine-tuning")
    axes[1].set_title("right after the cut, BN recalibrated (ranking quality)")
    for axis in axes:
        axis.set_xlabel("MACs (M)")
        axis.set_ylabel("top-1 (%)" if score == "accuracy" else "mAP50-95 (%)")
        axis.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    _save(fig, path)




def gamma_plots(model: nn.Module, payload: dict[str, Any], folder: Path) -> list[Path]:
    """NAM gamma histograms (overall and per layer, log counts, threshold marked), channels kept
    per layer, and each spatial gate's lambda map; returns the files written."""
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    normalizer = (payload.get("recipe") or {}).get("prune", {}).get("normalizer", "mean")
    threshold = (payload.get("metrics") or {}).get("prune_threshold")
    gates = channel_gates(model)
    written = []
    if gates:
        scores = {n: normalize_scores(m.gamma.detach().abs().float().cpu(), normalizer) for n, m in gates}
        fig, axis = plt.subplots(figsize=(7, 4))
        axis.hist(torch.cat(list(scores.values())).numpy(), bins=60, log=True, color="tab:blue")
        _mark(axis, threshold)
        axis.set(title=f"NAM gamma, all {len(gates)} gates", xlabel=f"normalized |gamma| ({normalizer})", ylabel="channels")
        _save(fig, folder / "gamma_hist.png")
        written.append(folder / "gamma_hist.png")
        cols = 4
        rows = (len(gates) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.4 * rows), squeeze=False)
        for axis, (name, values) in zip(axes.flat, scores.items()):
            axis.hist(values.numpy(), bins=30, log=True, color="tab:blue")
            _mark(axis, threshold)
            axis.set_title(name, fontsize=7)
        for axis in list(axes.flat)[len(scores):]:
            axis.axis("off")
        fig.tight_layout()
        _save(fig, folder / "gamma_hist_per_layer.png")
        written.append(folder / "gamma_hist_per_layer.png")
    layers = payload.get("layers") or []
    if layers:
        fig, axis = plt.subplots(figsize=(max(6, 0.3 * len(layers)), 4))
        names = [row["layer"] for row in layers]
        axis.bar(names, [row["before"] for row in layers], color="lightgray", label="before")
        axis.bar(names, [row["after"] for row in layers], color="tab:green", label="kept")
        axis.set(ylabel="output channels", title="channels kept per layer")
        axis.tick_params(axis="x", labelrotation=90, labelsize=6)
        axis.legend()
        fig.tight_layout()
        _save(fig, folder / "channels_kept.png")
        written.append(folder / "channels_kept.png")
    for name, gate in spatial_gates(model):
        fig, axis = plt.subplots(figsize=(4, 4))
        image = axis.imshow(normalize_scores(gate.gamma.detach().abs().float(), "mean").numpy(), cmap="viridis")
        fig.colorbar(image, ax=axis)
        axis.set_title(f"spatial lambda: {name}", fontsize=8)
        path = folder / f"lambda_{name.replace('.', '_')}.png"
        _save(fig, path)
        written.append(path)
    return written


def _mark(axis, threshold: float | None) -> None:
    if threshold is not None:
        axis.axvline(threshold, color="tab:red", linestyle="--", label=f"pruning threshold {threshold:.4g}")
        axis.legend(fontsize=7)
