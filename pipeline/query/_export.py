"""Writing a query's rows to ``.npy`` or ``.parquet``, readable without actcache.

- ``.npy``: the activations, ``(rows, hidden)`` (``(Σ tokens, hidden)`` for the
  ``tokens`` pooling), in the order of the result; beside it ``{stem}.ids.json``, the
  JSON list of each activation row's id (one per token for ``tokens``).
- ``.npz``: ``activations`` and ``ids`` (strings) together, plus ``scores`` (ranked
  queries) and ``token`` (tokens pooling).
- ``.parquet``: one row per result row (per token for ``tokens``): ``id``, ``token``
  (tokens only), ``score`` (top-k and nearest only), ``input`` (the model input, when
  the store keeps it), the metadata columns, and ``activation``, a fixed-size list
  column of ``hidden`` values.
  ``np.stack(pd.read_parquet(p)["activation"])`` gives the matrix; with pyarrow,
  ``t["activation"].combine_chunks().flatten().to_numpy().reshape(len(t), -1)``.

``dtype="float32"`` (the default) writes exact float32; ``"stored"`` writes the store's
dtype: float16 or float32 as such, bfloat16 as its uint16 bit patterns (widen with
``(a.astype(np.uint32) << 16).view(np.float32)``). The parquet file's schema metadata
``actcache`` records the store, layer, pooling and dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from actcache.schemas.errors import ConfigError
from actcache.workers.dtypes import encode

if TYPE_CHECKING:
    from actcache.store import Store

FORMATS = (".npy", ".npz", ".parquet")
DTYPES = ("float32", "stored")
RESERVED = ("id", "token", "score", "input", "activation")


def check_target(path: Path, dtype: str) -> None:
    """Refuse an unknown format or dtype before anything is read."""
    if path.suffix not in FORMATS:
        raise ConfigError(f"--out {str(path)!r} must end in {', '.join(FORMATS[:-1])} or "
                          f"{FORMATS[-1]}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def _arrow_column(values: pd.Series) -> Any:
    import pyarrow as pa

    try:
        return pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: keep them as text
        return pa.array(values.astype(str))


def to_table(ids: list[str], metadata: pd.DataFrame, x: np.ndarray, scores: np.ndarray | None,
             tokens: np.ndarray | None, info: dict[str, Any],
             inputs: np.ndarray | None = None) -> Any:
    """A pyarrow table of the rows (see the module docstring for its columns)."""
    import pyarrow as pa

    columns: dict[str, Any] = {"id": pa.array(ids, pa.string())}
    if tokens is not None:
        columns["token"] = pa.array(tokens, pa.int32())
    if scores is not None:
        columns["score"] = pa.array(np.asarray(scores, np.float32))
    if inputs is not None:
        columns["input"] = pa.array([str(v) for v in inputs], pa.string())
    for name in metadata.columns:
        key = f"meta_{name}" if str(name) in RESERVED else str(name)
        columns[key] = _arrow_column(metadata[name].reset_index(drop=True))
    hidden = x.shape[1] if x.ndim == 2 else 0
    flat = pa.array(np.ascontiguousarray(x).reshape(-1))
    columns["activation"] = pa.FixedSizeListArray.from_arrays(flat, hidden)
    table = pa.table(columns)
    return table.replace_schema_metadata({"actcache": json.dumps(info)})


def export(path: Path, store: Store, layer: int, pooling: str | None, rows: np.ndarray,
           scores: np.ndarray | None = None, dtype: str = "float32") -> int:
    """Write the rows' activations (and, for parquet, ids, metadata, scores); returns rows."""
    check_target(path, dtype)
    name = store.resolve_pooling(pooling)
    index = store.resolve_layer(layer)
    x = store.read(index, name, rows=rows)
    if dtype == "stored":
        x = encode(x, store.dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = [store.ids[int(i)] for i in rows]
    meta = store.metadata.iloc[rows]
    inputs = store.inputs(rows)
    tokens = None
    if name == "tokens":
        lengths = store.token_lengths(rows)
        repeat = np.repeat(np.arange(len(rows)), lengths)
        ids = [ids[i] for i in repeat]
        meta = meta.iloc[repeat]
        inputs = None if inputs is None else inputs[repeat]
        tokens = np.concatenate([np.arange(n) for n in lengths]) if len(rows) else np.zeros(0)
        scores = None if scores is None else np.asarray(scores)[repeat]
    if path.suffix == ".npy":
        np.save(path, x)
        ids_path(path).write_text(json.dumps(ids))
        return len(x)
    if path.suffix == ".npz":
        arrays: dict[str, Any] = {"activations": x, "ids": np.array(ids, dtype=str)}
        arrays.update({k: v for k, v in (("scores", scores), ("token", tokens)) if v is not None})
        np.savez(path, **arrays)
        return len(x)
    import pyarrow.parquet as pq

    info = {"store": store.url, "layer": index, "pooling": name,
            "dtype": store.dtype if dtype == "stored" else "float32"}
    pq.write_table(to_table(ids, meta, x, scores, tokens, info, inputs), path)
    return len(x)


def ids_path(npy: Path) -> Path:
    """Where a ``.npy`` export's ids go: ``slice.npy`` → ``slice.ids.json``."""
    return npy.with_name(npy.stem + ".ids.json")
