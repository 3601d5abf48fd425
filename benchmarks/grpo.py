"""How fast is one GRPO step? Ratios against baselines measured in this same run.

On the embedded SmolLM2-135M-Instruct with 13 scalars (u=13, one vector shared by all 210
maps), 4 prompts x 8 completions, up to 16 new tokens, a reward that is random per completion
(so every group has spread and no row is skipped):

1. our step / (generate the same group with the base model + one forward/backward of the base
   model on the full prompt+completion sequences, gradient w.r.t. the input embeddings, i.e.
   the activation gradients any trainer of v needs)               goal <= 1.15
2. our step / TRL GRPOTrainer step, same model, adapter, batch, token limit   goal <= 0.3
   (TRL's step runs through the same adapter layer, so a faster adapter speeds up both)
   Printed beside it: the matrix-product FLOPs of one step of each (torch.utils.flop_counter, an
   untimed step with the same seed), whose ratio is what the time ratio would be at equal speed
   per FLOP: the work each step does, apart from how fast the kernels run it
3. generation with the adapter merged into the weights / unmerged (is merging worth it?)
4. a step with experiment tracking / without (`report_to`: Trackio, TensorBoard, W&B offline when
   installed), same seed so the same prompts, completions and updates; CPU seconds per step of this
   process and the ones it starts (W&B's service): 1 + the tracker's CPU per step (its callback, and
   what its threads and processes add outside the main thread) / a step's CPU    goal <= 1.02
   Also printed: the whole step with logging vs the runs without logging around it (CPU and wall),
   with the noise of that comparison, and the one-off seconds to open and close the tracker. Only
   with --tracking-only, into benchmarks/results/grpo_tracking.txt (ratios 1-3 go to grpo.txt).

Usage: .venv/bin/python benchmarks/grpo.py [--steps 4] [--threads 2] [--tracking-only]
     [--device auto|cpu|cuda|cuda:1|mps] [--dtype auto|float32|bfloat16|float16]
`--device` / `--dtype` go to `tinylab.load_model` (auto: CUDA, then MPS, else the CPU; bf16 on a GPU
that runs it). The ratios compare steps on the same device and dtype; the first line printed
names them: quote it with the ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from results_file import add_results_option, results_file, results_name  # noqa: E402

from tinylab.adapter.attach import apply_tinylora  # noqa: E402
from tinylab.model.batch import positions_of  # noqa: E402
from tinylab.model.device import resolve_device, resolve_dtype  # noqa: E402
from tinylab.model.generation import generate, token_logprobs  # noqa: E402
from tinylab.model.loading import load_model
from tinylab.tasks.base import completion_text  # noqa: E402
from tinylab.tasks.capitals import CapitalsTask  # noqa: E402
from tinylab.train.grpo import GRPOConfig, train_grpo  # noqa: E402
from tinylab.train.tracking import Tracking  # noqa: E402


class RandomReward(CapitalsTask):
    """Capitals prompts; reward = a hash of the reply in [0, 1): every group has spread."""

    name = "capitals_random_reward"

    def reward(self, completions, answers=None, **kwargs):
        return [int(hashlib.md5(completion_text(c).encode()).hexdigest()[:8], 16) / 2**32 for c in completions]


def _wait_for(device: torch.device) -> None:
    """Let queued GPU kernels finish before reading the clock (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def base_step_time(model, tokenizer, adapter, prompts, config, seed) -> tuple[float, float, int]:
    """Seconds to generate the group with the base model + one full fwd/bwd of the base model."""
    with adapter.disabled():
        t0 = time.perf_counter()
        r = generate(model, tokenizer, prompts, n=config.group_size, max_new_tokens=config.max_new_tokens,
                     temperature=config.temperature, seed=seed)
        gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        embeds = model.get_input_embeddings()(r.input_ids).detach().requires_grad_(True)  # [B*G, P+L, d]
        out = model(inputs_embeds=embeds, attention_mask=r.attention_mask, position_ids=positions_of(r.attention_mask),
                    use_cache=False)
        logp = token_logprobs(out.logits[:, -r.completion_ids.shape[1] - 1:-1], r.completion_ids)  # [B*G, L]
        loss = -(logp * r.completion_mask).sum()
        loss.backward()
        _wait_for(r.input_ids.device)
        fwd_bwd = time.perf_counter() - t0
    return gen, fwd_bwd, int(r.completion_mask.sum())


def step_flops(model, tokenizer, adapter, task, config) -> tuple[tuple[float, float], tuple[float, float]]:
    """(matrix-product FLOPs, completion tokens) of one step of our loop and of TRL's GRPOTrainer, the
    first step of the same seed, counted by `torch.utils.flop_counter.FlopCounterMode`: mm, addmm,
    bmm and the attention kernels it has formulas for (not the CPU's fused attention, a small share
    at these lengths); elementwise work is not counted. Untimed: the counter slows the step down.
    The counter hooks every module, so our step scores through the logits here, not through the fused
    head of the timed steps (`tinylab.model.head_logprobs`), which makes the same matrix products.
    Starts and leaves the vector at zero."""
    from torch.utils.flop_counter import FlopCounterMode

    from tinylab.interop.trl_bridge import grpo_trainer

    one = GRPOConfig(**{**config.__dict__, "steps": 1, "checkpoint_dir": tempfile.mkdtemp(prefix="bench-flops-")})
    adapter.set_vector(torch.zeros(adapter.num_params))
    with FlopCounterMode(display=False) as counter:
        run = train_grpo(model, tokenizer, adapter, task, one)
    ours = (counter.get_total_flops(), run.logs[0].completion_len * one.prompts_per_step * one.group_size)
    adapter.set_vector(torch.zeros(adapter.num_params))
    trainer = grpo_trainer(model, tokenizer, adapter, task, one, output_dir=tempfile.mkdtemp(prefix="bench-flops-"))
    with FlopCounterMode(display=False) as counter:
        trainer.train()
    theirs = (counter.get_total_flops(), trainer.tinylab_logs.logs[0].completion_len * one.prompts_per_step * one.group_size)
    adapter.set_vector(torch.zeros(adapter.num_params))
    return ours, theirs


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process (all its threads) and by the processes it started (W&B's
    service, for one), read from /proc where there is one."""
    total = time.process_time()
    if not os.path.isdir("/proc"):
        return total
    parents, stats = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process ended meanwhile
                continue
            parents[int(entry)] = int(fields[1])
            stats[int(entry)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    family, grew = {os.getpid()}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in family} - family
        family |= more
        grew = bool(more)
    return total + sum(stats[pid] for pid in family - {os.getpid()})


class _Clock:
    """A callback noting wall time, CPU time (this process's threads and its children) and the main
    thread's CPU time after each step's callbacks: step k = reading k - reading k-1."""

    def __init__(self):
        self.readings = []

    def on_start(self, run):
        self.readings.append((time.perf_counter(), _cpu_seconds(), time.thread_time()))

    def __call__(self, entry):
        self.readings.append((time.perf_counter(), _cpu_seconds(), time.thread_time()))

    def steps(self) -> list[tuple[float, float, float]]:
        """(wall, CPU, CPU outside the main thread) seconds of each step, callbacks included. The step
        computes on the main thread (one torch thread); a tracker's background threads and processes
        are outside it."""
        return [(b[0] - a[0], b[1] - a[1], (b[1] - a[1]) - (b[2] - a[2])) for a, b in zip(self.readings, self.readings[1:])]


class _Timed:
    """A tracker, with the time spent inside it: opening, closing (wall), and each step (CPU of the
    main thread, where the callback runs)."""

    def __init__(self, tracker: Tracking):
        self.tracker, self.open_s, self.close_s, self.step_s = tracker, 0.0, 0.0, []

    def on_start(self, run):
        t0 = time.perf_counter()
        self.tracker.on_start(run)
        self.open_s = time.perf_counter() - t0

    def __call__(self, entry):
        t0 = time.thread_time()
        self.tracker(entry)
        self.step_s.append(time.thread_time() - t0)

    def on_end(self, run):
        t0 = time.perf_counter()
        self.tracker.on_end(run)
        self.close_s = time.perf_counter() - t0


def tracking_cost(model, tokenizer, adapter, task, config, backends, folder: str) -> list[str]:
    """Lines comparing the same run (same seed: the same prompts, completions and updates) without
    logging and with each backend, in one process; runs alternate: without, with the first backend,
    without, with the second, ..., without. The first step of each run is warm-up and left out.

    The cost, measured directly: the CPU time of the tracker's callback (on the main thread) plus what
    its threads and processes add outside the main thread (W&B's service, Trackio's writer), against
    the runs without logging around it; as a share of a step's CPU time, ratio 4 is 1 + that share.
    Also printed, for comparison: the whole step's CPU and wall ratio to the runs around it (per step,
    median), and the same ratio between those two runs without logging (the noise: on a machine whose
    cores other jobs share, a whole step moves by more than the 2% asked).
    """
    order = ["none"]
    for backend in backends:
        order += [backend, "none"]
    runs, inside, one_off = [], {}, {}
    for i, backend in enumerate(order):
        adapter.set_vector(torch.zeros(adapter.num_params))
        clock = _Clock()
        where = os.path.join(folder, backend)  # trackio: its TRACKIO_DIR (set before trackio is imported)
        timed = None if backend == "none" else _Timed(Tracking(backend, project="bench", name=f"{backend}-{i}",
                                                                directory=where))
        run_config = GRPOConfig(**{**config.__dict__, "checkpoint_dir": tempfile.mkdtemp(prefix="bench-grpo-")})
        train_grpo(model, tokenizer, adapter, task, run_config, callbacks=[c for c in (timed, clock) if c])
        runs.append(clock.steps()[1:])  # [(wall, cpu, cpu outside the main thread)] per step after the first
        if timed is not None:
            inside[backend] = timed.step_s[1:]
            one_off[backend] = (timed.open_s, timed.close_s)
    adapter.set_vector(torch.zeros(adapter.num_params))
    base = [step for i, run in enumerate(runs) if order[i] == "none" for step in run]
    base_wall, base_cpu = statistics.median(st[0] for st in base), statistics.median(st[1] for st in base)
    lines = [f"step without logging: CPU {base_cpu:.3f} s, wall {base_wall:.3f} s (medians of {len(base)} steps in "
             f"{order.count('none')} runs, alternated with the runs with logging)"]
    for i, backend in enumerate(order):
        if backend == "none":
            continue
        before, with_, after = runs[i - 1], runs[i], runs[i + 1]
        callback = statistics.median(inside[backend])
        outside = statistics.median(st[2] for st in with_)
        outside_without = statistics.median(st[2] for st in before + after)
        cost = callback + max(outside - outside_without, 0.0)
        cpu, wall = (statistics.median(w[k] / ((b[k] + a[k]) / 2) for b, w, a in zip(before, with_, after))
                     for k in (1, 0))  # median over steps of with / mean(before, after): CPU, then wall
        noise = statistics.median(a[1] / b[1] for b, a in zip(before, after))
        lines.append(f"ratio step with {backend:<11} / without = {1 + cost / base_cpu:.4f}   (goal <= 1.02; its cost "
                     f"{cost * 1e3:.2f} ms CPU per step: {callback * 1e3:.2f} ms in its callback + outside the main "
                     f"thread {outside * 1e3:.2f} ms vs {outside_without * 1e3:.2f} ms without logging)")
        lines.append(f"      {backend:<11} whole step vs the runs around it: CPU {cpu:.3f}, wall {wall:.3f}; noise (the "
                     f"run after / before, both without logging) {noise:.3f}; opening {one_off[backend][0]:.2f} s, "
                     f"closing {one_off[backend][1]:.2f} s (once a run)")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed run; the first is warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="where the model runs (tinylab.load_model's device)")
    parser.add_argument("--dtype", default="auto", help="the model's weight dtype (tinylab.load_model's dtype)")
    add_results_option(parser, "grpo")
    parser.add_argument("--tracking-only", action="store_true", help="only ratio 4 (experiment tracking)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    model, tokenizer = load_model(device=device, dtype=dtype)
    adapter = apply_tinylora(model, u=13, n_tie="all")
    task = RandomReward()
    config = GRPOConfig(prompts_per_step=4, group_size=8, max_new_tokens=16, lr=1e-3, steps=args.steps, seed=0)
    pool = task.examples("train", None, 0)
    prompts = [e.prompt for e in pool[:4]]
    header = (f"SmolLM2-135M on {device} in {dtype}, 13 params, 4 prompts x 8 completions, <= 16 new tokens, "
              f"{args.threads} threads, median of {args.steps - 1} steps after warm-up")

    if args.tracking_only:  # ratio 4 alone, into its own results file, grpo_tracking.txt (see __main__)
        backends = [b for b in ("trackio", "tensorboard", "wandb") if importlib.util.find_spec(b) is not None]
        os.environ["WANDB_MODE"] = "offline"  # benchmark runs are not uploaded anywhere
        with tempfile.TemporaryDirectory(prefix="bench-tracking-") as folder:
            tracking = tracking_cost(model, tokenizer, adapter, task, config, backends, folder)
        print(header)
        print("\n".join(tracking))
        return

    # Our loop (steps after the first; the first includes one-off warm-up)
    run = train_grpo(model, tokenizer, adapter, task,
                     GRPOConfig(**{**config.__dict__, "checkpoint_dir": tempfile.mkdtemp(prefix="bench-grpo-")}))
    logs = run.logs[1:]
    ours = statistics.median(log.step_time for log in logs)
    ours_gen = statistics.median(log.gen_time for log in logs)
    ours_fb = statistics.median(log.fwd_bwd_time for log in logs)
    ours_tokens = statistics.mean(log.completion_len for log in logs) * 32

    # Baseline: base-model generation of the same group + one plain fwd/bwd, same number of repeats
    base = [base_step_time(model, tokenizer, adapter, prompts, config, seed=s) for s in range(args.steps)][1:]
    base_gen = statistics.median(b[0] for b in base)
    base_fb = statistics.median(b[1] for b in base)
    base_tokens = statistics.mean(b[2] for b in base)

    # Merging for generation: same prompts, adapter active vs merged (in-place merge, timing only)
    adapter.set_vector(torch.full((13,), 0.01))
    times = {"active": [], "merged": []}
    for s in range(3):
        t0 = time.perf_counter()
        generate(model, tokenizer, prompts, n=8, max_new_tokens=16, seed=s)
        times["active"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        adapter.merge()
        generate(model, tokenizer, prompts, n=8, max_new_tokens=16, seed=s)
        adapter.unmerge()
        times["merged"].append(time.perf_counter() - t0)
    adapter.set_vector(torch.zeros(13))

    # TRL GRPOTrainer on the same model, adapter, batch and token limit
    from tinylab.interop.trl_bridge import grpo_trainer

    trainer = grpo_trainer(model, tokenizer, adapter, task, config, output_dir=tempfile.mkdtemp(prefix="bench-trl-"))
    trainer.train()
    trl_logs = trainer.tinylab_logs.logs[1:]
    trl = statistics.median(log.step_time for log in trl_logs)
    trl_tokens = statistics.mean(log.completion_len for log in trl_logs) * 32
    (flops, flop_tokens), (trl_flops, trl_flop_tokens) = step_flops(model, tokenizer, adapter, task, config)

    print(header)
    print(f"our step            {ours:7.2f} s  (generation {ours_gen:.2f} s, fwd/bwd {ours_fb:.2f} s, "
          f"{ours_tokens:.0f} completion tokens)")
    print(f"base gen + fwd/bwd  {base_gen + base_fb:7.2f} s  (generation {base_gen:.2f} s, fwd/bwd {base_fb:.2f} s, "
          f"{base_tokens:.0f} completion tokens)")
    print(f"TRL GRPOTrainer     {trl:7.2f} s  ({trl_tokens:.0f} completion tokens)")
    for name, ratio, goal in (("our step / (base gen + fwd/bwd)", ours / (base_gen + base_fb), 1.15),
                              ("our step / TRL step            ", ours / trl, 0.3)):
        print(f"ratio {name} = {ratio:.2f}   (goal <= {goal}: {'met' if round(ratio, 2) <= goal else 'NOT MET'})")
    print(f"FLOPs our step / TRL step             = {flops / trl_flops:.3f}   (matrix products of one untimed step each: "
          f"{flops / 1e9:.0f} vs {trl_flops / 1e9:.0f} GFLOP, {flop_tokens:.0f} vs {trl_flop_tokens:.0f} completion "
          "tokens; the time ratio at equal speed per FLOP)")
    print(f"ratio generation merged / unmerged    = "
          f"{statistics.median(times['merged']) / statistics.median(times['active']):.2f}   "
          f"(merge+unmerge included; < 1 means merging helps)")


if __name__ == "__main__":
    with results_file(results_name("grpo_tracking" if "--tracking-only" in sys.argv else "grpo")):
        main()
