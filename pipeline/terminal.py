"""The console tables print to: a terminal's width, or unbounded when piped.

Piped into a file or another program, rich would assume 80 columns and wrap ids and cut
numbers; there the table takes the width its cells need.
"""

from __future__ import annotations

from typing import Any

UNBOUNDED = 100_000


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    out = Console(stderr=stderr)
    if out.is_terminal:
        return out
    return Console(stderr=stderr, width=UNBOUNDED, soft_wrap=True)
