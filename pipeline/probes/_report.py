"""Write a probe run: metrics.csv, probes.safetensors, layers.png, and a terminal table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from rich.console import Console

    from actcache.probes.api import ProbeResult


def write_outputs(result: ProbeResult, out: str | Path) -> Path:
    """Write the three files into ``out`` (created if needed); returns the folder."""
    from safetensors.numpy import save_file

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    result.metrics.to_csv(folder / "metrics.csv", index=False, float_format="%.6g")
    save_file(result.tensors, str(folder / "probes.safetensors"), metadata=result.metadata)
    _umask_mode(folder / "probes.safetensors")
    plot_layers(result, folder / "layers.png")
    return folder


def _umask_mode(path: Path) -> None:
    """Give ``path`` the mode of the other outputs: safetensors writes its file through a
    private temporary file (0600), where ``open()`` would honour the umask (0644)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def plot_layers(result: ProbeResult, path: Path) -> None:
    """Test accuracy (solid) and control accuracy (dashed) against layer, per probe; test
    R² and control R² for a regression."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    regression = result.task == "regression"
    score, control = ("test_r2", "control_r2") if regression else (
        "test_accuracy", "control_accuracy")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for probe, group in result.metrics.groupby("probe", sort=False):
        line = ax.plot(group["layer"], group[score], marker="o", label=f"{probe}")[0]
        if group[control].notna().any():
            ax.plot(group["layer"], group[control], linestyle="--",
                    color=line.get_color(), label=f"{probe} control")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test R²" if regression else "test accuracy")
    ax.set_title(f"{result.metadata['label_column']} ({result.metadata['pooling']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


_HEADERS = {
    "strength": "C", "train_accuracy": "train acc", "test_accuracy": "test acc",
    "test_auroc": "AUROC", "control_accuracy": "control", "selectivity": "select.",
    "train_r2": "train R²", "test_r2": "test R²", "test_mse": "test MSE",
    "control_r2": "control R²",
}


def _fmt(value: object) -> str:
    if isinstance(value, float | np.floating):
        return "" if np.isnan(value) else f"{value:.4g}"
    return str(value)


def print_report(result: ProbeResult, console: Console, out: Path | None = None) -> None:
    """A table of the metrics and one summary line naming the best layer."""
    from rich.table import Table

    table = Table(title=f"probes on {result.metadata['label_column']!r}")
    shown = ["layer", "probe", "strength", "train_accuracy", "test_accuracy", "test_auroc",
             "control_accuracy", "selectivity"]
    if result.task == "regression":
        shown = ["layer", "probe", "strength", "train_r2", "test_r2", "test_mse", "control_r2",
                 "selectivity"]
    for col in shown:
        # Short headers keep the table whole in an 80-column terminal; metrics.csv keeps
        # the full names.
        table.add_column(_HEADERS.get(col, col), justify="right" if col != "probe" else "left")
    for _, row in result.metrics.iterrows():
        table.add_row(*(_fmt(row[c]) for c in shown))
    console.print(table)
    unlabelled = int(result.metadata.get("unlabelled_rows", "0"))
    if unlabelled:
        console.print(f"{unlabelled} rows have no {result.metadata['label_column']!r} label "
                      "and were left out")
    console.print(summary_line(result, out))


def summary_line(result: ProbeResult, out: Path | None = None) -> str:
    best = result.best()
    what = "test R²" if result.task == "regression" else "test accuracy"
    line = (f"best layer: {int(best['layer'])} ({best['probe']}, {what} "
            f"{best[result.score_column]:.3f}")
    if not np.isnan(best["selectivity"]):
        line += f", selectivity {best['selectivity']:.3f}"
    line += f"); trained on {result.device} in {result.precision}"
    return line + (f"; wrote {out}" if out is not None else "")
