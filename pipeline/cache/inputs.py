"""Reading a job's inputs (jsonl, csv, parquet at any fsspec URL) into validated rows."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from actcache.schemas.errors import InputDataError, InputFileNotFoundError
from actcache.workers.storage import with_retries

FORMATS = ("jsonl", "csv", "parquet")


@dataclass(frozen=True)
class InputRows:
    """The inputs, in input order: ids, model inputs, content hashes, metadata JSON.

    A model input is a text, or a (text, pair) when the job names a pair column.
    """

    ids: list[str]
    texts: list[Any]
    hashes: list[str]
    meta: list[str]
    columns: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def content_hash(text: str | tuple[str, str]) -> str:
    """Hash of what the model sees: an edited text is re-cached, a metadata edit is not."""
    data = text if isinstance(text, str) else json.dumps(list(text), ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:32]


def input_format(url: str) -> str:
    lowered = url.lower().removesuffix(".gz")
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl"),
                        (".csv", "csv"), (".parquet", "parquet"), (".pq", "parquet")):
        if lowered.endswith(suffix):
            return fmt
    raise InputDataError(
        f"cannot tell the format of inputs {url!r}: name it .jsonl, .csv or .parquet"
    )


def read_records(url: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    import fsspec

    fmt = input_format(url)
    try:
        with fsspec.open(url, "rb", compression="infer", **with_retries(url, storage_options)) as f:
            data = f.read()
    except FileNotFoundError as e:
        raise InputFileNotFoundError(
            f"inputs file {url!r} does not exist; fix `inputs` in the job (relative paths "
            "resolve against the job file's folder)"
        ) from e
    if fmt == "jsonl":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise InputDataError(
                f"{url}: line {line} is not UTF-8 (byte {e.start}); save the file as UTF-8"
            ) from e
        return _parse_jsonl(text, url)
    import io

    import pandas as pd

    try:
        frame = pd.read_csv(io.BytesIO(data)) if fmt == "csv" else pd.read_parquet(io.BytesIO(data))
    except Exception as e:
        raise InputDataError(f"cannot read {fmt} inputs {url!r}: {e}") from e
    return [_plain(record) for record in frame.to_dict(orient="records")]


def _parse_jsonl(text: str, url: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputDataError(
                f"{url}: line {number} is not valid JSON ({e.msg}); fix or remove that line"
            ) from e
        if not isinstance(record, dict):
            raise InputDataError(f"{url}: line {number} is not a JSON object")
        records.append(record)
    return records


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, float) and math.isnan(value):
            value = None
        out[str(key)] = value
    return out


def read_columns(url: str, storage_options: dict[str, Any] | None,
                 named: tuple[tuple[str | None, str], ...]) -> tuple[list[dict[str, Any]], list[str]]:
    """(the input's records, its columns in order of first appearance); no rows, or a
    column that a job field in ``named`` (column, field) names and no row has, is an error."""
    records = read_records(url, storage_options)
    if not records:
        raise InputDataError(f"inputs {url!r} hold no rows")
    columns = list(dict.fromkeys(k for r in records for k in r))
    for column, field in named:
        if column is not None and column not in columns:
            raise InputDataError(
                f"inputs {url!r} have no column {column!r} (set by `{field}`); "
                f"columns found: {', '.join(columns)}"
            )
    return records, columns


def note_id(seen: dict[str, int], row_id: str, number: int) -> None:
    """Note that row ``number`` has ``row_id`` in ``seen``; an id seen before is an error."""
    if row_id in seen:
        raise InputDataError(
            f"id {row_id!r} appears twice (rows {seen[row_id]} and {number}); ids must be unique"
        )
    seen[row_id] = number


def load_inputs(
    url: str,
    text_column: str,
    id_column: str | None,
    storage_options: dict[str, Any] | None = None,
    modality: str = "text",
    pair_column: str | None = None,
) -> InputRows:
    if modality != "text":
        from actcache.cache.media_inputs import load_media_inputs

        return load_media_inputs(url, text_column, id_column, modality, storage_options)
    records, columns = read_columns(url, storage_options, (
        (text_column, "text_column"), (id_column, "id_column"), (pair_column, "text_pair_column")))
    ids: list[str] = []
    texts: list[Any] = []
    hashes: list[str] = []
    meta: list[str] = []
    seen: dict[str, int] = {}
    for number, record in enumerate(records):
        text: Any = record.get(text_column)
        row_id = str(record[id_column]) if id_column is not None else str(number)
        for column in (text_column, pair_column):
            value = record.get(column) if column is not None else "-"
            if not isinstance(value, str) or not value.strip():
                raise InputDataError(
                    f"row {number} (id {row_id!r}) has an empty or non-text {column!r}; "
                    "remove it or give it text"
                )
        if pair_column is not None:
            text = (text, record[pair_column])
        note_id(seen, row_id, number)
        ids.append(row_id)
        texts.append(text)
        hashes.append(content_hash(text))
        extra = {k: v for k, v in record.items() if k not in (text_column, id_column, pair_column)}
        meta.append(json.dumps(extra, sort_keys=True, default=str, ensure_ascii=False))
    meta_columns = [c for c in columns if c not in (text_column, id_column, pair_column)]
    return InputRows(ids, texts, hashes, meta, meta_columns)
