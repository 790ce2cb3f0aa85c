"""``Store.spec``: the manifest typed, for stores of every format a user may still hold."""

from __future__ import annotations

import numpy as np
import pytest

from actcache import open_store
from actcache.info import describe
from actcache.schemas import store as layout
from actcache.testing import downgrade, synthetic_store
from actcache.workers.storage import open_group

# Manifest keys that formats 2 and 3 added; a format-1 store has none of them.
LATER_KEYS = ("checksum", "modality", "prefix_tokens", "final_norm", "processor_backend", "side",
              "self_check", "rendered_example")


@pytest.mark.parametrize("version", [1, 2, 3])
def test_every_format_has_a_typed_manifest(tmp_path, version):
    x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    url = str(tmp_path / "s.zarr")
    synthetic_store(url, {0: x, 2: -x}, rows_per_unit=8, dtype="float16")
    if version < 3:
        downgrade(url, version)
    if version == 1:
        group = open_group(url, "r+")
        stored = dict(group.attrs[layout.MANIFEST_ATTR])
        group.attrs[layout.MANIFEST_ATTR] = {k: v for k, v in stored.items()
                                             if k not in LATER_KEYS}
    s = open_store(url)
    assert s.spec.format_version == version
    assert s.spec.checksum == (None if version == 1 else "crc32c")
    assert (s.spec.modality, s.spec.n_units, s.complete) == ("text", 3, True)
    assert s.layers == s.spec.layers == (0, 2)
    np.testing.assert_array_equal(s.read(2), -x.astype(np.float16).astype(np.float32))
    assert f"format:      {version} " in describe(url)
    assert "units:       3/3 complete (8 rows each)" in describe(url)
