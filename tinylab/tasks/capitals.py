"""Capital cities: knowledge the embedded model has but buries in verbose replies.

"What is the capital of France? Answer with the city name only." The base model answers in
sentences, so this task measures whether a few scalars can surface knowledge
(`benchmarks/demo_cpu.py --probe-knowledge` shows where the base model ranks the right capital).
The split is by country: a held-out country is never asked about in training, in any phrasing.

Which countries (`countries`):
- "common" (the default): `CAPITALS`, 108 well-known countries, split train / test by `split_seed`
  and `test_fraction`. Every one is in the world set with the same capital (spellings equal up to
  accents and punctuation, which the reading ignores; "the Czech Republic" is GeoNames' "Czechia").
- "world": the UN member states from GeoNames (`tinylab.tasks.world_capitals`, 186 countries),
  split train / validation / test by the committed `capitals_split.json`. Choose recipes on
  "validation"; score "test" once, at the end.

Which phrasings (`phrasing`): "task" (the default) asks in the task's own templates, the only
ones training sees; "held_out" asks in other templates (`HELD_OUT_TEMPLATES`: the same
instruction after a differently worded question), never used by any training prompt. Score an
adapter trained on `countries="world"` (its "train" split) on `CapitalsTask(countries="world",
phrasing="held_out").examples("test")` to see whether a gain survives new countries and new wording
together. The two country sets are split independently: an adapter trained on "common" has seen
some of the world set's test countries, so score it on "common"'s own test split.

Reading a reply (case, accents, punctuation and quotes ignored):
- strict: the first non-empty line is the city (or an accepted alias, e.g. Kiev for Kyiv);
- formatted: the whole reply has at most 3 words;
- flexible: the city appears anywhere in the reply as whole words.

Reward options (`shape`): the default pays only a strict-correct reply; `RewardShape(flexible=0.2)`
gives small credit for a reply that contains the city, which keeps groups from being all-zero.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from tinylab.tasks import world_capitals
from tinylab.tasks.base import EXACT_MATCH, Example, RewardShape, Score, sample
from tinylab.tasks.synthetic import SyntheticTask

__all__ = [
    "ANSWER_HELD_OUT_TEMPLATES", "ANSWER_TEMPLATES", "CAPITALS", "COUNTRY_SETS", "HELD_OUT_TEMPLATES", "PHRASINGS",
    "TEMPLATES", "CapitalAnswerTask", "CapitalsTask",
]

# (country as it reads after "the capital of", capital, accepted aliases...)
CAPITALS: tuple[tuple[str, ...], ...] = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("the United Kingdom", "London"), ("Ireland", "Dublin"), ("Belgium", "Brussels"),
    ("Austria", "Vienna"), ("Poland", "Warsaw"), ("the Czech Republic", "Prague"), ("Hungary", "Budapest"),
    ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"), ("Iceland", "Reykjavík"), ("Russia", "Moscow"), ("Ukraine", "Kyiv", "Kiev"),
    ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
    ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"), ("Estonia", "Tallinn"), ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"), ("Belarus", "Minsk"), ("Albania", "Tirana", "Tirane"), ("Malta", "Valletta"),
    ("Cyprus", "Nicosia"), ("Turkey", "Ankara"), ("Armenia", "Yerevan"), ("Azerbaijan", "Baku"),
    ("Japan", "Tokyo"), ("China", "Beijing", "Peking"), ("South Korea", "Seoul"), ("North Korea", "Pyongyang"),
    ("India", "New Delhi"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"),
    ("Afghanistan", "Kabul"), ("Iran", "Tehran", "Teheran"), ("Iraq", "Baghdad"), ("Syria", "Damascus"),
    ("Jordan", "Amman"), ("Lebanon", "Beirut"), ("Saudi Arabia", "Riyadh"), ("Qatar", "Doha"),
    ("Oman", "Muscat"), ("the United Arab Emirates", "Abu Dhabi"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi", "Ha Noi"), ("Cambodia", "Phnom Penh"), ("Laos", "Vientiane"),
    ("the Philippines", "Manila"), ("Uzbekistan", "Tashkent"), ("Kyrgyzstan", "Bishkek"),
    ("Tajikistan", "Dushanbe"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Ethiopia", "Addis Ababa"),
    ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Senegal", "Dakar"), ("Morocco", "Rabat"),
    ("Algeria", "Algiers"), ("Tunisia", "Tunis"), ("Libya", "Tripoli"), ("Sudan", "Khartoum"),
    ("Uganda", "Kampala"), ("Rwanda", "Kigali"), ("Zimbabwe", "Harare"), ("Zambia", "Lusaka"),
    ("Angola", "Luanda"), ("Mozambique", "Maputo"), ("Madagascar", "Antananarivo"), ("Somalia", "Mogadishu"),
    ("Mali", "Bamako"), ("Niger", "Niamey"), ("Namibia", "Windhoek"), ("Botswana", "Gaborone"),
    ("the United States", "Washington, D.C.", "Washington", "Washington DC"), ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"), ("Cuba", "Havana"), ("Jamaica", "Kingston"), ("Argentina", "Buenos Aires"),
    ("Brazil", "Brasília"), ("Chile", "Santiago", "Santiago de Chile"), ("Peru", "Lima"), ("Colombia", "Bogotá"),
    ("Venezuela", "Caracas"), ("Ecuador", "Quito"), ("Uruguay", "Montevideo"), ("Paraguay", "Asunción"),
    ("Costa Rica", "San José"), ("Nicaragua", "Managua"), ("Honduras", "Tegucigalpa"),
    ("Haiti", "Port-au-Prince"), ("the Dominican Republic", "Santo Domingo"), ("Australia", "Canberra"),
    ("New Zealand", "Wellington"), ("Fiji", "Suva"), ("Papua New Guinea", "Port Moresby"),
)

TEMPLATES = (
    "What is the capital of {country}? Answer with the city name only.",
    "Name the capital city of {country}. Answer with the city name only.",
    "Which city is the capital of {country}? Answer with the city name only.",
)
HELD_OUT_TEMPLATES = (
    "Tell me the capital of {country}. Answer with the city name only.",
    "What city serves as the capital of {country}? Answer with the city name only.",
    "Quick geography question: the capital of {country} is which city? Answer with the city name only.",
)
ANSWER_TEMPLATES = tuple(t.replace("Answer with the city name only.", 'End your reply with "Answer: <city>".')
                         for t in TEMPLATES)
ANSWER_HELD_OUT_TEMPLATES = tuple(
    t.replace("Answer with the city name only.", 'End your reply with "Answer: <city>".') for t in HELD_OUT_TEMPLATES)
COUNTRY_SETS = ("common", "world")
PHRASINGS = ("task", "held_out")
_PUNCTUATION = re.compile(r"[^\w\s]|_")
_ANSWER_LINE = re.compile(r"answer\s*:[ \t]*(.*)", re.IGNORECASE)
_AFTER_ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)
_LONGEST_NAME = 6  # words: the longest capital name or alias, with room for split words ("Sana a")
_STRIP = "\"'`*_.,;:!?()[]{}<> "


def _words(text: str) -> str:
    """Lower case, accents and punctuation removed, single spaces: 'Washington, D.C.' -> 'washington d c'."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).casefold()
    return " ".join(_PUNCTUATION.sub(" ", text).split())


