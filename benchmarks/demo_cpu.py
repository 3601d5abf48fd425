"""The CPU demonstration: 13 scalars, GRPO, the embedded SmolLM2-135M-Instruct, 3 seeds.

Task: `CapitalAnswerTask(countries="world")`, 'What is the capital of Norway? End your reply with
"Answer: <city>".' in three phrasings, on the world set (186 UN member states from GeoNames, split
by country into 102 train / 28 validation / 56 test countries, `tinylab/tasks/capitals_split.json`).
Training sees only the train countries in the task's phrasings. Scores use greedy decoding, 24 new
tokens:

    strict    the text after the last "Answer:" is the right city (format and correctness together)
    format    there is an "Answer:" line with 1 to 4 words after it
    flexible  the right city appears anywhere in the reply
    capitals named per reply: how many capitals of the set a reply names (a guard against listing)

`--split validation` scores the validation countries (choose the recipe there, >= 2 seeds per
recipe); `--split test` scores the test countries in the task's phrasings and in held-out phrasings
(questions worded as no training prompt is), once, with the chosen recipe.

Why this task: the base model replies "The capital of Norway is Oslo." and stops (strict 0); its
knowledge is more reachable inside that sentence than at the start of a reply (`--probe-knowledge`
prints where the right capital ranks first, on the common countries). An answer line after the
sentence is a format the model can learn and fill by copying.

Training: the paper's exact-match reward (1 for strict-correct, else 0; `--format-credit` pays
an answer line with the wrong city), one u=13 vector shared by all 210 modules (r=2), 4 prompts
x 8 samples, temperature 0.7, Adam lr 5e-3, PPO clip 0.2 with 2 updates per batch of sampled
replies (`--clip`, `--inner-epochs`), at most 30 steps, stopped before a step would take the
seed past `--budget-min` (10) minutes of its process's CPU time (one torch thread: one core). Every `--select-every` (3) steps the greedy strict score on 32
training prompts is measured and the best v so far is kept (early stopping on the train split;
that time counts in the budget). `--sft`: the same adapter trained by SFT on the reference replies
at the same budget and steps, as its own row.

After training, each evaluation set prints (`capitals_protocol.py`): base; the prompt control (the
base model with one worked training example before the question); on the task's phrasings the
random-direction control (the trained vector's norm in `--draws` seeded random directions) and
SFT; trained. Then the paired statistics (`tinylab.paired`: 95% interval, exact McNemar p,
examples gained and lost) of trained vs base, vs the prompt control (and vs SFT), overall and per
knowledge stratum (the base model's probability of the capital: knows / half / does not know).
`--jobs 2` runs the seeds in two processes side by side; `--outcomes F` keeps every per-prompt
outcome as JSON and `--report F` prints the report again from it.

Usage: .venv/bin/python benchmarks/demo_cpu.py --split validation --seeds 0 1 [--jobs 2] [--inner-epochs 1]
       .venv/bin/python benchmarks/demo_cpu.py --split test [--seeds 0 1 2] [--jobs 2] [--save DIR]
       .venv/bin/python benchmarks/demo_cpu.py --quick   (a smoke run: 1 seed, 2 steps, 16 prompts per set)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import capitals_protocol as protocol  # noqa: E402
import torch  # noqa: E402
from results_file import add_results_option, results_file, results_name  # noqa: E402

import tinylab  # noqa: E402
from tinylab import (  # noqa: E402
    GRPOConfig,
    SFTConfig,
    StopTraining,
    TinyLoRAConfig,
    apply_tinylora,
    evaluate,
    load_adapter,
    load_model,
    module_importance,
    plan_budget,
    save_adapter,
    train_grpo,
    train_sft,
)
from tinylab.tasks import RewardShape  # noqa: E402
from tinylab.tasks.capitals import CAPITALS, CapitalAnswerTask, CapitalsTask  # noqa: E402


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
        rendered = tokenizer.apply_chat_template(ex.prompt, tokenize=False, add_generation_prompt=True)
        for label, (suffix, table) in contexts.items():
            ids = tokenizer(rendered + suffix.format(c=country_of[ex.answer]), add_special_tokens=False).input_ids
            logits = model(torch.tensor([ids])).logits[0, -1]
            best = max(cities, key=lambda c: logits[table[c]].item())
            hits[label] += table[best] == table[ex.answer]
    return {label: hit / len(examples) for label, hit in hits.items()}


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
    """Stop training (cleanly, after a step) once the time budget is used up; optionally log each
    step as a JSON line and probe greedy scores every `probe_every` steps (probe time is excluded
    from the budget). `clock`: "cpu" counts this process's CPU time (with one torch thread, one
    core's time, so other jobs on a shared machine do not cut a seed short), "wall" wall time."""

    def __init__(self, seconds: float, log_path: str | None = None, probe=None, probe_every: int = 0,
                 clock: str = "cpu"):
        if clock not in ("cpu", "wall"):
            raise ValueError(f"clock={clock!r} is not allowed: 'cpu' or 'wall'")
        self.clock = time.process_time if clock == "cpu" else time.perf_counter
        self.seconds, self.start, self.log_path = seconds, self.clock(), log_path
        self.probe, self.probe_every, self.probe_time = probe, probe_every, 0.0
        self.used = self.longest = 0.0  # training seconds so far; the longest step

    def __call__(self, log):
        entry = {"step": log.step, "reward": round(log.reward_mean, 3), "strict": round(log.correct_rate, 3),
                 "format": round(log.format_rate, 3), "len": round(log.completion_len, 1),
                 "v_norm": round(log.v_norm, 4), "gen": round(log.gen_time, 1), "fb": round(log.fwd_bwd_time, 1),
                 "sample": log.samples[0][0][:50]}
        if self.probe_every and log.step % self.probe_every == 0:
            t0 = self.clock()
            entry["probe"] = {k: round(v, 3) for k, v in self.probe().items()}
            self.probe_time += self.clock() - t0
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        used = self.clock() - self.start - self.probe_time
        self.longest, self.used = max(self.longest, used - self.used), used
        if used + self.longest > self.seconds:  # another step would overrun the budget
            raise StopTraining(f"time budget of {self.seconds:.0f} s: {used:.0f} s used, a step takes up to "
                               f"{self.longest:.0f} s")


