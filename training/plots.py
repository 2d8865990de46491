"""PNG plots of a training run: accuracy and loss per epoch, the beta heatmap.

matplotlib is imported lazily with the Agg backend; without it the functions
warn once and return None.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        warnings.warn("matplotlib is not installed; skipping plots", stacklevel=3)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve(
    rows: list[dict], metric: str, path: str | Path, title: str = ""
) -> Path | None:
    """Plots `metric` and `val_<metric>` per epoch from history rows."""
    plt = _pyplot()
    if plt is None:
        return None
    epochs = [row["epoch"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
        values = [row.get(key, np.nan) for row in rows]
        ax.plot(epochs, values, marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(title or metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def beta_heatmap(beta, path: str | Path, title: str = "learned beta") -> Path | None:
    """Heatmap of an (n, n) beta matrix: row i = output i, column j = input j."""
    plt = _pyplot()
    if plt is None:
        return None
    beta = np.asarray(beta, dtype="float32")
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(beta, cmap="viridis", interpolation="nearest")
    ax.set_xlabel("inhibitory input j")
    ax.set_ylabel("output i")
    ax.set_title(f"{title} (n={beta.shape[0]}, max {beta.max():.3g})")
    fig.colorbar(image, ax=ax, label=r"$\beta_{ij}$")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
