"""The layer × layer heatmap of a comparison."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def display_name(model: str) -> str:
    """A model's name as a figure shows it: a shipped package's name for ``pkg://``, a
    local folder's own name (not the whole path), a hub id as it is."""
    if model.startswith("pkg://"):
        return model.removeprefix("pkg://").split("/")[0]
    if model.startswith(("/", "./", "../", "~", "file://")) or "\\" in model:
        return model.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1] or model
    return model


def plot_similarity(frame: pd.DataFrame, name_a: str, name_b: str, path: Path) -> None:
    """Heatmap of ``value`` with layers of A down and layers of B across, each cell
    labelled; the models' names and the number of rows in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name_a, name_b = display_name(name_a), display_name(name_b)
    grid = frame.pivot(index="layer_a", columns="layer_b", values="value")
    rows, cols = grid.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * max(cols, 4), 1.0 + 0.5 * max(rows, 4)), dpi=110)
    # CKA and mutual-knn both lie in [0, 1]; a fixed scale makes two heatmaps comparable.
    image = ax.imshow(grid.to_numpy(dtype=float), vmin=0.0, vmax=1.0, cmap="viridis",
                      origin="lower", aspect="auto")
    ax.set_xticks(range(cols), [str(c) for c in grid.columns])
    ax.set_yticks(range(rows), [str(r) for r in grid.index])
    if rows * cols <= 400:
        for i in range(rows):
            for j in range(cols):
                value = grid.iat[i, j]
                ax.text(j, i, "nan" if value != value else f"{value:.2f}", ha="center",
                        va="center", fontsize=7, color="white" if value < 0.6 else "black")
    ax.set_xlabel(f"layer of {name_b}")
    ax.set_ylabel(f"layer of {name_a}")
    metric = str(frame["metric"].iloc[0])
    n_rows = int(frame["n_rows"].iloc[0])
    ax.set_title(f"{metric}: {name_a} vs {name_b} ({n_rows} rows)", fontsize=9)
    fig.colorbar(image, ax=ax, label=metric)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
