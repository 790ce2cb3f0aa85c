"""Depth curves: the per-layer test score of several probe runs on one axis, so that the
depth at which a concept becomes readable can be compared across models.

A run is a folder written by ``actcache probe`` (``metrics.csv`` and
``probes.safetensors``). Relative depth is the hidden-state index over the model's number
of blocks (0 the embeddings, 1 the last block), so models of different depths line up.
The number of blocks comes from the probed store's manifest (the run's metadata names
the store); when that store cannot be opened any more, from the deepest layer the run
probed, which is the model's depth whenever the run probed all layers (the default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from actcache.schemas.errors import (
    ActcacheError,
    ConfigError,
    InputDataError,
    InputFileNotFoundError,
)
from actcache.similarity._plot import display_name

DEPTHS = ("relative", "absolute")


@dataclass(frozen=True)
class Curve:
    """One run's line: a probe's test score per layer, with its interval."""

    label: str
    folder: Path
    probe: str
    layers: np.ndarray
    """Hidden-state indices, ascending."""
    depth: np.ndarray
    """Where each layer sits on the plot's axis (relative or absolute)."""
    score: np.ndarray
    low: np.ndarray | None
    high: np.ndarray | None
    chance: float
    """The majority-class accuracy of the run's test rows (0 for R²)."""
    n_layers: int
    """The model's number of blocks (hidden-state indices run 0..n_layers)."""


def read_run(folder: str | Path, depth: str = "relative", probe: str | None = None
             ) -> tuple[Curve, str]:
    """The curve of one probe run, and its task ("classification" or "regression")."""
    import pandas as pd

    folder = Path(folder)
    metrics_path = folder / "metrics.csv"
    if not metrics_path.is_file():
        raise InputFileNotFoundError(
            f"{folder} has no metrics.csv: give folders written by `actcache probe --out DIR`")
    try:
        metrics = pd.read_csv(metrics_path)
    except (ValueError, pd.errors.ParserError) as e:  # EmptyDataError is a ValueError
        raise InputDataError(f"{metrics_path} is not a readable CSV ({e})") from None
    meta = _metadata(folder / "probes.safetensors")
    regression = meta.get("task") == "regression" or (
        "test_r2" in metrics and "test_accuracy" not in metrics)
    task = "regression" if regression else "classification"
    score_col = "test_r2" if regression else "test_accuracy"
    missing = [c for c in ("layer", "probe", score_col) if c not in metrics]
    if missing or metrics.empty:
        raise InputDataError(
            f"{metrics_path} is not the metrics.csv of a probe run (no rows, or no "
            f"{', '.join(missing)} column): give folders written by `actcache probe --out DIR`")
    probes = list(dict.fromkeys(metrics["probe"]))
    chosen = probe if probe is not None else probes[0]
    if chosen not in probes:
        raise ConfigError(f"{folder} has no {chosen!r} probe; its probes: {', '.join(probes)}")
    rows = metrics[metrics["probe"] == chosen].sort_values("layer")
    layers = rows["layer"].to_numpy(dtype=np.int64)
    n_layers = _n_layers(meta, layers)
    has_band = (not regression and "test_accuracy_low" in rows
                and bool(rows["test_accuracy_low"].notna().any()))
    chance = 0.0
    if not regression:
        chance = float(rows["majority_baseline"].iloc[0]) if "majority_baseline" in rows else np.nan
    curve = Curve(
        label=display_name(meta["model"]) if meta.get("model") else folder.name,
        folder=folder, probe=chosen, layers=layers,
        depth=layers / n_layers if depth == "relative" else layers.astype(float),
        score=rows[score_col].to_numpy(dtype=float),
        low=rows["test_accuracy_low"].to_numpy(dtype=float) if has_band else None,
        high=rows["test_accuracy_high"].to_numpy(dtype=float) if has_band else None,
        chance=chance, n_layers=n_layers)
    return curve, task


