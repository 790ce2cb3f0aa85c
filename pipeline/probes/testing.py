"""scikit-learn references and tolerances for probe tests and benchmarks.

``sklearn_reference`` fits scikit-learn one layer and one C at a time on the same
features, split and selection rule, for any store (write one from arrays with
``actcache.testing.synthetic_store``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from actcache.schemas.probe import ProbeConfig


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
