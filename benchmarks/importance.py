"""Cost of gradient importance vs a GRPO step, slider-apply latency, and where importance lies.

    .venv/bin/python benchmarks/importance.py                  # timings on the embedded model
    .venv/bin/python benchmarks/importance.py --rank gsm8k --objective sft --prompts 16
    .venv/bin/python benchmarks/importance.py --rank capitals --objective grpo --prompts 16 --flexible 0.5
    .venv/bin/python benchmarks/importance.py --device cuda --dtype bfloat16   # where researchers run

Timings (medians of --repeats runs, same prompts and seed everywhere):
- module_importance over all 210 modules (sampling included) vs one GRPO step on the same
  rollout: tinylab.train.grpo's forward + backward of the token-level loss with a 13-parameter tiled
  adapter attached. Goal: (importance - its sampling) / GRPO forward+backward <= 2.
- weight_importance (same objective) vs the same GRPO forward+backward.
- BudgetSlider.apply after the first attach (SVD factors cached): goal < 0.5 s, printed as a ratio
  to the first attach and to one forward pass of the batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from results_file import add_results_option, results_file, results_name  # noqa: E402

from tinylab import tasks  # noqa: E402
from tinylab.adapter.attach import apply_tinylora  # noqa: E402
from tinylab.adapter.planner import plan_budget  # noqa: E402
from tinylab.analysis.importance import module_importance, weight_importance  # noqa: E402
from tinylab.model.generation import completion_logprobs, generate  # noqa: E402
from tinylab.model.loading import load_model  # noqa: E402
from tinylab.tasks import RewardShape  # noqa: E402
from tinylab.train.grpo import GRPOConfig, group_advantages, policy_loss  # noqa: E402


def _task(name: str, args):
    """The task; with --flexible / --formatted, partial credit so that groups' rewards differ."""
    if args.flexible or args.formatted:
        return tasks.get(name, shape=RewardShape(flexible=args.flexible, formatted=args.formatted))
    return tasks.get(name)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # a GPU's work is queued: time it done


def _time(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _model(args):
    model, tok = load_model(device=args.device, dtype=args.dtype)
    weight = next(model.parameters())
    print(f"model on {weight.device}, {weight.dtype}")
    return model, tok


def _grpo_forward_backward(model, rollout, rewards, group_size, temperature):
    """tinylab.train.grpo's step 4: one forward + backward over the rows with a non-zero advantage."""
    advantages = group_advantages(rewards, group_size, "group").float()  # [B*G]
    rows = (advantages != 0).nonzero().squeeze(-1)
    if len(rows) == 0:
        raise SystemExit("every group's rewards are equal: no GRPO gradient to time; use --flexible 0.5")
    mask = rollout.completion_mask
    ids, attn, cmask = rollout.input_ids[rows], rollout.attention_mask[rows], mask[rows]
    logp = completion_logprobs(model, ids, attn, cmask, temperature=temperature)  # [N, L]
    loss, _ = policy_loss(logp, logp.detach(), None, advantages[rows], cmask, mask.sum(), GRPOConfig())
    loss.backward()
    return len(rows)


def timings(args) -> None:
    model, tok = _model(args)
    task = _task(args.task, args)
    kwargs = dict(n_prompts=args.prompts, n_samples=args.samples, max_new_tokens=args.max_new_tokens,
                  seed=args.seed, temperature=1.0)
    examples = task.examples("train", args.prompts, args.seed)
    prompts, answers = [e.prompt for e in examples], [e.answer for e in examples for _ in range(args.samples)]

    t_first_probe, _ = _time(lambda: apply_tinylora(model, u=4).remove(), 1)  # SVD (disk cache or compute)
    t_gen, rollout = _time(lambda: generate(model, tok, prompts, n=args.samples, max_new_tokens=args.max_new_tokens,
                                            temperature=1.0, seed=args.seed), args.repeats)
    rewards = torch.tensor([0.0 if r is None else float(r) for r in task.reward(rollout.completions, answers)],
                           dtype=torch.float32, device=rollout.input_ids.device)  # [B*G]
    rows = args.prompts * args.samples
    t_imp, imp = _time(lambda: module_importance(model, tok, task, objective="grpo", batch_size=rows, **kwargs),
                       args.repeats)
    t_imp16, _ = _time(lambda: module_importance(model, tok, task, objective="grpo", batch_size=16, **kwargs),
                       args.repeats)
    t_wimp, _ = _time(lambda: weight_importance(model, tok, task, objective="grpo", batch_size=rows, **kwargs),
                      args.repeats)
    adapter = apply_tinylora(model, plan_budget(model, 13).config)
    try:
        t_fb, live = _time(lambda: _grpo_forward_backward(model, rollout, rewards, args.samples, 1.0), args.repeats)
        with torch.no_grad():
            t_fwd, _ = _time(lambda: model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask),
                             args.repeats)
    finally:
        adapter.remove()
    print(f"task {task.name}: {args.prompts} prompts x {args.samples} samples, <= {args.max_new_tokens} new tokens, "
          f"completion tokens {int(rollout.completion_mask.sum())}, rows with non-zero advantage {live}/{rows}, "
          f"prompts with a gradient {imp.informative}/{args.prompts}")
    print(f"first probe attach (SVD of 210 matrices, cached on disk after the first run): {t_first_probe:.2f} s")
    print(f"sampling                       {t_gen:7.2f} s")
    print(f"GRPO forward+backward (13 p.)  {t_fb:7.2f} s")
    print(f"module_importance (1 chunk)    {t_imp:7.2f} s   minus sampling / GRPO fwd+bwd = "
          f"{(t_imp - t_gen) / t_fb:.2f}  (goal <= 2);  total / (sampling + GRPO fwd+bwd) = "
          f"{t_imp / (t_gen + t_fb):.2f}")
    print(f"module_importance (16 rows)    {t_imp16:7.2f} s   minus sampling / GRPO fwd+bwd = "
          f"{(t_imp16 - t_gen) / t_fb:.2f}")
    print(f"weight_importance (1 chunk)    {t_wimp:7.2f} s   minus sampling / GRPO fwd+bwd = "
          f"{(t_wimp - t_gen) / t_fb:.2f}")
    slider_latency(model, t_fwd)


