"""Probe transfer across the groups of a store, and probes scored on another store.

**Transfer** (``group_column``). Per group, the run's probes are trained again on that
group's train rows alone: the pooled split restricted to the group (its fit rows fit, its
validation rows choose the strength, which is refit on its train rows), with the run's
classes. That is the run a store holding only the group's rows would make: the same ids
give the same hashed validation rows, the same rows the same standardisation. Then one
pass over the test rows of every group scores all groups' probes at once, and
``transfer.csv`` holds per layer and probe the train group × test group accuracy and
(binary) AUROC. A group with train rows but no test rows is a row of the matrix only; one
with test rows only, a column only.

**Evaluation on another store** (``eval_store``). The probes trained on the store are
scored on every row of the other store whose label is set (its split column, if any, is
ignored: a store of another data set is all evaluation); ``n_eval`` counts them. The other
store must hold the same model (weights fingerprint), hidden size, final-norm setting and
encoder/decoder side, the trained layers and the pooling; anything else is refused before
training, naming the difference. A label value the probes were not trained on is refused
too: accuracy on a class the probe cannot answer would mean nothing.

Both score the float32 raw-space weights that ``probes.safetensors`` holds (standardisation
folded in), applied to the stored activations in float64: exactly what applying the saved
weights by hand gives.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from actcache.probes import _closed, _eval
from actcache.probes._data import FIT, TEST, UNUSED, VAL, BlockSource, ProbeData, Reads, stream_rows
from actcache.schemas.errors import (
    ColumnNotFoundError,
    ProbeDataError,
    StoreIncompleteError,
    StoreMismatchError,
    StoreNotFoundError,
)
from actcache.schemas.probe import ProbeConfig

#: Per layer, a raw-space (out, hidden) weight and (out,) bias.
RawWeights = list[tuple[np.ndarray, np.ndarray]]
#: Trains every probe on the used rows of a ``ProbeData``: its moments and fitted probes.
Fit = Callable[[ProbeData, ProbeConfig], tuple[_closed.Moments, dict[str, Any]]]

TRANSFER_COLUMNS = ["layer", "probe", "train_group", "test_group", "n_test", "test_accuracy",
                    "test_auroc"]
EVAL_COLUMNS = ["layer", "probe", "eval_store", "n_eval", "accuracy", "auroc", "accuracy_low",
                "accuracy_high", "auroc_low", "auroc_high"]


@dataclass(frozen=True)
class Groups:
    """The groups of a store's labelled rows, checked before any training."""

    data: ProbeData
    """The pooled run's labels, classes and split."""
    names: tuple[Any, ...]
    """Group values, sorted."""
    codes: np.ndarray
    """Index into ``names`` per store row; -1 where the row has no group."""
    train: tuple[int, ...]
    """Groups with train rows: the rows of the transfer matrix."""
    test: tuple[int, ...]
    """Groups with test rows: its columns."""


def _sorted_values(values: pd.Series) -> tuple[Any, ...]:
    uniq = list(pd.unique(values.dropna()))
    try:
        uniq.sort()
    except TypeError:
        uniq.sort(key=str)
    return tuple(u.item() if isinstance(u, np.generic) else u for u in uniq)


def plan_groups(store: Any, data: ProbeData, config: ProbeConfig) -> Groups:
    """The groups of ``config.group_column``; every training group can train every class."""
    column = str(config.group_column)
    if data.regression:
        raise ProbeDataError(f"`group_column` needs class labels, but label column "
                             f"{config.label!r} is a regression target: use --task "
                             "classification or drop `group_column`")
    meta = store.metadata
    if column not in meta.columns:
        raise ColumnNotFoundError(
            f"group column {column!r} is not in the store's metadata; available columns: "
            f"{', '.join(map(str, meta.columns))}")
    used = data.role != UNUSED
    values = meta[column]
    names = _sorted_values(values[used])
    index: dict[Hashable, int] = {name: i for i, name in enumerate(names)}
    codes = np.array([index[v] if u and not pd.isna(v) else -1 for v, u in zip(
        values, used, strict=True)], dtype=np.int64)
    if len(names) < 2:
        shown = repr(names[0]) if names else "none"
        raise ProbeDataError(
            f"group column {column!r} has {len(names)} group ({shown}) among the labelled "
            "rows; transfer needs at least two: pick another column with `group_column`")
    train = tuple(g for g in range(len(names))
                  if np.isin(data.role[codes == g], (FIT, VAL)).any())
    test = tuple(g for g in range(len(names)) if (data.role[codes == g] == TEST).any())
    for groups, role in ((train, "train"), (test, "test")):
        if not groups:
            raise ProbeDataError(
                f"no {role} row has a value in group column {column!r}: the transfer matrix "
                f"needs {role} rows in at least one group; fill the column or drop "
                "`group_column`")
    for g in train:
        _check_group(data, codes == g, names[g], column)
    return Groups(data, names, codes, train, test)


