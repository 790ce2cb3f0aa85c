"""``actcache info``: what a store holds, in a few lines."""

from __future__ import annotations

from typing import Any

from actcache.store import open_store


def _size(url: str, storage_options: dict[str, Any] | None) -> int:
    from actcache.workers.storage import filesystem

    fs, root = filesystem(url, storage_options)
    try:
        return int(fs.du(root))
    except (FileNotFoundError, NotImplementedError):
        return 0


def describe(url: str, storage_options: dict[str, Any] | None = None) -> str:
    s = open_store(url, storage_options)
    m = s.manifest
    model = m["model"]
    planned = int(m.get("n_units", 0))
    lines = [
        f"store:       {url}",
        f"format:      {m['format_version']} (actcache {m['actcache_version']})",
        f"model:       {model['name']} ({model['model_type']}, {model['num_hidden_layers']} blocks, "
        f"hidden {model['hidden_size']}), weights {model['weights_hash'][:12]}",
        f"tokenizer:   {model['tokenizer']}, padding {model['padding_side']}",
        f"layers:      {', '.join(map(str, s.layers))}",
        f"poolings:    {', '.join(s.poolings)}",
        f"dtype:       {m['dtype']} (forward {m['model_dtype']}), codec {m['codec']}",
        f"max_length:  {m['max_length']} (truncation {m['truncation_side']}, "
        f"{m.get('truncated', 0)} inputs truncated)",
        f"rows:        {s.n_rows} complete",
        f"units:       {len(s.receipts)}/{planned} complete ({m['rows_per_unit']} rows each)"
        + ("" if s.complete else "  INCOMPLETE: rerun the job to finish it"),
        f"bytes:       {_size(url, storage_options) / 1e6:.1f} MB on storage (compressed), "
        f"{sum(r.bytes for r in s.receipts) / 1e6:.1f} MB of activations uncompressed",
        f"columns:     {', '.join(map(str, s.metadata.columns)) or '-'}",
        f"runs:        {len(s.runs)}",
    ]
    return "\n".join(lines)
