"""GSM8K grade-school math: the paper's prompt and reward, lm-eval-harness's extraction regexes.

Prompt (as in the paper's code, verl's GSM8K preprocessing): the question, a space, then
`Let's think step by step and output the final answer after "####".`

Reading a reply (both regexes are lm-eval-harness `gsm8k.yaml`'s):

- strict: `#### (\\-?[0-9\\.\\,]+)` searched in the last 300 characters of the reply; the last
  match counts (the paper's reward, verl `gsm8k.py`). `formatted` means a strict match exists.
- flexible: `(-?[$0-9.,]{2,})|(-?[0-9]+)`, the last match that contains a digit.
- normalisation, of the extracted text and of the gold answer alike (lm-eval's `regexes_to_ignore`):
  drop `,` and `$`, keep what follows the last `#### `, drop one trailing `.`.
- correctness compares numbers, not strings: `18.00` equals `18` (Decimal equality), which is what a
  researcher means by a right answer. Strings that are not numbers (`1.2.3`) compare as strings.

Deliberate differences from lm-eval (each pinned by a case in tests/tasks/test_gsm8k.py): lm-eval takes
the *first* `####` match anywhere in the reply, we take the last one within the last 300
characters (the paper's reward); lm-eval's flexible match can be a digitless run such as `...`
after the last number, ours skips it; lm-eval compares strings (`18.00` != `18`), we compare numbers.

Data: a folder holding `train.jsonl` / `test.jsonl` (rows with `question` and `answer`, the answer
ending in `#### <number>` or being the bare number), one JSONL file used for every split, a mapping
`{split: file}`, or a `datasets` hub name such as `openai/gsm8k`. Without a source (`default_source()`):
the folder or file named by `$TINYLAB_GSM8K` when it is set, else `openai/gsm8k` ("main") from the
Hugging Face hub through `datasets`, which caches it as `datasets` caches everything (offline, a
cached copy still loads; with none, the error says how to pass a local copy).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path

from tinylab.tasks.base import EXACT_MATCH, Example, RewardShape, Score, ScoredTask, check_split, sample

__all__ = [
    "EXPLICIT", "FLEXIBLE_PATTERN", "INSTRUCTION", "STRICT_PATTERN", "TAIL_CHARS", "GSM8K",
    "HUB_NAME", "default_source", "extract_flexible", "extract_strict", "gold_answer", "normalize_number", "same_number",
]

log = logging.getLogger(__name__)

INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
EXPLICIT = ('Work it out step by step, then end your reply with one last line "#### <number>": four hash signs, '
            "a space and the final answer as a bare number (no units, no $, no words).")
STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_PATTERN = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
TAIL_CHARS = 300
_IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))
_CALCULATOR = re.compile(r"<<[^>]*>>")
_DATA_ENV = "TINYLAB_GSM8K"
HUB_NAME = "openai/gsm8k"
_LOCAL_COPY = (f"set {_DATA_ENV}=/path/to/gsm8k (a folder with train.jsonl and test.jsonl, or one JSONL file) or "
               "pass GSM8K(source='/path/to/folder_or_file.jsonl')")


def normalize_number(text: str) -> str:
    """lm-eval's normalisation: drop `,` and `$`, keep what follows the last `#### `, drop one final `.`.

    >>> normalize_number("Natalia sold 72 clips.\\n#### 1,234")
    '1234'
    >>> normalize_number("$18.")
    '18'
    """
    text = text.strip()
    for pattern in _IGNORE:
        text = pattern.sub("", text)
    return text.strip()


def extract_strict(reply: str) -> str | None:
    """The normalised number after the last `#### ` in the reply's last 300 characters, else None.

    >>> extract_strict("3 + 4 = 7 so the answer is\\n#### 7")
    '7'
    >>> extract_strict("The answer is 7.") is None
    True
    """
    matches = STRICT_PATTERN.findall(reply[-TAIL_CHARS:])
    return normalize_number(matches[-1]) if matches else None


def extract_flexible(reply: str) -> str | None:
    """The normalised last number in the reply (lm-eval's flexible regex, digitless runs skipped).

    >>> extract_flexible("She pays $1,250.50 in total.")
    '1250.50'
    """
    for groups in reversed(FLEXIBLE_PATTERN.findall(reply)):
        match = next(g for g in groups if g).strip()
        if any(ch.isdigit() for ch in match):
            return normalize_number(match)
    return None


def same_number(a: str | None, b: str | None) -> bool:
    """Numeric equality of two normalised answers (`18.00` == `18`); strings if either is no number.

    >>> same_number("18.00", "18"), same_number("-3", "3"), same_number(None, "3")
    (True, False, False)
    """
    if a is None or b is None:
        return False
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return a == b


def gold_answer(answer: str) -> str:
    """The gold number of a GSM8K `answer` field (or of a bare number), normalised.

    >>> gold_answer("He bakes 6 * 2 = <<6*2=12>>12 pies.\\n#### 1,200")
    '1200'
    """
    return normalize_number(str(answer))


def default_source() -> Path | str:
    """GSM8K's source when none is given: the path in `$TINYLAB_GSM8K` when set, else `HUB_NAME`.

    A set variable must name an existing folder (holding `train.jsonl` / `test.jsonl`) or JSONL file.
    """
    value = os.environ.get(_DATA_ENV, "").strip()
    if not value:
        return HUB_NAME
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{_DATA_ENV}={value!r} does not exist; allowed: a folder with train.jsonl and "
                                "test.jsonl, or one JSONL file (unset it to load openai/gsm8k from the hub)")
    return path.resolve()


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not valid JSON ({err.msg})") from err
            rows.append(row)
    return rows


class GSM8K(ScoredTask):
    """Grade-school math with a `#### <number>` final answer.

    `source`: None (`$TINYLAB_GSM8K`, else the hub: see `default_source`), a folder with `{split}.jsonl`, one JSONL file
    (used for every split), a mapping `{split: path}`, or a `datasets` hub name (`"openai/gsm8k"`,
    loaded with `config`). `shape`: the reward; the default is the paper's exact match.

    >>> task = GSM8K(source={"test": []})
    >>> task.reward(["so 2 + 2 = 4\\n#### 4", "The answer is 4.", "#### 5"], ["4", "4", "4"])
    [1.0, 0.0, 0.0]
    >>> task.score("Each costs $1,000, total $2,000.00\\n#### 2,000", "2000")
    Score(formatted=True, correct_strict=True, correct_flexible=True, extracted='2000')
    """

    name = "gsm8k"
    max_new_tokens = 256

    def __init__(self, source=None, *, config: str = "main", shape: RewardShape = EXACT_MATCH):
        if not isinstance(shape, RewardShape):
            raise TypeError(f"shape must be a RewardShape, got {type(shape).__name__}")
        self.source = source
        self.config = config
        self.shape = shape
        self._rows: dict[str, list[dict]] = {}

    # --- data
    def _load(self, split: str) -> list[dict]:
        source = default_source() if self.source is None else self.source
        if isinstance(source, Mapping):
            if split not in source:
                raise ValueError(f"split={split!r} is not in the GSM8K source mapping; it has {sorted(source)}")
            rows = source[split]
            return _read_jsonl(Path(rows)) if isinstance(rows, (str, os.PathLike)) else [dict(r) for r in rows]
        path = Path(source).expanduser()
        if path.is_dir():
            file = path / f"{split}.jsonl"
            if not file.is_file():
                raise FileNotFoundError(f"{file} does not exist; a GSM8K folder holds train.jsonl and test.jsonl")
            return _read_jsonl(file)
        if path.is_file():
            log.info("GSM8K: %s serves every split (%s requested)", path, split)
            return _read_jsonl(path)
        if str(source).endswith((".jsonl", ".json")) or str(source).startswith(("/", ".", "~")):
            raise FileNotFoundError(f"GSM8K source {str(source)!r} does not exist")
        return self._load_hub(str(source), split)

    def _load_hub(self, name: str, split: str) -> list[dict]:
        from datasets import load_dataset

        try:
            dataset = load_dataset(name, self.config, split=split)
        except Exception as err:  # the hub is unreachable offline; say what to do instead
            raise OSError(
                f"could not load {name!r} ({self.config}, {split}) from the Hugging Face hub with "
                f"datasets.load_dataset ({err.__class__.__name__}: {err}); offline and not cached? Use a local "
                f"copy: {_LOCAL_COPY}"
            ) from err
        return [dict(row) for row in dataset]

    def rows(self, split: str) -> list[dict]:
        """The raw rows (`question`, `answer`) of a split, loaded once."""
        check_split(split, self.name)
        if split not in self._rows:
            rows = self._load(split)
            for i, row in enumerate(rows):
                missing = [k for k in ("question", "answer") if k not in row]
                if missing:
                    raise ValueError(f"GSM8K {split} row {i} lacks field(s) {missing}; it has {sorted(row)}")
            self._rows[split] = rows
        return self._rows[split]

    def examples(self, split: str = "train", n: int | None = None, seed: int | None = 0) -> list[Example]:
        """`n` problems of `split` (all when None), file order when `seed` is None."""
        return [self._example(row) for row in sample(self.rows(split), n, seed, f"gsm8k/{split}")]

    @staticmethod
    def _example(row: dict) -> Example:
        question, answer = str(row["question"]).strip(), str(row["answer"])
        solution = None
        if "####" in answer:  # the reference solution, calculator annotations <<6*2=12>> removed
            solution = _CALCULATOR.sub("", answer).strip()
        prompt = [{"role": "user", "content": f"{question} {INSTRUCTION}"}]
        return Example(prompt, gold_answer(answer), solution)

    def control_prompt(self, prompt):
        """The prompt control (`tinylab.evaluation.controls`): the paper's instruction replaced by `EXPLICIT`,
        which spells the "#### <number>" line out."""
        if isinstance(prompt, str):
            return prompt.replace(INSTRUCTION, EXPLICIT)
        return [{**m, "content": m["content"].replace(INSTRUCTION, EXPLICIT)} if m.get("role") == "user" else m
                for m in prompt]

    # --- scoring
    def score(self, completion: str, answer: str) -> Score:
        gold = gold_answer(answer)
        strict = extract_strict(completion)
        flexible = extract_flexible(completion)
        return Score(
            formatted=strict is not None,
            correct_strict=same_number(strict, gold),
            correct_flexible=same_number(flexible, gold),
            extracted=strict if strict is not None else flexible,
        )
