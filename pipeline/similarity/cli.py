"""``actcache compare``: parse the options, call ``compare``, write ``similarity.csv`` and
``similarity.png``; ``actcache plot``: depth curves of probe runs. Heavy imports wait inside the command so ``--help`` stays instant."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from actcache.schemas.errors import ConfigError

DEFAULT_OUT = "compare"
DEFAULT_PLOT = "depth.png"


class Metric(StrEnum):
    CKA = "cka"
    CKA_DEBIASED = "cka-debiased"
    MUTUAL_KNN = "mutual-knn"


def _layers(text: str | None, flag: str) -> list[int] | None:
    if text is None or text.strip() == "all":
        return None
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        layers = []
    if not layers:
        raise ConfigError(
            f"{flag} must be 'all' or comma-separated ints like 0,3,-1, got {text!r}")
    return layers


def compare_command(
    store_a: Annotated[str, typer.Argument(help="The first store's URL.")],
    store_b: Annotated[str | None, typer.Argument(
        help="The second store's URL; without it, the first against itself.")] = None,
    layers_a: Annotated[str | None, typer.Option(
        help="Layers of the first store: 'all' or indices like 0,3,-1.")] = None,
    layers_b: Annotated[str | None, typer.Option(
        help="Layers of the second store (of the first, without a second).")] = None,
    pooling: Annotated[str | None, typer.Option(help="Stored pooling to read.")] = None,
    metric: Annotated[Metric, typer.Option(
        help="cka (linear, centred), cka-debiased (unbiased HSIC) or mutual-knn.")
    ] = Metric.CKA,
    max_memory: Annotated[str | None, typer.Option(
        help="Memory for sums and blocks, e.g. 512MB (default 2GB).")] = None,
    k: Annotated[int, typer.Option(help="Neighbours for mutual-knn.")] = 10,
    sample: Annotated[int | None, typer.Option(
        help="mutual-knn on this many rows drawn with --seed (default all).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the mutual-knn sample.")] = 0,
    out: Annotated[Path, typer.Option(help="Folder for similarity.csv and .png.")] = Path(DEFAULT_OUT),
) -> None:
    """Similarity of every layer of one store with every layer of another (or itself),
    on the rows whose ids both hold."""
    from actcache.similarity._plot import plot_similarity
    from actcache.similarity.api import compare
    from actcache.store import open_store

    a = open_store(store_a)
    b = None if store_b is None else open_store(store_b)
    frame = compare(a, b, metric=str(metric), layers_a=_layers(layers_a, "--layers-a"),
                    layers_b=_layers(layers_b, "--layers-b"), pooling=pooling,
                    max_memory=max_memory, k=k, sample=sample, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "similarity.csv", index=False)
    names = [s.manifest["model"]["name"] for s in (a, b or a)]
    plot_similarity(frame, names[0], names[1], out / "similarity.png")
    n_rows = int(frame["n_rows"].iloc[0])
    shared = "" if b is None else f" shared by id ({a.n_rows} in A, {b.n_rows} in B)"
    typer.echo(f"{metric}: {len(frame)} layer pairs on {n_rows} rows{shared}; "
               f"wrote {out / 'similarity.csv'} and {out / 'similarity.png'}")


class Depth(StrEnum):
    RELATIVE = "relative"
    ABSOLUTE = "absolute"


def plot_command(
    runs: Annotated[list[Path], typer.Argument(
        metavar="RESULT_DIR",
        help="Probe result folders (written by `actcache probe --out`), one line each.")],
    depth: Annotated[Depth, typer.Option(
        help="x axis: relative (layer / number of layers) or absolute (layer).")
    ] = Depth.RELATIVE,
    probe: Annotated[str | None, typer.Option(
        help="Probe to plot from each run (default: each run's first, e.g. logistic).")
    ] = None,
    out: Annotated[Path, typer.Option(help="The figure to write.")] = Path(DEFAULT_PLOT),
) -> None:
    """Depth curves: the per-layer test accuracy (95% interval) of several probe runs on
    one axis, one line per model, chance marked."""
    from actcache.similarity._depth import plot_depth, read_runs, summary

    curves, task = read_runs(list(runs), str(depth), probe)
    if out.parent != Path():
        out.parent.mkdir(parents=True, exist_ok=True)
    plot_depth(curves, task, str(depth), out)
    for curve in curves:
        typer.echo(summary(curve))
    typer.echo(f"wrote {out}")
