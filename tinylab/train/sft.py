"""SFT at the same parameter budget: next-token loss on the task's reference solutions.

The baseline the TinyLoRA paper compares GRPO against. Same adapter, same Run (stop, checkpoint,
resume), same StepLog stream, so RL and SFT curves share one plot at equal parameter counts.
Each step takes `batch_size` examples by the same seeded per-epoch shuffle as GRPO, renders the
prompt exactly as generation does (chat template + generation prompt), appends the solution and
the end-of-sequence token, and minimises the mean negative log-likelihood of those tokens.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable

from tinylab.basics.checks import check_int, check_number
from tinylab.model.batch import TeacherBatch, teacher_forced_batch
from tinylab.model.device import model_device
from tinylab.model.generation import completion_logprobs
from tinylab.train.grpo import GRPOConfig, train_pool
from tinylab.train.loop_config import LoopConfig, loop_fields
from tinylab.train.records import step_log
from tinylab.train.run import Run, launch, register_loop, step_indices

__all__ = ["SFTConfig", "train_sft"]


@dataclasses.dataclass(frozen=True)
class SFTConfig(LoopConfig):
    """How SFT trains the adapter. `SFTConfig.from_grpo(grpo_config)` matches a GRPO run's budget.

    Checkpointing and tracking are `LoopConfig`'s keyword-only fields, as in `GRPOConfig`."""

    batch_size: int = 4
    """Examples per step (>= 1)."""
    lr: float = 1e-2
    """Adam learning rate on the trained vectors (> 0, at most 10)."""
    steps: int = 20
    """Optimizer steps in the whole run (>= 1)."""
    seed: int = 0
    """Seeds the example order."""
    max_tokens: int = 256
    """Solution tokens kept per example (>= 1); longer solutions are cut."""

    def __post_init__(self):
        super().__post_init__()
        for name, low in (("batch_size", 1), ("steps", 1), ("max_tokens", 1)):
            check_int(name, getattr(self, name), low=low)
        check_number("lr", self.lr, low=0, low_open=True, high=10)
        check_int("seed", self.seed)

    @classmethod
    def from_grpo(cls, config: GRPOConfig, **overrides) -> SFTConfig:
        """Same prompts per step, steps, lr, seed, checkpointing and tracking as a GRPO config."""
        fields = dict(batch_size=config.prompts_per_step, lr=config.lr, steps=config.steps, seed=config.seed,
                      **loop_fields(config))
        fields.update(overrides)
        return cls(**fields)


def _solution_batch(tokenizer, examples, max_tokens: int, device="cpu") -> TeacherBatch:
    """Prompts rendered as generation renders them, then each solution's first `max_tokens` tokens
    and the end-of-sequence token as the continuation to learn, on `device`."""
    eos = tokenizer.eos_token_id
    targets = [tokenizer(ex.solution, add_special_tokens=False)["input_ids"][:max_tokens]
               + ([eos] if eos is not None else []) for ex in examples]
    return teacher_forced_batch(tokenizer, [ex.prompt for ex in examples], targets, device)


def train_sft(model, tokenizer, adapter, task, config: SFTConfig | GRPOConfig, *, callbacks: Iterable = (),
              background: bool = False, start: bool = True) -> Run:
    """Train `adapter`'s vectors on `task`'s reference solutions; returns the Run.

    A GRPOConfig is accepted and converted with `SFTConfig.from_grpo`. A vector that is already
    NaN/inf (e.g. set by hand) is a ValueError before the first step.
    """
    if isinstance(config, GRPOConfig):
        config = SFTConfig.from_grpo(config)
    if not isinstance(config, SFTConfig):
        raise TypeError(f"config must be an SFTConfig (or a GRPOConfig), got {type(config).__name__}")
    return launch("sft", sft_body, model, tokenizer, adapter, task, config, callbacks=callbacks,
                  background=background, start=start)


def sft_body(run: Run, model, tokenizer, adapter, task, config: SFTConfig) -> None:
    """The SFT loop for `run` (started by `train_sft`, continued by `resume`)."""
    device = model_device(model)
    pool = train_pool(task, config.seed)
    missing = [i for i, ex in enumerate(pool) if not getattr(ex, "solution", None)]
    if missing:
        raise ValueError(f"task {task.name!r} gives no reference solution for {len(missing)} of {len(pool)} "
                         "train examples; SFT needs Example.solution")
    for step in run.steps():
        t_step = time.perf_counter()
        batch = [pool[i] for i in step_indices(len(pool), config.batch_size, step, config.seed)]
        ids, attn, target_mask = _solution_batch(tokenizer, batch, config.max_tokens, device)  # [B, P+L], [B, L]

        t0 = time.perf_counter()
        logp = completion_logprobs(model, ids, attn, target_mask)  # [B, L] fp32
        loss = -logp.sum() / target_mask.sum()  # fp32 mean negative log-likelihood per solution token
        run.check_finite("the loss", loss.detach())
        loss.backward()
        grad_norm = run.optimizer_step()
        fwd_bwd_time = time.perf_counter() - t0

        lengths = target_mask.sum(1).float()  # [B]
        run.record(step_log(
            step + 1, "sft", loss=float(loss.detach()), completion_len=float(lengths.mean()),
            completion_len_max=int(lengths.max()), completion_len_min=float(lengths.min()),
            v_norm=float(adapter.vector().norm()), grad_norm=grad_norm,
            gen_time=0.0, fwd_bwd_time=fwd_bwd_time, step_time=time.perf_counter() - t_step,
        ))


register_loop("sft", SFTConfig, sft_body)
