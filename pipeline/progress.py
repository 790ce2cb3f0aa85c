"""Progress of a caching run: a rich bar on a terminal, a plain line every few seconds otherwise."""

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
        self.started = time.perf_counter()
        self._last_line = 0.0
        console = Console(stderr=True)
        self._bar: RichProgress | None = None
        if console.is_terminal:
            self._bar = RichProgress(
                TextColumn("caching"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("rows · {task.fields[units]} · {task.fields[rate]} rows/s" + self.note),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
            )
            self._task = self._bar.add_task("cache", total=rows, units=self._units(), rate="-")
            self._bar.start()

    def _units(self) -> str:
        return f"{self.units_done}/{self.units} units"

    def rate(self) -> float:
        return self.rows_done / max(time.perf_counter() - self.started, 1e-9)

    def update(self, receipt: UnitReceipt) -> None:
        self.rows_done += receipt.rows
        self.units_done += 1
        if self._bar is not None:
            self._bar.update(
                self._task, completed=self.rows_done, units=self._units(), rate=f"{self.rate():.0f}"
            )
            return
        now = time.perf_counter()
        if now - self._last_line >= PLAIN_EVERY_S or self.units_done == self.units:
            self._last_line = now
            print(
                f"caching: {self.rows_done}/{self.rows} rows, {self._units()}, "
                f"{self.rate():.0f} rows/s{self.note}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
