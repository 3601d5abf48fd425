"""Base rates of the embedded model on every built-in task: strict, flexible, format, reply length.

    .venv/bin/python benchmarks/base_rates.py                           # all tasks, their defaults
    .venv/bin/python benchmarks/base_rates.py --tasks gsm8k --n 100 --gsm8k-tokens 256

Greedy replies on the held-out split ("test"), batched, through `tinylab.evaluate`. Format and
correctness are reported apart: a task's `formatted` flag says whether the reply has the form
the strict reading needs (e.g. "#### N" for GSM8K, at most 3 words for capitals).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from results_file import add_results_option, results_file, results_name  # noqa: E402

from tinylab import tasks  # noqa: E402
from tinylab.evaluation.report import evaluate  # noqa: E402
from tinylab.model.loading import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=tasks.names())
    parser.add_argument("--n", type=int, default=100, help="held-out examples per task (fewer if the split is smaller)")
    parser.add_argument("--gsm8k-tokens", type=int, default=256, help="max_new_tokens for gsm8k")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    add_results_option(parser, "base_rates")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    print(f"{'task':12s} {'n':>4s} {'tokens':>6s} {'strict':>7s} {'flexible':>8s} {'format':>7s} {'mean len':>8s} "
          f"{'time':>6s}  first reply")
    for name in args.tasks:
        task = tasks.get(name)
        max_new = args.gsm8k_tokens if name == "gsm8k" else task.max_new_tokens
        available = len(task.examples("test", None, None))
        n = min(args.n, available)
        start = time.perf_counter()
        report = evaluate(model, tokenizer, task, n=n, split="test", seed=0, batch_size=args.batch_size,
                          max_new_tokens=max_new, progress=False)
        print(f"{name:12s} {report.n:4d} {max_new:6d} {report.strict:7.1%} {report.flexible:8.1%} "
              f"{report.formatted:7.1%} {report.mean_length:8.1f} {time.perf_counter() - start:5.0f}s  "
              f"{report.table['reply'].iloc[0][:60]!r}", flush=True)


if __name__ == "__main__":
    with results_file(results_name("base_rates")):
        main()
