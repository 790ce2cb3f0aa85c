"""Stores made from arrays and scikit-learn references, for tests and benchmarks.

``ArrayStore`` serves numpy arrays through the store read API (what ``train_probes``
needs); ``ProceduralStore`` generates its rows on demand, so a store of any size costs no
memory. ``sklearn_reference`` fits scikit-learn one layer and one C at a time on the same
features, split and selection rule, for any store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from actcache.schemas.errors import LayerNotFoundError, PoolingNotFoundError
from actcache.schemas.probe import ProbeConfig


class _BaseStore:
    """The read API on top of a ``_rows(layer, start, stop)`` provider."""

    def __init__(self, layers: Sequence[int], hidden: int, metadata: pd.DataFrame,
                 ids: Sequence[str] | None, chunk_rows: int, poolings: Sequence[str],
                 url: str, complete: bool, num_hidden_layers: int | None) -> None:
        self.layers = tuple(int(layer) for layer in layers)
        self.hidden_size = int(hidden)
        self.metadata = metadata.reset_index(drop=True)
        n = len(self.metadata)
        self.ids = tuple(ids) if ids is not None else tuple(str(i) for i in range(n))
        self.n_rows = len(self.ids)
        self.chunk_rows = int(chunk_rows)
        self.poolings = tuple(poolings)
        self.url = url
        self.complete = complete
        blocks = num_hidden_layers if num_hidden_layers is not None else max(self.layers)
        self.manifest: dict[str, Any] = {"layers": list(self.layers), "poolings": list(self.poolings),
                         "hidden_size": self.hidden_size, "num_hidden_layers": blocks,
                         "model": "synthetic", "dtype": "float32"}

    def resolve_layer(self, layer: int) -> int:
        resolved = layer + self.manifest["num_hidden_layers"] + 1 if layer < 0 else layer
        if resolved not in self.layers:
            raise LayerNotFoundError(
                f"layer {layer} is not in the store; stored layers: "
                f"{', '.join(map(str, self.layers))}"
            )
        return resolved

    def resolve_pooling(self, pooling: str | None) -> str:
        if pooling is None:
            pooled = [p for p in self.poolings if p != "tokens"]
            if len(pooled) == 1:
                return pooled[0]
            pooling = "<none>"
        if pooling not in self.poolings:
            raise PoolingNotFoundError(
                f"pooling {pooling!r} is not in the store; stored poolings: "
                f"{', '.join(self.poolings)}"
            )
        return pooling

    def _rows(self, layer: int, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def read_block(self, layer: int, pooling: str | None, start: int, stop: int) -> np.ndarray:
        self.resolve_pooling(pooling)
        return self._rows(self.resolve_layer(layer), start, min(stop, self.n_rows))

    def read(self, layer: int, pooling: str | None = None,
             rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        full = self.read_block(layer, pooling, 0, self.n_rows)
        return full if rows is None else full[np.asarray(rows, dtype=np.int64)]

    def rows_for_ids(self, ids: Sequence[str]) -> np.ndarray:
        index = {key: i for i, key in enumerate(self.ids)}
        return np.array([index[key] for key in ids], dtype=np.int64)


class ArrayStore(_BaseStore):
    """An in-memory store: ``{layer: (rows, hidden) array}`` plus a metadata frame."""

    def __init__(self, x_by_layer: dict[int, np.ndarray], metadata: pd.DataFrame,
                 ids: Sequence[str] | None = None, *, chunk_rows: int = 64,
                 poolings: Sequence[str] = ("mean",), url: str = "memory://arrays",
                 complete: bool = True, num_hidden_layers: int | None = None) -> None:
        self._x = {int(k): np.ascontiguousarray(v, dtype=np.float32) for k, v in x_by_layer.items()}
        hidden = next(iter(self._x.values())).shape[1]
        super().__init__(sorted(self._x), hidden, metadata, ids, chunk_rows, poolings, url,
                         complete, num_hidden_layers)

    def _rows(self, layer: int, start: int, stop: int) -> np.ndarray:
        return self._x[layer][start:stop].copy()


class ProceduralStore(_BaseStore):
    """Rows generated per chunk from a seed: ``label`` is ``row % classes``; each layer
    shifts class c along its own random direction by ``signal × (layer + 1)``."""

    def __init__(self, n_rows: int, layers: Sequence[int], hidden: int, *, classes: int = 2,
                 chunk_rows: int = 256, signal: float = 0.3, seed: int = 0,
                 url: str = "memory://procedural") -> None:
        meta = pd.DataFrame({"label": np.arange(n_rows) % classes})
        super().__init__(layers, hidden, meta, None, chunk_rows, ("mean",), url, True, None)
        self._k, self._signal, self._seed = classes, signal, seed

    def _chunk(self, layer: int, chunk: int) -> np.ndarray:
        c = self.chunk_rows
        rng = np.random.default_rng([self._seed, layer, chunk])
        x = rng.standard_normal((c, self.hidden_size), dtype=np.float32)
        dirs = np.random.default_rng([self._seed, layer]).standard_normal(
            (self._k, self.hidden_size)).astype(np.float32)
        labels = np.arange(chunk * c, chunk * c + c) % self._k
        x += self._signal * (layer + 1) * dirs[labels]
        return x

    def _rows(self, layer: int, start: int, stop: int) -> np.ndarray:
        c = self.chunk_rows
        parts = [self._chunk(layer, i) for i in range(start // c, (stop - 1) // c + 1)]
        return np.concatenate(parts)[start - (start // c) * c:stop - (start // c) * c]


def constant_safe_std(x: np.ndarray) -> np.ndarray:
    """Per-feature std with actcache's rule for constant features (see ``Moments``): a
    spread below 1e-12 of the feature's scale is float noise (real hidden states have
    dimensions at ~1e-32), scaled by 1 rather than blown up to unit variance as
    scikit-learn's StandardScaler does."""
    mean, std = x.mean(0), x.std(0)
    return np.where(std <= 1e-12 * np.maximum(1.0, np.abs(mean)), 1.0, std)


