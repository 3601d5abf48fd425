"""Batched evaluation vs one prompt at a time: generated tokens per second on the embedded model.

Both runs use the same prompts in the same process, one after the other (after a warm-up), and
must produce the same greedy replies. Prints the throughput of each and their ratio.

    .venv/bin/python benchmarks/evaluate.py --task capitals --n 32 --batch-size 16 --max-new-tokens 16
"""

import argparse
import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tinylab.evaluation import evaluate  # noqa: E402
from tinylab.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="capitals")
    parser.add_argument("--n", type=int, default=32, help="prompts (held-out split)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
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
    main()
