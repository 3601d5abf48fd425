"""GSM8K: extraction agrees with lm-evaluation-harness on hand-written tricky replies; data loading.

Reference semantics re-implemented below (`_lm_eval_*`), from EleutherAI/lm-evaluation-harness:
- lm_eval/tasks/gsm8k/gsm8k.yaml (metadata version 3.0): filter "strict-match" = regex
  `#### (\\-?[0-9\\.\\,]+)` then take_first; "flexible-extract" = regex
  `(-?[$0-9.,]{2,})|(-?[0-9]+)` with group_select -1 then take_first; metric exact_match with
  ignore_case true, ignore_punctuation false, regexes_to_ignore [",", "\\$", "(?s).*#### ", "\\.$"].
- lm_eval/filters/extraction.py RegexFilter.apply: findall, pick match[group_select], a tuple
  becomes its first non-empty group, strip(); no match gives "[invalid]".
- lm_eval/api/metrics.py exact_match_hf_evaluate: each ignore regex is re.sub'bed away from the
  prediction and the reference (the full GSM8K answer field), then lower-case, then string equality.

Our documented differences (see tinylab/tasks/gsm8k.py) are listed per case with the reason, and the
test checks that lm-eval really disagrees there, so each difference is pinned from both sides.
"""

import json
import re
from pathlib import Path

import pytest

from tinylab.tasks.base import Example
from tinylab.tasks.gsm8k import (
    GSM8K,
    HUB_NAME,
    INSTRUCTION,
    default_source,
    extract_flexible,
    extract_strict,
    gold_answer,
)

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]


def _lm_eval_filter(regex, group_select, response):
    match = regex.findall(response)
    if not match:
        return "[invalid]"
    match = match[group_select]
    if isinstance(match, tuple):
        match = [m for m in match if m][0]
    return match.strip()


def _lm_eval_normalise(text):
    for pattern in _IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def _lm_eval_correct(filtered, reference):
    return _lm_eval_normalise(filtered) == _lm_eval_normalise(reference)


def _or_invalid(extracted):
    return "[invalid]" if extracted is None else extracted


# (reply, gold answer field, None if we must agree with lm-eval, else (reason, our strict, our flexible))
LONG = "Let me think about this carefully. " * 10  # 350 characters
CASES = [
    ("#### 42", "42", None),
    ("The answer is 42.\n#### 42", "42", None),
    ("#### 1,234", "1234", None),
    ("#### 1,234", "She earns 1,000 + 234 = <<1000+234=1234>>1,234 dollars.\n#### 1,234", None),
    ("#### -5", "-5", None),
    ("#### -5", "5", None),
    ("#### 5", "-5", None),
    ("#### 42.", "42", None),
    ("#### 3.5", "3.5", None),
    ("#### $18", "18", None),  # "$" after "#### " is not strict format
    ("####42", "42", None),
    ("####  42", "42", None),  # two spaces
    ("#### 42 apples", "42", None),
    ("#### 1,000,000", "1000000", None),
    ("#### 1,000,000.", "1,000,000", None),
    ("I don't know.", "42", None),
    ("", "0", None),
    ("#### 6\nWait, let me check. #### 6", "6", None),
    ("#### 7 #### 7", "7", None),
    ("The total is 15 dollars.", "15", None),
    ("It costs $15.", "15", None),
    ("He has 3 apples and 4 pears, so 7 total", "7", None),
    ("The answer is 7...", "7", None),  # both read "7.." and call it wrong
    ("1, 2, 3", "3", None),
    ("-3 degrees", "-3", None),
    ("The result is -0.5", "-0.5", None),
    ("Total: 1,234,567", "1234567", None),
    ("Answer: 42\n", "42", None),
    ("#### -1,200.50", "-1200.50", None),
    ("It is 5-3=2", "2", None),
    (LONG + "#### 42", "42", None),
    ("#### 42\n\nThe answer is 43", "42", None),
    ("#### 0", "0", None),
    ("#### 1e5", "100000", None),
    ("#### ,", "5", None),
    ("#### .", "5", None),
    ("**#### 5**", "5", None),
    ("#### **5**", "5", None),
    ("The answer is $\\boxed{12}$", "12", None),
    ("5 + 5 = 10.\n\n", "10", None),
    ("#### -", "5", None),
    ("$1,000,000.", "1000000", None),
    ("Janet makes $18 every day.\n#### 18", "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 18", None),
    ("#### 3,5", "35", None),
    ("I owe -$5", "-5", None),
    ("#### 12 and later 15", "12", None),
    ("Wait... 24", "24", None),
    ("The answer is: -12.", "-12", None),
    ("0.25 of 80 is 20", "20", None),
    ("She has 2 dogs.\n#### 2\n", "2", None),
    ("#### 1.5\n", "1.5", None),
    ("Step 1: 3 * 4 = 12\nStep 2: 12 + 8 = 20\n#### 20", "20", None),
    # deliberate differences
    ("#### 18.00", "18", ("numbers compare as numbers: 18.00 == 18", True, True)),
    ("The answer is 18.00", "18", ("numbers compare as numbers", False, True)),
    ("#### 007", "7", ("numbers compare as numbers", True, True)),
    ("#### 0.5", ".5", ("numbers compare as numbers", True, True)),
    ("#### 5\n#### 6", "6", ("the last #### counts (the paper's reward); lm-eval takes the first", True, True)),
    ("#### 1,234\nNo wait: #### 5", "1234", ("the last #### counts", False, False)),
    ("#### 42\n" + LONG, "42", ("strict reads only the last 300 characters (the paper's reward)", False, True)),
    ("so 12 apples. Done...", "12", ("flexible skips digitless runs such as '...'", False, True)),
    ("24 eggs... wait...", "24", ("flexible skips digitless runs", False, True)),
]


