"""The experiment's figures: convergence curves, AWGN degradation, sample grids side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import DIGITS_LEVELS
from ..fileio import atomic_path
from .budgets import HOST, PRESETS
from .runs import quantise


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, target: Path) -> Path:
    """Lay out ``fig``, write it as a PNG atomically, and free it."""
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    _pyplot().close(fig)
    return target


def plot_curves(results: list[dict], analysis: dict, target: Path, x_key: str) -> Path:
    plt = _pyplot()
    hosts = [h for h in ("digits-resflow", "digits-glow") if any(HOST[r["preset"]] == h for r in results)]
    fig, axes = plt.subplots(1, max(1, len(hosts)), figsize=(6 * max(1, len(hosts)), 4), squeeze=False)
    for ax, host in zip(axes[0], hosts, strict=False):
        for preset in [p for p in PRESETS if HOST[p] == host]:
            runs = [r for r in results if r["preset"] == preset and r["curve"]]
            if not runs:
                continue
            n = min(len(r["curve"]) for r in runs)
            y = np.array([[p["bpd"] for p in r["curve"][:n]] for r in runs])
            x = np.array(
                [[p["epoch"] if x_key == "epoch" else p["seconds"] for p in r["curve"][:n]] for r in runs]
            ).mean(0)
            line = ax.plot(x, y.mean(0), marker="o", ms=3, label=f"{preset} (n={len(runs)})")[0]
            ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.15)
        if host in analysis["thresholds"]:
            ax.axhline(analysis["thresholds"][host], color="grey", ls="--", lw=1, label="threshold")
        ax.set_xlabel("epoch" if x_key == "epoch" else "cumulative training seconds")
        ax.set_ylabel("held-out bits/dim (curve subset)")
        ax.set_title(f"host: {host}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("mean over seeds; band: min to max over seeds")
    return _save(fig, target)


def plot_awgn(analysis: dict, target: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for preset, s in analysis["summary"].items():
        ks = list(s["awgn_relative"])
        means = [s["awgn_relative"][k]["mean"] for k in ks]
        lo = [s["awgn_relative"][k]["lo"] for k in ks]
        hi = [s["awgn_relative"][k]["hi"] for k in ks]
        yerr = None
        if all(v is not None for v in lo + hi):
            yerr = [np.subtract(means, lo), np.subtract(hi, means)]
        ax.errorbar([float(k) for k in ks], means, yerr=yerr, marker="o", capsize=3, label=preset)
    ax.set_xscale("log")
    ax.set_xlabel("AWGN sigma (data in [0, 1])")
    ax.set_ylabel("relative bits/dim degradation")
    ax.set_title("mean over seeds, 95% t interval")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, target)


def plot_samples(results: list[dict], out_dir: Path, test_data: np.ndarray, target: Path) -> Path:
    plt = _pyplot()
    from ..plots import tile_images

    panels = [("real test digits", test_data[:64] / (DIGITS_LEVELS - 1))]
    for preset in PRESETS:
        runs = sorted((r for r in results if r["preset"] == preset), key=lambda r: r["seed"])
        if runs:
            path = out_dir / "runs" / preset / f"seed{runs[0]['seed']}" / "samples.npy"
            if path.is_file():
                samples = quantise(np.load(path)).reshape(-1, 1, 8, 8)
                panels.append((f"{preset}\n(seed {runs[0]['seed']})", samples))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3))
    for ax, (title, images) in zip(np.atleast_1d(axes), panels, strict=True):
        ax.imshow(tile_images(images, cols=8)[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return _save(fig, target)
