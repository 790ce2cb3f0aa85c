"""``train_probes`` for the token probes (attentive, moment, token-logistic).

Per group of layers (all of them when the budget holds them): one pass for the fit
tokens' mean and std (every probe sees standardised tokens), ``epochs`` passes of AdamW
over the fit rows, one pass scoring every row with every head. Kept in memory when every
piece fits ``max_memory`` (one read in all), else read window by window each pass, the
layers grouped so that a group's windows fit the budget: either way the same batches in
the same order (``_tokens``), so the same heads.

The weight decay is chosen per layer on the validation rows (best accuracy, then lowest
loss, then the first), as C is for the linear probes; the heads are not refit on train.
Outputs follow the linear probes', in raw activation space (standardisation folded in).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from actcache.probes import _eval, _precision
from actcache.probes._data import FIT, TEST, VAL, Reads
from actcache.probes._setprobes import Heads, Trainer, _autocast, timing_step, work_bytes
from actcache.probes._tokens import (
    Piece,
    TokenSets,
    TokenSource,
    assemble,
    moments,
    plan_memory,
    prepare_tokens,
    schedule,
    scoring_batches,
    window_tokens,
)
from actcache.read import bound_allocator
from actcache.schemas.probe import ProbeConfig, ProbeKind
from actcache.workers.devices import pick_device


@dataclass
class Scores:
    """One probe kind's scoring pass over a group of layers."""

    correct: np.ndarray
    """(layers, tasks, decays, 4) correct rows per role (index FIT, VAL, TEST)."""
    loss: np.ndarray
    test_rows: list[np.ndarray] = field(default_factory=list)
    test_logits: list[np.ndarray] = field(default_factory=list)
    """(layers, decays, rows, k) logits of the real task's heads on test rows, per batch."""
    token_hits: np.ndarray | None = None
    """token-logistic: (layers, decays, positions) correct test tokens at each position."""
    token_count: np.ndarray | None = None


def train_token_probes(store: Any, config: ProbeConfig) -> Any:
    """Train ``config.probes`` (token kinds) on every requested layer of ``store``."""
    from actcache.probes.api import ProbeResult, _open

    store = _open(store)
    sets = prepare_tokens(store, config)
    data = sets.data
    device = pick_device()
    k = 1 if data.n_classes == 2 else data.n_classes
    tasks = 2 if config.control else 1
    n_heads = tasks * len(config.weight_decays)
    work = sum(work_bytes(kind, data.hidden, k, n_heads, config.queries, sets.max_length)
               for kind in config.probes)
    cache, group = plan_memory(sets, config.max_memory, config.batch_size, work)
    if not cache:
        bound_allocator()  # windows read anew each pass would pile up in glibc's heaps
    sched = schedule(sets, config.epochs, config.batch_size, config.seed)
    reads = Reads()
    choice = None
    results: list[tuple[tuple[int, ...], list[Heads], dict[str, Scores], Any]] = []
    for lo in range(0, len(data.layers), group):
        layers = data.layers[lo:lo + group]
        source = TokenSource(store, sets, layers, cache, reads,
                             window_tokens(sets, config.batch_size))
        mean, std = moments(source)
        source.standardise(mean, std)
        heads = [Heads(kind, layers, data.hidden, k, tasks, len(config.weight_decays),
                       config.queries, config.seed, device) for kind in config.probes]
        if choice is None:
            choice = _decide(source, sched, heads, config, device, tasks)
        _train(source, sched, heads, config, device, choice.dtype, tasks)
        scores = _score(source, heads, config, device, choice.dtype, tasks)
        results.append((layers, heads, scores, (mean, std)))
        del source
    assert choice is not None
    metrics, chosen, positions = _metrics(results, sets, config)
    tensors, meta = _tensors(results, chosen, sets, store, config)
    meta["precision"] = choice.metadata()
    passes = reads.passes(data, len(data.layers))
    return ProbeResult(metrics, tensors, meta, data.classes, str(device), choice.name,
                       {"epochs": config.epochs, "steps": sched.steps}, "classification",
                       round(passes, 2), choice, positions=positions)