def _key(text: str) -> str:
    return _words(text).replace(" ", "")


@functools.lru_cache(maxsize=4096)
def _name_keys(completion: str) -> frozenset[str]:
    """The `_key` of every run of 1 to `_LONGEST_NAME` consecutive words of `completion` (cached: a reply is
    checked against every capital by `capitals_named`)."""
    words = _words(completion).split()
    return frozenset("".join(words[i:j]) for i in range(len(words))
                     for j in range(i + 1, min(len(words), i + _LONGEST_NAME) + 1))


class CapitalsTask(SyntheticTask):
    """Name a country's capital with the city name only; split by country.

    `countries`: "common" (`CAPITALS`, split train / test, 40% test by default) or "world" (186 UN
    member states, the committed train / validation / test split); see the module docstring.
    `phrasing`: "task" (`default_templates`) or "held_out" (`held_out_templates`, never trained on).
    `templates`: your own phrasings, each with `{country}` (instead of `phrasing`); every country is
    asked in every phrasing.

    >>> task = CapitalsTask()
    >>> task.reward(["Paris", "The capital of France is Paris.", "Lyon"], ["Paris", "Paris", "Paris"])
    [1.0, 0.0, 0.0]
    >>> CapitalsTask(shape=RewardShape(flexible=0.2)).reward(["'Paris.'", "It is Paris."], ["Paris", "Paris"])
    [1.0, 0.2]
    >>> task.score("**Kiev**", "Kyiv")
    Score(formatted=True, correct_strict=True, correct_flexible=True, extracted='Kiev')
    >>> world = CapitalsTask(countries="world", phrasing="held_out")
    >>> sorted(len(world.examples(s, None, None)) // 3 for s in ("train", "validation", "test"))
    [28, 56, 102]
    """

    name = "capitals"
    max_new_tokens = 16
    default_templates = TEMPLATES
    held_out_templates = HELD_OUT_TEMPLATES

    def __init__(self, *, countries: str = "common", phrasing: str = "task", templates: tuple[str, ...] | None = None,
                 split_seed: int = 0, test_fraction: float = 0.4, shape: RewardShape = EXACT_MATCH):
        if countries not in COUNTRY_SETS:
            raise ValueError(f"countries={countries!r} is not allowed: one of {list(COUNTRY_SETS)}")
        if phrasing not in PHRASINGS:
            raise ValueError(f"phrasing={phrasing!r} is not allowed: one of {list(PHRASINGS)}")
        if templates is not None and phrasing != "task":
            raise ValueError(f"phrasing={phrasing!r} and templates={templates!r}: give one of the two")
        if countries == "world" and (split_seed, test_fraction) != (0, 0.4):
            raise ValueError(f"split_seed={split_seed!r}, test_fraction={test_fraction!r}: the world set's split is "
                             "the committed one (tinylab/tasks/capitals_split.json); leave both at their defaults")
        if templates is None:
            templates = self.default_templates if phrasing == "task" else self.held_out_templates
        if isinstance(templates, str) or not templates or any("{country}" not in t for t in templates):
            raise ValueError(f"templates={templates!r} is not allowed: a non-empty tuple of strings with '{{country}}'")
        super().__init__(split_seed=split_seed, test_fraction=test_fraction, shape=shape)
        self.countries, self.phrasing, self.templates = countries, phrasing, tuple(templates)
        if countries == "common":
            self._rows = [(country, country, city, tuple(aliases)) for country, city, *aliases in CAPITALS]
        else:
            self._rows = [(c.code, c.name, c.capital, c.aliases) for c in world_capitals.countries()]
        self._aliases = {_key(city): (city, *aliases) for _, _, city, aliases in self._rows}

    def _groups(self):
        return [
            (key, [Example([{"role": "user", "content": t.format(country=country)}], city,
                           self._solution(country, city)) for t in self.templates])
            for key, country, city, _ in self._rows
        ]

    def _split(self) -> dict[str, list[Example]]:
        if self.countries == "common":
            return super()._split()
        if self._parts is None:
            groups = dict(self._groups())
            self._parts = {name: [e for code in codes for e in groups[code]]
                           for name, codes in world_capitals.split().items()}
        return self._parts

    def examples(self, split: str = "train", n: int | None = None, seed: int | None = 0) -> list[Example]:
        """`n` examples of `split` (all when None; a fixed order when `seed` is None): "train" or
        "test", and "validation" too with `countries="world"`."""
        parts = self._split()
        if split not in parts:
            raise ValueError(f"split={split!r} is not a split of task {self.name!r} with countries={self.countries!r}; "
                             f"choose one of {[s for s in ('train', 'validation', 'test') if s in parts]}")
        return sample(parts[split], n, seed, f"{self.name}/{split}")

    def capitals(self) -> list[str]:
        """The gold capital of every country of the task, in the task's order."""
        return [city for _, _, city, _ in self._rows]

    def capitals_named(self, completion: str) -> int:
        """How many of the task's capitals `completion` names (a guard against replies that list cities)."""
        return sum(self._mentions(completion, city) for city in self.capitals())

    def _solution(self, country: str, city: str) -> str:
        """The reference reply for SFT: the city alone."""
        return city

    def _is_city(self, text: str, answer: str) -> bool:
        """`text` is the gold city or one of its accepted aliases (case, accents, punctuation ignored)."""
        return bool(text) and _key(text) in {_key(name) for name in self._aliases.get(_key(answer), (answer,))}

    def _mentions(self, completion: str, answer: str) -> bool:
        """The gold city (or an alias) appears in `completion` as whole words, spaces inside it ignored as
        strict ignores them ("Sana'a" names Sanaa, "N'Djamena" Ndjamena): some run of at most
        `_LONGEST_NAME` consecutive words of the reply spells it."""
        return not _name_keys(completion).isdisjoint(_key(name) for name in self._aliases.get(_key(answer), (answer,)))

    def score(self, completion: str, answer: str) -> Score:
        lines = [line for line in completion.strip().splitlines() if line.strip()]
        first = lines[0].strip().strip("\"'`*_.,;:!?()[]{} ") if lines else ""
        return Score(
            formatted=1 <= len(completion.split()) <= 3,
            correct_strict=self._is_city(first, answer),
            correct_flexible=self._is_city(first, answer) or self._mentions(completion, answer),
            extracted=first or None,
        )


