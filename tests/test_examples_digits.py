"""The vision example's input table: scikit-learn's digits as PNG bytes, built offline."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from make_digits import digits_table  # noqa: E402


def test_digits_table_holds_every_digit_as_a_png(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    assert digits_table(tmp_path / "d.parquet") == 1797
    table = pd.read_parquet(tmp_path / "d.parquet")
    digits = load_digits()
    assert table["label"].tolist() == digits.target.tolist()
    assert table["id"].is_unique
    assert 0.15 < (table["split"] == "test").mean() < 0.25
    image = np.asarray(Image.open(io.BytesIO(table["image"][5])))
    assert image.shape == (8, 8)
    np.testing.assert_array_equal(image, np.round(digits.images[5] * 255 / 16))
