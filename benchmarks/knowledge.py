"""Knowledge, not only format: can <= 13 scalars make the embedded model name the right capital
more often on countries it never trained on, and in phrasings it never trained on?

The world set (`CapitalsTask(countries="world")`: 186 UN member states from GeoNames, split by
country into 102 train / 28 validation / 56 test countries, `tinylab/tasks/capitals_split.json`).
GRPO trains one u = 13 vector shared by all 210 adapted maps (r = 2) on the train countries in the
task's phrasings. Scored under the lenient reading (the right city named anywhere in the reply,
`Score.correct_flexible`):

- `--split validation`: the validation countries (choose the recipe here, >= 2 seeds per recipe);
- `--split test`: the test countries in the task's phrasings and in held-out phrasings (questions
  worded as no training prompt is), scored once with the chosen recipe.

Each set prints base, prompt control (one worked training example before the question) and
trained, with capitals named per reply (each capital of the set found in a reply counts; a guard
against listing: a gain counts only at <= 1.2), then the paired 95% interval and McNemar p of
trained vs base and vs the prompt control, overall and per knowledge stratum (the base model's
probability of the capital after "The capital of X is": knows / half / does not know; see
`capitals_protocol.py`). A gain only where the base model already knew is surfacing, not learning.

Task (`--task city`, the default): `CapitalsTask`, "What is the capital of Norway? Answer with the
city name only." in three phrasings. `--task answer`: `CapitalAnswerTask` ('End your reply with
"Answer: <city>".'). Reward: `RewardShape(correct=1, flexible=--credit)`: 1 when the reply's first
line is the right city, `--credit` when the right city is named elsewhere in the reply, else 0.

Each seed trains at most `--steps` steps and stops before a step would take it past `--minutes`
of training, counted in the process's CPU time (`--clock cpu`, the default: one torch thread, so
one core's time, whatever else runs on the machine); one torch thread per process. `--jobs 2` runs the seeds in two processes
side by side. `--outcomes F` writes every per-prompt outcome as JSON; `--report F` prints the
report again from such a file without a model (e.g. after a change to the paired statistics).

Usage: .venv/bin/python benchmarks/knowledge.py --split validation --seeds 0 1 [--lr ...] [--jobs 2]
       .venv/bin/python benchmarks/knowledge.py --split test --seeds 0 1 2 --jobs 2
       .venv/bin/python benchmarks/knowledge.py --quick   (smoke run: seed 0, 2 steps, 16 prompts)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import capitals_protocol as protocol  # noqa: E402
import torch  # noqa: E402
from demo_cpu import TimeBudget  # noqa: E402
from results_file import add_results_option, results_file, results_name  # noqa: E402

import tinylab  # noqa: E402
from tinylab.tasks import RewardShape  # noqa: E402
from tinylab.tasks.capitals import CapitalAnswerTask, CapitalsTask  # noqa: E402

GUARD = 1.2  # most capitals named per reply, on average, for a gain to count
MEASURES = ("flexible",)


def run_seed(model, tokenizer, args, seed: int) -> dict:
    """Train one seed on the train countries within the budget; per-prompt outcomes on the evaluation sets."""
    kind = CapitalsTask if args.task == "city" else CapitalAnswerTask
    shape = RewardShape(correct=1.0, flexible=args.credit)
    adapter = tinylab.apply_tinylora(model, tinylab.TinyLoRAConfig(u=13, r=2, n_tie="all", seed=seed))
    config = tinylab.GRPOConfig(prompts_per_step=args.prompts, group_size=args.group, lr=args.lr, steps=args.steps,
                                temperature=args.temperature, seed=seed, clip=args.clip, inner_epochs=args.inner_epochs,
                                checkpoint_dir=tempfile.mkdtemp(prefix=f"tinylab-knowledge-{seed}-"))
    start, cpu0 = time.perf_counter(), time.process_time()
    run = tinylab.train_grpo(model, tokenizer, adapter, kind(countries="world", shape=shape), config,
                             callbacks=[TimeBudget(args.minutes * 60, args.log, clock=args.clock)])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    t0 = time.perf_counter()
    sets = ["validation"] if args.split == "validation" else ["test", "test, held-out phrasings"]
    scored = [protocol.outcomes(model, tokenizer, kind, shape, adapter, name, seed=seed, n=args.n_eval)
              for name in sets]
    out = {"seed": seed, "params": adapter.num_params, "steps": run.step, "status": run.status, "wall": wall, "cpu": cpu,
           "eval_seconds": time.perf_counter() - t0, "v": [round(x, 4) for x in adapter.vector().tolist()],
           "sets": scored}
    adapter.remove()
    return out


def seed_lines(result: dict, strata: dict, minutes: float) -> list[str]:
    lines = [f"seed {result['seed']}: {result['params']} params, {result['steps']} steps ({result['status']}), training "
             f"wall time {result['wall']:.0f} s, cpu {result.get('cpu', float('nan')):.0f} s (budget {minutes:g} min), "
             f"evaluation {result['eval_seconds']:.0f} s; "
             f"v = {result['v']}"]
    for scored in result["sets"]:
        lines += protocol.report(scored, strata, MEASURES, seed=result["seed"])
        trained = scored["rows"]["trained"]
        stats = tinylab.paired(scored["rows"]["base"]["flexible"], trained["flexible"])
        named = sum(trained["named"]) / len(trained["named"])
        lines.append(f"    holds (interval vs base above 0 and <= {GUARD} capitals per reply): "
                     f"{'yes' if stats.low > 0 and named <= GUARD else 'no'}; e.g. {trained['replies']}")
    return lines


def summary_lines(results: list[dict]) -> list[str]:
    lines = []
    for i, name in enumerate(s["set"] for s in results[0]["sets"]):
        per_seed = [r["sets"][i]["rows"] for r in results]
        base = sum(per_seed[0]["base"]["flexible"]) / len(per_seed[0]["base"]["flexible"])
        trained = [sum(rows["trained"]["flexible"]) / len(rows["trained"]["flexible"]) for rows in per_seed]
        above = {other: sum(tinylab.paired(rows[other]["flexible"], rows["trained"]["flexible"]).low > 0
                            for rows, r in zip(per_seed, results)) for other in ("base", "prompt control")}
        lines.append(f"{name}, over {len(results)} seeds: flexible {base:.1%} (base) -> {sum(trained) / len(trained):.1%} "
                     f"(trained, mean; {', '.join(f'{t:.1%}' for t in trained)}); interval above 0 vs base in "
                     f"{above['base']} of {len(results)} seeds, vs the prompt control in {above['prompt control']}")
    lines.append(f"max training wall {max(r['wall'] for r in results):.0f} s")
    return lines


def print_report(payload: dict) -> None:
    args = payload["args"]
    print(f"{'capitals' if args['task'] == 'city' else 'capitals_answer'}, world set, {args['split']}: reward 1 for the "
          f"city alone, {args['credit']:g} for the city named in a longer reply; lr {args['lr']:g}, {args['prompts']} "
          f"prompts x {args['group']} samples, temperature {args['temperature']:g}, clip {args['clip']} x "
          f"{args['inner_epochs']} updates per batch, at most {args['steps']} steps or {args['minutes']:g} min of "
          f"{args.get('clock', 'wall')} time per seed; "
          f"{args['jobs']} processes, {args['threads']} torch thread each")
    print("\n".join(protocol.strata_lines(payload["strata"])))
    for result in payload["seeds"]:
        print("\n".join(seed_lines(result, payload["strata"], args["minutes"])))
    if len(payload["seeds"]) > 1:
        print("\n".join(summary_lines(payload["seeds"])))


def parallel(args, settings: dict) -> dict:
    """Each seed in its own process (one torch thread), `--jobs` at a time."""
    passed = [a for a in sys.argv[1:] if a not in ("--quick",)]
    parts = protocol.parallel(__file__, passed, args.seeds, args.jobs)
    return {"args": settings, "strata": parts[0]["strata"], "seeds": [r for p in parts for r in p["seeds"]]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=15, help="most GRPO steps per seed")
    parser.add_argument("--minutes", type=float, default=10.0, help="training time budget per seed")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: the budget counts the process's CPU time (one thread: one core's time); wall: wall time")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--credit", type=float, default=1.0,
                        help="reward for a reply naming the right city that is not the city alone")
    parser.add_argument("--task", choices=["city", "answer"], default="city")
    parser.add_argument("--split", choices=["validation", "test"], default="validation",
                        help="validation: validation countries (choose the recipe); test: test countries, task and "
                             "held-out phrasings (once, at the end)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--clip", type=float, default=0.2, help="PPO clip epsilon (needed for --inner-epochs > 1)")
    parser.add_argument("--inner-epochs", type=int, default=2, help="updates per batch of sampled replies")
    parser.add_argument("--n-eval", type=int, default=None, help="evaluation prompts per set (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="processes side by side, one seed each")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log", default=None, help="append per-step JSON lines to this file")
    parser.add_argument("--outcomes", default=None, help="write the per-prompt outcomes of every seed here (JSON)")
    parser.add_argument("--report", nargs="+", default=None,
                        help="print the report from --outcomes files (other seeds, same settings) and exit")
    parser.add_argument("--quick", action="store_true", help="smoke run: seed 0, 2 steps of 2 prompts x 4, 16 prompts")
    add_results_option(parser, "knowledge")
    args = parser.parse_args()
    if args.report:
        return print_report(protocol.load(*args.report))
    if args.quick:
        args.seeds, args.steps, args.prompts, args.group, args.n_eval = [0], 2, 2, 4, args.n_eval or 16
    settings = {k: getattr(args, k) for k in ("task", "split", "credit", "lr", "prompts", "group", "temperature", "clip",
                                              "inner_epochs", "steps", "minutes", "clock", "jobs", "threads", "seeds")}
    if args.jobs > 1 and len(args.seeds) > 1:
        payload = parallel(args, settings)
    else:
        torch.set_num_threads(args.threads)
        model, tokenizer = tinylab.load_model()
        strata = protocol.probe_strata(model, tokenizer)
        payload = {"args": settings, "strata": strata, "seeds": [run_seed(model, tokenizer, args, s) for s in args.seeds]}
    if args.outcomes:
        protocol.save(args.outcomes, payload)
    print_report(payload)


if __name__ == "__main__":
    with results_file(results_name("knowledge")):
        main()
