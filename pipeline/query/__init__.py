"""Querying a store: rows by metadata or id, top-k along a direction, nearest neighbours,
export to ``.npy`` or ``.parquet``. ``Store.select``, ``Store.topk`` and ``Store.nearest``
delegate here."""

from __future__ import annotations

from actcache.query._export import export
from actcache.query._search import METRICS, Ranking, nearest, topk
from actcache.query._select import Selection, parse_where, select

__all__ = [
    "METRICS",
    "Ranking",
    "Selection",
    "export",
    "nearest",
    "parse_where",
    "select",
    "topk",
]
