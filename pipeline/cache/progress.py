"""Progress of a caching run: a rich bar on a terminal, a plain line every few seconds otherwise.

Rows move as actors finish batches (``computed``), not only when a unit commits
(``update``), so a long unit still shows its pace; the units column counts commits.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

from actcache.schemas.store import UnitReceipt

PLAIN_EVERY_S = 5.0


class Progress:
    def __init__(self, rows: int, units: int, note: str = "") -> None:
        self.rows, self.units = rows, units
        # Said on every line: something the user should know while waiting (an offload).
        self.note = f" · {note}" if note else ""
        self.rows_done = self.units_done = 0
        self.rows_computed = 0
        self.started = time.perf_counter()
        self._last_line = 0.0
        console = Console(stderr=True)
        self._bar: RichProgress | None = None
        if console.is_terminal:
            self._bar = RichProgress(
                TextColumn("caching"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("rows · {task.fields[rate]} rows/s · {task.fields[units]}" + self.note),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
            )
            self._task = self._bar.add_task("cache", total=rows, units=self._units(), rate="-")
            self._bar.start()

    def _units(self) -> str:
        return f"{self.units_done}/{self.units} units committed"

    @property
    def shown_rows(self) -> int:
        """Rows forwarded so far (a retried unit counts once), at least those committed."""
        return min(self.rows, max(self.rows_done, self.rows_computed))

    def rate(self) -> float:
        return self.shown_rows / max(time.perf_counter() - self.started, 1e-9)

    def computed(self, rows: int) -> None:
        """Rows the actors have forwarded so far in this run, committed or not."""
        self.rows_computed = rows
        self._show()

    def update(self, receipt: UnitReceipt) -> None:
        self.rows_done += receipt.rows
        self.units_done += 1
        self._show(force=self.units_done == self.units)

    def _show(self, force: bool = False) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.shown_rows, units=self._units(),
                             rate=f"{self.rate():.1f}")
            return
        now = time.perf_counter()
        if force or now - self._last_line >= PLAIN_EVERY_S:
            self._last_line = now
            left = (self.rows - self.shown_rows) / self.rate() if self.rate() > 0 else float("nan")
            eta = f", ETA {left:.0f}s" if left == left and self.shown_rows < self.rows else ""
            print(
                f"caching: {self.shown_rows}/{self.rows} rows, {self.rate():.1f} rows/s{eta}, "
                f"{self._units()}{self.note}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
