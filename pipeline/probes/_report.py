"""Write a probe run: metrics.csv, probes.safetensors, layers.png (with groups, transfer.csv
and transfer.png; with an eval store, eval.csv), and a terminal table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from actcache.probes._transfer_report import print_extras, write_extras
from actcache.schemas.probe import TOKEN_PROBES

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
    if result.positions is not None:  # token-logistic: accuracy at each token position
        result.positions.to_csv(folder / "positions.csv", index=False, float_format="%.6g")
    write_extras(result, folder)
    return folder


def _umask_mode(path: Path) -> None:
    """Give ``path`` the mode of the other outputs: safetensors writes its file through a
    private temporary file (0600), where ``open()`` would honour the umask (0644)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def plot_layers(result: ProbeResult, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = layers_figure(result)
    fig.savefig(path)
    plt.close(fig)


def layers_figure(result: ProbeResult) -> Any:
    """Test accuracy per layer with its 95% interval as a band, control accuracy dashed,
    the majority-class baseline as the floor; test R² and control R² for a regression."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regression = result.task == "regression"
    m = result.metrics
    score, control = ("test_r2", "control_r2") if regression else (
        "test_accuracy", "control_accuracy")
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    for probe, group in m.groupby("probe", sort=False):
        line = ax.plot(group["layer"], group[score], marker="o", label=f"{probe}")[0]
        if not regression and group["test_accuracy_low"].notna().any():
            ax.fill_between(group["layer"], group["test_accuracy_low"],
                            group["test_accuracy_high"], color=line.get_color(), alpha=0.15,
                            linewidth=0)
        if group[control].notna().any():
            ax.plot(group["layer"], group[control], linestyle="--", color=line.get_color())
    # One legend entry per probe; the band and the dashed line are explained once.
    if not regression:
        ax.fill_between([], [], [], color="0.5", alpha=0.25, linewidth=0,
                        label="95% interval (bootstrap over test rows)")
    ax.plot([], [], linestyle="--", color="0.4", label="control task")
    chance = 0.0 if regression else float(m["majority_baseline"].iloc[0])
    ax.axhline(chance, color="0.4", linestyle=":", linewidth=1.2,
               label="R² = 0" if regression else f"majority class ({chance:.3f})")
    if not regression:
        lowest = np.nanmin(m[[control, "test_accuracy_low"]].to_numpy(dtype=float))
        ax.set_ylim(bottom=min(chance, lowest) - 0.02, top=1.0)
    layers = sorted(int(v) for v in m["layer"].unique())
    ax.set_xticks(layers, [("0\nembeddings" if v == 0 else str(v)) for v in layers])
    ax.set_xlabel("layer (hidden-state index)")
    ax.set_ylabel("test R²" if regression else "test accuracy")
    meta = result.metadata
    model = meta.get("model") or "model"
    ax.set_title(f"{meta['label_column']} ({meta['pooling']}) · {model}\n{meta['store_url']}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


_HEADERS = {
    "strength": "C", "train_accuracy": "train acc", "test_accuracy": "test acc [95%]",
    "test_auroc": "AUROC [95%]", "control_accuracy": "control", "selectivity": "select.",
    "train_r2": "train R²", "test_r2": "test R²", "test_mse": "test MSE",
    "control_r2": "control R²",
}


def _fmt(value: object) -> str:
    if isinstance(value, float | np.floating):
        return "" if np.isnan(value) else f"{value:.4g}"
    return str(value)


def _with_interval(row: object, column: str) -> str:
    value, low, high = (row[column], row[f"{column}_low"], row[f"{column}_high"])  # type: ignore[index]
    if np.isnan(value):
        return ""
    return f"{value:.3f}" + ("" if np.isnan(low) else f" [{low:.2f}, {high:.2f}]")


def print_report(result: ProbeResult, console: Console, out: Path | None = None) -> None:
    """A table of the metrics and one summary line naming the best layer."""
    from rich.table import Table

    regression = result.task == "regression"
    title = f"probes on {result.metadata['label_column']!r}"
    if not regression:
        title += (f" (majority class {result.metrics['majority_baseline'].iloc[0]:.3f}; "
                  "\\[low, high]: 95% bootstrap interval over test rows)")
    table = Table(title=title)
    shown = ["layer", "probe", "strength", "train_accuracy", "test_accuracy", "test_auroc",
             "control_accuracy", "selectivity"]
    if result.task == "regression":
        shown = ["layer", "probe", "strength", "train_r2", "test_r2", "test_mse", "control_r2",
                 "selectivity"]
    # Token probes choose a weight decay where the linear probes choose C.
    tokens = set(result.metrics["probe"]) <= {p.value for p in TOKEN_PROBES}
    for col in shown:
        # Short headers keep the table whole in an 80-column terminal; metrics.csv keeps
        # the full names.
        header = "wd" if col == "strength" and tokens else _HEADERS.get(col, col)
        table.add_column(header, justify="right" if col != "probe" else "left")
    for _, row in result.metrics.iterrows():
        table.add_row(*(_with_interval(row, c) if not regression and c in INTERVALS
                        else _fmt(row[c]) for c in shown))
    console.print(table)
    unlabelled = int(result.metadata.get("unlabelled_rows", "0"))
    if unlabelled:
        console.print(f"{unlabelled} rows have no {result.metadata['label_column']!r} label "
                      "and were left out")
    if result.passes > 1:
        console.print(f"the rows exceed --max-memory: read the store in {result.passes:g} passes")
    unconverged = result.iterations.get("unconverged", 0)
    if unconverged:
        console.print(f"warning: {unconverged} logistic fits stopped at the pass limit before "
                      "reaching the tolerance (tol); a larger --max-memory gives a larger sample")
    print_extras(result, console)
    console.print(summary_line(result, out))


def summary_line(result: ProbeResult, out: Path | None = None) -> str:
    best = result.best()
    what = "test R²" if result.task == "regression" else "test accuracy"
    line = (f"best layer: {int(best['layer'])} ({best['probe']}, {what} "
            f"{best[result.score_column]:.3f}")
    if not np.isnan(best["selectivity"]):
        line += f", selectivity {best['selectivity']:.3f}"
    probes = list(result.metrics["probe"].unique())
    # One decision serves every probe it covers: its reason follows the last of them.
    last = max((i for i, p in enumerate(probes) if p in CHOSEN), default=-1)
    used = ", ".join(f"{probe} in {PRECISION.get(str(probe), result.precision)}"
                     + (f" ({result.choice.summary()})" if i == last
                        and result.choice is not None else "")
                     for i, probe in enumerate(probes))
    line += f"); trained on {result.device}: {used}"
    return line + (f"; wrote {out}" if out is not None else "")


INTERVALS = ("test_accuracy", "test_auroc")
#: Probes whose precision ``_precision.choose`` decided (``result.choice``).
CHOSEN = ("logistic", "attentive", "moment", "token-logistic")
PRECISION = {"ridge": "float64", "mean-diff": "float64"}
"""Probes solved in closed form from float64 moments and Gram matrices, whatever
``--precision`` says; logistic trains in ``result.precision``."""
