"""The capitals protocol shared by knowledge.py and demo_cpu.py: score a trained adapter on new
countries and new phrasings, per knowledge stratum, with paired statistics; keep the per-prompt
outcomes so the report can be printed again from them.

Evaluation sets (the world set, `tinylab.tasks.world_capitals`):
- "validation": validation countries, task phrasings (choosing a recipe);
- "test": test countries, task phrasings; "test, held-out phrasings": test countries, phrasings no
  training prompt uses. Test is scored once, at the end, with the recipe chosen on validation.

Strata: `probe_strata` asks the base model "What is the capital of X?" and reads the probability of
the capital (the most probable of its accepted names) right after "The capital of X is"; >= 0.5
"knows", >= 0.1 "half", else "does not know" (`world_capitals.stratum`). A gain that lives only in
"knows" is surfacing what the base model knew, not learning.

Rows per set: base (adapter off), prompt control (the base model with one worked training example
before the question), trained; each with strict, flexible, format and capitals named per reply;
then trained vs base and trained vs the prompt control (`tinylab.paired`), overall and per stratum.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import tinylab
from tinylab.measures.capital_knowledge import capital_knowledge
from tinylab.tasks import world_capitals

SETS = {"validation": ("validation", "task"), "test": ("test", "task"),
        "test, held-out phrasings": ("test", "held_out")}
MEASURES = {"strict": "correct_strict", "flexible": "correct_flexible", "format": "formatted"}
ROWS = ("base", "prompt control", "trained")


def probe_strata(model, tokenizer) -> dict[str, dict]:
    """Capital -> {"country", "code", "p", "stratum"} for every country of the world set (base model)."""
    return {capital: {"country": k.country, "code": k.code, "p": k.p, "stratum": k.stratum}
            for capital, k in capital_knowledge(model, tokenizer).items()}


class _Fixed:
    """A task whose examples of every split are `examples` (the prompt control's prompts), for `tinylab.evaluate`."""

    def __init__(self, task, examples):
        self.task, self._examples = task, list(examples)
        self.name, self.max_new_tokens = task.name, task.max_new_tokens

    def examples(self, split="train", n=None, seed=0):
        return self._examples if n is None else self._examples[:n]

    def reward(self, *args, **kwargs):
        return self.task.reward(*args, **kwargs)

    def score(self, completion, answer):
        return self.task.score(completion, answer)


_SEED_FREE: dict[tuple, dict] = {}  # base and prompt-control reports per evaluation set: the same for every seed


def outcomes(model, tokenizer, kind, shape, adapter, set_name: str, *, seed: int, n: int | None = None,
             batch_size: int = 64, controls: tuple[str, ...] = ("prompt",), draws: int = 3,
             vectors: dict | None = None) -> dict:
    """Per-prompt outcomes of base, the prompt control, the random-direction control (when
    "random" is in `controls`), other vectors (e.g. SFT) and trained on one evaluation set (see
    `SETS`). Base and prompt control do not depend on the seed: they are evaluated once per process."""
    split, phrasing = SETS[set_name]
    task = kind(countries="world", phrasing=phrasing, shape=shape)
    n = len(task.examples(split, None, None)) if n is None else n
    common = dict(n=n, split=split, seed=None, batch_size=batch_size, progress=False)
    key = (kind.__name__, shape, set_name, n)
    if key not in _SEED_FREE:
        prompted = _Fixed(task, [ex._replace(prompt=task.control_prompt(ex.prompt)) for ex in task.examples(split, n, None)])
        with adapter.disabled():
            _SEED_FREE[key] = {"base": tinylab.evaluate(model, tokenizer, task, **common),
                               "prompt control": tinylab.evaluate(model, tokenizer, prompted, **common)}
    reports = dict(_SEED_FREE[key])
    if "random" in controls or vectors:
        result = tinylab.compare(model, tokenizer, task, adapter, **common, controls=("random",) if "random" in controls
                                 else (), draws=draws, control_seed=seed, vectors=vectors or {})
        if list(result.base.table["reply"]) != list(reports["base"].table["reply"]):
            raise RuntimeError("the base model's greedy replies changed between evaluations")
        if result.random is not None:
            reports |= {f"random direction {i + 1}": r for i, r in enumerate(result.random.reports)}
        reports |= {name: r for name, r in (result.others or {}).items()}
        reports["trained"] = result.adapted
    else:
        reports["trained"] = tinylab.evaluate(model, tokenizer, task, **common)
    rows = {}
    for label, report in reports.items():
        rows[label] = {m: [bool(x) for x in report.table[c]] for m, c in MEASURES.items()}
        rows[label]["named"] = [task.capitals_named(r) for r in report.table["reply"]]
        rows[label]["replies"] = list(report.table["reply"][:4])
    return {"set": set_name, "task": task.name, "gold": list(reports["base"].table["gold"]), "rows": rows}


def _rate(values) -> float:
    return sum(values) / len(values) if values else float("nan")


def report(scored: dict, strata: dict[str, dict], measures: tuple[str, ...], *, seed: int = 0,
           stratum_measures: tuple[str, ...] | None = None) -> list[str]:
    """Lines for one evaluation set: the rows (random directions as their mean), then paired trained
    vs base, vs the prompt control and vs any other vector for each of `measures`; per stratum,
    trained vs base for each of `stratum_measures` (default: `measures`)."""
    rows, gold = scored["rows"], scored["gold"]
    lines = [f"  {scored['set']} ({scored['task']}, {len(gold)} prompts of {len(set(gold))} countries):"]

    def row(label, r):
        return (f"    {label:26s} strict {_rate(r['strict']):6.1%}  flexible {_rate(r['flexible']):6.1%}  "
                f"format {_rate(r['format']):6.1%}  capitals named per reply {_rate(r['named']):.2f}")

    randoms = [label for label in rows if label.startswith("random direction")]
    others = [label for label in rows if label not in ("base", "prompt control", "trained", *randoms)]
    lines += [row("base", rows["base"]), row("prompt control", rows["prompt control"])]
    if randoms:
        mean = {k: [_rate(rows[label][k]) for label in randoms] for k in ("strict", "flexible", "format", "named")}
        lines.append(f"    {f'random direction x{len(randoms)} (mean)':26s} strict {_rate(mean['strict']):6.1%}  flexible "
                     f"{_rate(mean['flexible']):6.1%}  format {_rate(mean['format']):6.1%}  capitals named per reply "
                     f"{_rate(mean['named']):.2f} (each draw, strict: {', '.join(f'{x:.1%}' for x in mean['strict'])})")
    lines += [row(f"{label}, same budget", rows[label]) for label in others]
    lines.append(row("trained", rows["trained"]))
    for measure in measures:
        for other in ("base", "prompt control", *others):
            stats = tinylab.paired(rows[other][measure], rows["trained"][measure])
            lines.append(stats.line(f"    {measure}, trained vs {other:14s}"))
    for stratum in world_capitals.STRATA:
        keep = [i for i, g in enumerate(gold) if strata[g]["stratum"] == stratum]
        if not keep:
            lines.append(f"    stratum {stratum!r}: no countries")
            continue
        countries = len({gold[i] for i in keep})
        lines.append(f"    stratum {stratum!r} ({countries} countries, {len(keep)} prompts):")
        for measure in stratum_measures or measures:
            pick = {label: [rows[label][measure][i] for i in keep] for label in ("base", "prompt control", "trained")}
            stats = tinylab.paired(pick["base"], pick["trained"])
            lines.append(stats.line(f"      {measure}, trained vs base") +
                         f"; prompt control {_rate(pick['prompt control']):.1%}")
    return lines


def strata_lines(strata: dict[str, dict]) -> list[str]:
    """How many countries of each split fall in each stratum, under a line saying what the strata are."""
    lines = ["knowledge strata (base model's probability of the capital after 'The capital of X is'), countries:"]
    for split, codes in world_capitals.split().items():
        codes = set(codes)
        counts = {s: sum(1 for v in strata.values() if v["code"] in codes and v["stratum"] == s)
                  for s in world_capitals.STRATA}
        lines.append(f"  {split:10s} " + ", ".join(f"{s}: {k}" for s, k in counts.items()) + f" (of {len(codes)})")
    return lines


def parallel(script: str, argv: list[str], seeds: list[int], jobs: int) -> list[dict]:
    """Run `script argv` once per seed in its own process (`jobs` at a time, one torch thread each),
    each writing its payload with `--outcomes`; the payloads in seed order."""
    folder = tempfile.mkdtemp(prefix="tinylab-capitals-")

    def child(seed: int) -> dict:
        out = os.path.join(folder, f"seed{seed}.json")
        command = [sys.executable, script, *argv, "--jobs", "1", "--seeds", str(seed), "--outcomes", out,
                   "--results", "none"]  # the parent prints the report, into its own results file
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"seed {seed} failed:\n{done.stderr[-3000:]}")
        return load(out)

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(child, seeds))


def save(path: str, payload: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f)


def load(*paths: str) -> dict:
    """A saved payload; several (runs of other seeds with the same settings) merge into one."""
    payloads = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            payloads.append(json.load(f))
    merged = payloads[0]
    merged["seeds"] = sorted((r for p in payloads for r in p["seeds"]), key=lambda r: r["seed"])
    merged["args"]["seeds"] = [r["seed"] for r in merged["seeds"]]
    return merged
