"""The base of every schema model: frozen, and refusing fields it does not know."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    """Immutable once validated; an unknown field is an error, not silently dropped (a
    misspelt job key would otherwise fall back to its default)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)