def slider_latency(model, t_fwd: float) -> None:
    from tinylab.widgets import BudgetSlider  # noqa: TID251 (a script on top times the slider)

    slider = BudgetSlider(model, n_params=13)
    start = time.perf_counter()
    slider.apply()
    first = time.perf_counter() - start
    latencies = []
    for n in (1, 13, 100, 210, 420, 840, 13, 5):
        slider.slider.value = n
        start = time.perf_counter()
        slider.apply()
        latencies.append(time.perf_counter() - start)
        assert slider.adapter.num_params == n
    slider.adapter.remove()
    median, worst = statistics.median(latencies), max(latencies)
    print(f"slider apply after first attach: median {median:.3f} s, max {worst:.3f} s over {len(latencies)} "
          f"budgets (goal < 0.5 s); first apply {first:.3f} s; median / first = {median / first:.2f}; "
          f"median / one forward of the batch = {median / t_fwd:.2f}")


def rank(args) -> None:
    import pandas as pd

    model, tok = _model(args)
    task = _task(args.rank, args)
    start = time.perf_counter()
    imp = module_importance(model, tok, task, n_prompts=args.prompts, objective=args.objective,
                            n_samples=args.samples, max_new_tokens=args.max_new_tokens, seed=args.seed)
    seconds = time.perf_counter() - start
    table = imp.table
    print(f"{task.name} / {args.objective}: {args.prompts} prompts, {imp.informative} with a gradient, {seconds:.1f} s")
    if args.objective == "grpo":
        flat = [r for group in imp.rewards for r in group]
        print(f"mean reward {sum(flat) / len(flat):.3f}")
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 3):
        print("top 10 modules by fisher:")
        print(imp.ranked("fisher").head(10)[["fisher", "grad", "abs_mean", "consistency"]])
        share = table.fisher / table.fisher.sum()
        print("share of fisher by module type:")
        print(share.groupby(level="module", sort=False).sum().sort_values(ascending=False).round(3).to_string())
        by_layer = share.groupby(level="layer").sum()
        print("share of fisher by layer (top 8):")
        print(by_layer.sort_values(ascending=False).head(8).round(3).to_string())
        thirds = pd.cut(by_layer.index, 3, labels=["first third", "middle third", "last third"])
        print(by_layer.groupby(thirds, observed=True).sum().round(3).to_string())
        print("grad (batch gradient norm) top 5:", list(imp.ranked("grad").head(5).index))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="capitals", help="task for the timings (default capitals)")
    parser.add_argument("--flexible", type=float, default=0.5, help="reward for a flexible-only match (0: off)")
    parser.add_argument("--formatted", type=float, default=0.0, help="reward for a formatted wrong reply")
    parser.add_argument("--rank", default=None, help="instead of timings: rank modules on this task")
    parser.add_argument("--objective", default="grpo", choices=["grpo", "sft"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, else CPU), cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU that runs it, else fp32), float32, ...")
    add_results_option(parser, "importance (importance_rank with --rank)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rank:
        rank(args)
    else:
        timings(args)


if __name__ == "__main__":
    with results_file(results_name("importance_rank" if "--rank" in sys.argv else "importance")):
        main()
