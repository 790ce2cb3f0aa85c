"""Field coercions shared by the job and probe configs (validators run them)."""

from __future__ import annotations

from collections.abc import Iterable


def layers_value(v: object) -> object:
    """``3`` → ``(3,)``; ``"all"`` and lists pass; any other string is an error."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,)
    if isinstance(v, str) and v != "all":
        raise ValueError(f"`layers` must be 'all' or a list of ints, got {v!r}")
    return v


def names_value(v: object, known: Iterable[str], what: str) -> object:
    """One name or a list of names, each one of ``known``: ``"mean"`` → ``("mean",)``."""
    if isinstance(v, str):
        v = (v,)
    if isinstance(v, list | tuple):
        choices = list(known)
        for name in v:
            if name not in choices:
                raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(choices)}")
    return v
