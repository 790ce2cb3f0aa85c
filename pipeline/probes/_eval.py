"""One pass over train and test rows scoring every probe of every layer at once.

Classification: correct predictions, losses and (binary) test scores. Regression: sums of
squared errors and of the (shifted) targets on train and on test, from which R² and MSE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from actcache.probes._data import BlockSource, ProbeData, indicator


@dataclass
class Segment:
    """The columns of one (probe, task) in the concatenated score matrix."""

    probe: str
    task: int
    """0 = labels, 1 = control labels."""
    cols: slice
    threshold: float
    """Binary decision threshold on the single score (ridge regresses 0/1: 0.5)."""
    correct: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    """(layers, 2) correct predictions on train, test."""
    loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sse: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Ridge: (layers, targets) test sum of squared errors."""
    sy: np.ndarray = field(default_factory=lambda: np.zeros(0))
    syy: np.ndarray = field(default_factory=lambda: np.zeros(0))
    train_sse: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Regression only: (layers, 1) train sum of squared errors."""
    train_sy: np.ndarray = field(default_factory=lambda: np.zeros(0))
    train_syy: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scores: list[np.ndarray] = field(default_factory=list)
    """Binary only: (layers, rows) test scores, block by block."""
    labels: list[np.ndarray] = field(default_factory=list)
    """Binary only: the test labels of ``scores``, in the same order."""
    test_rows: list[np.ndarray] = field(default_factory=list)
    """Row indices of the test rows in ``hits``/``scores``, block by block: intervals sort by
    them, so they do not depend on the order blocks were streamed in."""
    hits: list[np.ndarray] = field(default_factory=list)
    """Classification, real labels: (layers, rows) correct test predictions, block by block,
    for the bootstrap intervals."""
    class_counts: np.ndarray = field(default_factory=lambda: np.zeros((2, 0)))
    """Classification, real labels: (train, test) rows per class, for the majority baseline."""


def _update(seg: Segment, s: torch.Tensor, y: np.ndarray, n_train: int, k: int,
            rows: np.ndarray) -> None:
    """Accumulate one block's scores (layers, rows, out) for rows labelled ``y``."""
    yt = torch.from_numpy(y).to(s.device)
    if s.shape[-1] == 1:
        pred = (s[..., 0] > seg.threshold).long()
    else:
        pred = s.argmax(-1)
    hit = (pred == yt).double()
    if seg.task == 0:
        seg.test_rows.append(np.asarray(rows[n_train:]))
        seg.hits.append(hit[:, n_train:].bool().cpu().numpy())
        for part, labels in ((0, y[:n_train]), (1, y[n_train:])):
            seg.class_counts[part] += np.bincount(labels[labels >= 0], minlength=k)[:k]
    seg.correct[:, 0] += hit[:, :n_train].sum(1).cpu().numpy()
    seg.correct[:, 1] += hit[:, n_train:].sum(1).cpu().numpy()
    st = s[:, n_train:].double()
    ytest = yt[n_train:]
    if seg.probe == "logistic":
        if k == 2:
            loss = torch.nn.functional.softplus(st[..., 0]) - ytest.double() * st[..., 0]
        else:
            loss = torch.logsumexp(st, -1) - st.gather(
                -1, ytest.view(1, -1, 1).expand(st.shape[0], -1, 1)).squeeze(-1)
        seg.loss += loss.sum(1).cpu().numpy()
    elif seg.probe == "ridge":
        target = torch.from_numpy(indicator(y[n_train:], k)).to(st.device)
        seg.sse += ((st - target) ** 2).sum(1).cpu().numpy()
        seg.sy += target.sum(0).cpu().numpy()
        seg.syy += (target * target).sum(0).cpu().numpy()
    if k == 2 and seg.task == 0:
        seg.scores.append(st[..., 0].cpu().numpy())
        seg.labels.append(y[n_train:])


def _update_regression(seg: Segment, s: torch.Tensor, target: np.ndarray, shift: float,
                       n_train: int) -> None:
    """Accumulate one block's (layers, rows, 1) predictions of (rows, 1) targets.

    Sums of targets are taken after subtracting ``shift`` (their mean over used rows), so
    the total sum of squares stays accurate for targets far from zero.
    """
    t = target - shift
    err = (s.double() - shift - torch.from_numpy(t).to(s.device)) ** 2
    seg.train_sse += err[:, :n_train].sum(1).cpu().numpy()
    seg.sse += err[:, n_train:].sum(1).cpu().numpy()
    seg.train_sy += t[:n_train].sum(0)
    seg.train_syy += (t[:n_train] ** 2).sum(0)
    seg.sy += t[n_train:].sum(0)
    seg.syy += (t[n_train:] ** 2).sum(0)


def score_pass(source: BlockSource, data: ProbeData, weights: torch.Tensor, bias: torch.Tensor,
               segments: list[Segment]) -> None:
    """Score every block with (layers, hidden, cols) weights; fills the segments."""
    n_l, k = len(data.layers), data.n_classes
    shift = float(np.nanmean(data.value)) if data.value is not None else 0.0
    for seg in segments:
        width = seg.cols.stop - seg.cols.start
        seg.correct = np.zeros((n_l, 2))
        seg.loss = np.zeros(n_l)
        seg.sse, seg.sy, seg.syy = np.zeros((n_l, width)), np.zeros(width), np.zeros(width)
        seg.train_sse = np.zeros((n_l, width))
        seg.train_sy, seg.train_syy = np.zeros(width), np.zeros(width)
        seg.scores, seg.labels, seg.hits, seg.test_rows = [], [], [], []
        seg.class_counts = np.zeros((2, k))
    for block in source.blocks(0):
        if block.n_test + block.n_train == 0:
            continue
        order = block.rows
        s = torch.bmm(block.x, weights.to(block.x.dtype)).float() + bias.unsqueeze(1).float()
        for seg in segments:
            if data.regression:
                target = data.targets(order, control=seg.task == 1)
                _update_regression(seg, s[..., seg.cols], target, shift, block.n_train)
                continue
            labels = data.y if seg.task == 0 else data.control
            _update(seg, s[..., seg.cols], labels[order], block.n_train, k, order)