MEASURES = ("strict", "flexible", "format")


def run_seed(model, tokenizer, args, placement, seed: int) -> dict:
    """SFT (optional) then GRPO for one seed on the train countries; per-prompt outcomes on the evaluation sets."""
    task = CapitalAnswerTask(countries="world", shape=RewardShape(formatted=args.format_credit))
    adapter = apply_tinylora(model, dataclasses.replace(placement, seed=seed))
    config = GRPOConfig(prompts_per_step=args.prompts, group_size=args.group, lr=args.lr, steps=args.steps,
                        temperature=args.temperature, seed=seed, max_new_tokens=args.max_new, kl=args.kl,
                        clip=args.clip, inner_epochs=args.inner_epochs,
                        checkpoint_dir=tempfile.mkdtemp(prefix=f"tinylab-demo-{seed}-"))
    sft_vector, notes = None, []
    if args.sft:
        sft_select = SelectOnTrain(model, tokenizer, adapter, task, args.select_every)
        sft_run = train_sft(model, tokenizer, adapter, task, SFTConfig.from_grpo(
            config, checkpoint_dir=tempfile.mkdtemp(prefix=f"tinylab-demo-sft-{seed}-")), callbacks=[sft_select])
        if args.select_every:
            sft_select.restore()
        sft_vector = adapter.vector().tolist()
        notes.append(f"SFT {sft_run.step} steps, v of step {sft_select.best_step if args.select_every else sft_run.step} "
                     f"(greedy strict on training prompts by step: {', '.join(f'{k}: {x:.0%}' for k, x in sft_select.trace)})")
        adapter.set_vector(torch.zeros(adapter.num_params))
    start, cpu0 = time.perf_counter(), time.process_time()

    def probe():  # greedy scores on half the validation countries' prompts, logged only
        report = evaluate(model, tokenizer, task, n=len(task.examples("validation", None, None)) // 2,
                          split="validation", seed=0, batch_size=64, progress=False)
        return {"strict": report.strict, "format": report.formatted, "flexible": report.flexible}

    budget = TimeBudget(args.budget_min * 60, args.log, probe, args.probe_every, clock=args.budget_clock)
    select = SelectOnTrain(model, tokenizer, adapter, task, 0 if args.trained else args.select_every)
    if args.trained:  # the GRPO adapter an earlier run saved; same config, so the SFT vector fits it
        path, own = os.path.join(args.trained, f"seed{seed}.tlra"), adapter.config
        adapter.remove()
        adapter = load_adapter(model, path)
        if adapter.config != own:
            raise SystemExit(f"{path} holds {adapter.config}; this run's adapter is {own}: pass the same flags")
        notes.append(f"GRPO v read from {path}")
    else:
        run = train_grpo(model, tokenizer, adapter, task, config, callbacks=[select, budget])
        if args.select_every:
            select.restore()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
        chosen = (f"v of step {select.best_step}, chosen on training prompts (greedy strict by step: "
                  f"{', '.join(f'{k}: {x:.0%}' for k, x in select.trace)})" if args.select_every else "last v")
        notes.append(f"GRPO {run.step} steps ({run.status}), train wall {wall:.0f} s (cpu {cpu:.0f} s); {chosen}")
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        save_adapter(adapter, os.path.join(args.save, f"seed{seed}.tlra"))
    sets = ["validation"] if args.split == "validation" else ["test", "test, held-out phrasings"]
    scored = []
    for name in sets:
        own_phrasing = protocol.SETS[name][1] == "task"  # the extra rows only where training's phrasings are asked
        scored.append(protocol.outcomes(
            model, tokenizer, CapitalAnswerTask, task.shape, adapter, name, seed=seed, n=args.n_eval,
            controls=("prompt", "random") if own_phrasing else ("prompt",), draws=args.draws,
            vectors={"SFT": sft_vector} if sft_vector is not None and own_phrasing else None))
    out = {"seed": seed, "params": adapter.num_params, "notes": notes,
           "v": [round(x, 4) for x in adapter.vector().tolist()], "sets": scored,
           "wall": None if args.trained else wall}
    adapter.remove()
    return out


