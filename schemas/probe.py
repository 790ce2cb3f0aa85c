"""The probe stage: what a ``probe.yaml`` holds and what ``actcache probe`` accepts.

Defaults live here and nowhere else (the CLI's options default to None, meaning "the
schema's"). Strengths follow scikit-learn's ``C``: the inverse L2 strength on a summed
loss, so a larger value regularises less.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Literal

from pydantic import Field, field_validator, model_validator

from actcache.schemas._base import Frozen
from actcache.schemas._fields import layers_value, names_value

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: object) -> int:
    """``"512MB"`` → 512_000_000; ``"1GiB"`` → 2**30; ints pass through."""
    if isinstance(value, bool):
        raise ValueError(f"not a memory size: {value!r}")  # noqa: TRY004 (pydantic needs ValueError)
    if isinstance(value, int | float):
        return int(value)
    match = _SIZE.match(str(value))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"not a memory size: {value!r}; write e.g. 512MB, 2GB or 1GiB"
        )
    return int(float(match.group(1)) * _UNITS[unit])


class ProbeKind(StrEnum):
    """A kind of probe."""

    LOGISTIC = "logistic"
    """L2-regularised logistic regression (binary sigmoid, multiclass softmax)."""
    RIDGE = "ridge"
    """Ridge regression, closed form (alpha = 1/C): on the class indicators for a
    classification task, on the numeric label itself for a regression task."""
    MEAN_DIFF = "mean-diff"
    """Difference of class means (nearest class mean in activation space); no strength."""
    ATTENTIVE = "attentive"
    """Token probe (``pooling: tokens``): learnable queries cross-attend to the row's tokens
    (keys and values are the tokens themselves, no projections), then a linear classifier
    on the pooled vectors (efficient probing, Psomas et al.). Trained by AdamW."""
    MOMENT = "moment"
    """Token probe: a linear classifier on the per-feature mean and variance of the row's
    tokens (a diagonal Moment Probing). Trained by AdamW."""
    TOKEN_LOGISTIC = "token-logistic"
    """Token probe: logistic regression on every token, each labelled with its row's label;
    a row is scored by the mean of its tokens' logits. Trained by AdamW."""


#: Probe kinds that read every token of a row (``pooling: tokens``).
TOKEN_PROBES = (ProbeKind.ATTENTIVE, ProbeKind.MOMENT, ProbeKind.TOKEN_LOGISTIC)


LINEAR_PROBES = (ProbeKind.LOGISTIC, ProbeKind.RIDGE, ProbeKind.MEAN_DIFF)
"""Probes of one vector per row and a linear score: those ``group_column`` and
``eval_store`` train and score."""


class Task(StrEnum):
    """What the label column asks of a probe."""

    AUTO = "auto"
    """Regression when the label column is numeric and either holds a non-integer value or
    more than 20 distinct values; classification otherwise."""
    CLASSIFICATION = "classification"
    """Each distinct label value is a class."""
    REGRESSION = "regression"
    """The label is a number to predict (ridge only); rows with a missing label are unused."""


class Precision(StrEnum):
    """Compute dtype of the probe matmuls."""

    AUTO = "auto"
    """bfloat16 only where timing one objective evaluation of the run's own rows in both
    precisions projects the whole bf16 fit (its float32 finish included) faster than
    float32's; fp32 on hardware without native bf16 or where the fit is too short to pay."""
    BF16 = "bf16"
    """bfloat16 matmuls with float64 master weights, finished in float32, whatever the
    hardware."""
    FP32 = "fp32"
    """float32 throughout."""


def _default_strengths() -> tuple[float, ...]:
    return tuple(float(10.0**e) for e in range(-4, 3))


