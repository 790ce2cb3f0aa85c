"""Write and show a run's transfer matrix (``transfer.csv``, ``transfer.png``) and its
scores on another store (``eval.csv``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from rich.console import Console

    from actcache.probes.api import ProbeResult


def write_extras(result: ProbeResult, folder: Path) -> None:
    """``transfer.csv`` and ``transfer.png`` with groups, ``eval.csv`` with an eval store."""
    if result.transfer is not None:
        result.transfer.to_csv(folder / "transfer.csv", index=False, float_format="%.6g")
        import matplotlib.pyplot as plt

        fig = transfer_figure(result)
        fig.savefig(folder / "transfer.png")
        plt.close(fig)
    if result.evaluation is not None:
        result.evaluation.to_csv(folder / "eval.csv", index=False, float_format="%.6g")


def shown_cell(result: ProbeResult) -> tuple[int, str]:
    """The (layer, probe) the heatmap and the terminal show: the pooled run's best."""
    best = result.best()
    return int(best["layer"]), str(best["probe"])


def matrix(transfer: pd.DataFrame, layer: int, probe: str, column: str = "test_accuracy"
           ) -> pd.DataFrame:
    """Train group × test group values of one layer and probe, groups in file order."""
    part = transfer[(transfer["layer"] == layer) & (transfer["probe"] == probe)]
    table = part.pivot(index="train_group", columns="test_group", values=column)
    rows = list(dict.fromkeys(part["train_group"]))
    cols = list(dict.fromkeys(part["test_group"]))
    return table.loc[rows, cols]


def transfer_figure(result: ProbeResult) -> Any:
    """Test accuracy of each group's probe (rows) on each group's test rows (columns) at
    the pooled run's best layer and probe, each cell annotated with it; the colours diverge
    from the majority-class baseline, so a cell below it reads at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    if result.transfer is None:
        raise ValueError("the run has no transfer matrix: give it a group_column")
    layer, probe = shown_cell(result)
    table = matrix(result.transfer, layer, probe)
    counts = matrix(result.transfer, layer, probe, "n_test").iloc[0]
    values = table.to_numpy(dtype=float)
    n_rows, n_cols = values.shape
    chance = float(result.metrics["majority_baseline"].iloc[0])
    norm = TwoSlopeNorm(vcenter=min(max(chance, 1e-6), 1 - 1e-6), vmin=0.0, vmax=1.0)
    fig, ax = plt.subplots(figsize=(1.1 * n_cols + 3.5, 0.55 * n_rows + 2.2), dpi=110)
    image = ax.imshow(values, cmap="RdBu", norm=norm, aspect="auto")
    for i in range(n_rows):
        for j in range(n_cols):
            strong = abs(norm(values[i, j]) - 0.5) > 0.3
            ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if strong else "black")
    ax.set_xticks(range(n_cols), [f"{c}\n(n={int(counts[c])})" for c in table.columns],
                  fontsize=8)
    ax.set_yticks(range(n_rows), [str(r) for r in table.index], fontsize=8)
    ax.set_xlabel("tested on (the group's test rows)")
    ax.set_ylabel("trained on (the group's train rows)")
    meta = result.metadata
    model = meta.get("model") or "model"
    ax.set_title(f"{probe} probe transfer, layer {layer} (the pooled run's best)\n"
                 f"{meta['label_column']} ({meta['pooling']}) · {model}", fontsize=9)
    bar = fig.colorbar(image, ax=ax, label=f"test accuracy (line: majority class {chance:.3f})")
    bar.ax.axhline(chance, color="0.2", linewidth=1)
    fig.tight_layout()
    return fig


def print_extras(result: ProbeResult, console: Console) -> None:
    """The transfer matrix at the best layer, and the best layer on the eval store."""
    from rich.table import Table

    if result.transfer is not None:
        layer, probe = shown_cell(result)
        table = matrix(result.transfer, layer, probe)
        shown = Table(title=f"transfer of {probe} at layer {layer}: test accuracy, trained "
                            "on (rows) × tested on (columns)")
        shown.add_column("trained on")
        for col in table.columns:
            shown.add_column(str(col), justify="right")
        for name, row in table.iterrows():
            shown.add_row(str(name), *(f"{v:.3f}" for v in row))
        console.print(shown)
    if result.evaluation is not None:
        ev = result.evaluation
        best = ev.sort_values(["accuracy", "layer"], ascending=[False, True]).iloc[0]
        line = (f"on {best['eval_store']} ({int(best['n_eval'])} labelled rows): best layer "
                f"{int(best['layer'])} ({best['probe']}, accuracy {best['accuracy']:.3f} "
                f"[{best['accuracy_low']:.2f}, {best['accuracy_high']:.2f}]")
        if not np.isnan(best["auroc"]):
            line += f", AUROC {best['auroc']:.3f}"
        console.print(line + ")")