def r2(sse: np.ndarray, sy: np.ndarray, syy: np.ndarray, n: int) -> float:
    """Coefficient of determination, averaged over target columns (scikit-learn's
    ``r2_score`` with ``multioutput="uniform_average"``)."""
    sst = syy - sy**2 / n
    return float(np.mean(1.0 - sse / np.maximum(sst, 1e-300)))


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    uniq, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ranks = (first + (counts + 1) / 2.0)[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_MAX_ROWS = 5_000
CHUNK_ELEMENTS = 1_000_000
"""Resampled rows held at once (per layer): bounds the bootstrap's memory."""
"""Above this many test rows the intervals come from the normal approximations (Wilson for
accuracy, Hanley & McNeil 1982 for AUROC), which match the bootstrap at such sizes, at a
fraction of its time and memory."""
METRIC_COLUMNS = ["layer", "probe", "strength", "n_train", "n_test", "train_accuracy",
                  "test_accuracy", "test_auroc", "test_loss", "control_accuracy",
                  "selectivity"]
"""The columns every probe's metrics.csv starts with, one row per (layer, probe)."""
INTERVAL_COLUMNS = ["majority_baseline", "test_accuracy_low", "test_accuracy_high",
                    "test_auroc_low", "test_auroc_high"]
"""Added to a classification's metrics: the test accuracy of always answering train's most
frequent class, and 95% percentile-bootstrap intervals over the test rows."""


def majority_baseline(counts: np.ndarray) -> float:
    """Test accuracy of predicting train's most frequent class (first on ties)."""
    return float(counts[1][int(np.argmax(counts[0]))] / max(counts[1].sum(), 1))


def bootstrap_intervals(hits: np.ndarray, scores: np.ndarray | None, positive: np.ndarray | None,
                        seed: int, resamples: int = BOOTSTRAP_RESAMPLES
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(layers, 2) 95% intervals of test accuracy and of AUROC (NaN unless binary).

    The same seeded resamples of the test rows serve every layer, so layers are compared
    on equal draws.
    """
    n_layers, n = hits.shape
    if n > BOOTSTRAP_MAX_ROWS:
        return normal_intervals(hits, scores, positive)
    auc_ci = np.full((n_layers, 2), np.nan)
    if not n:
        return np.full((n_layers, 2), np.nan), auc_ci
    rng = np.random.default_rng(seed)
    binary = scores is not None and positive is not None
    acc = np.empty((n_layers, resamples))
    aucs = np.empty((n_layers, resamples))
    step = max(1, CHUNK_ELEMENTS // (n * n_layers))
    for lo in range(0, resamples, step):
        draws = rng.integers(0, n, size=(min(step, resamples - lo), n))
        acc[:, lo : lo + len(draws)] = hits[:, draws].mean(axis=2)
        if binary:
            for i in range(n_layers):
                aucs[i, lo : lo + len(draws)] = [auroc(scores[i, d], positive[d])  # type: ignore[index]
                                                 for d in draws]
    acc_ci = np.percentile(acc, [2.5, 97.5], axis=1).T
    if binary:
        auc_ci = np.nanpercentile(aucs, [2.5, 97.5], axis=1).T
    return acc_ci, auc_ci


def normal_intervals(hits: np.ndarray, scores: np.ndarray | None, positive: np.ndarray | None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Wilson intervals of accuracy and Hanley-McNeil intervals of AUROC, 95%."""
    z, n = 1.959964, hits.shape[1]
    p = hits.mean(axis=1)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    acc_ci = np.stack([centre - half, centre + half], axis=1)
    auc_ci = np.full((hits.shape[0], 2), np.nan)
    if scores is not None and positive is not None:
        n1, n2 = int(positive.sum()), int((~positive).sum())
        for i in range(hits.shape[0]):
            a = auroc(scores[i], positive)
            q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
            se = np.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n2 - 1) * (q2 - a * a))
                         / max(n1 * n2, 1))
            auc_ci[i] = [max(0.0, a - z * se), min(1.0, a + z * se)]
    return acc_ci, auc_ci


def with_intervals(metrics: pd.DataFrame, segments: list[Segment], seed: int) -> pd.DataFrame:
    """``metrics`` (classification) with the majority baseline and the 95% intervals."""
    metrics = metrics.copy()
    for column in INTERVAL_COLUMNS:
        metrics[column] = np.nan
    for seg in segments:
        if seg.task != 0 or not seg.hits:
            continue
        order = np.argsort(np.concatenate(seg.test_rows), kind="stable")
        hits = np.concatenate(seg.hits, axis=1)[:, order]
        scores = np.concatenate(seg.scores, axis=1)[:, order] if seg.scores else None
        positive = (np.concatenate(seg.labels) == 1)[order] if seg.labels else None
        acc_ci, auc_ci = bootstrap_intervals(hits, scores, positive, seed)
        at = (metrics["probe"] == seg.probe).to_numpy().nonzero()[0]
        metrics.loc[at, "majority_baseline"] = majority_baseline(seg.class_counts)
        metrics.loc[at, ["test_accuracy_low", "test_accuracy_high"]] = acc_ci
        metrics.loc[at, ["test_auroc_low", "test_auroc_high"]] = auc_ci
    return metrics
