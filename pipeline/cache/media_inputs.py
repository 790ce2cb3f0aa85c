"""Image and audio inputs: a table of references, or a folder of class subfolders.

A row's model input is a reference (path, URL or ``base64:`` bytes) and its content hash
is the hash of the encoded bytes, so a replaced file is an edited row and a moved one is
not. Every file is read and decoded once here, before anything is written: an unreadable
file is refused with the row and file named, and the store stays as it was.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from actcache.cache.inputs import InputRows, note_id, read_columns
from actcache.schemas.errors import InputDataError
from actcache.workers.media import (
    AUDIO_SUFFIXES,
    IMAGE_SUFFIXES,
    bytes_hash,
    read_checked,
    reference,
)

LABEL_COLUMN = "label"
_READERS = 8  # files read at once: remote stores answer slowly, one at a time


def load_media_inputs(
    url: str,
    column: str,
    id_column: str | None,
    modality: str,
    storage_options: dict[str, Any] | None = None,
) -> InputRows:
    import fsspec

    from actcache.workers.storage import with_retries

    fs, root = fsspec.core.url_to_fs(url, **with_retries(url, storage_options))
    if fs.isdir(root):
        ids, refs, metas = _class_folders(fs, root, modality)
        columns = [LABEL_COLUMN]
    else:
        ids, refs, metas, columns = _table(url, column, id_column, modality, storage_options)
    where = [f"row {n} (id {i!r})" for n, i in enumerate(ids)]
    with ThreadPoolExecutor(_READERS) as pool:
        blobs = list(pool.map(
            lambda args: read_checked(modality, args[0], args[1], storage_options),
            zip(refs, where, strict=True),
        ))
    hashes = [bytes_hash(b) for b in blobs]
    meta = [json.dumps(m, sort_keys=True, default=str, ensure_ascii=False) for m in metas]
    return InputRows(ids, refs, hashes, meta, columns)


def _class_folders(fs: Any, root: str, modality: str) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """ImageFolder convention: ``root/<label>/.../<file>``; id = path relative to root."""
    suffixes = IMAGE_SUFFIXES if modality == "image" else AUDIO_SUFFIXES
    from fsspec.implementations.local import LocalFileSystem

    local = isinstance(fs, LocalFileSystem)
    root = root.rstrip("/")
    ids, refs, metas = [], [], []
    for path in sorted(fs.find(root)):
        relative = path[len(root) + 1 :]
        if "/" not in relative or not relative.lower().endswith(suffixes):
            continue
        ids.append(relative)
        refs.append(path if local else fs.unstrip_protocol(path))
        metas.append({LABEL_COLUMN: relative.split("/", 1)[0]})
    if not ids:
        raise InputDataError(
            f"inputs folder {root!r} holds no {modality} files in class subfolders "
            f"({', '.join(suffixes)}); give a table or a folder of <label>/<file> files"
        )
    return ids, refs, metas


def _table(
    url: str,
    column: str,
    id_column: str | None,
    modality: str,
    storage_options: dict[str, Any] | None,
) -> tuple[list[str], list[str], list[dict[str, Any]], list[str]]:
    records, columns = read_columns(url, storage_options,
                                    ((column, f"{modality}_column"), (id_column, "id_column")))
    base = url.rsplit("/", 1)[0] if "/" in url else None
    ids, refs, metas = [], [], []
    seen: dict[str, int] = {}
    for number, record in enumerate(records):
        row_id = str(record[id_column]) if id_column is not None else str(number)
        try:
            refs.append(reference(record.get(column), base))
        except ValueError as e:
            raise InputDataError(
                f"row {number} (id {row_id!r}): {column!r} is {e}; give each row a path, "
                "a URL or the file's bytes"
            ) from e
        note_id(seen, row_id, number)
        ids.append(row_id)
        metas.append({k: v for k, v in record.items() if k not in (column, id_column)})
    return ids, refs, metas, [c for c in columns if c not in (column, id_column)]
