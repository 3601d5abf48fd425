"""GRPO on the adapter's trained vectors: one loop, read it top to bottom.

How this departs from textbook GRPO (Shao et al. 2024), nanochat `chat_rl.py` style:

- Only the TinyLoRA vectors train (fp32 Adam, no weight decay, no gradient clipping); every
  other weight is frozen and stays bit-identical.
- Token-level loss (DAPO / Dr. GRPO): the policy term is summed over all completion tokens of the
  batch and divided by their total count, not averaged per sequence first.
- `scale_rewards="none"` drops the division by the group's reward std (Dr. GRPO).
- Default on-policy single update (`clip=None, inner_epochs=1`): the ratio is exactly 1, so the
  loss is plain REINFORCE with group-mean baseline. With `clip`, PPO's clipped surrogate over
  `inner_epochs` passes on the same batch; "old" log-probs are the first pass's, detached (no
  extra forward pass). Generation log-probs are never used: sampling and training run the same
  model, so there is no mismatch to correct.
- KL (`kl > 0`): the k3 estimator against the reference = the same model with the adapter
  disabled (`adapter.disabled()`), never a copy. Default 0, as in the TinyLoRA paper.
- Groups whose rewards are all equal have zero advantage; with `kl = 0` their rows are left out
  of forward/backward (their gradient is exactly zero; the token count still includes them, so
  the update is the same as computing them). A step where no group has spread makes no update
  at all (an Adam step on a zero gradient would still move v by momentum). Each group's shared prompt runs through the model
  once in the training forward too (`completion_logprobs(..., group_size=G)`).
- Sampling is seeded per step from (config.seed, step): prompts by a seeded shuffle of the train
  pool per epoch, completions by a private generator. A resumed run repeats an uninterrupted one.
- A `None` reward counts as 0.0; a NaN/inf reward stops the run (`NonFiniteError`) with the last
  finite state checkpointed. A vector that is NaN/inf before step 1 is refused (`ValueError`).
- Any device, any dtype: every tensor is made on the model's device; rewards, advantages,
  log-probabilities and the loss are fp32 whatever the model's dtype (bf16 logits are cast before
  the log-softmax); the trained vectors and Adam's state stay fp32.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable

import torch

from tinylab import tasks
from tinylab.basics.checks import check_choice, check_int, check_number
from tinylab.basics.seeds import derived_seed
from tinylab.model.batch import render_prompts
from tinylab.model.device import model_device
from tinylab.model.generation import completion_logprobs, generate, stop_token_ids
from tinylab.train.loop_config import LoopConfig
from tinylab.train.records import step_log
from tinylab.train.run import Run, launch, register_loop, step_indices

__all__ = ["GRPOConfig", "group_advantages", "policy_loss", "train_grpo", "train_pool"]

_SCALES = ("group", "none")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(LoopConfig):
    """How GRPO trains the adapter. `dataclasses.replace(config, lr=3e-3)` is the sweep API.

    Checkpointing and tracking (`checkpoint_every`, `checkpoint_dir`, `report_to`, `project`, `run_name`,
    `run_group`, `tracking_dir`) are `LoopConfig`'s keyword-only fields."""

    prompts_per_step: int = 4
    """Distinct prompts sampled each step (>= 1)."""
    group_size: int = 8
    """Completions per prompt; advantages are computed within each group (>= 2)."""
    max_new_tokens: int | None = None
    """Longest completion in tokens (>= 1), None = the task's `max_new_tokens`; EOS also ends one."""
    temperature: float = 1.0
    """Sampling temperature (> 0, at most 10); log-probabilities use the same temperature."""
    lr: float = 1e-2
    """Adam learning rate on the trained vectors (> 0, at most 10). A few scalars need large steps."""
    steps: int = 20
    """Optimizer steps in the whole run (>= 1); `resume` continues up to this number."""
    seed: int = 0
    """Seeds prompt order and sampling, per step; same seed, same run."""
    scale_rewards: str = "group"
    """"group": advantage = (r - group mean) / (group std + 1e-4); "none": r - group mean (Dr. GRPO)."""
    clip: float | None = None
    """None: no ratio clipping; else PPO's epsilon in (0, 1), e.g. 0.2."""
    inner_epochs: int = 1
    """Updates per batch of completions (>= 1); more than 1 needs `clip`."""
    kl: float = 0.0
    """Coefficient of the KL penalty to the adapter-disabled model (>= 0; 0 skips the reference pass)."""

    def __post_init__(self):
        super().__post_init__()
        if self.max_new_tokens is not None:
            _or_none(check_int, "max_new_tokens", self.max_new_tokens, low=1)
        for name, low in (("prompts_per_step", 1), ("group_size", 2), ("steps", 1),
                          ("inner_epochs", 1)):
            check_int(name, getattr(self, name), low=low)
        check_number("temperature", self.temperature, low=0, low_open=True, high=10)
        check_number("lr", self.lr, low=0, low_open=True, high=10)
        check_int("seed", self.seed)
        check_choice("scale_rewards", self.scale_rewards, _SCALES)
        if self.clip is not None:
            _or_none(check_number, "clip", self.clip, low=0, high=1, low_open=True, high_open=True)
        if self.inner_epochs > 1 and self.clip is None:
            raise ValueError(f"inner_epochs={self.inner_epochs} needs clip (e.g. clip=0.2): several unclipped "
                             "updates on one batch diverge; allowed without clip: inner_epochs=1")
        check_number("kl", self.kl, low=0)


