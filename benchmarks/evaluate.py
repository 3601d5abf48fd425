"""Batched evaluation vs one prompt at a time: generated tokens per second on the embedded model.

Both runs use the same prompts in the same process, one after the other (after a warm-up), and
must produce the same greedy replies. Prints the throughput of each and their ratio.

    .venv/bin/python benchmarks/evaluate.py --task capitals --n 32 --batch-size 16 --max-new-tokens 16

With `--harness` (needs the eval extra): the embedded model on the first `--n` GSM8K test problems,
scored by tinylab (`evaluate`) and by lm-evaluation-harness (`tinylab.interop.lm_eval_harness`, the same prompt,
zero-shot, greedy); prints both strict and flexible scores and on how many problems they agree.

    .venv/bin/python benchmarks/evaluate.py --harness --n 20 --max-new-tokens 256
"""

import argparse
import os
import sys

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from results_file import add_results_option, results_file, results_name  # noqa: E402

from tinylab.evaluation.report import evaluate  # noqa: E402
from tinylab.model.loading import load_model  # noqa: E402


def harness_agreement(model, tokenizer, n: int, max_new_tokens: int, batch_size: int) -> None:
    """tinylab's and lm-eval's GSM8K readings of the same model on the same problems."""
    from tinylab.interop.lm_eval_harness import gsm8k_harness_task, run_harness
    from tinylab.tasks import GSM8K

    task = GSM8K()
    ours = evaluate(model, tokenizer, task, n=n, seed=None, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    progress=False)
    results = run_harness(model, tokenizer, [gsm8k_harness_task(max_new_tokens=max_new_tokens)], limit=n,
                          batch_size=batch_size, log_samples=True)
    theirs = {(s["doc"]["question"].strip(), s["filter"]): bool(s["exact_match"])
              for s in results["samples"]["gsm8k_tinylab"]}
    replies = {s["doc"]["question"].strip(): s["resps"][0][0] for s in results["samples"]["gsm8k_tinylab"]}
    questions = [row["question"].strip() for row in task.rows("test")[:n]]
    same_reply = sum(replies[q] == r for q, r in zip(questions, ours.table["reply"]))
    print(f"GSM8K test, first {n} problems, zero-shot, greedy, {max_new_tokens} new tokens; identical replies: "
          f"{same_reply}/{n}")
    for ours_column, filter_name in (("correct_strict", "strict-match"), ("correct_flexible", "flexible-extract")):
        mine = list(ours.table[ours_column])
        lm = [theirs[(q, filter_name)] for q in questions]
        print(f"{filter_name:16s} tinylab {sum(mine) / n:6.1%}  lm-eval {sum(lm) / n:6.1%}  "
              f"agree on {sum(a == b for a, b in zip(mine, lm))}/{n} problems")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="capitals")
    parser.add_argument("--n", type=int, default=32, help="prompts (held-out split)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--harness", action="store_true", help="GSM8K scored by tinylab and by lm-eval (see above)")
    add_results_option(parser, "evaluate (evaluate_harness with --harness)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    if args.harness:
        harness_agreement(model, tokenizer, args.n, args.max_new_tokens, args.batch_size)
        return
    common = dict(n=args.n, max_new_tokens=args.max_new_tokens, progress=False)
    evaluate(model, tokenizer, args.task, n=2, batch_size=2, max_new_tokens=4, progress=False)  # warm-up

    single = evaluate(model, tokenizer, args.task, batch_size=1, **common)
    batched = evaluate(model, tokenizer, args.task, batch_size=args.batch_size, **common)
    same = list(single.table["reply"]) == list(batched.table["reply"])
    tokens = int(batched.table["length"].sum() + (~batched.table["truncated"]).sum())  # end tokens are generated too
    rate_single, rate_batched = tokens / single.seconds, tokens / batched.seconds
    print(f"task {args.task}, {args.n} prompts, max_new_tokens {args.max_new_tokens}, torch threads "
          f"{torch.get_num_threads()}, {tokens} generated tokens")
    print(f"one at a time : {single.seconds:8.1f} s  {rate_single:8.1f} tokens/s")
    print(f"batch of {args.batch_size:<5d}: {batched.seconds:8.1f} s  {rate_batched:8.1f} tokens/s")
    print(f"ratio batched / one at a time: {rate_batched / rate_single:.2f}x   identical replies: {same}")


if __name__ == "__main__":
    with results_file(results_name("evaluate_harness" if "--harness" in sys.argv else "evaluate")):
        main()
