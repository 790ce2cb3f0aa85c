"""``train_probes``: every requested probe on every layer of a store, out-of-core.

When the used rows fit ``max_memory`` they are read once and kept: the moments, ridge's
Gram matrices, full-batch L-BFGS for the logistic probes (all layers × all strengths per
evaluation) and the scoring all run on them. Otherwise the store is read layer by layer
(``_fit_streamed``): one pass for the moments, which also copies a stratified sample of
the train rows into the budget, one for ridge's Gram matrices, and a few for the logistic
probes, solved on the sample and polished on the store by one Newton step per pass
(``_newton``); then one pass over all layers scores everything. ``ProbeResult.passes``
counts what was read. A streaming run fixes glibc's mmap threshold for the rest of the
process (``actcache.read.bound_allocator`` says why).

A regression task (numeric labels; ridge only) fits ridge on the number itself from the
same Gram pass, C chosen on validation MSE. Its metrics rows leave the accuracy columns,
``test_auroc`` and ``control_accuracy`` empty and add ``train_r2``, ``test_r2``,
``test_mse`` (``test_loss`` is the test MSE) and ``control_r2``, the test R² of the same
ridge fitted on a seeded permutation of the targets; ``selectivity`` is then
``test_r2 - control_r2``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from actcache.probes import _closed, _eval, _newton, _precision, _transfer
from actcache.probes._data import (
    FIT,
    VAL,
    BlockSource,
    ProbeData,
    Reads,
    plan_blocks,
    prepare,
)
from actcache.probes._precision import Choice
from actcache.probes._train import (
    PRECONDITIONER_BYTES,
    CastBlocks,
    LogisticBatch,
    augmented_eig,
    gram_preconditioner,
    solve,
)
from actcache.read import bound_allocator
from actcache.schemas.probe import TOKEN_PROBES, Precision, ProbeConfig, ProbeKind
from actcache.workers.devices import pick_device

#: Per layer: (hidden, out) standardised-space weight and (out,) bias.
ZWeights = list[tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class ProbeResult:
    """Metrics, raw-space weights and the metadata written next to them."""

    metrics: pd.DataFrame
    tensors: dict[str, np.ndarray]
    """``{probe}.layer{L}.weight`` (out, hidden) and ``.bias`` (out,), float32, raw space."""
    metadata: dict[str, str]
    classes: tuple[Any, ...]
    device: str
    precision: str
    iterations: dict[str, int]
    """Largest iteration count per logistic phase: ``select`` and ``refit`` (L-BFGS) when
    the rows fit the budget; ``sample`` (L-BFGS) and ``newton`` (passes) otherwise."""
    task: str = "classification"
    """``classification`` or ``regression``, as resolved from the config and the labels."""
    passes: float = 1.0
    """Rows × layers read from the store over the run, in full passes over its used rows."""
    choice: Choice | None = None
    """How ``precision`` was decided, with the measured figures (``_precision``)."""
    transfer: pd.DataFrame | None = None
    """With ``group_column``: ``layer, probe, train_group, test_group, n_test,
    test_accuracy, test_auroc`` (``_transfer``)."""
    evaluation: pd.DataFrame | None = None
    """With ``eval_store``: the probes scored on that store's labelled rows (``_transfer``)."""
    positions: pd.DataFrame | None = None
    """token-logistic: ``layer, probe, position, n_test_tokens, test_accuracy`` per token
    position of the test rows (``_tokenrun``)."""

    @property
    def score_column(self) -> str:
        """The metric ranking layers: ``test_accuracy``, or ``test_r2`` for a regression."""
        return "test_r2" if self.task == "regression" else "test_accuracy"

    def best(self) -> pd.Series:
        """The (layer, probe) row with the best test score (earliest layer on ties)."""
        ranked = self.metrics.sort_values([self.score_column, "layer"], ascending=[False, True])
        return ranked.iloc[0]