def _targets(rows: np.ndarray, sets: TokenSets, tasks: int, device: torch.device
             ) -> torch.Tensor:
    both = np.stack([sets.data.y[rows], sets.data.control[rows]])[:tasks]
    return torch.from_numpy(both).to(device)


def _batch(pieces: list[Piece], batch: Any, device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    x, mask, pos, rows = assemble(pieces, batch)
    return torch.from_numpy(x).to(device), torch.from_numpy(mask).to(device), pos, rows


def _decide(source: TokenSource, sched: Any, heads: list[Heads], config: ProbeConfig,
            device: torch.device, tasks: int) -> _precision.Choice:
    """fp32 or bf16 autocast, timed on the run's first batch (``_precision.choose``)."""
    window, batches = sched.epochs[0][0]
    if config.precision.value != "auto" or not batches:
        return _precision.choose(config.precision, device, lambda d: None, 1.0)
    pieces = [source.load(p) for p in window]
    x, mask, _, rows = _batch(pieces, batches[0], device)
    step = timing_step(heads, x, mask, _targets(rows, source.sets, tasks, device))
    work = _precision.Work(fp32=sched.steps, bf16=sched.steps, polish=0)
    return _precision.choose(config.precision, device, step, 1.0, work)


def _train(source: TokenSource, sched: Any, heads: list[Heads], config: ProbeConfig,
           device: torch.device, dtype: torch.dtype, tasks: int) -> None:
    trainer = Trainer(heads, config.weight_decays, config.learning_rate, sched.steps, device)
    for epoch in sched.epochs:
        for pieces, (_, batches) in zip(source.windows([w for w, _ in epoch]), epoch,
                                        strict=True):
            for batch in batches:
                x, mask, _, rows = _batch(pieces, batch, device)
                trainer.step(x, mask, _targets(rows, source.sets, tasks, device), dtype)
            del pieces


def _score(source: TokenSource, heads: list[Heads], config: ProbeConfig,
           device: torch.device, dtype: torch.dtype, tasks: int) -> dict[str, Scores]:
    """Every used row through every head: counts per role, test logits, token hits."""
    g, decays = len(source.layers), len(config.weight_decays)
    n_pos = source.sets.skip + source.sets.max_length
    out = {h.kind.value: Scores(np.zeros((g, tasks, decays, 4)), np.zeros((g, tasks, decays, 4)))
           for h in heads}
    role = source.sets.data.role
    for pieces in source.windows(source.in_order()):
        for batch in scoring_batches(pieces, config.batch_size, role):
            x, mask, pos, rows = _batch(pieces, batch, device)
            target = _targets(rows, source.sets, tasks, device)
            with torch.no_grad(), _autocast(device, dtype):
                for head in heads:
                    logits, tok = head.forward(x, mask)
                    _accumulate(out[head.kind.value], logits.float(), target, role[rows], rows)
                    if tok is not None:
                        _token_hits(out[head.kind.value], tok.float(), target, mask, pos,
                                    role[rows], n_pos)
        del pieces
    return out


def _predict(logits: torch.Tensor) -> torch.Tensor:
    return (logits[..., 0] > 0).long() if logits.shape[-1] == 1 else logits.argmax(-1)


def _losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-item loss ``(..., n)``; ``target`` broadcast to ``logits.shape[:-1]``."""
    full = target.expand(logits.shape[:-1])
    if logits.shape[-1] == 1:
        return torch.nn.functional.binary_cross_entropy_with_logits(
            logits[..., 0].double(), full.double(), reduction="none")
    lse = torch.logsumexp(logits.double(), -1)
    return lse - logits.double().gather(-1, full.unsqueeze(-1)).squeeze(-1)


def _accumulate(sc: Scores, logits: torch.Tensor, target: torch.Tensor, roles: np.ndarray,
                rows: np.ndarray) -> None:
    tgt = target[None, :, None, :]
    hit = (_predict(logits) == tgt).double().cpu().numpy()
    loss = _losses(logits, tgt).cpu().numpy()
    for r in (FIT, VAL, TEST):
        sel = roles == r
        sc.correct[..., r] += hit[..., sel].sum(-1)
        sc.loss[..., r] += loss[..., sel].sum(-1)
    test = roles == TEST
    if test.any():
        sc.test_rows.append(rows[test])
        sc.test_logits.append(logits[:, 0][:, :, torch.from_numpy(test)].cpu().numpy())


def _token_hits(sc: Scores, tok: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                pos: np.ndarray, roles: np.ndarray, n_pos: int) -> None:
    """Correct test tokens of the real task, per layer, decay and position."""
    g, _, decays = tok.shape[:3]
    if sc.token_hits is None:
        sc.token_hits, sc.token_count = np.zeros((g, decays, n_pos)), np.zeros(n_pos)
    sel = (mask.cpu().numpy() & (roles == TEST)[:, None])
    if not sel.any():
        return
    pred = _predict(tok[:, 0]).cpu().numpy()  # (g, decays, n, T)
    hit = pred == target[0].cpu().numpy()[:, None]
    where = pos[sel]
    assert sc.token_count is not None
    sc.token_count += np.bincount(where, minlength=n_pos)[:n_pos]
    for i in range(g):
        for d in range(decays):
            sc.token_hits[i, d] += np.bincount(where, weights=hit[i, d][sel],
                                               minlength=n_pos)[:n_pos]


def _choose(sc: Scores, n_val: int) -> np.ndarray:
    """Per layer, the decay with the best validation accuracy, then loss, then first."""
    acc, loss = sc.correct[:, 0, :, VAL] / n_val, sc.loss[:, 0, :, VAL] / n_val
    return np.array([int(np.lexsort((loss[i], -acc[i]))[0]) for i in range(len(acc))])


def _metrics(results: list[Any], sets: TokenSets, config: ProbeConfig
             ) -> tuple[pd.DataFrame, dict[str, list[int]], pd.DataFrame | None]:
    data = sets.data
    n_fit, n_val, n_test = data.count(FIT), data.count(VAL), data.count(TEST)
    train = np.isin(data.role, (FIT, VAL))
    k = data.n_classes
    counts = np.stack([np.bincount(data.y[train], minlength=k),
                       np.bincount(data.y[data.role == TEST], minlength=k)])
    rows, positions, chosen = [], [], {}
    for kind in config.probes:
        probe = kind.value
        picks: list[int] = []
        hits_all: list[np.ndarray] = []
        scores_all: list[np.ndarray] = []
        labels: np.ndarray | None = None
        for layers, _, scores, _ in results:
            sc = scores[probe]
            best = _choose(sc, n_val)
            picks += list(best)
            order = np.argsort(np.concatenate(sc.test_rows), kind="stable")
            test_rows = np.concatenate(sc.test_rows)[order]
            logits = np.concatenate(sc.test_logits, axis=2)[:, :, order]
            labels = data.y[test_rows]
            for i, layer in enumerate(layers):
                d = best[i]
                lg = logits[i, d]
                pred = (lg[:, 0] > 0).astype(int) if lg.shape[1] == 1 else lg.argmax(1)
                hits_all.append(pred == labels)
                if lg.shape[1] == 1:
                    scores_all.append(lg[:, 0])
                test_acc = sc.correct[i, 0, d, TEST] / n_test
                control = sc.correct[i, 1, d, TEST] / n_test if config.control else np.nan
                row = {"layer": layer, "probe": probe, "strength": config.weight_decays[d],
                       "n_train": n_fit, "n_test": n_test,
                       "train_accuracy": sc.correct[i, 0, d, FIT] / n_fit,
                       "test_accuracy": test_acc,
                       "test_auroc": (_eval.auroc(lg[:, 0], labels == 1)
                                      if lg.shape[1] == 1 else np.nan),
                       "test_loss": sc.loss[i, 0, d, TEST] / n_test,
                       "control_accuracy": control, "selectivity": test_acc - control}
                if sc.token_hits is not None and sc.token_count is not None:
                    row["test_token_accuracy"] = (sc.token_hits[i, d].sum()
                                                  / max(sc.token_count.sum(), 1))
                    positions += _position_rows(layer, probe, sc.token_hits[i, d],
                                                sc.token_count)
                rows.append(row)
        chosen[probe] = picks
        hits = np.stack(hits_all)
        binary = bool(scores_all) and labels is not None
        acc_ci, auc_ci = _eval.bootstrap_intervals(
            hits, np.stack(scores_all) if binary else None,
            (labels == 1) if binary and labels is not None else None, config.seed)
        at = len(rows) - len(hits)
        for j in range(len(hits)):
            rows[at + j].update({"majority_baseline": _eval.majority_baseline(counts),
                                 "test_accuracy_low": acc_ci[j, 0],
                                 "test_accuracy_high": acc_ci[j, 1],
                                 "test_auroc_low": auc_ci[j, 0], "test_auroc_high": auc_ci[j, 1]})
    extra = (["test_token_accuracy"] if ProbeKind.TOKEN_LOGISTIC in config.probes else [])
    columns = _eval.METRIC_COLUMNS + extra + _eval.INTERVAL_COLUMNS
    table = pd.DataFrame(rows, columns=columns)
    pos = pd.DataFrame(positions) if positions else None
    return table, chosen, pos


def _position_rows(layer: int, probe: str, hits: np.ndarray, count: np.ndarray
                   ) -> list[dict[str, Any]]:
    return [{"layer": layer, "probe": probe, "position": p, "n_test_tokens": int(count[p]),
             "test_accuracy": hits[p] / count[p]} for p in np.flatnonzero(count)]


def _fold(kind: ProbeKind, params: dict[str, np.ndarray], mean: np.ndarray, std: np.ndarray
          ) -> dict[str, np.ndarray]:
    """Raw-space tensors of one head trained on ``(x - mean) / std`` (see the README)."""
    w, b = params["weight"], params["bias"]
    h = len(mean)
    out: dict[str, np.ndarray] = {}
    if kind == ProbeKind.ATTENTIVE:
        # A query's constant shift q·mean/std is the same for every token: softmax drops it.
        out["queries"] = params["queries"] / std
        wm = w.reshape(-1, h, w.shape[-1])
        raw = wm / std[None, :, None]
        bias = b - np.einsum("mjk,j->k", raw, mean)
        weight = raw.reshape(w.shape)
    elif kind == ProbeKind.MOMENT:
        w1, w2 = w[:h] / std[:, None], w[h:] / (std * std)[:, None]
        bias = b - mean @ w1
        weight = np.concatenate([w1, w2])
    else:
        weight = w / std[:, None]
        bias = b - mean @ weight
    out["weight"], out["bias"] = weight.T, bias
    return {name: np.ascontiguousarray(v, dtype=np.float32) for name, v in out.items()}


def _tensors(results: list[Any], chosen: dict[str, list[int]], sets: TokenSets, store: Any,
             config: ProbeConfig) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from actcache import __version__
    from actcache.probes.api import _model_name

    data = sets.data
    tensors: dict[str, np.ndarray] = {}
    strengths: dict[str, dict[str, float]] = {}
    for kind in config.probes:
        at = 0
        strengths[kind.value] = {}
        for layers, heads, _, (mean, std) in results:
            head = next(h for h in heads if h.kind == kind)
            for i, layer in enumerate(layers):
                d = chosen[kind.value][at]
                at += 1
                params = {n: p[i, 0, d].detach().double().cpu().numpy()
                          for n, p in head.params.items()}
                for name, value in _fold(kind, params, mean[i], std[i]).items():
                    tensors[f"{kind.value}.layer{layer}.{name}"] = value
                strengths[kind.value][str(layer)] = config.weight_decays[d]
    meta = {
        "store_url": str(store.url), "model": _model_name(store), "pooling": "tokens",
        "label_column": config.label,
        "classes": json.dumps([c if isinstance(c, str | int | float | bool) else str(c)
                               for c in data.classes]),
        "strength_per_layer": json.dumps(strengths), "layers": json.dumps(list(data.layers)),
        "task": "classification", "unlabelled_rows": str(int((data.y < 0).sum())),
        "actcache_version": __version__,
        "token_probe": json.dumps({
            "skip_positions": sets.skip, "epochs": config.epochs,
            "batch_size": config.batch_size, "learning_rate": config.learning_rate,
            "weight_decays": list(config.weight_decays), "queries": config.queries,
            "attention_scale": 1.0 / float(np.sqrt(data.hidden)),
            "rows_without_tokens": sets.no_tokens, "strength": "AdamW weight decay"}),
    }
    return tensors, meta

