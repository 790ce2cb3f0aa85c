"""Checking a store at rest: read every chunk of every complete unit, name the corrupt ones.

Activation chunks carry a crc32c checksum (format 2; shard indexes carry one in every
format), so a byte changed at rest fails its read. ``--repair`` uncommits exactly the
units found here, and the run that follows recomputes their rows like any unit an
interrupted run left behind.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from actcache.cache.create import row_array_keys
from actcache.read import corrupt_message
from actcache.schemas import store as layout
from actcache.schemas.errors import StoreCorruptError
from actcache.store import Store
from actcache.workers.storage import filesystem


def _extents(store: Store) -> list[tuple[str, int, int, int]]:
    """(array key, unit, first, stop) of what every complete unit wrote to every array."""
    m = store.manifest
    rpu = int(m["rows_per_unit"])
    out = [(key, r.unit, r.unit * rpu, r.unit * rpu + r.rows)
           for key in row_array_keys(m) for r in store.receipts]
    if "tokens" in m["poolings"]:
        for layer in m["layers"]:
            for r in store.receipts:
                if layout.packed_tokens(m):
                    key, base = layout.token_unit_key(layer, r.unit), 0
                else:
                    key = layout.activation_key("tokens", layer)
                    base = r.unit * layout.token_slots_per_unit(rpu, int(m["max_length"]))
                out.append((key, r.unit, base, base + r.tokens))
    return out


def scan(store: Store) -> dict[int, list[str]]:
    """Corrupt complete units: unit index -> the arrays whose chunks fail their checksum or
    whose shards are missing."""
    corrupt: dict[int, list[str]] = {}
    for key, unit, lo, hi in _extents(store):
        try:
            store.reader.check(key, unit, lo, hi)
        except StoreCorruptError:
            corrupt.setdefault(unit, []).append(key)
    return corrupt


def verify(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """One line when every chunk reads; StoreCorruptError naming each corrupt unit otherwise."""
    store = Store(url, storage_options)
    corrupt = scan(store)
    if corrupt:
        raise StoreCorruptError(corrupt_message(url, corrupt))
    arrays = len({key.rsplit("/", 1)[0] if "tokens/" in key else key
                  for key, *_ in _extents(store)})
    return (f"verified: {len(store.receipts)} complete units x {arrays} arrays, "
            "every shard is there and every chunk matches its checksum")


def uncommit(store: Store, corrupt: dict[int, list[str]]) -> None:
    """Remove the commit markers of the corrupt units and their corrupt shards.

    The next plan recomputes their rows; the shards go first because a unit that writes
    part of a shard (token arrays) would otherwise read the corrupt one back to merge.
    """
    fs, root = filesystem(store.url, store.storage_options)
    for unit, keys in sorted(corrupt.items()):
        for key in keys:
            if key.startswith("tokens/") and layout.packed_tokens(store.manifest):
                target = f"{root}/{key}"  # the unit's own array, whole
            else:
                arr = store.group[key]
                shard = arr.metadata.encode_chunk_key((unit,) + (0,) * (arr.ndim - 1))
                target = f"{root}/{key}/{shard}"
            if fs.exists(target):  # a missing shard has nothing to remove
                fs.rm(target, recursive=True)
        fs.rm(f"{root}/{layout.unit_key(unit)}", recursive=True)


def repair(url: str, input_ids: set[str], storage_options: dict[str, Any] | None,
           echo: Any) -> None:
    """Uncommit the units whose chunks fail their checksum, so this run recomputes them.

    Runs under the run's lease. Refuses when a corrupt unit holds ids the inputs no longer
    have: uncommitting those rows would drop them from the store.
    """
    from actcache.schemas.errors import ConfigError, StoreNotFoundError
    from actcache.store import gather

    try:
        store = Store(url, storage_options)
    except StoreNotFoundError:
        return
    found = scan(store)
    if not found:
        echo("repair: every chunk reads and matches its checksum; nothing to recompute")
        return
    corrupt = sorted(found)
    rpu = int(store.manifest["rows_per_unit"])
    receipts = {r.unit: r for r in store.receipts}
    slots = np.concatenate([np.arange(u * rpu, u * rpu + receipts[u].rows) for u in corrupt])
    lost = sorted({str(i) for i in gather(store.group[layout.IDS_KEY], slots)} - input_ids)
    if lost:
        raise ConfigError(
            f"units {', '.join(map(str, corrupt))} need recomputing but ids "
            f"{', '.join(map(repr, lost[:5]))} are not in the inputs any more; "
            "run --repair with the inputs that wrote them"
        )
    uncommit(store, found)
    echo(f"repair: recomputing units {', '.join(map(str, corrupt))} "
         "(chunks that failed their checksum or shards that are missing)")
