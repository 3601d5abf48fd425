"""Knowledge, not only format: can <= 13 scalars make the embedded model name the right capital
more often on countries it never trained on?

The CPU demonstration (`demo_cpu.py`) raised held-out strict accuracy by teaching a format, while
the right city appeared in fewer replies than before. This script asks the other question: under
the lenient reading (the right city named anywhere in the reply, `Score.correct_flexible`), does
GRPO on one u = 13 vector shared by all 210 adapted maps (r = 2) raise held-out correctness, with

- a guard against listing: capitals named per reply (each of tinylab's CAPITALS found in the reply
  counts) stays <= 1.2, so the gain is not bought by naming several cities;
- the paired 95% interval (`tinylab.paired`, the same held-out prompts before and after) above 0;
- the prompt control beside it (the base model with one worked training example before the
  question, `task.control_prompt`), with the paired statistics of trained vs prompt control.

Task (`--task city`, the default): `CapitalsTask`, "What is the capital of Norway? Answer with the
city name only." in three phrasings, split by country (65 train / 43 held-out countries). `--task
answer`: `CapitalAnswerTask` (same countries, 'End your reply with "Answer: <city>".').
Reward: `RewardShape(correct=1, flexible=--credit)`: 1 when the reply's first line is the right
city, `--credit` when the right city is named elsewhere in the reply, else 0. The default credit
1.0 pays the lenient reading itself (the right city named anywhere).

Choosing the recipe: `--split validation` trains on 49 of the 65 training countries and evaluates
on the other 16 (48 prompts), so reward, lr and steps are chosen without the held-out countries;
`--split test` (the default) trains on all 65 and evaluates on the 129 held-out prompts.

How the recipe was chosen (2026-12-02, seed 0, `--split validation`: 48 prompts of 16 training
countries, base flexible 60.4%; the held-out countries were not looked at):
- reward credit 0.5 (the earlier probe's "halved above 3 words", in RewardShape form), lr 1e-2,
  4 prompts x 8, temperature 1.0, 10 steps: 60.4% -> 50.0% (seed 0), 47.9% (seed 1);
- credit 1.0, temperature 0.7, otherwise the same: 60.4% -> 58.3%;
- `--task answer`, credit 1.0, temperature 0.7: 68.8% -> 47.9% (its prompt control: 75.0%);
- credit 1.0, temperature 0.7, 8 prompts x 4, PPO clip 0.2 with 2 updates per batch, lr 1e-2:
  60.4% -> 60.4% (10 steps in the budget);
- the same with lr 5e-3: 60.4% -> 72.9% [paired 95% CI +2.1, +23.0], McNemar p = 0.07,
  0.73 capitals named per reply (10 of 15 steps in the budget). These are the defaults.
One validation seed per recipe: the choice itself is noisy.

Measured with the defaults (2026-12-02, `--jobs 2`, 129 held-out prompts; seeds 0 and 1 side by
side stopped at the budget after 11 and 12 steps, seed 2 alone did 15): flexible 48.8% -> 55.8 /
61.2 / 64.3%, paired 95% CI [+0.8, +14.0] (McNemar p = 0.064), [+3.9, +20.9] (p = 0.009),
[+7.8, +23.3] (p = 0.00018); capitals named per reply 0.49 -> 0.56 / 0.61 / 0.67; prompt control
19.4%. Strict stays 0%: the trained models name the city in "The capital of X is Y." sentences.

Each seed trains at most `--steps` steps and stops before a step would take it past `--minutes`
of training (wall time); one torch thread per process. `--jobs 2` runs the seeds in two processes
side by side and prints their outputs in seed order, then one summary line.

Usage: .venv/bin/python benchmarks/knowledge.py [--seeds 0 1 2] [--jobs 2] [--split validation]
       .venv/bin/python benchmarks/knowledge.py --quick   (smoke run: seed 0, 2 steps, 16 prompts)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from demo_cpu import TimeBudget, capitals_named  # noqa: E402
from results_file import add_results_option, results_file, results_name  # noqa: E402

from tinylab.adapter.attach import apply_tinylora  # noqa: E402
from tinylab.adapter.config import TinyLoRAConfig
from tinylab.evaluation.report import compare  # noqa: E402
from tinylab.model.loading import load_model  # noqa: E402
from tinylab.tasks.base import RewardShape  # noqa: E402
from tinylab.tasks.capitals import CapitalAnswerTask, CapitalsTask  # noqa: E402
from tinylab.train.grpo import GRPOConfig, train_grpo  # noqa: E402

GUARD = 1.2  # most capitals named per reply, on average, for a gain to count
VALIDATION_COUNTRIES = 16


def validation_task(kind: type[CapitalsTask]) -> type[CapitalsTask]:
    """`kind` with the held-out countries removed: its "test" split is 16 of the training countries
    (seeded choice), its "train" split the other training countries."""

    class Validation(kind):
        def _split(self):
            if self._parts is None:
                train = super()._split()["train"]
                cities = sorted({ex.answer for ex in train})
                random.Random("knowledge/validation").shuffle(cities)
                chosen = set(cities[:VALIDATION_COUNTRIES])
                self._parts = {"test": [ex for ex in train if ex.answer in chosen],
                               "train": [ex for ex in train if ex.answer not in chosen]}
            return self._parts

    Validation.__name__ = f"Validation{kind.__name__}"
    return Validation


def make_task(args):
    kind = CapitalsTask if args.task == "city" else CapitalAnswerTask
    if args.split == "validation":
        kind = validation_task(kind)
    return kind(shape=RewardShape(correct=1.0, flexible=args.credit))


def rates(task, report) -> dict[str, float]:
    return {"strict": report.strict, "flexible": report.flexible, "format": report.formatted,
            "named": capitals_named(task, report.table["reply"])}


def run_seed(model, tokenizer, task, args, seed: int) -> dict:
    """Train one seed within the budget, compare on the evaluation split, print, return the numbers."""
    adapter = apply_tinylora(model, TinyLoRAConfig(u=13, r=2, n_tie="all", seed=seed))
    config = GRPOConfig(prompts_per_step=args.prompts, group_size=args.group, lr=args.lr, steps=args.steps,
                        temperature=args.temperature, seed=seed, clip=args.clip, inner_epochs=args.inner_epochs,
                        checkpoint_dir=tempfile.mkdtemp(prefix=f"tinylab-knowledge-{seed}-"))
    start = time.perf_counter()
    budget = TimeBudget(args.minutes * 60, args.log)
    run = train_grpo(model, tokenizer, adapter, task, config, callbacks=[budget])
    wall = time.perf_counter() - start
    t0 = time.perf_counter()
    result = compare(model, tokenizer, task, adapter, n=args.n_eval, split="test", seed=None, batch_size=64,
                     controls=("prompt",), control_seed=seed, progress=False)
    rows = {"base": rates(task, result.base), "prompt control": rates(task, result.prompt),
            "trained": rates(task, result.adapted)}
    lines = [f"seed {seed}: {adapter.num_params} params, {run.step} steps ({run.status}), training wall time "
             f"{wall:.0f} s (budget {args.minutes:g} min); evaluation {time.perf_counter() - t0:.0f} s on "
             f"{result.base.n} {args.split} prompts"]
    lines += [f"  {name:15s} strict {r['strict']:6.1%}  flexible {r['flexible']:6.1%}  format {r['format']:6.1%}  "
              f"capitals named per reply {r['named']:.2f}" for name, r in rows.items()]
    lines.append(result.paired["flexible"].line("  flexible, trained vs base          "))
    lines.append(result.prompt_paired["flexible"].line("  flexible, trained vs prompt control"))
    holds = result.paired["flexible"].low > 0 and rows["trained"]["named"] <= GUARD
    lines.append(f"  holds (interval vs base above 0 and <= {GUARD} capitals per reply): {'yes' if holds else 'no'}; "
                 f"v = {[round(x, 4) for x in adapter.vector().tolist()]}")
    lines.append(f"  e.g. {list(result.adapted.table['reply'][:4])}")
    print("\n".join(lines), flush=True)
    adapter.remove()
    return {"seed": seed, "rows": rows, "holds": holds, "wall": wall,
            "vs_base": [result.paired["flexible"].diff, result.paired["flexible"].low, result.paired["flexible"].high],
            "vs_prompt": [result.prompt_paired["flexible"].diff, result.prompt_paired["flexible"].low,
                          result.prompt_paired["flexible"].high]}


def summary(results: list[dict]) -> str:
    mean = {k: sum(r["rows"]["trained"][k] for r in results) / len(results) for k in ("flexible", "named")}
    base = results[0]["rows"]["base"]
    held = sum(r["holds"] for r in results)
    above_prompt = sum(r["vs_prompt"][1] > 0 for r in results)
    each = ", ".join(f"{r['rows']['trained']['flexible']:.1%}" for r in results)
    return (f"over {len(results)} seeds: flexible {base['flexible']:.1%} (base) -> {mean['flexible']:.1%} (trained, mean; "
            f"{each}), capitals named per reply "
            f"{base['named']:.2f} -> {mean['named']:.2f}; held in {held} of {len(results)} seeds; interval vs the "
            f"prompt control above 0 in {above_prompt}; max training wall {max(r['wall'] for r in results):.0f} s")


def parallel(args) -> None:
    """Each seed in its own process (one torch thread), `--jobs` at a time; outputs in seed order."""
    folder = tempfile.mkdtemp(prefix="tinylab-knowledge-")
    passed = [a for a in sys.argv[1:] if a != "--quick"]

    def child(seed: int):
        out = os.path.join(folder, f"seed{seed}.json")
        command = [sys.executable, __file__, *passed, "--jobs", "1", "--seeds", str(seed), "--json", out,
                   "--results", "none"]  # the parent prints what each child printed, into its own file
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"seed {seed} failed:\n{done.stderr[-3000:]}")
        with open(out) as f:
            return done.stdout, json.load(f)

    with ThreadPoolExecutor(args.jobs) as pool:
        outputs = list(pool.map(child, args.seeds))
    for text, _ in outputs:
        print(text, end="", flush=True)
    print(summary([r for _, rs in outputs for r in rs]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=15, help="most GRPO steps per seed")
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall-time budget per seed")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--credit", type=float, default=1.0,
                        help="reward for a reply naming the right city that is not the city alone")
    parser.add_argument("--task", choices=["city", "answer"], default="city")
    parser.add_argument("--split", choices=["test", "validation"], default="test",
                        help="test: held-out countries; validation: 16 training countries (choose the recipe)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--clip", type=float, default=0.2, help="PPO clip epsilon (needed for --inner-epochs > 1)")
    parser.add_argument("--inner-epochs", type=int, default=2, help="updates per batch of sampled replies")
    parser.add_argument("--n-eval", type=int, default=None, help="evaluation prompts (default: all of the split)")
    parser.add_argument("--jobs", type=int, default=1, help="processes side by side, one seed each")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log", default=None, help="append per-step JSON lines to this file")
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smoke run: seed 0, 2 steps of 2 prompts x 4, 16 prompts")
    add_results_option(parser, "knowledge")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.prompts, args.group, args.n_eval = [0], 2, 2, 4, args.n_eval or 16
    task = make_task(args)
    n_split = len(task.examples("test", None, None))
    args.n_eval = min(args.n_eval or n_split, n_split)
    if args.jobs > 1 and len(args.seeds) > 1:
        print(f"{task.name}, {args.split} split: {len(task.examples('train', None, None))} training / {n_split} "
              f"evaluation prompts; reward 1 for the city alone, {args.credit:g} for the city named in a longer reply; "
              f"lr {args.lr:g}, {args.prompts} prompts x {args.group} samples, temperature {args.temperature:g}, clip "
              f"{args.clip} x {args.inner_epochs} updates per batch, at "
              f"most {args.steps} steps or {args.minutes:g} min per seed; {args.jobs} processes, "
              f"{args.threads} thread each", flush=True)
        return parallel(args)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    results = [run_seed(model, tokenizer, task, args, seed) for seed in args.seeds]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    elif len(results) > 1:
        print(summary(results))


if __name__ == "__main__":
    with results_file(results_name("knowledge")):
        main()
