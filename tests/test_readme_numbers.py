"""Every decimal number the README quotes is printed where a reader can check it: in a results file a
benchmark wrote (`benchmarks/results/*.txt`, see `benchmarks/results_file.py`) or in the saved outputs
of a committed notebook run in full mode (the outputs of a quick-mode smoke run are not results).

What counts as a decimal number in README.md's prose (code blocks and `code spans` are code, not
claims, and are left out): a number with a decimal point (1.003, 0.118), a percentage (48.8%, 0%),
a ratio (1.5x, 48,027x), a time in seconds (226 s, 2.48 s), a number in scientific notation (5e-3),
and every number of a range or list that ends in one of these (the 512 of "512-574 s", the 55.8 of
"55.8 / 61.2 / 64.3%"). A number belonging to a name (Qwen2.5, SmolLM2) is not one. A number is
found when a results file or a notebook output prints the same value (sign and unit aside: the
README's "-16.3 points" is the "-16.3" a script printed, its "lr 1e-2" the "lr 0.01" of a run).
"""

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"

_NUMBER = r"\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?"
# a README number: not inside a name or a longer number; its unit, if any, right after it
_QUOTED = re.compile(rf"(?<![\w.]){_NUMBER}(?:%|x\b|\s?s\b(?!/))?")
# between the numbers of a range or list: "1.003-1.024x", "+26.4..+43.4", "55.8 / 61.2 / 64.3%", "16 to 53%"
_JOIN = re.compile(r"\s*(?:-|\.\.|/|to|and)\s*[+-]?")
_PRINTED = re.compile(rf"(?<![\d.]){_NUMBER}")


def _value(token: str) -> float:
    return abs(float(re.match(_NUMBER, token).group().replace(",", "")))


def _counts(token: str) -> bool:
    return "." in token or "e" in token or token.endswith(("%", "x", "s"))


def prose(markdown: str) -> str:
    """README text without fenced or indented code blocks and without inline code spans."""
    markdown = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    markdown = re.sub(r"(?m)^(?: {4}|\t).*$", "", markdown)
    return re.sub(r"`[^`\n]*`", "", markdown)


def quoted_numbers(text: str) -> list[tuple[str, str]]:
    """(number as written, its context) for every decimal number in `text`, as the module docstring says."""
    found = list(_QUOTED.finditer(text))
    keep = [_counts(m.group()) for m in found]
    for i in range(len(found) - 2, -1, -1):  # a range or list inherits the unit of its last number
        between = text[found[i].end():found[i + 1].start()]
        if keep[i + 1] and _JOIN.fullmatch(between):
            keep[i] = True
    return [(m.group(), " ".join(text[max(0, m.start() - 50):m.end() + 30].split()))
            for m, k in zip(found, keep) if k]


def notebook_outputs(notebook: Path) -> str:
    """The text a committed notebook's cells printed or returned (streams and plain-text results)."""
    parts = []
    for cell in json.loads(notebook.read_text())["cells"]:
        for output in cell.get("outputs", []):
            text = output.get("text", output.get("data", {}).get("text/plain", ""))
            parts.append("".join(text) if isinstance(text, list) else text)
    return "\n".join(parts)


def printed_text() -> str:
    """The results files' text and the outputs of every committed notebook saved from a full-mode run (a
    notebook whose outputs say "quick mode: True" is a smoke run: its numbers are no results)."""
    parts = [p.read_text() for p in sorted((REPO / "benchmarks" / "results").glob("*.txt"))]
    for notebook in sorted((REPO / "notebooks").glob("*.ipynb")):
        text = notebook_outputs(notebook)
        if "quick mode: True" not in text:
            parts.append(text)
    return "\n".join(parts)


def test_quoted_numbers_follow_the_rules_of_the_docstring():
    text = prose("ran 1.003-1.024x (Qwen2.5, SmolLM2-135M) in 512-574 s, 16-53%, 55.8 / 61.2 / 64.3%, "
                 "lr 5e-3, 129 prompts, 10,000 adapters, 48,027x, 97 tokens/s `--threads 1.5`\n\n"
                 "```\nsteps=1.25\n```\n    0.75 indented\n+26.4..+43.4, -16.3 points, 2 s.")
    assert [t for t, _ in quoted_numbers(text)] == [
        "1.003", "1.024x", "512", "574 s", "16", "53%", "55.8", "61.2", "64.3%", "5e-3", "48,027x",
        "26.4", "43.4", "16.3", "2 s"]


def test_every_decimal_number_in_the_readme_is_printed_by_a_script_or_a_notebook():
    printed = {_value(t) for t in _PRINTED.findall(printed_text())}
    quoted = quoted_numbers(prose(README.read_text()))
    assert len(quoted) > 50  # the rules above still find the README's numbers
    missing = [f"{token!r} in '... {context} ...'" for token, context in quoted if _value(token) not in printed]
    assert not missing, (f"{len(missing)} of {len(quoted)} decimal numbers in README.md are printed by no results "
                         "file in benchmarks/results/ and no committed notebook output:\n" + "\n".join(missing))