class CapitalAnswerTask(CapitalsTask):
    """Capitals with the answer on a final "Answer: <city>" line, as GSM8K ends with "#### <number>".

    'What is the capital of Norway? End your reply with "Answer: <city>".' The base model replies
    "The capital of Norway is Oslo." and stops: right city, no answer line. Its knowledge is more
    reachable right after "The capital of X is" than at the start of a reply (`benchmarks/demo_cpu.py
    --probe-knowledge` prints how often the right capital ranks first in each place). So a format
    asking for the city first (as `CapitalsTask` does) buries the knowledge; this one lets the
    sentence come first.

    Reading a reply (case, accents, punctuation, quotes and markdown around the city ignored):
    - formatted: an "Answer:" line whose text after the last "Answer:" has 1 to 4 words;
    - strict: formatted, and that text is the city (or an accepted alias);
    - flexible: the city appears anywhere in the reply as whole words.

    >>> task = CapitalAnswerTask()
    >>> task.reward(["The capital of France is Paris.\\nAnswer: Paris", "The capital of France is Paris."], ["Paris"] * 2)
    [1.0, 0.0]
    >>> task.score("It is Lyon. Answer: **Lyon**.", "Paris")
    Score(formatted=True, correct_strict=False, correct_flexible=False, extracted='Lyon')
    """

    name = "capitals_answer"
    split_name = "capitals"  # the same held-out countries as `CapitalsTask`
    max_new_tokens = 24
    default_templates = ANSWER_TEMPLATES
    held_out_templates = ANSWER_HELD_OUT_TEMPLATES

    def _solution(self, country: str, city: str) -> str:
        """The reference reply for SFT: 'The capital of X is Y.' then 'Answer: Y'."""
        return f"The capital of {country} is {city}.\nAnswer: {city}"

    def score(self, completion: str, answer: str) -> Score:
        found = _ANSWER_LINE.findall(completion)
        last = _AFTER_ANSWER.split(found[-1])[-1].strip(_STRIP) if found else ""  # after a line's last "Answer:"
        formatted = 1 <= len(last.split()) <= 4
        strict = formatted and self._is_city(last, answer)
        return Score(
            formatted=formatted,
            correct_strict=strict,
            correct_flexible=strict or self._mentions(completion, answer),
            extracted=last or None,
        )
