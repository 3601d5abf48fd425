"""Which heads did the CPU demonstration's scalars switch? Measured facts for a trained adapter.

    .venv/bin/python benchmarks/demo_cpu.py --save /tmp/demo-adapters      # trains, writes seed<k>.tlra
    .venv/bin/python benchmarks/heads.py /tmp/demo-adapters/seed0.tlra [--task answer] [--prompts 43]

On held-out prompts of the demonstration's task, with a reward on greedy replies as the causal
metric (`--reward exact`: 1 for a strict-correct reply, else 0 (for `--task answer` the right city
after "Answer:", for choice / open the reply's first line); `--reward training`: demo_cpu.py's
shaped training reward of the choice / open tasks; the answer task trains on exact match), prints:
- the top 5 heads by each measure of `tinylab.head_effects` (weight, js, output_change,
  gate_grad, ablation) and the pairwise overlap of those top-5 sets;
- the share of the reward gain (adapted - base) that removing the update from the top 5 heads
  together takes away (`tinylab.ablate_heads`), for the top 5 by ablation and by weight.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from results_file import add_results_option, results_file, results_name  # noqa: E402
from shaped_capitals import CapitalChoices, ShapedCapitals  # noqa: E402

from tinylab.adapter.file_format import load_adapter  # noqa: E402
from tinylab.analysis.heads import EVIDENCE, ablate_heads, head_effects  # noqa: E402
from tinylab.model.loading import load_model  # noqa: E402
from tinylab.tasks.capitals import CapitalAnswerTask  # noqa: E402


def _names(heads) -> str:
    return ", ".join(f"L{layer}.H{head}" for layer, head in heads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="an adapter file written by demo_cpu.py --save")
    parser.add_argument("--task", choices=["answer", "choice", "open"], default="answer")
    parser.add_argument("--reward", choices=["exact", "training"], default="exact",
                        help="causal metric: exact match (strict accuracy) or demo_cpu.py's default training reward")
    parser.add_argument("--prompts", type=int, default=None, help="held-out prompts (default: all)")
    parser.add_argument("--confirm", type=int, default=15, help="heads confirmed by real ablation")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda, mps")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU that runs it, else fp32), float32, ...")
    add_results_option(parser, "heads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pd.set_option("display.width", 160)

    model, tokenizer = load_model(device=args.device, dtype=args.dtype)
    adapter = load_adapter(model, args.adapter)
    shape = dict(starts=0.0, short=0.0) if args.reward == "exact" else dict(starts=0.5, short=0.3)
    if args.task == "answer":
        task = CapitalAnswerTask(countries="world")  # the countries demo_cpu.py trains and tests on
    else:
        task = (CapitalChoices if args.task == "choice" else ShapedCapitals)(**shape)
    prompts = task.examples("test", None, None)[: args.prompts]
    start = time.perf_counter()
    effects = head_effects(model, tokenizer, adapter, prompts, task=task, confirm=args.confirm)
    print(f"{args.adapter}: {adapter.num_params} params; {len(prompts)} held-out prompts; head_effects "
          f"{time.perf_counter() - start:.0f} s")
    print(f"{args.reward} reward on greedy replies: adapted {effects.adapted:.3f}, base {effects.base:.3f}, "
          f"gain {effects.adapted - effects.base:+.3f}")
    tops = {column: effects.top(column, args.top) for column in EVIDENCE}
    for column, heads in tops.items():
        print(f"top {args.top} by {column:13s}: {_names(heads)}")
    print("overlap of the top-5 sets (diagonal: heads with a non-zero value):")
    print(effects.agreement(args.top).to_string())
    for column in ("ablation", "weight"):
        if not tops[column]:
            continue
        together = ablate_heads(model, tokenizer, adapter, prompts, tops[column], task=task, reference=effects)
        print(f"ablating the top {args.top} by {column} together ({_names(together.heads)}): reward "
              f"{together.adapted:.3f} -> {together.ablated:.3f} (base {together.base:.3f}); share of the gain "
              f"removed {together.share:.1%}")


if __name__ == "__main__":
    with results_file(results_name("heads")):
        main()
