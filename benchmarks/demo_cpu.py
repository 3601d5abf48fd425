"""The CPU demonstration: 13 scalars, GRPO, the embedded SmolLM2-135M-Instruct, 3 seeds.

Default task (`--task answer`, `tinylab.tasks.get("capitals_answer")`): 'What is the capital of
Norway? End your reply with "Answer: <city>".' in three phrasings, split by country (65 train /
43 held-out countries, 195 / 129 prompts), so held-out countries are never seen in training.
Held-out scores use greedy decoding, 24 new tokens, on all 129 held-out prompts:

    strict    the text after the last "Answer:" is the right city (format and correctness together)
    format    there is an "Answer:" line with 1 to 4 words after it
    flexible  the right city appears anywhere in the reply
    capitals named per reply: how many capitals a reply names (a guard against listing)

Why this task: the base model replies "The capital of Norway is Oslo." and stops (strict 0), and
its knowledge is only reachable in that sentence (`--probe-knowledge`: the right capital's first
token ranks first among the 108 capitals' for 81% of held-out countries after "The capital of X
is", 7% at the start of a reply, 28% after "The capital of X is **"). Asking for the city first,
as the 2026-11-30 attempts did (`--task choice | open`: best mean +6.2 points), makes the model
guess; an answer line after the sentence is a format it can learn and fill by copying.

Training: the paper's exact-match reward (1 for strict-correct, else 0; `--format-credit` pays
an answer line with the wrong city), one u=13 vector shared by all 210 modules (r=2), 4 prompts
x 8 samples, temperature 0.7, Adam lr 5e-3, PPO clip 0.2 with 2 updates per batch of sampled
replies (`--clip`, `--inner-epochs`), at most 30 steps, stopped before a step would take the
seed past `--budget-min` (10). Every `--select-every` (3) steps the greedy strict score on 32
training prompts is measured and the best v so far is kept (early stopping on the train split;
that time counts in the budget).

Why 2 updates per batch: exact match is rarely earned at first (1-5% of sampled replies), so
most groups carry no gradient and the few that do were used once. With one update per batch
(2026-12-02, morning) the seeds reached 13.2 / 20.9 / 47.3% (mean +27.1); seed 0 reached 13.2%
again with 8 prompts per step and 16.3% with groups of 16. A second clipped update on the same
replies took seed 0 to 34.9% (its training-prompt score rose to 44% against 9-16% for the
others, so the training split alone would have chosen it too). That choice was made after
seeing seed 0's held-out score: the 3-seed result below is not a clean held-out estimate.

Measured on 2026-12-02 with `--threads 1 --budget-min 25` for seeds 0 and 1 (side by side, with
other jobs on the machine) and `--budget-min 20` for seed 2 (all 30 steps ran; 524 / 512 / 574 s
of CPU time): held-out strict 0% -> 34.9 / 39.5 / 51.2% (mean +41.9 points); format 0% -> 86.0 /
87.6 / 86.8%; flexible 58.1% -> 41.9 / 48.8 / 51.9%; the prompt control 64.3% strict, 99.2%
format, 64.3% flexible, above every seed; random directions strict 0.0 / 3.9 / 0.0%; SFT at the
same budget and steps (`--trained` on the saved GRPO adapters, 2026-12-03) strict 4.7 / 3.1 /
7.8%, format 10.1 / 6.2 / 10.9%, flexible 41.9 / 62.0 / 61.2%. What the scalars changed is format: the trained models reply "Answer: Oslo" alone, the city first,
instead of "The capital of Norway is Oslo.". Knowledge did not grow: the right city appears in
fewer replies than before. Seeds 0 and 1 score as they did in the earlier runs at 33ffccd and
208268d (30 steps there too); seed 2 there stopped at the 10-minute budget after 27 steps with
50.4%; here it ran 30 and kept the v of step 18 (the training-prompt selection).

After training, each seed's held-out comparison (`tinylab.compare(..., controls=("prompt", "random"))`)
prints four rows, each with strict, flexible and format: the base model; the prompt control (the
base model with one worked training example before the question, `task.control_prompt`); the
random-direction control (the trained vector's norm in `--draws` seeded random directions: mean
and spread); trained. Then the paired statistics (`tinylab.paired`: Newcombe's paired 95% interval,
exact McNemar p, examples gained and lost) of trained vs base and trained vs the prompt control.

Usage: .venv/bin/python benchmarks/demo_cpu.py [--seeds 0 1 2] [--threads 2] [--save DIR] [--log F]
       .venv/bin/python benchmarks/demo_cpu.py --quick   (a smoke run: 1 seed, 2 steps, 16 held-out prompts)
Prints per seed: the four rows and the paired statistics above, steps, training wall time, the 13 numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from results_file import add_results_option, results_file, results_name  # noqa: E402

from tinylab.adapter.attach import apply_tinylora  # noqa: E402
from tinylab.adapter.config import TinyLoRAConfig
from tinylab.adapter.file_format import load_adapter, save_adapter  # noqa: E402
from tinylab.adapter.planner import plan_budget  # noqa: E402
from tinylab.analysis.importance import module_importance  # noqa: E402
from tinylab.evaluation.report import compare, evaluate  # noqa: E402
from tinylab.model.batch import render_prompts  # noqa: E402
from tinylab.model.loading import load_model  # noqa: E402
from tinylab.tasks.base import (
    Example,  # noqa: E402
    RewardShape,  # noqa: E402
    completion_text,  # noqa: E402
)
from tinylab.tasks.capitals import CAPITALS, CapitalAnswerTask, CapitalsTask  # noqa: E402
from tinylab.train.grpo import GRPOConfig, train_grpo  # noqa: E402
from tinylab.train.records import StopTraining  # noqa: E402
from tinylab.train.sft import SFTConfig, train_sft  # noqa: E402


class ShapedCapitals(CapitalsTask):
    """Capitals with the training reward described in the module docstring (scoring unchanged)."""

    name = "capitals_shaped"

    def __init__(self, starts: float = 0.5, short: float = 0.0, contains: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.starts, self.short, self.contains = starts, short, contains

    def starts_with_city(self, text: str, answer: str) -> bool:
        words = text.split()
        return any(self.score(" ".join(words[:k]), answer).correct_strict for k in (1, 2, 3))

    def reward(self, completions, answers=None, **kwargs):
        answers = kwargs.get("answer") if answers is None else answers
        out = []
        for completion, answer in zip(completions, answers):
            text = completion_text(completion)
            score = self.score(text, answer)
            if score.correct_strict:
                out.append(1.0)
            elif self.starts_with_city(text, answer):
                out.append(self.starts)
            elif score.formatted:
                out.append(self.short)
            elif score.correct_flexible:
                out.append(self.contains)
            else:
                out.append(0.0)
        return out


class CapitalChoices(ShapedCapitals):
    """The capitals question with three cities to choose from (the right one and two other
    countries' capitals, in a seeded order): "Which city is the capital of Norway: Lima, Oslo or
    Madrid? Answer with the city name only." Same split by country, same scoring. Shaped reward:
    1 strict-correct; `short` for a reply that is one of the wrong options (the form of an answer,
    wrong); `starts` for a reply that starts with the right city and goes on; else 0."""

    name = "capitals_choice"

    def _groups(self):
        import random

        cities = [city for _, city, *_ in CAPITALS]
        groups, self.options = [], {}
        for country, city, *_ in CAPITALS:
            rng = random.Random(f"choices/{country}")
            options = [city, *rng.sample([c for c in cities if c != city], 2)]
            rng.shuffle(options)
            self.options[city] = options
            question = f"Which city is the capital of {country}: {options[0]}, {options[1]} or {options[2]}?"
            prompt = [{"role": "user", "content": f"{question} Answer with the city name only."}]
            groups.append((country, [Example(prompt, city, city)]))
        return groups

    def reward(self, completions, answers=None, **kwargs):
        answers = kwargs.get("answer") if answers is None else answers
        if not hasattr(self, "options"):
            self._split()
        out = []
        for completion, answer in zip(completions, answers):
            text = completion_text(completion)
            if self.score(text, answer).correct_strict:
                out.append(1.0)
            elif any(self.score(text, o).correct_strict for o in self.options.get(answer, ()) if o != answer):
                out.append(self.short)
            elif self.starts_with_city(text, answer):
                out.append(self.starts)
            else:
                out.append(0.0)
        return out


@torch.no_grad()
def knowledge_probe(model, tokenizer) -> dict[str, float]:
    """Where the base model's knowledge of capitals is reachable: for each held-out country, is the
    right capital's first token the highest-ranked among the first tokens of all the capitals, (a) at
    the start of the reply, (b) after "The capital of X is", (c) after "The capital of X is **"?"""
    task = CapitalsTask(templates=("What is the capital of {country}? Answer with the city name only.",))
    country_of = {city: country for country, city, *_ in CAPITALS}
    cities = list(country_of)
    first = {c: tokenizer(c, add_special_tokens=False).input_ids[0] for c in cities}
    first_spaced = {c: tokenizer(" " + c, add_special_tokens=False).input_ids[0] for c in cities}
    contexts = {"reply start": ("", first), "after 'The capital of X is'": ("The capital of {c} is", first_spaced),
                "after 'The capital of X is **'": ("The capital of {c} is **", first)}
    hits = dict.fromkeys(contexts, 0)
    examples = task.examples("test", None, None)
    for ex in examples:
        rendered = render_prompts(tokenizer, [ex.prompt])[0]
        for label, (suffix, table) in contexts.items():
            ids = tokenizer(rendered + suffix.format(c=country_of[ex.answer]), add_special_tokens=False).input_ids
            logits = model(torch.tensor([ids])).logits[0, -1]
            best = max(cities, key=lambda c: logits[table[c]].item())
            hits[label] += table[best] == table[ex.answer]
    return {label: hit / len(examples) for label, hit in hits.items()}


def held_out(model, tokenizer, task, n: int, seed: int | None = None):
    """Greedy held-out scores (fractions) and the replies, through `tinylab.evaluate`: `n` held-out
    prompts (seed None: the first n in a fixed order)."""
    report = evaluate(model, tokenizer, task, n=n, split="test", seed=seed, batch_size=64, progress=False)
    replies = list(report.table["reply"])
    # a reply naming many capitals could pass `flexible` by listing: count the capitals each one names
    named = [sum(task.score(c, city).correct_flexible for _, city, *_ in CAPITALS) for c in replies]
    return {"strict": report.strict, "format": report.formatted, "flexible": report.flexible,
            "cities_named": sum(named) / len(replies)}, replies


def capitals_named(task, replies) -> float:
    """Capitals named per reply: a reply naming many capitals could pass `flexible` by listing."""
    return sum(sum(task.score(c, city).correct_flexible for _, city, *_ in CAPITALS) for c in replies) / len(replies)


def print_comparison(task, result) -> dict[str, float]:
    """The rows (base, prompt control, random-direction control, SFT, trained) and the paired
    statistics of trained vs base, vs the prompt control and vs SFT; returns the trained scores."""
    def row(label, report, spread=""):
        print(f"  {label:26s} strict {report.strict:6.1%}  flexible {report.flexible:6.1%}  format "
              f"{report.formatted:6.1%}  capitals named per reply {capitals_named(task, report.table['reply']):.2f}"
              f"{spread}")

    row("base", result.base)
    row("prompt control", result.prompt)
    rates = result.random.rates()
    print(f"  {f'random direction x{len(result.random.reports)}':26s} strict "
          f"{rates.loc['strict', 'mean']:6.1%}  flexible {rates.loc['flexible', 'mean']:6.1%}  format "
          f"{rates.loc['formatted', 'mean']:6.1%}  (spread, std over draws: {rates.loc['strict', 'std']:.1%} / "
          f"{rates.loc['flexible', 'std']:.1%} / {rates.loc['formatted', 'std']:.1%})")
    for name, other in (result.others or {}).items():
        row(f"{name}, same budget and steps", other)
    row("trained", result.adapted)
    titled = [("trained vs base", result.paired), ("trained vs prompt control", result.prompt_paired)]
    titled += [(f"trained vs {name}", stats) for name, stats in (result.others_paired or {}).items()]
    for title, stats in titled:
        print(f"  {title}:")
        for measure, difference in stats.items():
            print(difference.line(f"    {measure:8s}"))
    report = result.adapted
    return {"strict": report.strict, "format": report.formatted, "flexible": report.flexible,
            "cities_named": capitals_named(task, report.table["reply"])}


class SelectOnTrain:
    """Early stopping on the train split (held-out prompts never choose anything): every `every`
    steps, greedy strict accuracy on a fixed sample of training prompts; the best v so far is kept
    and restored by `restore()`. Its time counts in the training budget."""

    def __init__(self, model, tokenizer, adapter, task, every: int, n: int = 32):
        self.model, self.tokenizer, self.adapter, self.task = model, tokenizer, adapter, task
        self.every, self.n = every, n
        self.best, self.best_step, self.best_v = (self.score() if every else 0.0), 0, adapter.vector()
        self.trace = [(0, self.best)]

    def score(self) -> float:
        return evaluate(self.model, self.tokenizer, self.task, n=self.n, split="train", seed=0, batch_size=64,
                        progress=False).strict

    def __call__(self, log):
        if self.every and log.step % self.every == 0:
            value = self.score()
            self.trace.append((log.step, value))
            if value > self.best:
                self.best, self.best_step, self.best_v = value, log.step, self.adapter.vector()

    def restore(self) -> None:
        self.adapter.set_vector(self.best_v)


class TimeBudget:
    """Stop training (cleanly, after a step) once the wall-time budget is used up; optionally log
    each step as a JSON line and probe greedy held-out scores every `probe_every` steps (probe
    time is excluded from the budget)."""

    def __init__(self, seconds: float, log_path: str | None = None, probe=None, probe_every: int = 0):
        self.seconds, self.start, self.log_path = seconds, time.perf_counter(), log_path
        self.probe, self.probe_every, self.probe_time = probe, probe_every, 0.0
        self.used = self.longest = 0.0  # training seconds so far; the longest step

    def __call__(self, log):
        entry = {"step": log.step, "reward": round(log.reward_mean, 3), "strict": round(log.correct_rate, 3),
                 "format": round(log.format_rate, 3), "len": round(log.completion_len, 1),
                 "v_norm": round(log.v_norm, 4), "gen": round(log.gen_time, 1), "fb": round(log.fwd_bwd_time, 1),
                 "sample": log.samples[0][0][:50]}
        if self.probe_every and log.step % self.probe_every == 0:
            t0 = time.perf_counter()
            entry["held_out"] = {k: round(v, 3) for k, v in self.probe().items()}
            self.probe_time += time.perf_counter() - t0
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        used = time.perf_counter() - self.start - self.probe_time
        self.longest, self.used = max(self.longest, used - self.used), used
        if used + self.longest > self.seconds:  # another step would overrun the budget
            raise StopTraining(f"time budget of {self.seconds:.0f} s: {used:.0f} s used, a step takes up to "
                               f"{self.longest:.0f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--budget-min", type=float, default=10.0, help="wall-time cap per seed's training")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new", type=int, default=None, help="tokens per sampled reply (default: task's)")
    parser.add_argument("--u", type=int, default=13)
    parser.add_argument("--n-tie", default="all", help='"all" (one shared vector of u) or an integer')
    parser.add_argument("--placement", choices=["config", "tiled", "top"], default="config",
                        help="config: --u/--n-tie as given; tiled / top: tinylab.plan_budget(model, --params, "
                             "strategy=...) with u=1 (top ranks modules by module_importance on the training task)")
    parser.add_argument("--params", type=int, default=13, help="budget for --placement tiled / top")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--task", choices=["answer", "choice", "open"], default="answer",
                        help='answer: the capitals_answer task (final "Answer: <city>" line); choice / open: the '
                             "city first (the 2026-11-30 attempts)")
    parser.add_argument("--format-credit", type=float, default=0.0,
                        help="answer task: reward for an answer line with the wrong city")
    parser.add_argument("--kl", type=float, default=0.0, help="KL coefficient to the adapter-disabled model")
    parser.add_argument("--clip", type=float, default=0.2, help="PPO clip epsilon (needed for --inner-epochs > 1)")
    parser.add_argument("--inner-epochs", type=int, default=2, help="updates per batch of sampled replies")
    parser.add_argument("--select-every", type=int, default=3,
                        help="keep the v with the best greedy strict score on 32 training prompts, measured every "
                             "this many steps (0: keep the last v)")
    parser.add_argument("--starts", type=float, default=0.5, help="choice / open: reward for starting with the city")
    parser.add_argument("--short", type=float, default=0.3, help="choice / open: reward for a wrong short reply")
    parser.add_argument("--contains", type=float, default=0.0, help="open: reward for the city later in the reply")
    parser.add_argument("--probe-knowledge", action="store_true",
                        help="print where the base model's knowledge of capitals is reachable, then exit")
    parser.add_argument("--probe-every", type=int, default=0, help="greedy probe on a fixed random half of the held-out prompts")
    parser.add_argument("--log", default=None, help="append per-step JSON lines to this file")
    parser.add_argument("--save", default=None, help="folder: write each seed's adapter as seed<k>.tlra")
    parser.add_argument("--trained", default=None,
                        help="folder of seed<k>.tlra written by --save: score those GRPO adapters instead of training")
    parser.add_argument("--sft", action=argparse.BooleanOptionalAction, default=True,
                        help="the SFT row: the same adapter config trained by SFT on the reference solutions for "
                             "--steps steps of --prompts examples at --lr, v chosen by the same train-split selection")
    parser.add_argument("--draws", type=int, default=3, help="random directions in the random-direction control")
    parser.add_argument("--n-eval", type=int, default=None, help="held-out prompts compared (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: seed 0, 2 steps of 2 prompts x 4, no selection, 16 held-out prompts, 1 draw")
    add_results_option(parser, "demo_cpu")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.prompts, args.group, args.select_every = [0], 2, 2, 4, 0
        args.n_eval, args.draws = args.n_eval or 16, 1
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model()
    if args.probe_knowledge:
        for label, share in knowledge_probe(model, tokenizer).items():
            print(f"right capital ranked first among {len(CAPITALS)} capitals' first tokens, {label}: {share:.0%}")
        return
    if args.task == "answer":
        task = CapitalAnswerTask(shape=RewardShape(formatted=args.format_credit))
    else:
        kind = CapitalChoices if args.task == "choice" else ShapedCapitals
        task = kind(starts=args.starts, short=args.short, contains=args.contains)
    test = task.examples("test", None, None)
    print(f"{task.name}: {len(task.examples('train', None, None))} train / {len(test)} held-out prompts "
          f"(by country); greedy, {task.max_new_tokens} new tokens; e.g. {test[0].prompt[-1]['content']!r}")
    n_eval = min(args.n_eval or len(test), len(test))
    n_tie = args.n_tie if args.n_tie == "all" else int(args.n_tie)
    rows = []
    if args.placement == "config":
        placement = TinyLoRAConfig(u=args.u, n_tie=n_tie)
    else:
        importance = None
        if args.placement == "top":
            t0 = time.perf_counter()
            importance = module_importance(model, tokenizer, task, n_prompts=16, objective="grpo", seed=0)
            print(f"importance: {time.perf_counter() - t0:.0f} s; {importance.informative} informative prompts; top by fisher: "
                  f"{list(importance.scores().nlargest(8).index)}")
        plan = plan_budget(model, args.params, importance=importance, strategy=args.placement)
        placement = plan.config
        print(f"placement {args.placement}: {plan.achieved} numbers, {len(plan.groups)} vectors of u={plan.u} "
              f"over {len(plan.modules)} modules ({plan.reason})")
    for seed in args.seeds:
        adapter = apply_tinylora(model, dataclasses.replace(placement, seed=seed))
        config = GRPOConfig(prompts_per_step=args.prompts, group_size=args.group, lr=args.lr, steps=args.steps,
                            temperature=args.temperature, seed=seed, max_new_tokens=args.max_new, kl=args.kl,
                            clip=args.clip, inner_epochs=args.inner_epochs,
                            checkpoint_dir=tempfile.mkdtemp(prefix=f"tinylab-demo-{seed}-"))
        sft_vector = None
        if args.sft:
            sft_select = SelectOnTrain(model, tokenizer, adapter, task, args.select_every)
            sft_run = train_sft(model, tokenizer, adapter, task, SFTConfig.from_grpo(
                config, checkpoint_dir=tempfile.mkdtemp(prefix=f"tinylab-demo-sft-{seed}-")), callbacks=[sft_select])
            if args.select_every:
                sft_select.restore()
            sft_vector = adapter.vector()
            print(f"seed {seed}: SFT {sft_run.step} steps, v of step {sft_select.best_step if args.select_every else sft_run.step}"
                  f" (greedy strict on training prompts by step: {', '.join(f'{k}: {x:.0%}' for k, x in sft_select.trace)})",
                  flush=True)
            adapter.set_vector(torch.zeros(adapter.num_params))
        start = time.perf_counter()
        cpu0 = time.process_time()
        budget = TimeBudget(args.budget_min * 60, args.log, lambda: held_out(model, tokenizer, task, len(test) // 2, seed=0)[0],
                            args.probe_every)
        select = SelectOnTrain(model, tokenizer, adapter, task, 0 if args.trained else args.select_every)
        if args.trained:  # the GRPO adapter an earlier run saved; same config, so the SFT vector fits it
            path, own = os.path.join(args.trained, f"seed{seed}.tlra"), adapter.config
            adapter.remove()
            adapter = load_adapter(model, path)
            if adapter.config != own:
                raise SystemExit(f"{path} holds {adapter.config}; this run's adapter is {own}: pass the same flags")
            run = None
        else:
            run = train_grpo(model, tokenizer, adapter, task, config, callbacks=[select, budget])
            if args.select_every:
                select.restore()
        wall, cpu = time.perf_counter() - start - budget.probe_time, time.process_time() - cpu0
        print(f"seed {seed}: held-out comparison on {n_eval} prompts", flush=True)
        result = compare(model, tokenizer, task, adapter, n=n_eval, seed=None, batch_size=64, progress=False,
                         controls=("prompt", "random"), draws=args.draws, control_seed=seed,
                         vectors={} if sft_vector is None else {"SFT": sft_vector})
        trained, replies = print_comparison(task, result), list(result.adapted.table["reply"])
        base = {"strict": result.base.strict, "format": result.base.formatted, "flexible": result.base.flexible,
                "cities_named": capitals_named(task, result.base.table["reply"])}
        numbers = [round(x, 4) for x in adapter.vector().tolist()]
        if args.save:
            os.makedirs(args.save, exist_ok=True)
            save_adapter(adapter, os.path.join(args.save, f"seed{seed}.tlra"))
        rows.append((seed, trained, None if run is None else run.step, wall))
        chosen = (f"v of step {select.best_step}, chosen on training prompts (greedy strict by step: "
                  f"{', '.join(f'{k}: {x:.0%}' for k, x in select.trace)})" if args.select_every else "last v")
        how = (f"GRPO v read from {path}" if run is None else
               f"{run.step} steps ({run.status}), train wall {wall:.0f} s (cpu {cpu:.0f} s); {chosen}")
        print(f"seed {seed}: {adapter.num_params} params, {how}\n  v = {numbers}\n  e.g. {replies[:4]}", flush=True)
        adapter.remove()
    mean = {k: sum(r[1][k] for r in rows) / len(rows) for k in ("strict", "format", "flexible", "cities_named")}
    print(f"mean over {len(rows)} seeds: strict {base['strict']:.1%} -> {mean['strict']:.1%} "
          f"({100 * (mean['strict'] - base['strict']):+.1f} points), format {base['format']:.1%} -> "
          f"{mean['format']:.1%}, flexible {base['flexible']:.1%} -> {mean['flexible']:.1%} "
          f"({100 * (mean['flexible'] - base['flexible']):+.1f} points), capitals named per reply "
          f"{base['cities_named']:.2f} -> {mean['cities_named']:.2f}; "
          + (f"max train wall {max(r[3] for r in rows):.0f} s" if not args.trained else "GRPO vectors read from files"))


if __name__ == "__main__":
    with results_file(results_name("demo_cpu")):
        main()