def _make(logistic: bool, c: float, max_iter: int, tol: float) -> Any:
    from sklearn.linear_model import LogisticRegression, Ridge

    return LogisticRegression(C=c, max_iter=max_iter, tol=tol) if logistic else Ridge(1.0 / c)


def _val_score(model: Any, z: np.ndarray, target: np.ndarray, logistic: bool
               ) -> tuple[float, float]:
    """Lower is better: (-accuracy, log-loss) for logistic, (MSE, 0) for ridge."""
    from sklearn.metrics import log_loss

    if logistic:
        proba = model.predict_proba(z)
        return (-model.score(z, target), log_loss(target, proba, labels=model.classes_))
    err = model.predict(z).reshape(len(z), -1) - target.reshape(len(z), -1)
    return (float(np.mean(err**2)), 0.0)


def _regression_row(data: Any, layer: int, z: np.ndarray, config: ProbeConfig,
                    split: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
                    ) -> dict[str, Any]:
    """Ridge on the numeric target, C by validation MSE, refit on train; and its control."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import mean_squared_error, r2_score

    fit, val, train, test = split
    y, ctl = data.value, data.control_value
    mse = [mean_squared_error(y[val], Ridge(1.0 / c).fit(z[fit], y[fit]).predict(z[val]))
           for c in config.strengths]
    best = float(config.strengths[int(np.argmin(mse))])
    model = Ridge(1.0 / best).fit(z[train], y[train])
    control = Ridge(1.0 / best).fit(z[train], ctl[train])
    pred = model.predict(z)
    return {"layer": layer, "probe": "ridge", "strength": best,
            "train_accuracy": np.nan, "test_accuracy": np.nan,
            "train_r2": float(r2_score(y[train], pred[train])),
            "test_r2": float(r2_score(y[test], pred[test])),
            "test_mse": float(mean_squared_error(y[test], pred[test])),
            "control_r2": float(r2_score(ctl[test], control.predict(z[test]))),
            "coef": np.atleast_2d(model.coef_), "intercept": np.atleast_1d(model.intercept_)}


def sklearn_reference(store: Any, config: ProbeConfig, max_iter: int = 1000) -> pd.DataFrame:
    """scikit-learn on the same standardised features, split and selection rule.

    Logistic: ``LogisticRegression(C)`` per C on the fit rows, the C with the best
    validation accuracy (ties: lower validation log-loss), refit on train. Ridge:
    ``Ridge(alpha=1/C)`` on the class indicators (or, for a regression, on the number),
    the C with the lowest validation MSE. Returns one row per (layer, probe) with the
    strength, accuracies (regression: ``train_r2``, ``test_r2``, ``test_mse`` and
    ``control_r2``, the same C on the control targets) and the standardised-space ``coef``
    (out, hidden) and ``intercept``.
    """
    from actcache.probes._data import FIT, TEST, VAL, prepare

    data = prepare(store, config)
    fit, val, test = (np.flatnonzero(data.role == r) for r in (FIT, VAL, TEST))
    train = np.sort(np.concatenate([fit, val]))
    rows = []
    for layer in data.layers:
        x = store.read(layer, data.pooling).astype(np.float64)
        z = (x - x[train].mean(0)) / constant_safe_std(x[train])
        if data.regression:
            rows.append(_regression_row(data, layer, z, config, (fit, val, train, test)))
            continue
        for kind in config.probes:
            if kind.value not in ("logistic", "ridge"):
                continue
            logistic = kind.value == "logistic"
            target = data.y if logistic else data.targets(np.arange(len(data.y)))
            scores = [_val_score(_make(logistic, c, max_iter, config.tol).fit(z[fit], target[fit]),
                                 z[val], target[val], logistic) for c in config.strengths]
            best = min(range(len(scores)), key=lambda i: scores[i])
            model = _make(logistic, config.strengths[best], max_iter, config.tol)
            model.fit(z[train], target[train])
            pred = model.predict(z)
            if kind.value == "ridge":
                pred = pred.reshape(len(z), -1)
                pred = (pred[:, 0] > 0.5).astype(int) if pred.shape[1] == 1 else pred.argmax(1)
            rows.append({"layer": layer, "probe": kind.value,
                         "strength": float(config.strengths[best]),
                         "train_accuracy": float(np.mean(pred[train] == data.y[train])),
                         "test_accuracy": float(np.mean(pred[test] == data.y[test])),
                         "coef": np.atleast_2d(model.coef_), "intercept": model.intercept_})
    return pd.DataFrame(rows)


def compare_with_sklearn(store: Any, config: ProbeConfig, points: float = 0.01,
                         result: Any = None) -> pd.DataFrame:
    """Train with actcache (unless ``result`` holds that run) and scikit-learn; raise
    AssertionError when a layer's test accuracy (test R² for a regression) differs by more
    than ``points`` (a fraction). Returns both side by side, scikit-learn's columns suffixed
    ``_sklearn`` (its standardised-space ``coef`` and ``intercept`` unsuffixed)."""
    from actcache.probes.api import train_probes

    run = result if result is not None else train_probes(store, config)
    ref = sklearn_reference(store, config)
    both = run.metrics.merge(ref, on=["layer", "probe"], suffixes=("", "_sklearn"))
    score = run.score_column
    gap = (both[score] - both[f"{score}_sklearn"]).abs()
    if (gap > points).any() or gap.isna().any():
        raise AssertionError(f"{score} differs from scikit-learn by more than {points}:\n"
                             f"{both[['layer', 'probe', score, f'{score}_sklearn']]}")
    return both


#: How far an out-of-core run may land from the in-memory one on the same store: both stop
#: at the same gradient tolerance from different starting points (see ``_newton``), so a
#: logistic probe may classify a borderline row differently, a near-tie on validation may
#: choose a neighbouring C, and weights differ within the tolerance's reach (up to a tenth
#: of the largest weight for a weakly penalised fit, whose optimum is flat). Ridge and
#: mean-diff are closed forms and stay within float noise.
LOGISTIC_POINTS = 0.005
LOGISTIC_WEIGHTS = 0.1
_ACCURACIES = ["train_accuracy", "test_accuracy", "control_accuracy"]


def assert_close_to_in_memory(whole: Any, streamed: Any) -> None:
    """Metrics and weights of ``streamed`` against ``whole`` within the stated tolerance."""
    logistic = (whole.metrics["probe"] == "logistic").to_numpy()
    pd.testing.assert_frame_equal(whole.metrics[~logistic], streamed.metrics[~logistic],
                                  atol=1e-4, rtol=0)
    for col in _ACCURACIES:
        gap = np.abs(whole.metrics[col] - streamed.metrics[col])[logistic].max()
        assert not (gap > LOGISTIC_POINTS), (col, gap)
    assert whole.tensors.keys() == streamed.tensors.keys()
    same_c = whole.metrics["strength"].to_numpy() == streamed.metrics["strength"].to_numpy()
    for key in [k for k in whole.tensors if k.endswith(".weight")]:
        probe, layer = key.split(".")[0], int(key.split(".")[1].removeprefix("layer"))
        metrics = whole.metrics
        row = ((metrics["probe"] == probe) & (metrics["layer"] == layer)).to_numpy()
        if probe == "logistic" and not same_c[row].all():
            continue  # another C on a validation near-tie: accuracies are compared above
        # Weight and bias as one parameter vector, on the scale of its largest entry.
        bias = key.removesuffix(".weight") + ".bias"
        want = np.concatenate([whole.tensors[key], whole.tensors[bias][:, None]], 1)
        got = np.concatenate([streamed.tensors[key], streamed.tensors[bias][:, None]], 1)
        rel = LOGISTIC_WEIGHTS if probe == "logistic" else 1e-3
        np.testing.assert_allclose(got, want, rtol=rel, atol=rel * np.abs(want).max(),
                                   err_msg=key)