def _or_none(check, name: str, value, **bounds) -> None:
    """`check(name, value, **bounds)` whose error also says that None is allowed."""
    try:
        check(name, value, **bounds)
    except ValueError as err:
        raise ValueError(f"{err}, or None") from None


def train_pool(task, seed: int, split: str = "train") -> list:
    """All of `task`'s (a Task or its name) examples of `split` (seeded order): the pool a run draws its
    prompts from."""
    task = tasks.resolve(task)
    pool = list(task.examples(split, None, seed))
    if not pool:
        raise ValueError(f"task {getattr(task, 'name', task)!r} gave no {split!r} examples; it needs at least one")
    return pool


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """(r - group mean), divided by (group std + 1e-4) when scale == "group". [B*G] -> [B*G] fp32,
    on the rewards' device."""
    r = rewards.to(torch.float32).view(-1, group_size)  # [B, G]
    adv = r - r.mean(dim=1, keepdim=True)  # [B, G]
    if scale == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + 1e-4)
    return adv.reshape(-1)  # [B*G]


def policy_loss(logp, old_logp, ref_logp, advantages, mask, n_tokens, config):
    """Token-level GRPO loss summed over `mask` and divided by `n_tokens`, with detached stats.

    logp / old_logp / ref_logp (or None): [N, L]; advantages: [N]; mask: [N, L]. Computed in fp32
    whatever the dtype of the inputs. With `config.clip`, PPO's pessimistic bound: a token whose
    ratio left [1 - clip, 1 + clip] in the direction its advantage pushes (above for A > 0, below for
    A < 0) contributes a constant, so no gradient; `clip_frac` is the share of such tokens.
    """
    logp, old_logp = logp.float(), old_logp.float()  # [N, L]
    ratio = torch.exp(logp - old_logp)  # [N, L]
    adv = advantages.float()[:, None]  # [N, 1]
    per_token = -ratio * adv  # [N, L]
    clipped = torch.zeros_like(ratio, dtype=torch.bool)  # [N, L]
    if config.clip is not None:
        bounded = torch.clamp(ratio, 1 - config.clip, 1 + config.clip) * adv  # [N, L]
        per_token = -torch.minimum(ratio * adv, bounded)  # [N, L]
        clipped = (ratio * adv) > bounded  # [N, L]
    kl = torch.zeros_like(per_token)  # [N, L]
    if ref_logp is not None:
        delta = ref_logp.float() - logp  # [N, L]
        kl = torch.exp(delta) - delta - 1  # [N, L] k3 estimator, >= 0
        per_token = per_token + config.kl * kl
    m = mask.to(torch.float32)  # [N, L]
    loss = (per_token * m).sum() / n_tokens
    count = m.sum().clamp(min=1)
    stats = {"kl": float((kl.detach() * m).sum() / count) if ref_logp is not None else math.nan,
             "clip_frac": float((clipped & mask.bool()).sum() / count) if config.clip is not None else math.nan}
    return loss, stats


def _rewards(task, completions, answers, device: torch.device) -> torch.Tensor:
    raw = task.reward(completions, answers)
    if len(raw) != len(completions):
        raise ValueError(f"task {task.name!r} returned {len(raw)} rewards for {len(completions)} completions")
    return torch.tensor([0.0 if r is None else float(r) for r in raw], dtype=torch.float32, device=device)  # [B*G]


def _score_rates(task, completions, answers) -> tuple[float, float]:
    if not hasattr(task, "score"):
        return math.nan, math.nan
    scores = [task.score(c, a) for c, a in zip(completions, answers)]
    return (sum(bool(s.formatted) for s in scores) / len(scores),
            sum(bool(s.correct_strict) for s in scores) / len(scores))


def train_grpo(model, tokenizer, adapter, task, config: GRPOConfig, *, callbacks: Iterable = (),
               background: bool = False, start: bool = True) -> Run:
    """Train `adapter`'s vectors with GRPO on `task`; returns the Run (history, status, checkpoint).

    Blocks by default (interrupting the kernel stops cleanly). `background=True` returns at once
    with training in a thread: `run.stop()` from another cell, `run.wait()` to join.
    `start=False` returns the Run before training; then `run.train()` or `run.start()`.
    A vector that is already NaN/inf (e.g. set by hand) is a ValueError before the first step.
    """
    if not isinstance(config, GRPOConfig):
        raise TypeError(f"config must be a GRPOConfig, got {type(config).__name__}")
    return launch("grpo", grpo_body, model, tokenizer, adapter, task, config, callbacks=callbacks,
                  background=background, start=start)