def _logistic(source: BlockSource, data: ProbeData, config: ProbeConfig, device: torch.device,
              dtype: torch.dtype) -> tuple[list[float], list[ZWeights], dict[str, int]]:
    n_l, h = len(data.layers), data.hidden
    k = 1 if data.n_classes == 2 else data.n_classes
    grid = torch.tensor(config.strengths, dtype=torch.float64, device=device)
    select = LogisticBatch(n_l, h, k, grid.expand(n_l, -1).clone(), [data.y] * len(grid),
                           device, torch.float32)
    # The blocks are float32; a bf16 solve works on a bf16 copy, finished in float32.
    low = CastBlocks(source, dtype) if dtype != torch.float32 else None
    theta0 = torch.zeros((n_l, len(grid), h + 1, k), dtype=torch.float64, device=device)
    grams = _grams(source, data)
    pre_a = pre_b = None
    if grams is not None:
        n_fit, n_train = data.count(FIT), data.count(FIT, VAL)
        eig_a = [augmented_eig(f) for f, _ in grams]
        pre_a = gram_preconditioner(eig_a, select.strengths, n_fit, k)
        eig_b = [augmented_eig(f + v) for f, v in grams]
    theta, it_a = solve(select, source, low, "fit", theta0, config.max_iter, config.tol, pre_a)
    acc, loss = select.evaluate(source, theta, "val")
    best = [int(np.lexsort((loss[i], -acc[i]))[0]) for i in range(n_l)]
    chosen = [float(config.strengths[b]) for b in best]
    targets = [data.y, data.control] if config.control else [data.y]
    strengths = torch.tensor(chosen, dtype=torch.float64, device=device)
    refit = LogisticBatch(n_l, h, k, strengths[:, None].expand(-1, len(targets)).clone(),
                          targets, device, torch.float32)
    start = torch.zeros((n_l, len(targets), h + 1, k), dtype=torch.float64, device=device)
    start[:, 0] = theta[torch.arange(n_l, device=device), torch.tensor(best, device=device)]
    if grams is not None:
        pre_b = gram_preconditioner(eig_b, refit.strengths, n_train, k)
    final, it_b = solve(refit, source, low, "train", start, config.max_iter, config.tol, pre_b)
    out = final.cpu().numpy()
    per_task = [[(out[i, t, :-1, :], out[i, t, -1, :]) for i in range(n_l)]
                for t in range(len(targets))]
    return chosen, per_task, {"select": int(it_a.max()), "refit": int(it_b.max())}


def _grams(source: BlockSource, data: ProbeData) -> list[Any] | None:
    """Fit and validation Gram matrices of every layer, when they fit the cap."""
    if 3 * len(data.layers) * (data.hidden + 1) ** 2 * 8 > PRECONDITIONER_BYTES:
        return None
    return _closed.gram_pass(source, data, list(range(len(data.layers))))


