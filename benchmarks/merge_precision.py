"""How much of a trained TinyLoRA update survives merged into bf16 weights (what vLLM serves).

vLLM has no TinyLoRA kernels: TRL (and tinylab's bridge) push W + dW merged into the weights, in
the dtype vLLM runs, bf16 on most GPUs. A 13-number update is small against W, so rounding W + dW
to bf16 can lose part of it. Run this before a long run; no vLLM needed (main venv).

Per budget (--budgets, default 13 52 210 840 trained numbers, `plan_budget`, tiled), on the
embedded SmolLM2-135M-Instruct:

1. A trained vector: `train_sft` on the capitals task (--steps (20) steps, lr --lr, batch 4) on the
   float32 model; its |v| and the SFT loss before/after are printed.
2. The same adapter (same config and v) on the model loaded in bfloat16, three ways:
   base (adapter off), unmerged (tinylab's forward adds the update beside W), merged (each
   adapted W replaced by round_bf16(W + dW), the weights the TRL bridge pushes to vLLM).
3. Printed: the share of dW the bf16 weights keep (1 - |round(W + dW) - W - dW| / |dW| over all
   adapted maps) and the share of dW's entries that round away entirely; on --prompts (32) held-out
   capitals prompts, greedy replies of --new-tokens (24) from the unmerged model, scored
   teacher-forced under all three: the update's own effect (mean |log p unmerged - log p base| per
   reply token), the merge's error (mean |log p merged - log p unmerged|), bf16's own error (mean
   |log p unmerged in bf16 - log p of the trained float32 model|: the floor), the share of the
   effect kept (regression slope of merged - base on unmerged - base), and greedy agreement
   (replies of the merged model identical to the unmerged one's; of the unmerged bf16 model to the
   float32 one's; replies the update changes vs the base).

Everything printed is also written to benchmarks/results/merge_precision.txt (`--results NAME`;
benchmarks/results_file.py) with the date, commit, machine and command. Run: .venv/bin/python benchmarks/merge_precision.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from results_file import add_results_option, results_file, results_name  # noqa: E402

from tinylab import SFTConfig, apply_tinylora, load_model, plan_budget, train_sft  # noqa: E402
from tinylab.interop.vllm_sync import merged_weights  # noqa: E402
from tinylab.model.generation import completion_logprobs, generate  # noqa: E402
from tinylab.tasks import CapitalsTask  # noqa: E402


@torch.no_grad()
def weight_survival(model) -> tuple[float, float]:
    """(share of dW kept, share of dW's entries lost) when each adapted W becomes round(W + dW) in W's dtype."""
    err = total = lost = count = 0.0
    for _, module in model_adapted(model):
        W = module.base.weight
        dW = module.delta_weight()  # fp32 (out, in)
        applied = (W.float() + dW).to(W.dtype).float() - W.float()
        err += float((applied - dW).square().sum())
        total += float(dW.square().sum())
        lost += float(((applied == 0) & (dW != 0)).sum())
        count += float((dW != 0).sum())
    return 1 - (err / total) ** 0.5, lost / max(count, 1)


def model_adapted(model):
    return [(n, m) for n, m in model.named_modules() if getattr(m, "adapts_linear", False)]


@torch.no_grad()
def scored(model, rollout) -> torch.Tensor:
    """Log-probabilities [B, L] of the rollout's reply tokens under `model` (0 where masked)."""
    return completion_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.completion_mask).float()


def greedy(model, tok, prompts, n) -> list[list[int]]:
    out = generate(model, tok, prompts, max_new_tokens=n, temperature=0.0)
    return [ids[m.bool()].tolist() for ids, m in zip(out.completion_ids, out.completion_mask)]