def grpo_body(run: Run, model, tokenizer, adapter, task, config: GRPOConfig) -> None:
    """The GRPO loop for `run` (started by `train_grpo`, continued by `resume`)."""
    pool = train_pool(task, config.seed)
    render_prompts(tokenizer, [pool[0].prompt])  # a missing chat template fails here, before step 1
    device = model_device(model)
    G = config.group_size
    max_new = config.max_new_tokens or getattr(task, "max_new_tokens", 64)
    stops = torch.tensor(stop_token_ids(model, tokenizer), device=device)  # [s] the tokens that end a completion
    for step in run.steps():
        t_step = time.perf_counter()
        # 1. Prompts for this step, from (seed, step) alone.
        batch = [pool[i] for i in step_indices(len(pool), config.prompts_per_step, step, config.seed)]
        answers = [ex.answer for ex in batch for _ in range(G)]

        # 2. A group of G completions per prompt, sampled with the adapter active.
        t0 = time.perf_counter()
        rollout = generate(model, tokenizer, [ex.prompt for ex in batch], n=G, max_new_tokens=max_new,
                           temperature=config.temperature, seed=derived_seed(config.seed, step, "sample"))
        gen_time = time.perf_counter() - t0

        # 3. Rewards, and advantages relative to the group (fp32, on the model's device).
        rewards = _rewards(task, rollout.completions, answers, device)  # [B*G]
        run.check_finite("the reward", rewards)
        advantages = group_advantages(rewards, G, config.scale_rewards)  # [B*G]
        spread = rewards.view(-1, G).std(dim=1) > 0  # [B]

        # 4. Token-level policy loss over completion tokens; backward into v only.
        t0 = time.perf_counter()
        mask = rollout.completion_mask  # [B*G, L]
        n_tokens = mask.sum().clamp(min=1)
        keep = torch.ones_like(spread) if config.kl > 0 else spread  # [B] groups that carry gradient
        rows = keep.repeat_interleave(G).nonzero().squeeze(-1)  # [N] their rows, whole groups
        stats = {"kl": math.nan, "clip_frac": math.nan}
        loss_value = 0.0
        if len(rows) > 0:
            ids, attn, cmask = rollout.input_ids[rows], rollout.attention_mask[rows], mask[rows]  # [N, P+L]
            ref = None
            if config.kl > 0:
                with torch.no_grad(), adapter.disabled():
                    ref = completion_logprobs(model, ids, attn, cmask, temperature=config.temperature,
                                              group_size=G)  # [N, L]
            old = None
            for _ in range(config.inner_epochs):
                logp = completion_logprobs(model, ids, attn, cmask, temperature=config.temperature,
                                           group_size=G)  # [N, L]
                old = logp.detach() if old is None else old
                loss, stats = policy_loss(logp, old, ref, advantages[rows], cmask, n_tokens, config)
                run.check_finite("the loss", loss.detach())
                loss.backward()
                loss_value = float(loss.detach())
                grad_norm = run.optimizer_step()
        else:
            grad_norm = 0.0  # no group carries information: no update (Adam's momentum would still move v)
        fwd_bwd_time = time.perf_counter() - t0

        # 5. Log the step; callbacks may stop the run.
        lengths = mask.sum(1).float()  # [B*G]
        ended = (torch.isin(rollout.completion_ids, stops) & mask.bool()).any(1)  # [B*G] stopped before the limit
        before = run.logs[-1].num_tokens if run.logs else 0.0  # a resumed run counts on from its history
        num_tokens = (0.0 if math.isnan(before) else before) + float(rollout.attention_mask.sum())
        format_rate, correct_rate = _score_rates(task, rollout.completions, answers)
        entropy = float((rollout.token_entropy * mask).sum() / mask.sum().clamp(min=1))  # nats per completion token
        picks = range(0, len(rewards), G)[:4]
        run.record(step_log(
            step + 1, "grpo", loss=loss_value, reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
            zero_spread=float(1 - spread.float().mean()), format_rate=format_rate, correct_rate=correct_rate,
            completion_len=float(lengths.mean()), completion_len_max=int(lengths.max()),
            completion_len_min=float(lengths.min()), clipped_ratio=float(1 - ended.float().mean()),
            num_tokens=num_tokens,
            v_norm=float(adapter.vector().norm()), grad_norm=grad_norm, kl=stats["kl"], clip_frac=stats["clip_frac"],
            entropy=entropy,
            gen_time=gen_time, fwd_bwd_time=fwd_bwd_time, step_time=time.perf_counter() - t_step,
            samples=tuple((rollout.completions[i], float(rewards[i])) for i in picks),
        ))


register_loop("grpo", GRPOConfig, grpo_body)
