"""Capital cities: knowledge the embedded model has but buries in verbose replies.

"What is the capital of France? Answer with the city name only." A log-probability probe ranks the
right capital first before any training (`benchmarks/demo_cpu.py --probe-knowledge`), yet the
base model answers in sentences, so this task measures whether a few scalars can surface knowledge.
The split is by country: a held-out country is never asked about in training, in any phrasing.

Reading a reply (case, accents, punctuation and quotes ignored):
- strict: the first non-empty line is the city (or an accepted alias, e.g. Kiev for Kyiv);
- formatted: the whole reply has at most 3 words;
- flexible: the city appears anywhere in the reply as whole words.

Reward options (`shape`): the default pays only a strict-correct reply; `RewardShape(flexible=0.2)`
gives small credit for a reply that contains the city, which keeps groups from being all-zero.
"""

from __future__ import annotations

import re
import unicodedata

from tinylab.tasks.base import EXACT_MATCH, Example, RewardShape, Score
from tinylab.tasks.synthetic import SyntheticTask

__all__ = ["ANSWER_TEMPLATES", "CAPITALS", "TEMPLATES", "CapitalAnswerTask", "CapitalsTask"]

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
ANSWER_TEMPLATES = tuple(t.replace("Answer with the city name only.", 'End your reply with "Answer: <city>".')
                         for t in TEMPLATES)
_PUNCTUATION = re.compile(r"[^\w\s]|_")
_ANSWER_LINE = re.compile(r"answer\s*:[ \t]*(.*)", re.IGNORECASE)
_STRIP = "\"'`*_.,;:!?()[]{}<> "


def _words(text: str) -> str:
    """Lower case, accents and punctuation removed, single spaces: 'Washington, D.C.' -> 'washington d c'."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).casefold()
    return " ".join(_PUNCTUATION.sub(" ", text).split())


def _key(text: str) -> str:
    return _words(text).replace(" ", "")


class CapitalsTask(SyntheticTask):
    """Name a country's capital with the city name only; split by country (40% held out by default).

    `templates`: how the question is phrased, each with `{country}` (None: `default_templates`); every
    country is asked in every phrasing. `CAPITALS` holds the countries with their aliases.

    >>> task = CapitalsTask()
    >>> task.reward(["Paris", "The capital of France is Paris.", "Lyon"], ["Paris", "Paris", "Paris"])
    [1.0, 0.0, 0.0]
    >>> CapitalsTask(shape=RewardShape(flexible=0.2)).reward(["'Paris.'", "It is Paris."], ["Paris", "Paris"])
    [1.0, 0.2]
    >>> task.score("**Kiev**", "Kyiv")
    Score(formatted=True, correct_strict=True, correct_flexible=True, extracted='Kiev')
    """

    name = "capitals"
    max_new_tokens = 16
    default_templates = TEMPLATES

    def __init__(self, *, templates: tuple[str, ...] | None = None, split_seed: int = 0, test_fraction: float = 0.4,
                 shape: RewardShape = EXACT_MATCH):
        templates = self.default_templates if templates is None else templates
        if isinstance(templates, str) or not templates or any("{country}" not in t for t in templates):
            raise ValueError(f"templates={templates!r} is not allowed: a non-empty tuple of strings with '{{country}}'")
        super().__init__(split_seed=split_seed, test_fraction=test_fraction, shape=shape)
        self.templates = tuple(templates)
        self._aliases = {_key(city): (city, *aliases) for _, city, *aliases in CAPITALS}

    def _groups(self):
        return [
            (country, [Example([{"role": "user", "content": t.format(country=country)}], city,
                               self._solution(country, city)) for t in self.templates])
            for country, city, *_ in CAPITALS
        ]

    def _solution(self, country: str, city: str) -> str:
        """The reference reply for SFT: the city alone."""
        return city

    def _is_city(self, text: str, answer: str) -> bool:
        """`text` is the gold city or one of its accepted aliases (case, accents, punctuation ignored)."""
        return bool(text) and _key(text) in {_key(name) for name in self._aliases.get(_key(answer), (answer,))}

    def _mentions(self, completion: str, answer: str) -> bool:
        """The gold city (or an alias) appears in `completion` as whole words."""
        reply_words = f" {_words(completion)} "
        return any(f" {_words(name)} " in reply_words for name in self._aliases.get(_key(answer), (answer,)))

    def score(self, completion: str, answer: str) -> Score:
        lines = [line for line in completion.strip().splitlines() if line.strip()]
        first = lines[0].strip().strip("\"'`*_.,;:!?()[]{} ") if lines else ""
        return Score(
            formatted=1 <= len(completion.split()) <= 3,
            correct_strict=self._is_city(first, answer),
            correct_flexible=self._mentions(completion, answer),
            extracted=first or None,
        )


class CapitalAnswerTask(CapitalsTask):
    """Capitals with the answer on a final "Answer: <city>" line, as GSM8K ends with "#### <number>".

    'What is the capital of Norway? End your reply with "Answer: <city>".' The base model replies
    "The capital of Norway is Oslo." and stops: right city, no answer line. Its knowledge is
    reachable there and hardly earlier: over the 108 capitals, the first token it ranks highest
    is the right one for 81% of held-out countries right after "The capital of X is", but for 7%
    at the start of the reply and 28% after "The capital of X is **" (measured with
    `benchmarks/demo_cpu.py --probe-knowledge`). So a format asking for the city first (as
    `CapitalsTask` does) buries the knowledge; this one lets the sentence come first.

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

    def _solution(self, country: str, city: str) -> str:
        """The reference reply for SFT: 'The capital of X is Y.' then 'Answer: Y'."""
        return f"The capital of {country} is {city}.\nAnswer: {city}"

    def score(self, completion: str, answer: str) -> Score:
        found = _ANSWER_LINE.findall(completion)
        last = found[-1].strip(_STRIP) if found else ""
        formatted = 1 <= len(last.split()) <= 4
        return Score(
            formatted=formatted,
            correct_strict=formatted and self._is_city(last, answer),
            correct_flexible=self._mentions(completion, answer),
            extracted=last or None,
        )