def _check_group(data: ProbeData, mine: np.ndarray, name: Any, column: str) -> None:
    fit_classes = set(np.unique(data.y[mine & (data.role == FIT)]).tolist())
    missing = [repr(c) for i, c in enumerate(data.classes) if i not in fit_classes]
    if missing:
        raise ProbeDataError(
            f"group {name!r} of {column!r} has no train rows of class {', '.join(missing)} "
            "(validation rows aside); each group's probes learn every class of the run: "
            "give the group such rows or leave its group value empty")
    if not (mine & (data.role == VAL)).any():
        raise ProbeDataError(
            f"group {name!r} of {column!r} has no validation rows to choose the strength "
            "on: give the group more train rows (or 'val' rows in the split column)")


def transfer(store: Any, groups: Groups, config: ProbeConfig, device: torch.device,
             fit: Fit) -> pd.DataFrame:
    """Each training group's probes, scored on each test group's test rows."""
    data = groups.data
    # The control task is not part of a transfer matrix: its fits would only cost time.
    alone = config.model_copy(update={"control": False})
    weights: dict[tuple[int, str], RawWeights] = {}
    for g in groups.train:
        role = np.where((groups.codes == g) & np.isin(data.role, (FIT, VAL)), data.role, UNUSED)
        mom, fitted = fit(replace(data, role=role.astype(np.int8)), alone)
        for probe, (_, tasks) in fitted.items():
            weights[(g, probe)] = [raw_weights(w_z, b_z, mom, i)
                                   for i, (w_z, b_z) in enumerate(tasks[0])]
    tested = (groups.codes >= 0) & (data.role == TEST)
    test = replace(data, role=np.where(tested, TEST, UNUSED).astype(np.int8))
    scored = score(store, test, weights, config, device)
    rows = []
    for i, layer in enumerate(data.layers):
        for probe in dict.fromkeys(p for _, p in weights):
            for g in groups.train:
                s = scored[(g, probe)]
                for h in groups.test:
                    mask = groups.codes[s.rows] == h
                    rows.append({
                        "layer": layer, "probe": probe, "train_group": groups.names[g],
                        "test_group": groups.names[h], "n_test": int(mask.sum()),
                        "test_accuracy": float(s.hits[i, mask].mean()),
                        "test_auroc": s.auroc(i, mask),
                    })
    return pd.DataFrame(rows, columns=TRANSFER_COLUMNS)