class ProbeConfig(Frozen):
    """Which probes to train on which layers of a store, on which labels and split."""

    label: str = Field(min_length=1)
    """The metadata column holding the labels: classes (strings, ints, bools) or, for a
    regression task, numbers. Rows whose label is missing are unused."""
    task: Task = Task.AUTO
    """classification, regression (numeric labels, ridge only) or auto: regression when the
    column is numeric with a non-integer value or more than 20 distinct values."""
    pooling: str | None = None
    """The stored pooling to read; None when the store has exactly one non-token pooling."""
    layers: Literal["all"] | tuple[int, ...] = "all"
    """Hidden-state indices to probe; negatives count from the model's last hidden state."""
    probes: tuple[ProbeKind, ...] = (ProbeKind.LOGISTIC,)
    """The probe kinds to train, each on every layer."""

    split_column: str | None = None
    """A metadata column with values train / test / val (optional) that fixes the split."""
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    """Without ``split_column``: the fraction of rows held out for test, chosen by a hash of the id."""
    val_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    """The fraction of train used to choose the strength (by a hash of the id), unless the
    split column has ``val`` rows."""

    group_column: str | None = Field(default=None, min_length=1)
    """A metadata column naming each row's group (domain, source, language). Besides the
    pooled run, each group's probes are trained on that group's train rows alone (strength
    chosen on its validation rows) and scored on every group's test rows: ``transfer.csv``
    and ``transfer.png``. Rows without a group value take part in the pooled run only."""
    eval_store: str | None = Field(default=None, min_length=1)
    """Another store of the same model, layers and pooling: the probes trained here are
    also scored on every row of it that has a label (its split is ignored): ``eval.csv``."""

    strengths: tuple[float, ...] = Field(default_factory=_default_strengths)
    """The grid of C values (inverse L2 strength on the summed loss), default logspace(-4, 2, 7)."""
    control: bool = True
    """Also train each probe on a fixed random relabelling (Hewitt & Liang control task)."""
    seed: int = 0
    """Seeds the control relabelling, the hash splits and the block shuffling."""

    max_memory: int = 512 * 10**6
    """Memory budget in bytes for activation blocks ("512MB", "2GiB" accepted)."""
    precision: Precision = Precision.AUTO
    """Compute dtype of the matmuls."""
    max_iter: int = Field(default=500, ge=1)
    """Cap on L-BFGS iterations per fit (a safeguard: fits stop at ``tol``)."""
    tol: float = Field(default=1e-4, gt=0.0)
    """Stop a fit when the largest gradient entry of its mean objective is at most this
    (scikit-learn's lbfgs ``gtol``)."""

    skip_positions: int | None = Field(default=None, ge=0)
    """Token probes: leading positions of every row left out (class, register tokens).
    None: the manifest's ``prefix_tokens`` for an image store, else 0."""
    epochs: int = Field(default=20, ge=1)
    """Token probes: passes of AdamW over the fit rows (one read of their tokens each)."""
    batch_size: int = Field(default=64, ge=1)
    """Token probes: rows per minibatch (their tokens padded to the batch's longest row)."""
    learning_rate: float = Field(default=1e-2, gt=0.0)
    """Token probes: AdamW's peak learning rate, decayed to 0 by a cosine over all steps."""
    weight_decays: tuple[float, ...] = (0.0, 0.01, 0.1, 1.0)
    """Token probes: AdamW (decoupled) weight decays trained side by side, one head each,
    the one with the best validation accuracy kept (as ``strengths`` for C)."""
    queries: int = Field(default=8, ge=1)
    """Attentive probe: learnable queries per head, each pooling the tokens on its own."""

    out: str = "probes"
    """The folder that receives metrics.csv, probes.safetensors and layers.png."""

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v: object) -> object:
        return layers_value(v)

    @field_validator("probes", mode="before")
    @classmethod
    def _probes(cls, v: object) -> object:
        return names_value(v, (p.value for p in ProbeKind), "probe")

    @field_validator("max_memory", mode="before")
    @classmethod
    def _max_memory(cls, v: object) -> object:
        return parse_bytes(v)

    @model_validator(mode="before")
    @classmethod
    def _regression_trains_ridge(cls, values: object) -> object:
        # A regression trains ridge only, so naming the task is enough to mean it.
        if (isinstance(values, dict) and values.get("probes") is None
                and str(values.get("task")) == Task.REGRESSION.value):
            return {**values, "probes": (ProbeKind.RIDGE,)}
        return values

    @model_validator(mode="after")
    def _cross(self) -> ProbeConfig:
        if self.split_column is not None and "test_fraction" in self.model_fields_set:
            raise ValueError("Cannot specify both `split_column` and `test_fraction`")
        if not self.probes:
            raise ValueError("`probes` is empty: name at least one of logistic, ridge, mean-diff")
        if len(set(self.probes)) != len(self.probes):
            raise ValueError("`probes` names a probe twice")
        if self.layers != "all" and not self.layers:
            raise ValueError("`layers` is empty: give 'all' or at least one index")
        if self.layers != "all" and len(set(self.layers)) != len(self.layers):
            raise ValueError("`layers` names a layer twice")
        token = [p.value for p in self.probes if p in TOKEN_PROBES]
        if token and len(token) != len(self.probes):
            pooled = ", ".join(p.value for p in self.probes if p not in TOKEN_PROBES)
            raise ValueError(f"`probes` mixes token probes ({', '.join(token)}) with pooled "
                             f"probes ({pooled}): train each kind in a run of its own")
        if not self.weight_decays or any(w < 0 for w in self.weight_decays):
            raise ValueError("`weight_decays` must be a non-empty list of values >= 0")
        if not self.strengths or any(c <= 0 for c in self.strengths):
            raise ValueError("`strengths` must be a non-empty list of positive C values")
        self._cross_transfer()
        if self.max_memory < 1 << 20:
            raise ValueError(f"`max_memory` of {self.max_memory} bytes is too small; give at least 1MiB")
        return self

    def _cross_transfer(self) -> None:
        for name in ("group_column", "eval_store"):
            if getattr(self, name) is None:
                continue
            if self.task == Task.REGRESSION:
                raise ValueError(f"`{name}` needs class labels, not a regression: drop it or "
                                 "use --task classification")
            other = [p.value for p in self.probes if p not in LINEAR_PROBES]
            if other:
                raise ValueError(f"`{name}` applies to the linear probes (logistic, ridge, "
                                 f"mean-diff), not {', '.join(other)}: probe those apart")
        if self.group_column is not None and self.group_column == self.label:
            raise ValueError("`group_column` is the label column: group by another column")
        if self.group_column is not None and self.group_column == self.split_column:
            raise ValueError("`group_column` is the split column: group by another column")
