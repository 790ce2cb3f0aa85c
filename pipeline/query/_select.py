"""Selecting rows by metadata: ``store.select(where={...})`` and ``--where col=value``.

Values match with type tolerance, so a filter typed on the command line finds what the
inputs stored: ``1`` matches the int 1, the float 1.0 and the string "1"; ``true``
matches the bool True and the string "true"; ``null`` matches missing values. A list of
values matches any of them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from actcache.schemas.errors import ColumnNotFoundError, ConfigError

if TYPE_CHECKING:
    from actcache.store import Store


def match_key(value: Any) -> str:
    """A canonical text form under which equal-looking values of different types meet."""
    if value is None or (isinstance(value, float | np.floating) and math.isnan(float(value))):
        return "null"
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        number = float(value)
        return str(int(number)) if number.is_integer() else repr(number)
    if isinstance(value, str):
        return value
    if value is pd.NA or value is pd.NaT:
        return "null"
    return json.dumps(value, sort_keys=True, default=str)


def matches(column: pd.Series, wanted: Any) -> np.ndarray:
    """Boolean mask of the column's values equal (with type tolerance) to ``wanted``.

    ``wanted`` may be a scalar or a list/tuple/set of scalars (any of them).
    """
    values = wanted if isinstance(wanted, list | tuple | set | frozenset) else [wanted]
    keys = {match_key(v) for v in values}
    raw = {str(v) for v in values}
    mask = np.fromiter(
        ((match_key(v) in keys) or (isinstance(v, str) and v in raw) for v in column),
        dtype=bool,
        count=len(column),
    )
    return mask


def parse_value(text: str) -> Any:
    """A JSON scalar when the text is one (``1`` → 1, ``true`` → True), else the text."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if not isinstance(value, dict | list) else text


def parse_where(items: Iterable[str]) -> dict[str, Any]:
    """``["label=1", "split=test"]`` → ``{"label": 1, "split": "test"}``.

    A column given twice matches either value: ``split=test split=val``.
    """
    where: dict[str, Any] = {}
    for item in items:
        column, sep, text = item.partition("=")
        if not sep or not column.strip():
            raise ConfigError(
                f"--where {item!r} is not of the form column=value; write e.g. --where label=1"
            )
        column, value = column.strip(), parse_value(text.strip())
        if column in where:
            previous = where[column]
            where[column] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            where[column] = value
    return where


def check_columns(metadata: pd.DataFrame, columns: Iterable[str]) -> None:
    available = [str(c) for c in metadata.columns]
    for column in columns:
        if column not in metadata.columns:
            listed = ", ".join(available) if available else "none"
            raise ColumnNotFoundError(
                f"column {column!r} is not in the store's metadata; available columns: {listed}"
            )


def select_rows(metadata: pd.DataFrame, where: Mapping[str, Any] | None) -> np.ndarray:
    """Store rows (positions) whose metadata match every ``where`` entry, in store order."""
    if not where:
        return np.arange(len(metadata), dtype=np.int64)
    check_columns(metadata, where)
    mask = np.ones(len(metadata), dtype=bool)
    for column, wanted in where.items():
        mask &= matches(metadata[column], wanted)
    return np.flatnonzero(mask).astype(np.int64)


@dataclass(frozen=True)
class Selection:
    """Rows of a store chosen by metadata (or ids), in store order unless given otherwise."""

    store: Store
    rows: np.ndarray
    """Positions in ``store.ids``."""

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self.store.ids[int(i)] for i in self.rows)

    @property
    def metadata(self) -> pd.DataFrame:
        """The selected rows' metadata, indexed by their store positions."""
        return self.store.metadata.iloc[self.rows]

    def read(self, layer: int, pooling: str | None = None) -> np.ndarray:
        """float32 activations of the selected rows (touching only their chunks)."""
        return self.store.read(layer, pooling, rows=self.rows)


def select(
    store: Store,
    where: Mapping[str, Any] | None = None,
    ids: Sequence[str] | None = None,
) -> Selection:
    """Rows matching ``where``; with ``ids``, those ids (in the order given) that match."""
    rows = select_rows(store.metadata, where)
    if ids is not None:
        wanted = store.rows_for_ids(ids)
        if where:
            wanted = wanted[np.isin(wanted, rows)]
        rows = wanted
    return Selection(store, rows)
