"""Choose a recipe on the validation countries, from the per-prompt outcomes of its seeds.

Each `--recipe NAME=FILE[,FILE...]` names one recipe and the `--outcomes` files that
`knowledge.py --split validation` or `demo_cpu.py --split validation` wrote for its seeds (at least 2
seeds per recipe). For each recipe and each of `--measures` this prints the base rate, the trained
rate per seed and its mean, the paired difference against the base model per seed (`tinylab.paired`:
95% interval, exact McNemar p, and whether it is more than noise) and the capitals named per reply.

The choice, made on the first measure: the highest mean difference against the base model, among
recipes whose replies name at most `--guard` capitals on average (listing many cities is not
knowing one); a tie goes to the recipe named first. Whether any recipe's mean is above zero, and
whether the chosen one beats the runner-up by more than the seed-to-seed spread, is printed too:
the choice is then scored once on the test countries with `--split test`.

Usage: .venv/bin/python benchmarks/recipe_choice.py --results recipe_choice_knowledge --measures flexible \
           --recipe "lr 5e-3"=a0.json,a1.json --recipe "lr 2e-3"=b0.json,b1.json
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("TQDM_DISABLE", "1")

import capitals_protocol as protocol  # noqa: E402
from results_file import add_results_option, results_file, results_name  # noqa: E402

import tinylab  # noqa: E402


def _rate(values) -> float:
    return sum(values) / len(values)


def recipe_lines(name: str, payload: dict, measures: list[str]) -> tuple[list[str], dict]:
    """Lines for one recipe, and its summary: mean difference vs base (first measure), named per reply."""
    seeds = payload["seeds"]
    sets = [r["sets"][0] for r in seeds]
    if any(s["set"] != "validation" for s in sets):
        raise SystemExit(f"recipe {name!r}: its outcomes are of {sorted({s['set'] for s in sets})}, not 'validation' "
                         "(choose on validation; run the script with --split validation)")
    steps = [str(r["steps"]) if "steps" in r else "/".join(r.get("notes", [])[:1]).split(",")[0] for r in seeds]
    lines = [f"recipe {name}: {len(seeds)} seeds ({', '.join(str(r['seed']) for r in seeds)}): "
             f"{'; '.join(steps)}; settings {_settings(payload['args'])}"]
    summary = {}
    for m in measures:
        base = _rate(sets[0]["rows"]["base"][m])
        diffs, parts = [], []
        for r, s in zip(seeds, sets):
            stats = tinylab.paired(s["rows"]["base"][m], s["rows"]["trained"][m])
            diffs.append(stats.diff)
            parts.append(f"seed {r['seed']} {_rate(s['rows']['trained'][m]):.1%} ({stats.diff * 100:+.1f} "
                         f"[{stats.low * 100:+.1f}, {stats.high * 100:+.1f}], p = {stats.p_value:.2g}: "
                         f"{stats.verdict.split(' (')[0]})")
        mean = statistics.mean(diffs)
        lines.append(f"  {m:9s} base {base:.1%}; " + "; ".join(parts) + f"; mean difference {mean * 100:+.1f} points")
        summary.setdefault("diff", mean)
        summary.setdefault("spread", max(diffs) - min(diffs))
    named = statistics.mean(_rate(s["rows"]["trained"]["named"]) for s in sets)
    lines.append(f"  capitals named per reply {named:.2f} (base {_rate(sets[0]['rows']['base']['named']):.2f})")
    summary["named"] = named
    summary["seeds"] = len(seeds)
    return lines, summary


def _settings(args: dict) -> str:
    keys = ("task", "lr", "credit", "format_credit", "prompts", "group", "temperature", "clip", "inner_epochs", "kl",
            "steps", "minutes", "budget_min")
    return ", ".join(f"{k} {args[k]}" for k in keys if k in args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", action="append", required=True, metavar="NAME=FILE[,FILE...]")
    parser.add_argument("--measures", nargs="+", default=["flexible"], choices=sorted(protocol.MEASURES))
    parser.add_argument("--guard", type=float, default=1.2, help="most capitals named per reply for a recipe to count")
    add_results_option(parser, "recipe_choice")
    args = parser.parse_args(argv)
    summaries = {}
    for spec in args.recipe:
        name, sep, files = spec.partition("=")
        if not sep or not files:
            raise SystemExit(f"--recipe {spec!r}: allowed form NAME=FILE[,FILE...]")
        payload = protocol.load(*files.split(","))
        lines, summaries[name] = recipe_lines(name, payload, args.measures)
        print("\n".join(lines))
    eligible = {n: s for n, s in summaries.items() if s["seeds"] >= 2 and s["named"] <= args.guard}
    if not eligible:
        print(f"no recipe has >= 2 seeds and <= {args.guard} capitals named per reply: nothing to choose")
        return
    ranked = sorted(eligible, key=lambda n: -eligible[n]["diff"])  # stable: a tie keeps the order given
    best = ranked[0]
    m = args.measures[0]
    print(f"chosen on validation ({m}, mean difference vs base): {best} ({eligible[best]['diff'] * 100:+.1f} points)")
    if eligible[best]["diff"] <= 0:
        print(f"  no recipe raised {m} above the base model on validation: the choice is the least harmful one")
    if len(ranked) > 1:
        second = ranked[1]
        gap = eligible[best]["diff"] - eligible[second]["diff"]
        spread = max(eligible[best]["spread"], eligible[second]["spread"])
        print(f"  ahead of {second} by {gap * 100:.1f} points; seed-to-seed spread within a recipe up to "
              f"{spread * 100:.1f} points: {'more than' if gap > spread else 'within'} the spread")


if __name__ == "__main__":
    with results_file(results_name("recipe_choice")):
        main()