def _ridge(source: BlockSource, data: ProbeData, config: ProbeConfig, mom: _closed.Moments
           ) -> tuple[list[float], list[ZWeights]]:
    n_l, h, t = len(data.layers), data.hidden, data.n_targets
    # Two float64 Gram matrices per layer: group layers so they stay within the budget.
    per_group = max(1, config.max_memory // (4 * 8 * h * h))
    chosen: list[float] = []
    real: ZWeights = []
    ctrl: ZWeights = []
    for lo in range(0, n_l, per_group):
        group = list(range(lo, min(n_l, lo + per_group)))
        for fit, val in _closed.gram_pass(source, data, group, mom):
            c, w, b = _closed.ridge_solve(fit, val, config.strengths, t)
            chosen.append(c)
            real.append((w[:, :t], b[:t]))
            ctrl.append((w[:, t:], b[t:]))
    return chosen, [real, ctrl]


def _mean_diff(mom: _closed.Moments) -> list[ZWeights]:
    tasks = []
    for task in (0, 1):
        raw = _closed.mean_diff(mom, task)
        tasks.append([_closed.unfold(w, b, mom, i) for i, (w, b) in enumerate(raw)])
    return tasks


def _open(store: Any) -> Any:
    if isinstance(store, str | Path):
        from actcache.store import open_store

        return open_store(str(store))
    return store


def train_probes(store: Any, config: ProbeConfig) -> ProbeResult:
    """Train ``config.probes`` on every requested layer of ``store`` (an object or a URL)."""
    # Confident logits underflow exp() into subnormals, which x86 computes ~100x slower.
    flushed = torch.set_flush_denormal(True)
    try:
        if any(kind in TOKEN_PROBES for kind in config.probes):
            from actcache.probes._tokenrun import train_token_probes

            return train_token_probes(store, config)
        return _train_probes(store, config)
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _train_probes(store: Any, config: ProbeConfig) -> ProbeResult:
    store = _open(store)
    data = prepare(store, config)
    # Checked before any training: a bad group column or eval store fails at once.
    groups = _transfer.plan_groups(store, data, config) if config.group_column else None
    target = _transfer.open_target(store, data, config) if config.eval_store else None
    device = pick_device()
    cols = max(len(config.strengths), 2) * data.n_targets * 2
    decider = _Decider(config, device)
    reads = Reads()
    source, mom, fitted, iterations = _fit(store, data, config, device, decider, cols, reads)
    segments, weights, bias = _stack(fitted, data, device, config.control)
    _eval.score_pass(source, data, weights, bias, segments)
    del source  # its cached blocks: each group's fit below may take the whole budget again
    metrics = _metrics(segments, fitted, data, config.control)
    if not data.regression:
        metrics = _eval.with_intervals(metrics, segments, config.seed)
    tensors, meta = _tensors(fitted, data, mom, store, config)
    transfer = evaluation = None
    if groups is not None:
        # Reads of its own: ``passes`` reports the pooled run's reads, as without groups.
        transfer = _transfer.transfer(store, groups, config, device, lambda d, c: _fit(
            store, d, c, device, decider, cols, Reads())[1:3])
    if target is not None:
        evaluation = _transfer.evaluate(target, tensors, config, device)
    choice = decider.final()
    meta["precision"] = choice.metadata()
    return ProbeResult(metrics, tensors, meta, data.classes, str(device), choice.name,
                       iterations, meta["task"], round(reads.passes(data, len(data.layers)), 2),
                       choice, transfer, evaluation)


def _fit(store: Any, data: ProbeData, config: ProbeConfig, device: torch.device,
         decider: _Decider, cols: int, reads: Reads
         ) -> tuple[BlockSource, _closed.Moments, Fitted, dict[str, int]]:
    """Every probe on the used rows of ``data``; the source of standardised blocks to score."""
    block_rows, cache = plan_blocks(store, data, config.max_memory, cols)
    if cache:
        source = BlockSource(store, data, block_rows, True, config.seed, reads)
        mom, fitted, iterations = _fit_group(source, data, config, device, decider)
    else:
        # Streamed blocks would otherwise pile up in glibc's heaps (see bound_allocator).
        bound_allocator()
        mom, fitted, iterations = _fit_streamed(store, data, config, device, decider, cols,
                                                reads)
        source = BlockSource(store, data, block_rows, False, config.seed, reads)
        source.set_transform(_standardiser(mom, device, torch.float32))
    return source, mom, fitted, iterations


#: Rows the precision is timed on: enough for a step to be arithmetic, not overhead.
CALIBRATION_ROWS = 1024


class _Decider:
    """The run's precision for its logistic fits, decided once (``_precision.choose``) on
    the first standardised rows the fits will see: the in-memory blocks, or the first
    layer's sample when streaming."""

    def __init__(self, config: ProbeConfig, device: torch.device) -> None:
        self.config, self.device = config, device
        self.choice: Choice | None = None

    def dtype(self, blocks: Any, data: ProbeData, n_rows: int) -> torch.dtype:
        """``blocks`` hold ``n_rows`` train rows, standardised, float32."""
        if self.choice is None:
            self.choice = self._choose(blocks, data, n_rows)
        return self.choice.dtype

    def final(self) -> Choice:
        return self.choice or _precision.fixed(self.config.precision, "no iterative probe")

    def _choose(self, blocks: Any, data: ProbeData, n_rows: int) -> Choice:
        block = next((b for b in blocks.blocks(0) if b.n_train), None)
        if self.config.precision != Precision.AUTO or block is None:
            return _precision.fixed(self.config.precision)
        m = min(block.n_train, CALIBRATION_ROWS)
        part = replace(block, rows=block.rows[:m], n_fit=m, n_val=0, n_test=0)
        x = {torch.float32: block.x[:, :m].contiguous()}
        x[torch.bfloat16] = x[torch.float32].to(torch.bfloat16)
        n_l, h, k = len(data.layers), data.hidden, 1 if data.n_classes == 2 else data.n_classes
        grid = torch.tensor(self.config.strengths, dtype=torch.float64, device=self.device)
        batch = LogisticBatch(n_l, h, k, grid.expand(n_l, -1).clone(), [data.y] * len(grid),
                              self.device, torch.float32)
        theta = torch.zeros((n_l, len(grid), h + 1, k), dtype=torch.float64, device=self.device)

        def step(dtype: torch.dtype) -> None:
            # One evaluation of the select problems' objective and gradient, as a fit runs it.
            f = torch.zeros(theta.shape[:2], dtype=torch.float64, device=self.device)
            replace(batch, dtype=dtype).accumulate(replace(part, x=x[dtype]), theta, "fit", f,
                                                   torch.zeros_like(theta))

        return _precision.choose(self.config.precision, self.device, step, n_rows / m)


Fitted = dict[str, tuple[list[float] | None, list[ZWeights]]]


def _standardiser(mom: _closed.Moments, device: torch.device, dtype: torch.dtype) -> Any:
    mean_t = torch.from_numpy(mom.mean).float().to(device)[:, None, :]
    std_t = torch.from_numpy(mom.std).float().to(device)[:, None, :]

    def apply(x: np.ndarray) -> torch.Tensor:
        # In place: on the CPU the block's own float32 array becomes the standardised one.
        return torch.from_numpy(x).to(device).sub_(mean_t).div_(std_t).to(dtype)

    return apply


def _fit_group(source: BlockSource, data: ProbeData, config: ProbeConfig, device: torch.device,
               decider: _Decider, sample: _newton.Sample | None = None
               ) -> tuple[_closed.Moments, Fitted, dict[str, int]]:
    """Every probe on the layers of ``source``: full-batch when ``sample`` is None (the
    rows are in memory), else solved on the sample and polished on the store."""
    mom = _closed.moments(source, data, tap=sample.take if sample is not None else None)
    # Ridge reads the raw blocks (float64 Gram matrices), before they are standardised for
    # the iterative probes (float32: a bf16 solve is finished in float32).
    ridge = _ridge(source, data, config, mom) if ProbeKind.RIDGE in config.probes else None
    source.set_transform(_standardiser(mom, device, torch.float32))
    fitted: Fitted = {}
    iterations: dict[str, int] = {}
    for kind in config.probes:
        if kind == ProbeKind.RIDGE and ridge is not None:
            fitted[kind.value] = ridge
        elif kind == ProbeKind.LOGISTIC and sample is None:
            dtype = decider.dtype(source, data, data.count(FIT, VAL))
            chosen, tasks, iterations = _logistic(source, data, config, device, dtype)
            fitted[kind.value] = (chosen, tasks)
        elif kind == ProbeKind.LOGISTIC and sample is not None:
            sample.standardise(mom.mean, mom.std, device)
            dtype = decider.dtype(sample, data, len(sample.rows))
            chosen, tasks, iterations = _newton.fit_streamed(source, sample, data, config,
                                                             device, dtype)
            fitted[kind.value] = (chosen, tasks)
        else:
            fitted[kind.value] = (None, _mean_diff(mom))
    return mom, fitted, iterations


def _fit_streamed(store: Any, data: ProbeData, config: ProbeConfig, device: torch.device,
                  decider: _Decider, cols: int, reads: Reads
                  ) -> tuple[_closed.Moments, Fitted, dict[str, int]]:
    """Layer by layer, so the whole budget holds one layer's sample (see ``_newton``)."""
    parts = []
    for layer in data.layers:
        one = replace(data, layers=(layer,))
        block_rows, capacity, work = _newton.plan_stream(store, one, config.max_memory, cols)
        source = BlockSource(store, one, block_rows, False, config.seed, reads)
        sample = None
        if ProbeKind.LOGISTIC in config.probes and not data.regression:
            rows = _newton.sample_rows(one, store.ids, capacity, config.seed)
            sample = _newton.Sample(one, rows, str(getattr(store, "dtype", "float32")), work)
        parts.append(_fit_group(source, one, config, device, decider, sample))
    mom = _closed.Moments(np.concatenate([m.mean for m, _, _ in parts]),
                          np.concatenate([m.std for m, _, _ in parts]),
                          np.concatenate([m.class_means for m, _, _ in parts], axis=1))
    fitted: Fitted = {}
    for kind, (chosen, tasks) in parts[0][1].items():
        per = [p[1][kind] for p in parts]
        fitted[kind] = (None if chosen is None else [c for ch, _ in per for c in ch or []],
                        [[w for _, ts in per for w in ts[t]] for t in range(len(tasks))])
    iterations: dict[str, int] = {}
    for _, _, its in parts:
        for key, value in its.items():
            iterations[key] = max(iterations.get(key, 0), value)
    return mom, fitted, iterations


def _stack(fitted: dict[str, tuple[list[float] | None, list[ZWeights]]], data: ProbeData,
           device: torch.device, control: bool
           ) -> tuple[list[_eval.Segment], torch.Tensor, torch.Tensor]:
    segments, ws, bs, col = [], [], [], 0
    for probe, (_, tasks) in fitted.items():
        for task, per_layer in enumerate(tasks[: 2 if control else 1]):
            width = per_layer[0][0].shape[1]
            threshold = 0.5 if probe == "ridge" else 0.0
            segments.append(_eval.Segment(probe, task, slice(col, col + width), threshold))
            ws.append(np.stack([w for w, _ in per_layer]))
            bs.append(np.stack([b for _, b in per_layer]))
            col += width
    weights = torch.from_numpy(np.concatenate(ws, axis=2)).float().to(device)
    bias = torch.from_numpy(np.concatenate(bs, axis=1)).float().to(device)
    return segments, weights, bias


def _metrics(segments: list[_eval.Segment], fitted: dict[str, Any], data: ProbeData,
             control: bool) -> pd.DataFrame:
    if data.regression:
        return _regression_metrics(segments, fitted, data, control)
    n_train, n_test = data.count(1, 2), data.count(3)
    rows = []
    for seg in segments:
        if seg.task != 0:
            continue
        strengths = fitted[seg.probe][0]
        ctl = next((s for s in segments if s.probe == seg.probe and s.task == 1), None)
        scores = np.concatenate(seg.scores, axis=1) if seg.scores else None
        positive = np.concatenate(seg.labels) == 1 if seg.labels else None
        for i, layer in enumerate(data.layers):
            row: dict[str, Any] = {
                "layer": layer, "probe": seg.probe,
                "strength": strengths[i] if strengths is not None else np.nan,
                "n_train": n_train, "n_test": n_test,
                "train_accuracy": seg.correct[i, 0] / n_train,
                "test_accuracy": seg.correct[i, 1] / n_test,
                "test_auroc": np.nan,
                "test_loss": seg.loss[i] / n_test if seg.probe == "logistic" else np.nan,
                "control_accuracy": ctl.correct[i, 1] / n_test if ctl and control else np.nan,
            }
            row["selectivity"] = row["test_accuracy"] - row["control_accuracy"]
            if scores is not None and positive is not None:
                row["test_auroc"] = _eval.auroc(scores[i], positive)
            if seg.probe == "ridge":
                row["test_mse"] = seg.sse[i].sum() / (n_test * len(seg.sy))
                row["test_r2"] = _eval.r2(seg.sse[i], seg.sy, seg.syy, n_test)
                row["test_loss"] = row["test_mse"]
            rows.append(row)
    columns = _eval.METRIC_COLUMNS + (["test_r2", "test_mse"] if "ridge" in fitted else [])
    return pd.DataFrame(rows, columns=columns)


def _regression_metrics(segments: list[_eval.Segment], fitted: dict[str, Any],
                        data: ProbeData, control: bool) -> pd.DataFrame:
    """Ridge on a numeric label: R² and MSE; the classification columns stay empty."""
    n_train, n_test = data.count(1, 2), data.count(3)
    seg = next(s for s in segments if s.task == 0)
    ctl = next((s for s in segments if s.task == 1), None) if control else None
    rows = []
    for i, layer in enumerate(data.layers):
        mse = float(seg.sse[i].sum() / n_test)
        test_r2 = _eval.r2(seg.sse[i], seg.sy, seg.syy, n_test)
        control_r2 = _eval.r2(ctl.sse[i], ctl.sy, ctl.syy, n_test) if ctl else np.nan
        rows.append({
            "layer": layer, "probe": seg.probe, "strength": fitted[seg.probe][0][i],
            "n_train": n_train, "n_test": n_test, "test_loss": mse,
            "selectivity": test_r2 - control_r2, "test_r2": test_r2, "test_mse": mse,
            "train_r2": _eval.r2(seg.train_sse[i], seg.train_sy, seg.train_syy, n_train),
            "control_r2": control_r2,
        })
    columns = [*_eval.METRIC_COLUMNS, "test_r2", "test_mse", "train_r2", "control_r2"]
    return pd.DataFrame(rows, columns=columns).astype({c: float for c in _eval.METRIC_COLUMNS[5:]})


def _tensors(fitted: dict[str, tuple[list[float] | None, list[ZWeights]]], data: ProbeData,
             mom: _closed.Moments, store: Any, config: ProbeConfig
             ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from actcache import __version__

    tensors: dict[str, np.ndarray] = {}
    strengths: dict[str, dict[str, float]] = {}
    for probe, (chosen, tasks) in fitted.items():
        for i, layer in enumerate(data.layers):
            w, b = _closed.fold(*tasks[0][i], mom, i)
            tensors[f"{probe}.layer{layer}.weight"] = np.ascontiguousarray(w, dtype=np.float32)
            tensors[f"{probe}.layer{layer}.bias"] = np.ascontiguousarray(b, dtype=np.float32)
        if chosen is not None:
            strengths[probe] = {str(layer): c for layer, c in zip(data.layers, chosen, strict=True)}
    meta = {
        "store_url": str(store.url),
        "model": _model_name(store),
        "pooling": data.pooling,
        "label_column": config.label,
        "classes": json.dumps([c if isinstance(c, str | int | float | bool) else str(c)
                               for c in data.classes]),
        "strength_per_layer": json.dumps(strengths),
        "layers": json.dumps(list(data.layers)),
        "task": "regression" if data.regression else "classification",
        "unlabelled_rows": str(int((data.y < 0).sum())),
        "actcache_version": __version__,
    }
    return tensors, meta


def _model_name(store: Any) -> str:
    """The store's model as its job named it ('' when the store does not say)."""
    model = (getattr(store, "manifest", None) or {}).get("model")
    return str(model.get("name", "") if isinstance(model, dict) else model or "")