def print_report(payload: dict) -> None:
    args = payload["args"]
    print(f"capitals_answer, world set, {args['split']}: exact-match reward (format credit {args['format_credit']:g}), "
          f"lr {args['lr']:g}, {args['prompts']} prompts x {args['group']} samples, temperature {args['temperature']:g}, "
          f"clip {args['clip']} x {args['inner_epochs']} updates per batch, at most {args['steps']} steps or "
          f"{args['budget_min']:g} min of {args.get('budget_clock', 'wall')} time per seed, v chosen on training prompts every {args['select_every']} steps; "
          f"{args['jobs']} processes, {args['threads']} torch thread(s) each")
    print("\n".join(protocol.strata_lines(payload["strata"])))
    for result in payload["seeds"]:
        print(f"seed {result['seed']}: {result['params']} params; " + "; ".join(result["notes"]))
        print(f"  v = {result['v']}")
        for scored in result["sets"]:
            print("\n".join(protocol.report(scored, payload["strata"], MEASURES, seed=result["seed"],
                                            stratum_measures=("strict", "flexible"))))
            print(f"    e.g. {scored['rows']['trained']['replies']}")
    if len(payload["seeds"]) < 2:
        return
    results = payload["seeds"]
    for i, name in enumerate(s["set"] for s in results[0]["sets"]):
        per_seed = [r["sets"][i]["rows"] for r in results]
        rate = {m: [sum(rows["trained"][m]) / len(rows["trained"][m]) for rows in per_seed] for m in MEASURES}
        base = {m: sum(per_seed[0]["base"][m]) / len(per_seed[0]["base"][m]) for m in MEASURES}
        above = {other: sum(tinylab.paired(rows[other]["strict"], rows["trained"]["strict"]).low > 0
                            for rows, r in zip(per_seed, results)) for other in ("base", "prompt control")}
        print(f"{name}, mean over {len(results)} seeds: " + ", ".join(
            f"{m} {base[m]:.1%} -> {sum(rate[m]) / len(rate[m]):.1%} ({', '.join(f'{x:.1%}' for x in rate[m])})"
            for m in MEASURES) + f"; strict interval above 0 vs base in {above['base']} of {len(results)} seeds, "
            f"vs the prompt control in {above['prompt control']}")
    walls = [r["wall"] for r in results if r["wall"] is not None]
    if walls:
        print(f"max train wall {max(walls):.0f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--split", choices=["validation", "test"], default="validation",
                        help="validation: validation countries (choose the recipe); test: test countries, task and "
                             "held-out phrasings (once, at the end)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--budget-min", type=float, default=10.0, help="time cap per seed's GRPO training")
    parser.add_argument("--budget-clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: the process's CPU time (one thread: one core's time); wall: wall time")
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
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--format-credit", type=float, default=0.0, help="reward for an answer line with the wrong city")
    parser.add_argument("--kl", type=float, default=0.0, help="KL coefficient to the adapter-disabled model")
    parser.add_argument("--clip", type=float, default=0.2, help="PPO clip epsilon (needed for --inner-epochs > 1)")
    parser.add_argument("--inner-epochs", type=int, default=2, help="updates per batch of sampled replies")
    parser.add_argument("--select-every", type=int, default=3,
                        help="keep the v with the best greedy strict score on 32 training prompts, measured every "
                             "this many steps (0: keep the last v)")
    parser.add_argument("--probe-knowledge", action="store_true",
                        help="print where the base model's knowledge of capitals is reachable, then exit")
    parser.add_argument("--probe-every", type=int, default=0, help="log greedy scores on half the validation prompts")
    parser.add_argument("--log", default=None, help="append per-step JSON lines to this file")
    parser.add_argument("--save", default=None, help="folder: write each seed's adapter as seed<k>.tlra")
    parser.add_argument("--trained", default=None,
                        help="folder of seed<k>.tlra written by --save: score those GRPO adapters instead of training")
    parser.add_argument("--sft", action=argparse.BooleanOptionalAction, default=True,
                        help="the SFT row: the same adapter config trained by SFT on the reference solutions for "
                             "--steps steps of --prompts examples at --lr, v chosen by the same train-split selection")
    parser.add_argument("--draws", type=int, default=3, help="random directions in the random-direction control")
    parser.add_argument("--n-eval", type=int, default=None, help="prompts per evaluation set (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="processes side by side, one seed each")
    parser.add_argument("--outcomes", default=None, help="write the per-prompt outcomes of every seed here (JSON)")
    parser.add_argument("--report", nargs="+", default=None,
                        help="print the report from --outcomes files (other seeds, same settings) and exit")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: seed 0, 2 steps of 2 prompts x 4, no selection, 16 prompts per set, 1 draw")
    add_results_option(parser, "demo_cpu")
    args = parser.parse_args()
    if args.report:
        return print_report(protocol.load(*args.report))
    if args.quick:
        args.seeds, args.steps, args.prompts, args.group, args.select_every = [0], 2, 2, 4, 0
        args.n_eval, args.draws = args.n_eval or 16, 1
    settings = {k: getattr(args, k) for k in ("split", "format_credit", "lr", "prompts", "group", "temperature", "clip",
                                              "inner_epochs", "steps", "budget_min", "budget_clock", "select_every", "jobs", "threads",
                                              "seeds", "draws", "sft")}
    if args.jobs > 1 and len(args.seeds) > 1 and not args.probe_knowledge:
        passed = [a for a in sys.argv[1:] if a != "--quick"]
        parts = protocol.parallel(__file__, passed, args.seeds, args.jobs)
        payload = {"args": settings, "strata": parts[0]["strata"], "seeds": [r for p in parts for r in p["seeds"]]}
    else:
        torch.set_num_threads(args.threads)
        model, tokenizer = load_model()
        if args.probe_knowledge:
            for label, share in knowledge_probe(model, tokenizer).items():
                print(f"right capital ranked first among {len(CAPITALS)} capitals' first tokens, {label}: {share:.0%}")
            return
        strata = protocol.probe_strata(model, tokenizer)
        n_tie = args.n_tie if args.n_tie == "all" else int(args.n_tie)
        if args.placement == "config":
            placement = TinyLoRAConfig(u=args.u, n_tie=n_tie)
        else:
            train_task = CapitalAnswerTask(countries="world")
            importance = None
            if args.placement == "top":
                importance = module_importance(model, tokenizer, train_task, n_prompts=16, objective="grpo", seed=0)
            placement = plan_budget(model, args.params, importance=importance, strategy=args.placement).config
        payload = {"args": settings, "strata": strata,
                   "seeds": [run_seed(model, tokenizer, args, placement, seed) for seed in args.seeds]}
    if args.outcomes:
        protocol.save(args.outcomes, payload)
    print_report(payload)


if __name__ == "__main__":
    with results_file(results_name("demo_cpu")):
        main()
