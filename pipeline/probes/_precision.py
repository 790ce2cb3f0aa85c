"""One home for the probes' compute precision: what ``--precision auto`` chooses, and why.

``auto`` decides by what the whole fit would cost, not by a matmul in isolation. It times
one step of the real work (for the logistic probes: one objective-and-gradient evaluation
on a sample of the run's own standardised rows, casts and loss included) in float32 and in
bfloat16, and projects both fits from counts of steps measured end to end (``Work``): a
bf16 fit stops at its noise floor (``BF16_TOL``) and is finished in float32, so it pays
both kinds of step. bf16 is taken only when its projection, with ``MARGIN``, beats
float32's. No bf16 step is timed where it cannot pay: on hardware without native bf16,
or where the whole float32 fit is projected to cost less than timing bf16 would.

Every decision keeps its figures (``Choice``): they go into the probe outputs' metadata
and the summary line. The same ``choose`` serves any iterative trainer: a minibatch loop
passes one training step (under autocast on a GPU) and its step counts.

Device facts (whether bf16 is native, how to wait for a device) come from
``actcache.workers.devices``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from actcache.schemas.probe import Precision
from actcache.workers.devices import native_bf16, synchronize

#: A bf16 solve stops when its largest gradient entry reaches this, then float32 finishes
#: it to ``tol``: below it bf16's rounding (2⁻⁸ relative) makes line searches fail, and the
#: first wave's bf16 fits spent 40x the evaluations there and picked other strengths.
BF16_TOL = 1e-3


@dataclass(frozen=True)
class Work:
    """Steps a whole fit takes, in units of the timed step."""

    fp32: float
    """Steps of a float32 fit."""
    bf16: float
    """bf16 steps of a bf16 fit (to ``BF16_TOL``)."""
    polish: float
    """float32 steps that finish a bf16 fit (0 where nothing is finished in float32)."""


#: The logistic fit (select and refit, L-BFGS with the Gram preconditioner) in
#: evaluations over the train rows. Counted on the demo store (2,400 x 7 x 384): fp32 29;
#: bf16 48 then 15 in float32. On the synthetic 8,000-row store: fp32 55; bf16 10 then 50.
#: Per float32 fit that is bf16 1.66x and 0.18x, polish 0.52x and 0.91x; the means,
#: scaled to 40 float32 steps. So bf16 pays only where its step is over 6x faster.
LOGISTIC_WORK = Work(fp32=40, bf16=37, polish=29)
#: bf16 must be projected at least this much faster: the projection's own error.
MARGIN = 1.15
#: Timing bf16 costs its first call (kernel selection, measured 7-70 ms on a 2-core
#: AVX512-BF16 CPU) and a few steps: a float32 fit projected to save less than this even
#: with free bf16 steps is run as it is.
MIN_SAVING_S = 0.25
#: Timed steps per precision after one warm-up; the best is kept (noise only adds).
REPEATS = 3


@dataclass(frozen=True)
class Choice:
    """The precision a run uses, why, and the figures it was decided on."""

    requested: str
    dtype: torch.dtype
    reason: str
    fp32_ms: float | None = None
    """One timed step in float32 (best of ``REPEATS``)."""
    bf16_ms: float | None = None
    fit_fp32_s: float | None = None
    """The whole fit projected in float32."""
    fit_bf16_s: float | None = None
    calibration_ms: float = 0.0
    """Wall time the decision itself took."""

    @property
    def name(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    def metadata(self) -> str:
        """JSON for the probe outputs' metadata."""
        figures = {"requested": self.requested, "chosen": self.name, "reason": self.reason,
                   "fp32_step_ms": self.fp32_ms, "bf16_step_ms": self.bf16_ms,
                   "projected_fit_fp32_s": self.fit_fp32_s,
                   "projected_fit_bf16_s": self.fit_bf16_s,
                   "calibration_ms": round(self.calibration_ms, 2)}
        return json.dumps({k: v for k, v in figures.items() if v is not None})

    def summary(self) -> str:
        """A few words for the summary line."""
        if self.requested != Precision.AUTO.value:
            return f"--precision {self.requested}"
        text = f"auto: {self.reason}"
        return text + f", decided in {self.calibration_ms:.0f} ms"


def fixed(precision: Precision, reason: str = "as requested") -> Choice:
    """The choice of an explicit ``--precision`` (or of ``auto`` with nothing to decide)."""
    dtype = torch.bfloat16 if precision == Precision.BF16 else torch.float32
    return Choice(precision.value, dtype, reason)


def _best_ms(step: Callable[[torch.dtype], object], dtype: torch.dtype,
             device: torch.device) -> float:
    times = []
    for _ in range(REPEATS + 1):
        synchronize(device)
        start = time.perf_counter()
        step(dtype)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * min(times[1:])


def choose(precision: Precision, device: torch.device, step: Callable[[torch.dtype], object],
           scale: float, work: Work = LOGISTIC_WORK) -> Choice:
    """The precision of a fit whose unit of work ``step(dtype)`` runs, timed on a sample
    ``scale`` times smaller than the fit's own steps (see the module's docstring)."""
    if precision != Precision.AUTO:
        return fixed(precision)
    if not native_bf16(device):
        return fixed(precision, f"no native bf16 on this {device.type}")
    begin = time.perf_counter()
    t32 = _best_ms(step, torch.float32, device)
    fit32 = work.fp32 * t32 * scale / 1000
    # Free bf16 steps would still leave the float32 polish.
    ceiling = fit32 * (1 - work.polish / work.fp32)
    if ceiling < MIN_SAVING_S:
        took = 1000 * (time.perf_counter() - begin)
        return Choice(precision.value, torch.float32,
                      f"fp32 fit projected {fit32:.2f} s, too short for bf16 to pay",
                      round(t32, 4), None, round(fit32, 6), None, took)
    t16 = _best_ms(step, torch.bfloat16, device)
    fit16 = (work.bf16 * t16 + work.polish * t32) * scale / 1000
    took = 1000 * (time.perf_counter() - begin)
    faster = fit16 * MARGIN < fit32
    reason = (f"{'bf16' if faster else 'fp32'}: fit projected {fit16:.2f} s in bf16 "
              f"against {fit32:.2f} s in fp32")
    return Choice(precision.value, torch.bfloat16 if faster else torch.float32, reason,
                  round(t32, 4), round(t16, 4), round(fit32, 6), round(fit16, 6), took)