def test_the_agreement_set_is_large_and_tricky():
    assert len(CASES) >= 50
    assert len({(r, g) for r, g, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("reply, gold, difference", CASES)
def test_extraction_agrees_with_lm_eval(reply, gold, difference):
    score = GSM8K(source={"test": []}).score(reply, gold)
    lm_strict = _lm_eval_filter(_STRICT, 0, reply)
    lm_flexible = _lm_eval_filter(_FLEXIBLE, -1, reply)
    lm = (_lm_eval_correct(lm_strict, gold), _lm_eval_correct(lm_flexible, gold))
    ours = (score.correct_strict, score.correct_flexible)
    assert score.formatted == (extract_strict(reply) is not None)
    if difference is None:
        assert ours == lm
        # the strings we read are lm-eval's, after its normalisation
        assert _or_invalid(extract_strict(reply)) == _lm_eval_normalise(lm_strict)
        assert _or_invalid(extract_flexible(reply)) == _lm_eval_normalise(lm_flexible)
        assert score.formatted == (lm_strict != "[invalid]")
    else:
        reason, strict, flexible = difference
        assert ours == (strict, flexible), reason
        assert ours != lm, f"no longer a difference: {reason}"


# The tests on the real data use GSM8K's default source: `$TINYLAB_GSM8K` (`make` sets it to the
# local copy beside the repository when there is one), else openai/gsm8k from the hub or its cache.


def test_gold_normalisation_matches_lm_eval_on_the_real_data():
    task = GSM8K()
    for split in ("train", "test"):
        for row in task.rows(split):
            assert gold_answer(row["answer"]) == _lm_eval_normalise(row["answer"])


def test_reference_solutions_score_full_marks():
    task = GSM8K()
    for split in ("train", "test"):
        examples = task.examples(split, n=None, seed=None)
        assert len(examples) == {"train": 7473, "test": 1319}[split]
        assert all(task.score(e.solution, e.answer).correct_strict for e in examples)
        assert not any("<<" in e.solution for e in examples)


def test_prompt_is_the_papers():
    example = GSM8K().examples("test", n=1, seed=None)[0]
    assert example.prompt == [{"role": "user", "content": example.prompt[0]["content"]}]
    assert example.prompt[0]["content"].startswith("Janet")
    assert example.prompt[0]["content"].endswith('market? Let\'s think step by step and output the final answer '
                                                 'after "####".')
    assert example.answer == "18"


# --- loading


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i:,}"} for i in range(600, 605)]


def test_loads_a_folder_a_file_and_a_mapping(tmp_path):
    _write(tmp_path / "train.jsonl", ROWS[:3])
    _write(tmp_path / "test.jsonl", ROWS[3:])
    by_folder = GSM8K(source=tmp_path)
    assert [e.answer for e in by_folder.examples("test", None, None)] == ["1206", "1208"]
    assert len(by_folder.examples("train", None, None)) == 3
    by_file = GSM8K(source=str(tmp_path / "train.jsonl"))
    assert by_file.examples("test", None, None) == by_folder.examples("train", None, None)
    by_mapping = GSM8K(source={"test": tmp_path / "test.jsonl"})
    assert by_mapping.examples("test", None, None) == by_folder.examples("test", None, None)
    assert by_folder.examples("test", None, None)[0].prompt[0]["content"] == f"What is 603 + 603? {INSTRUCTION}"


def test_bare_number_answers_have_no_solution(tmp_path):
    task = GSM8K(source=_write(tmp_path / "mine.jsonl", [{"question": "q?", "answer": "1,500"}]))
    assert task.examples("test", None, None) == [Example([{"role": "user", "content": f"q? {INSTRUCTION}"}], "1500")]


def test_the_environment_variable_names_the_default_source(tmp_path, monkeypatch):
    _write(tmp_path / "test.jsonl", ROWS[:1])
    _write(tmp_path / "train.jsonl", ROWS[1:3])
    monkeypatch.setattr("datasets.load_dataset", _no_network)
    monkeypatch.setenv("TINYLAB_GSM8K", str(tmp_path))
    assert default_source() == tmp_path.resolve()
    task = GSM8K()
    assert [e.answer for e in task.examples("test", None, None)] == ["1200"]
    assert [e.answer for e in task.examples("train", None, None)] == ["1202", "1204"]
    monkeypatch.setenv("TINYLAB_GSM8K", str(tmp_path / "train.jsonl"))  # one file serves every split
    assert [e.answer for e in GSM8K().examples("test", None, None)] == ["1202", "1204"]
    monkeypatch.setenv("TINYLAB_GSM8K", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"TINYLAB_GSM8K='.*missing' does not exist; allowed: a folder"):
        GSM8K().examples("test", 1)


def _no_network(*args, **kwargs):
    raise ConnectionError("no network (monkeypatched: this test never reaches the hub)")


def test_without_the_variable_the_hub_is_asked_and_offline_says_how_to_pass_a_local_copy(monkeypatch):
    monkeypatch.delenv("TINYLAB_GSM8K", raising=False)
    assert default_source() == HUB_NAME == "openai/gsm8k"
    calls = []

    def recording(*args, **kwargs):
        calls.append(args)
        _no_network()

    monkeypatch.setattr("datasets.load_dataset", recording)
    with pytest.raises(OSError, match=r"could not load 'openai/gsm8k' \(main, test\).*ConnectionError.*"
                                      r"set TINYLAB_GSM8K=/path/to/gsm8k .* or pass GSM8K\(source="):
        GSM8K().examples("test", 1)
    assert calls == [("openai/gsm8k", "main")]
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        GSM8K(source="./nope.jsonl").examples("test", 1)
    monkeypatch.setenv("TINYLAB_GSM8K", "  ")  # blank counts as unset (the Makefile exports it empty)
    assert default_source() == HUB_NAME


def test_the_makefile_points_the_variable_at_the_copy_beside_the_repository(tmp_path, monkeypatch):
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "Makefile", repo / "Makefile")
    monkeypatch.delenv("TINYLAB_GSM8K", raising=False)
    show = ["make", "-s", "--no-print-directory", "--eval", "showgsm: ; @echo \"[$$TINYLAB_GSM8K]\"", "showgsm"]

    def exported():
        return subprocess.run(show, cwd=repo, capture_output=True, text=True, check=True).stdout.strip()

    assert exported() == "[]"  # no copy beside the repository: tinylab will ask the hub
    (tmp_path / "shared" / "data" / "gsm8k").mkdir(parents=True)
    assert exported() == f"[{(tmp_path / 'shared' / 'data' / 'gsm8k').resolve()}]"  # absolute


