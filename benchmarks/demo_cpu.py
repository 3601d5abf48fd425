"""The CPU demonstration: 13 scalars, GRPO, the embedded SmolLM2-135M-Instruct, 3 seeds.

Task: capitals ("What is the capital of Norway? Answer with the city name only."), split by
country, so held-out countries are never seen in training. Held-out scores use greedy decoding:

    strict    the reply's first line is the right city (the headline number)
    format    the reply has at most 3 words
    flexible  the right city appears anywhere in the reply (knowledge, whatever the format)

The base model knows about half of the held-out capitals (flexible) but answers in a sentence
("The capital of Norway is Oslo."), so strict is 0. Exact-match reward never fires on sampled
replies (0 of 128 samples in a probe), so training uses a shaped reward: 1 for a strict-correct
reply, and for a reply that contains the right city somewhere a smaller reward that grows as the
reply gets shorter (min(0.5, 1.5 / words)); wrong replies get 0. It never pays for format alone.

Usage: .venv/bin/python benchmarks/demo_cpu.py [--seeds 0 1 2] [--steps 40] [--budget-min 10]
Prints per seed: base and trained held-out scores, steps, training wall time, the 13 numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tinylab.adapter import TinyLoRAConfig, apply_tinylora  # noqa: E402
from tinylab.grpo import GRPOConfig, train_grpo  # noqa: E402
from tinylab.models import load_model  # noqa: E402
from tinylab.rollout import generate  # noqa: E402
from tinylab.tasks.base import completion_text  # noqa: E402
from tinylab.tasks.capitals import CapitalsTask  # noqa: E402
from tinylab.training import StopTraining  # noqa: E402


class ShapedCapitals(CapitalsTask):
    """Capitals with the training reward described in the module docstring (scoring unchanged)."""

    name = "capitals_shaped"

    def reward(self, completions, answers=None, **kwargs):
        answers = kwargs.get("answer") if answers is None else answers
        out = []
        for completion, answer in zip(completions, answers):
            text = completion_text(completion)
            score = self.score(text, answer)
            if score.correct_strict:
                out.append(1.0)
            elif score.correct_flexible:
                out.append(min(0.5, 1.5 / max(1, len(text.split()))))
            else:
                out.append(0.0)
        return out


def held_out(model, tokenizer, task, examples, batch_size=64):
    """Greedy held-out scores (fractions) and the replies."""
    r = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens=task.max_new_tokens,
                 temperature=0, batch_size=batch_size)
    scores = [task.score(c, e.answer) for c, e in zip(r.completions, examples)]
    n = len(scores)
    return {"strict": sum(s.correct_strict for s in scores) / n, "format": sum(s.formatted for s in scores) / n,
            "flexible": sum(s.correct_flexible for s in scores) / n}, r.completions


class TimeBudget:
    """Stop training (cleanly, after a step) once the wall-time budget is used up."""

    def __init__(self, seconds: float, log_path: str | None = None):
        self.seconds, self.start, self.log_path = seconds, time.perf_counter(), log_path

    def __call__(self, log):
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"step": log.step, "reward": round(log.reward_mean, 3),
                                    "strict": round(log.correct_rate, 3), "format": round(log.format_rate, 3),
                                    "len": round(log.completion_len, 1), "v_norm": round(log.v_norm, 4),
                                    "gen": round(log.gen_time, 1), "fb": round(log.fwd_bwd_time, 1),
                                    "sample": log.samples[0][0][:60]}) + "\n")
        if time.perf_counter() - self.start > self.seconds:
            raise StopTraining(f"time budget of {self.seconds:.0f} s used")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--budget-min", type=float, default=10.0, help="wall-time cap per seed's training")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--u", type=int, default=13)
    parser.add_argument("--n-tie", default="all", help='"all" (one shared vector of u) or an integer')
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log", default=None, help="append per-step JSON lines to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model()
    task = ShapedCapitals()
    test = task.examples("test", None, None)
    print(f"capitals: {len(task.examples('train', None, None))} train / {len(test)} held-out prompts "
          f"({len(test) // len(task.templates)} held-out countries); greedy, {task.max_new_tokens} new tokens")
    base, base_replies = held_out(model, tokenizer, task, test)
    print(f"base: strict {base['strict']:.1%}  format {base['format']:.1%}  flexible {base['flexible']:.1%}"
          f"  e.g. {base_replies[0]!r}")
    n_tie = args.n_tie if args.n_tie == "all" else int(args.n_tie)
    rows = []
    for seed in args.seeds:
        adapter = apply_tinylora(model, TinyLoRAConfig(u=args.u, n_tie=n_tie, seed=seed))
        config = GRPOConfig(prompts_per_step=args.prompts, group_size=args.group, lr=args.lr, steps=args.steps,
                            temperature=args.temperature, seed=seed,
                            checkpoint_dir=tempfile.mkdtemp(prefix=f"tinylab-demo-{seed}-"))
        start = time.perf_counter()
        cpu0 = time.process_time()
        run = train_grpo(model, tokenizer, adapter, task, config,
                         callbacks=[TimeBudget(args.budget_min * 60, args.log)])
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
        trained, replies = held_out(model, tokenizer, task, test)
        numbers = [round(x, 4) for x in adapter.vector().tolist()]
        rows.append((seed, trained, run.step, wall))
        print(f"seed {seed}: {adapter.num_params} params, {run.step} steps ({run.status}), train wall {wall:.0f} s "
              f"(cpu {cpu:.0f} s)\n  trained: strict {trained['strict']:.1%}  format {trained['format']:.1%}  "
              f"flexible {trained['flexible']:.1%}   (base {base['strict']:.1%} / {base['format']:.1%} / "
              f"{base['flexible']:.1%})\n  v = {numbers}\n  e.g. {replies[:4]}", flush=True)
        adapter.remove()
    mean = {k: sum(r[1][k] for r in rows) / len(rows) for k in ("strict", "format", "flexible")}
    print(f"mean over {len(rows)} seeds: strict {base['strict']:.1%} -> {mean['strict']:.1%} "
          f"({100 * (mean['strict'] - base['strict']):+.1f} points), format {base['format']:.1%} -> "
          f"{mean['format']:.1%}, flexible {base['flexible']:.1%} -> {mean['flexible']:.1%}; "
          f"max train wall {max(r[3] for r in rows):.0f} s")


if __name__ == "__main__":
    main()
