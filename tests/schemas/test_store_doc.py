"""docs/STORE.md says which job fields a store refuses to change: the list in the code."""

from __future__ import annotations

import re
from pathlib import Path

from actcache.schemas.job import SHAPING_FIELDS, JobConfig

STORE_MD = Path(__file__).resolve().parents[2] / "docs" / "STORE.md"


def _refusal_paragraph() -> str:
    paragraphs = STORE_MD.read_text().split("\n\n")
    found = [p for p in paragraphs if p.startswith("A job is refused against an existing store")]
    assert len(found) == 1, "STORE.md should say once which fields a job may not change"
    return found[0]


def test_store_md_names_every_shaping_field_as_refused_and_the_rest_as_free() -> None:
    refused, _, free = _refusal_paragraph().partition("may change between runs")
    refused_names = set(re.findall(r"`(\w+)`", refused))
    free_names = set(re.findall(r"`(\w+)`", refused.rsplit("The rest of the job", 1)[-1]))
    assert set(SHAPING_FIELDS) <= refused_names - free_names
    # `store` names the store itself: a job with another one writes another store.
    assert set(JobConfig.model_fields) - set(SHAPING_FIELDS) - {"store"} == free_names
    assert "`SHAPING_FIELDS`" in free  # where a reader finds the list in the code