def test_no_library_code_looks_for_a_folder_beside_the_repository():
    library = Path(__file__).resolve().parents[2] / "tinylab"
    for file in library.rglob("*.py"):
        text = file.read_text(encoding="utf-8")
        assert "../shared" not in text and "shared/data" not in text and '"shared"' not in text, file


def test_bad_rows_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"row 0 lacks field\(s\) \['answer'\]"):
        GSM8K(source=_write(tmp_path / "a.jsonl", [{"question": "q"}])).examples("test")
    (tmp_path / "b.jsonl").write_text('{"question": "q", "answer": "1"}\nnot json\n')
    with pytest.raises(ValueError, match="b.jsonl:2 is not valid JSON"):
        GSM8K(source=tmp_path / "b.jsonl").examples("test")
    with pytest.raises(ValueError, match="split='validation'"):
        GSM8K(source=tmp_path / "b.jsonl").examples("validation")


def test_hub_names_go_to_datasets(monkeypatch):
    """The hub code path (not run online): `openai/gsm8k` is loaded with datasets.load_dataset."""
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"question": "q?", "answer": "x\n#### 3"}]

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    examples = GSM8K(source="openai/gsm8k").examples("train", None, None)
    assert calls == [("openai/gsm8k", "main", "train")]
    assert examples[0].answer == "3" and examples[0].solution == "x\n#### 3"

    monkeypatch.setattr("datasets.load_dataset", _no_network)
    with pytest.raises(OSError, match="Use a local copy: set TINYLAB_GSM8K"):
        GSM8K(source="openai/gsm8k").examples("test")
