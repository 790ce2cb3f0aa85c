"""``actcache info``: what a store holds, in a few lines."""

from __future__ import annotations

from typing import Any

from actcache.schemas import store as layout
from actcache.store import Store, open_store


def _size(url: str, storage_options: dict[str, Any] | None) -> int:
    from actcache.workers.storage import filesystem

    fs, root = filesystem(url, storage_options)
    try:
        return int(fs.du(root))
    except (FileNotFoundError, NotImplementedError):
        return 0


def _compressed(s: Store, storage_options: dict[str, Any] | None) -> list[str]:
    """The poolings whose activation arrays compress (a crc32c checksum compresses nothing).

    Read from each array's own codecs: the manifest's `codec` describes the actcache that
    wrote the store, and stores of every format and codec keep reading.
    """
    from zarr.codecs import Crc32cCodec

    from actcache.workers.storage import open_group

    if not s.layers:
        return []
    group = open_group(s.url, "r", storage_options)
    found = []
    for pooling in s.poolings:
        if pooling == "tokens" and layout.packed_tokens(s.manifest):
            continue  # format 3 packs tokens uncompressed, one array per unit
        array = group[layout.activation_key(pooling, s.layers[0])]
        if any(not isinstance(c, Crc32cCodec) for c in array.compressors):
            found.append(pooling)
    return found


def _bytes_line(s: Store, url: str, storage_options: dict[str, Any] | None) -> str:
    compressed = _compressed(s, storage_options)
    if not compressed:
        how = ""
    elif len(compressed) == len(s.poolings):
        how = " (compressed)"
    else:
        how = f" ({', '.join(compressed)} compressed)"
    raw = sum(r.bytes for r in s.receipts) / 1e6
    return (f"{_size(url, storage_options) / 1e6:.1f} MB on storage{how}, {raw:.1f} MB of "
            f"activations{' uncompressed' if compressed else ''}")


def describe(url: str, storage_options: dict[str, Any] | None = None) -> str:
    s = open_store(url, storage_options)
    m = s.spec
    model = m.model
    lines = [
        f"store:       {url}",
        f"format:      {m.format_version} (actcache {m.actcache_version})",
        f"model:       {model.name} ({model.model_type}, {model.num_hidden_layers} blocks, "
        f"hidden {model.hidden_size}), weights {model.weights_hash[:12]}",
        f"tokenizer:   {model.tokenizer}, padding {model.padding_side}",
        f"layers:      {', '.join(map(str, s.layers))}",
        f"poolings:    {', '.join(s.poolings)}",
        f"dtype:       {m.dtype} (forward {m.model_dtype}), codec {m.codec}",
        f"max_length:  {m.max_length} (truncation {m.truncation_side}, "
        f"{m.truncated} inputs truncated)",
        f"rows:        {s.n_rows} complete",
        f"units:       {len(s.receipts)}/{m.n_units} complete ({m.rows_per_unit} rows each)"
        + ("" if s.complete else "  INCOMPLETE: rerun the job to finish it"),
        f"bytes:       {_bytes_line(s, url, storage_options)}",
        f"columns:     {', '.join(map(str, s.metadata.columns)) or '-'}",
        f"runs:        {len(s.runs)}",
    ]
    return "\n".join(lines)