def one_budget(args, budget, fp32, bf16, merged, tok, task, prompts, report) -> None:
    plan = plan_budget(fp32, budget)
    adapter = apply_tinylora(fp32, plan.config)
    config = SFTConfig(batch_size=4, lr=args.lr, steps=args.steps, seed=0)
    run = train_sft(fp32, tok, adapter, task, config)
    losses = run.history["loss"].tolist()
    v = adapter.vector()
    on16 = apply_tinylora(bf16, plan.config)
    on16.set_vector(v)
    kept, lost = weight_survival(bf16)
    weights = dict(merged_weights(bf16))
    loaded = merged.load_state_dict(weights, strict=False)
    if loaded.unexpected_keys:
        raise RuntimeError(f"merged weights with unknown names: {loaded.unexpected_keys[:3]}")
    rollout = generate(bf16, tok, prompts, max_new_tokens=args.new_tokens, temperature=0.0)
    mask = rollout.completion_mask.bool()
    unmerged_replies = [ids[m].tolist() for ids, m in zip(rollout.completion_ids, mask)]
    lp_fp32 = scored(fp32, rollout)[mask]  # the trained model itself: the bf16 floor
    fp32_replies = greedy(fp32, tok, prompts, args.new_tokens)
    adapter.remove()
    lp_unmerged = scored(bf16, rollout)[mask]
    lp_merged = scored(merged, rollout)[mask]
    with on16.disabled():
        lp_base = scored(bf16, rollout)[mask]
        base_replies = greedy(bf16, tok, prompts, args.new_tokens)
    merged_replies = greedy(merged, tok, prompts, args.new_tokens)
    effect = lp_unmerged - lp_base
    slope = float((lp_merged - lp_base) @ effect / effect.square().sum().clamp_min(1e-30))
    n = len(prompts)
    same = sum(a == b for a, b in zip(merged_replies, unmerged_replies))
    floor = sum(a == b for a, b in zip(fp32_replies, unmerged_replies))
    changed = sum(a != b for a, b in zip(base_replies, unmerged_replies))
    report(f"{plan.achieved:>6} | {float(v.norm()):5.3f} | {losses[0]:.2f} -> {losses[-1]:.2f} | {kept:7.3f} | "
           f"{lost:12.3f} | {float(effect.abs().mean()):6.4f} | {float((lp_merged - lp_unmerged).abs().mean()):9.4f} | "
           f"{float((lp_unmerged - lp_fp32).abs().mean()):9.4f} | {slope:10.3f} | {same:>7}/{n} | {floor:>7}/{n} | "
           f"{changed:>7}/{n}")
    on16.remove()
    merged.load_state_dict({n: p for n, p in bf16.state_dict().items() if n in weights}, strict=False)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[13, 52, 210, 840])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    add_results_option(parser, "merge_precision")
    args = parser.parse_args(argv[1:])
    torch.set_num_threads(args.threads)

    def report(line=""):
        print(line, flush=True)

    start = time.perf_counter()
    fp32, tok = load_model(device="cpu", dtype="float32")
    bf16, _ = load_model(device="cpu", dtype="bfloat16")
    merged, _ = load_model(device="cpu", dtype="bfloat16")
    task = CapitalsTask()
    prompts = [ex.prompt for ex in task.examples("test", n=args.prompts, seed=0)]
    report(f"SFT on capitals ({args.steps} steps, lr {args.lr}, batch 4, fp32); scored in bf16 on {len(prompts)} "
           f"held-out prompts, greedy replies of up to {args.new_tokens} tokens from the unmerged model")
    report("budget |  |v|  | SFT loss     | dW kept | entries lost | effect | merge gap | bf16 gap | kept slope | "
           "merged==unmerged | bf16==fp32 | changed by the update")
    report("(effect: mean |log p unmerged - log p base| per reply token, bf16; merge gap: mean |log p merged - "
           "log p unmerged|; bf16 gap: mean |log p unmerged bf16 - log p unmerged fp32|; greedy replies compared "
           "whole)")
    for budget in args.budgets:
        one_budget(args, budget, fp32, bf16, merged, tok, task, prompts, report)
    report(f"(total {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    with results_file(results_name("merge_precision")):
        code = main(sys.argv)
    sys.exit(code)