def raw_weights(w_z: np.ndarray, b_z: np.ndarray, mom: _closed.Moments, layer: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Standardised-space weights as ``probes.safetensors`` stores them: raw space, float32."""
    w, b = _closed.fold(w_z, b_z, mom, layer)
    return w.astype(np.float32), b.astype(np.float32)


@dataclass(frozen=True)
class Scored:
    """One probe's test predictions on every layer, in store-row order."""

    rows: np.ndarray
    """(n,) the store rows scored."""
    hits: np.ndarray
    """(layers, n) whether each row was classified right."""
    scores: np.ndarray | None
    """Binary only: (layers, n) the single score."""
    positive: np.ndarray | None
    """Binary only: (n,) whether each row is of the second class."""

    def auroc(self, layer: int, mask: np.ndarray) -> float:
        if self.scores is None or self.positive is None:
            return float("nan")
        return _eval.auroc(self.scores[layer, mask], self.positive[mask])


def score(store: Any, data: ProbeData, weights: dict[tuple[Any, ...], RawWeights],
          config: ProbeConfig, device: torch.device) -> dict[tuple[Any, ...], Scored]:
    """Every probe of ``weights`` (keys end with the probe's kind) on the TEST rows of
    ``data``, in one streamed pass."""
    n_l, k = len(data.layers), data.n_classes
    segments, ws, bs, col = {}, [], [], 0
    for key, per_layer in weights.items():
        width = per_layer[0][0].shape[0]
        probe = key[-1]
        threshold = 0.5 if probe == "ridge" else 0.0  # ridge regresses the 0/1 indicator
        segments[key] = _fresh(_eval.Segment(probe, 0, slice(col, col + width), threshold),
                               n_l, width, k)
        ws.append(np.stack([w.T for w, _ in per_layer]).astype(np.float64))
        bs.append(np.stack([b for _, b in per_layer]).astype(np.float64))
        col += width
    w_all = torch.from_numpy(np.concatenate(ws, axis=2)).to(device)
    b_all = torch.from_numpy(np.concatenate(bs, axis=1)).to(device)[:, None, :]
    # Per row: the prefetched float32 blocks, their float64 copy and the float64 scores.
    row_work = n_l * (data.hidden * 8 + col * 8 * 2)
    block_rows = stream_rows(int(store.chunk_rows), config.max_memory, n_l, data.hidden,
                             row_work)
    source = BlockSource(store, data, block_rows, False, config.seed, Reads())
    source.set_transform(lambda x: torch.from_numpy(x).to(device, torch.float64))
    for block in source.blocks(0):
        s = torch.bmm(block.x, w_all) + b_all
        labels = data.y[block.rows]
        for seg in segments.values():
            _eval._update(seg, s[..., seg.cols], labels, 0, k, block.rows)
    return {key: _collect(seg) for key, seg in segments.items()}


def _fresh(seg: _eval.Segment, n_layers: int, width: int, k: int) -> _eval.Segment:
    """``seg`` with empty accumulators of the sizes ``_eval._update`` adds into."""
    seg.correct, seg.loss = np.zeros((n_layers, 2)), np.zeros(n_layers)
    seg.sse, seg.sy, seg.syy = np.zeros((n_layers, width)), np.zeros(width), np.zeros(width)
    seg.class_counts = np.zeros((2, k))
    return seg


def _collect(seg: _eval.Segment) -> Scored:
    rows = np.concatenate(seg.test_rows)
    order = np.argsort(rows, kind="stable")
    scores = np.concatenate(seg.scores, axis=1)[:, order] if seg.scores else None
    positive = (np.concatenate(seg.labels) == 1)[order] if seg.labels else None
    return Scored(rows[order], np.concatenate(seg.hits, axis=1)[:, order], scores, positive)


@dataclass(frozen=True)
class Target:
    """The store ``eval_store`` names, opened and checked, and its labelled rows."""

    url: str
    store: Any
    data: ProbeData
    """The trained layers, pooling and classes; every labelled row of the store is TEST."""


def open_target(store: Any, data: ProbeData, config: ProbeConfig) -> Target:
    """Open ``config.eval_store``; refuse a store the probes cannot be applied to."""
    from actcache.store import open_store

    url = str(config.eval_store)
    if data.regression:
        raise ProbeDataError(f"`eval_store` needs class labels, but label column "
                             f"{config.label!r} is a regression target: use --task "
                             "classification or drop `eval_store`")
    try:
        other = open_store(url)
    except StoreNotFoundError as e:
        raise StoreNotFoundError(f"`eval_store`: {e}") from None
    if not other.complete:
        raise StoreIncompleteError(
            f"`eval_store` {url} is incomplete: some units are not cached yet; finish it "
            "with `actcache cache JOB.yaml` first")
    difference = _difference(other, store, data)
    if difference:
        raise StoreMismatchError(f"`eval_store` {url} {difference}")
    meta = other.metadata
    if config.label not in meta.columns:
        raise ColumnNotFoundError(
            f"label column {config.label!r} is not in the metadata of `eval_store` {url}; "
            f"available columns: {', '.join(map(str, meta.columns)) or 'none'}")
    index: dict[Hashable, int] = {c: i for i, c in enumerate(data.classes)}
    values = meta[config.label]
    unknown = [v for v in _sorted_values(values) if v not in index]
    if unknown:
        shown = ", ".join(repr(v) for v in unknown[:5])
        known = ", ".join(repr(c) for c in data.classes)
        raise ProbeDataError(
            f"`eval_store` {url} has labels the probes were not trained on: {shown} (they "
            f"know {known}); relabel those rows or leave their label empty")
    y = np.array([-1 if pd.isna(v) else index[v] for v in values], dtype=np.int64)
    if not (y >= 0).any():
        raise ProbeDataError(f"`eval_store` {url} has no row with a {config.label!r} label")
    role = np.where(y >= 0, TEST, UNUSED).astype(np.int8)
    return Target(url, other, ProbeData(data.layers, data.pooling, data.classes, y, y, role,
                                        data.hidden))


def _model(store: Any) -> dict[str, Any]:
    return dict(store.manifest.get("model") or {})


def _difference(other: Any, store: Any, data: ProbeData) -> str | None:
    """What keeps the probes of ``store`` from applying to ``other``, or None."""
    mine, theirs = _model(store), _model(other)
    if theirs.get("weights_hash") != mine.get("weights_hash"):
        a, b = theirs.get("name", "?"), mine.get("name", "?")
        if a == b:  # one name, other weights: show the fingerprints
            a = f"{a} (weights {str(theirs.get('weights_hash'))[:12]})"
            b = f"{b} (weights {str(mine.get('weights_hash'))[:12]})"
        return f"holds model {a}, the probes were trained on model {b}"
    if other.hidden_size != data.hidden:
        return (f"has hidden size {other.hidden_size}, the probes were trained on hidden "
                f"size {data.hidden}")
    if bool(other.manifest.get("final_norm")) != bool(store.manifest.get("final_norm")):
        said = {True: "with", False: "without"}
        a, b = bool(other.manifest.get("final_norm")), bool(store.manifest.get("final_norm"))
        return (f"holds layers {said[a]} the model's final norm, the probes were trained on "
                f"layers {said[b]} it")
    if other.manifest.get("side") != store.manifest.get("side"):
        return (f"holds the {other.manifest.get('side')} side's hidden states, the probes "
                f"were trained on the {store.manifest.get('side')} side's")
    missing = [layer for layer in data.layers if layer not in other.layers]
    if missing:
        return (f"lacks layer{'s' if len(missing) > 1 else ''} "
                f"{', '.join(map(str, missing))} the probes were trained on (it holds "
                f"{', '.join(map(str, other.layers))}): choose `layers` among those")
    if data.pooling not in other.poolings:
        return (f"has no {data.pooling!r} pooling, the probes were trained on it (it holds "
                f"{', '.join(other.poolings)})")
    return None


def evaluate(target: Target, tensors: dict[str, np.ndarray], config: ProbeConfig,
             device: torch.device) -> pd.DataFrame:
    """The saved probes on every labelled row of the target store, with 95% intervals."""
    data = target.data
    weights = {(probe.value,): [(tensors[f"{probe.value}.layer{layer}.weight"],
                              tensors[f"{probe.value}.layer{layer}.bias"])
                             for layer in data.layers]
               for probe in config.probes}
    scored = score(target.store, data, weights, config, device)
    rows = []
    for (probe,), s in scored.items():
        acc_ci, auc_ci = _eval.bootstrap_intervals(s.hits, s.scores, s.positive, config.seed)
        for i, layer in enumerate(data.layers):
            every = np.ones(len(s.rows), dtype=bool)
            rows.append({
                "layer": layer, "probe": probe, "eval_store": target.url,
                "n_eval": len(s.rows), "accuracy": float(s.hits[i].mean()),
                "auroc": s.auroc(i, every), "accuracy_low": acc_ci[i, 0],
                "accuracy_high": acc_ci[i, 1], "auroc_low": auc_ci[i, 0],
                "auroc_high": auc_ci[i, 1],
            })
    return pd.DataFrame(rows, columns=EVAL_COLUMNS).sort_values(
        ["layer"], kind="stable").reset_index(drop=True)
