"""``actcache query``: select rows, rank them along a probe direction or by nearness to a
stored row, print a table and optionally export the activations.

Every option defaults to None; the command resolves what None means. Heavy imports
happen inside the command so ``actcache --help`` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from actcache.schemas.errors import ConfigError, flag_names

if TYPE_CHECKING:
    import numpy as np

    from actcache.store import Store

SHOWN_ROWS = 50
"""Rows printed when no --limit is given (an export still gets every row)."""
DEFAULT_K = 10


def load_direction(path: Path, layer: int, probe: str | None, class_name: str | None) -> np.ndarray:
    """The weight row of ``probe`` at ``layer`` in a probes.safetensors file.

    A one-row (binary) probe gives its direction; ``--class`` of its negative class gives
    minus that direction. A multi-class probe needs ``--class``.
    """
    from safetensors import safe_open
    from safetensors._safetensors_rust import SafetensorError

    try:
        with safe_open(str(path), framework="numpy") as f:
            keys, meta = list(f.keys()), f.metadata() or {}
            names = sorted({k.split(".layer", 1)[0] for k in keys if k.endswith(".weight")})
            probe = probe or ("logistic" if "logistic" in names or not names else names[0])
            key = f"{probe}.layer{layer}.weight"
            if key not in keys:
                layers = sorted(k.split(".layer", 1)[1][: -len(".weight")] for k in keys
                                if k.startswith(f"{probe}.layer") and k.endswith(".weight"))
                raise ConfigError(
                    f"{path} has no {key!r}; probes there: {', '.join(names) or 'none'}; "
                    f"layers of {probe!r}: {', '.join(layers) or 'none'} (use --probe/--layer)"
                )
            weight = f.get_tensor(key)
    except (OSError, SafetensorError) as e:
        raise ConfigError(f"cannot read --direction {str(path)!r}: {e}") from e
    return _class_row(weight, json.loads(meta.get("classes", "[]")), class_name, path)


def _class_row(weight: np.ndarray, classes: list[Any], class_name: str | None,
               path: Path) -> np.ndarray:
    from actcache.query._select import match_key

    if weight.ndim == 1:
        weight = weight[None, :]
    if class_name is None:
        if weight.shape[0] == 1:
            return weight[0]
        raise ConfigError(
            f"the probe in {path} has {weight.shape[0]} classes "
            f"({', '.join(map(str, classes))}); pick one with --class"
        )
    keys = [match_key(c) for c in classes]
    wanted = match_key(_json_scalar(class_name))
    if wanted not in keys and class_name not in [str(c) for c in classes]:
        raise ConfigError(
            f"class {class_name!r} is not one of the probe's classes: "
            f"{', '.join(map(str, classes)) or 'none recorded'}"
        )
    at = keys.index(wanted) if wanted in keys else [str(c) for c in classes].index(class_name)
    if weight.shape[0] == 1:
        return -weight[0] if at == 0 and len(classes) == 2 else weight[0]
    return weight[at]


def _json_scalar(text: str) -> Any:
    from actcache.query._select import parse_value

    return parse_value(text)


def _rank(s: Store, layer: int, pooling: str | None, rows: Any, top_k: int | None,
          direction: Path | None, probe: str | None, class_name: str | None,
          nearest_id: str | None, k: int | None, metric: str | None) -> tuple[Any, Any]:
    """(rows, scores) ranked by a direction or by nearness; scores None when unranked."""
    from actcache.query import nearest, topk

    if top_k is not None and direction is None:
        raise ConfigError("--top-k needs --direction probes.safetensors")
    if direction is not None and nearest_id is not None:
        raise ConfigError("give either --direction (top-k) or --nearest ID, not both")
    if direction is not None:
        w = load_direction(direction, s.resolve_layer(layer), probe, class_name)
        result = topk(s, layer, w, top_k or k or DEFAULT_K, pooling, rows)
        return result.rows, result.scores
    if nearest_id is not None:
        query = s.read(layer, pooling, rows=s.rows_for_ids([nearest_id]))[0]
        result = nearest(s, layer, query, k or top_k or DEFAULT_K, metric or "cosine",
                         pooling, rows)
        return result.rows, result.scores
    return rows, None


def print_table(s: Store, rows: Any, scores: Any, total: int, shown: int) -> None:
    from rich.table import Table

    from actcache.terminal import console as terminal

    meta = s.metadata
    inputs = s.inputs(rows[:shown])
    table = Table(show_edge=False)
    table.add_column("id", overflow="fold")
    if inputs is not None:
        table.add_column("input", overflow="fold")
    for column in meta.columns:
        table.add_column(str(column), overflow="fold")
    if scores is not None:
        table.add_column("score", justify="right")
    for i, row in enumerate(rows[:shown]):
        cells = [s.ids[int(row)], *(() if inputs is None else (str(inputs[i]),)),
                 *(str(v) for v in meta.iloc[int(row)].tolist())]
        if scores is not None:
            cells.append(f"{float(scores[i]):.6g}")
        table.add_row(*cells)
    console = terminal()
    console.print(table)
    more = f" (showing {shown}; use --limit or --out for more)" if total > shown else ""
    console.print(f"{total} row{'s' if total != 1 else ''}{more}")


def query_command(
    store: Annotated[str, typer.Argument(help="The store's URL (local path, s3://...).")],
    layer: Annotated[int | None, typer.Option(help="Hidden-state index; negatives count "
                                              "from the last.")] = None,
    pooling: Annotated[str | None, typer.Option(
        help="Stored pooling (may be omitted when the store has one).")] = None,
    where: Annotated[list[str] | None, typer.Option(
        help="col=value filter; repeat for AND, repeat a column for OR.")] = None,
    ids: Annotated[str | None, typer.Option(help="Comma-separated ids, in this order.")] = None,
    limit: Annotated[int | None, typer.Option(help="Keep the first N result rows.")] = None,
    top_k: Annotated[int | None, typer.Option(
        "--top-k", help="Rank by a probe direction and keep K rows.")] = None,
    direction: Annotated[Path | None, typer.Option(
        help="probes.safetensors holding the direction.")] = None,
    probe: Annotated[str | None, typer.Option(
        help="Probe in the file (logistic when present).")] = None,
    class_name: Annotated[str | None, typer.Option(
        "--class", help="Class whose weight row is the direction.")] = None,
    nearest: Annotated[str | None, typer.Option(
        help="Rank by nearness to the row of this id.")] = None,
    k: Annotated[int | None, typer.Option(help="Neighbours to keep (default 10).")] = None,
    metric: Annotated[str | None, typer.Option(
        help="cosine (default), dot or euclidean.")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Write the result's activations to slice.npy (ids beside it in "
             "slice.ids.json), slice.npz or slice.parquet.")] = None,
    dtype: Annotated[str | None, typer.Option(
        help="Export dtype: float32 (default) or stored.")] = None,
) -> None:
    """Select rows by metadata or id, rank them, print them and export their activations."""
    import numpy as np

    from actcache.query import export, parse_where, select
    from actcache.query._export import check_target
    from actcache.store import open_store

    # A metadata-only listing reads no activations; ranking and exports do.
    reads = top_k is not None or direction is not None or nearest is not None or out is not None
    if layer is None and reads:
        what = "--out" if out is not None else "--nearest" if nearest is not None else "--top-k"
        raise ConfigError(f"{what} reads activations: give the layer with --layer, e.g. --layer 6")
    filters = parse_where(where or [])
    if out is not None:
        check_target(out, dtype or "float32")
    if limit is not None and limit < 0:
        raise ConfigError(f"--limit must be 0 or more, got {limit}")
    s = open_store(store)
    if layer is not None:
        s.resolve_layer(layer)
        with flag_names({"pooling": "--pooling"}):
            s.resolve_pooling(pooling)
    wanted = [i.strip() for i in ids.split(",") if i.strip()] if ids is not None else None
    selection = select(s, filters, wanted)
    restrict = selection.rows if (filters or wanted is not None) else None
    rows, scores = _rank(s, layer or 0, pooling, restrict if restrict is not None else None,
                         top_k, direction, probe, class_name, nearest, k, metric)
    rows = np.asarray(selection.rows if rows is None else rows, dtype=np.int64)
    if limit is not None:
        rows = rows[:limit]
        scores = None if scores is None else scores[:limit]
    print_table(s, rows, scores, len(rows), len(rows) if limit is not None else SHOWN_ROWS)
    if out is not None:
        written = export(out, s, layer or 0, pooling, rows, scores, dtype or "float32")
        from actcache.query._export import ids_path

        beside = f" (ids in {ids_path(out)})" if out.suffix == ".npy" else ""
        typer.echo(f"wrote {written} rows to {out}{beside}")