def _metadata(path: Path) -> dict[str, str]:
    """The string metadata of a run's probes.safetensors ({} when there is none)."""
    if not path.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})


def _n_layers(meta: dict[str, str], layers: np.ndarray) -> int:
    url = meta.get("store_url")
    if url:
        try:
            from actcache.store import open_store

            return open_store(url).num_hidden_layers
        except (ActcacheError, OSError):  # moved, deleted or unreachable: the run's layers
            pass
    probed = json.loads(meta["layers"]) if meta.get("layers") else layers.tolist()
    return max(1, int(max(probed)))


def read_runs(folders: list[str | Path], depth: str = "relative",
              probe: str | None = None) -> tuple[list[Curve], str]:
    """The curves of several runs, all of one task (mixing tasks is refused)."""
    if depth not in DEPTHS:
        raise ConfigError(f"--depth must be one of {', '.join(DEPTHS)}, not {depth!r}")
    if not folders:
        raise ConfigError("give at least one probe result folder")
    got = [read_run(f, depth, probe) for f in folders]
    tasks = {task for _, task in got}
    if len(tasks) > 1:
        regression = [str(c.folder) for c, t in got if t == "regression"]
        raise ConfigError(
            f"cannot overlay regression runs ({', '.join(regression)}: test R²) with "
            "classification runs (test accuracy): plot each kind on its own")
    curves = [c for c, _ in got]
    labels = [c.label for c in curves]
    # Two runs of one model (other labels, other data) stay apart in the legend.
    curves = [c if labels.count(c.label) == 1 else
              replace(c, label=f"{c.label} ({c.folder.name})") for c in curves]
    return curves, tasks.pop()


def plot_depth(curves: list[Curve], task: str, depth: str, path: Path) -> None:
    """One line per run with its 95% band, chance dotted (once when the runs share it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regression = task == "regression"
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    chances = {round(c.chance, 6) for c in curves}
    for c in curves:
        line = ax.plot(c.depth, c.score, marker="o", markersize=4,
                       label=f"{c.label}, {c.n_layers} layers ({c.probe})")[0]
        if c.low is not None and c.high is not None:
            ax.fill_between(c.depth, c.low, c.high, color=line.get_color(), alpha=0.15,
                            linewidth=0)
        if len(chances) > 1:
            ax.axhline(c.chance, color=line.get_color(), linestyle=":", linewidth=1.2)
    if regression:
        ax.axhline(0.0, color="0.4", linestyle=":", linewidth=1.2, label="R² = 0")
    elif len(chances) == 1:
        chance = curves[0].chance
        ax.axhline(chance, color="0.4", linestyle=":", linewidth=1.2,
                   label=f"chance: majority class ({chance:.3f})")
    else:
        ax.plot([], [], color="0.4", linestyle=":", label="chance: majority class (each run's)")
    if any(c.low is not None for c in curves):
        ax.fill_between([], [], [], color="0.5", alpha=0.25, linewidth=0,
                        label="95% interval (bootstrap over test rows)")
    ax.set_xlabel("relative depth (layer / number of layers; 0 = embeddings)"
                  if depth == "relative" else "layer (hidden-state index; 0 = embeddings)")
    if depth == "absolute":
        ax.set_xticks(sorted({int(x) for c in curves for x in c.layers}))
    ax.set_ylabel("test R²" if regression else "test accuracy")
    ax.set_title(_title(curves, regression), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary(curve: Curve) -> str:
    """One line per run: its best layer, where that lies in depth, and chance."""
    best = int(np.nanargmax(curve.score))
    return (f"{curve.label}: best {curve.probe} {curve.score[best]:.3f} at layer "
            f"{curve.layers[best]} of {curve.n_layers} (relative depth "
            f"{curve.layers[best] / curve.n_layers:.2f}); chance {curve.chance:.3f}")


def _title(curves: list[Curve], regression: bool) -> str:
    what = "test R²" if regression else "test accuracy"
    return f"{what} by depth: " + " vs ".join(dict.fromkeys(c.label for c in curves))
