"""The records a training loop emits: `StepLog` (one per optimizer step) and the ways a run ends early."""

from __future__ import annotations

from typing import NamedTuple

from tinylab.train.run_folder import unjson_float

__all__ = ["NonFiniteError", "StepLog", "StopTraining", "log_from_json", "step_log"]

_NAN = float("nan")


class StopTraining(Exception):  # noqa: N818 - reads as an instruction, like StopIteration
    """Raise from a callback to end the run cleanly after the current step."""


class NonFiniteError(FloatingPointError):
    """A reward, loss, gradient or vector became NaN/inf; the last finite state was checkpointed."""


class StepLog(NamedTuple):
    """One optimizer step, as sent to every callback and stored in `run.history`. NaN = not measured."""

    step: int  # 1-based number of steps done after this one
    kind: str  # "grpo", "sft" or "trl"
    loss: float
    reward_mean: float
    reward_std: float
    zero_spread: float  # fraction of groups whose rewards were all equal (they teach nothing)
    format_rate: float  # fraction of sampled completions the task scores as well formatted
    correct_rate: float  # fraction scored strictly correct
    completion_len: float  # mean completion length in tokens
    completion_len_max: int
    completion_len_min: float  # shortest completion in tokens
    clipped_ratio: float  # fraction of completions cut at the token limit (no end-of-sequence token)
    num_tokens: float  # prompt and completion tokens sampled so far in the run (padding not counted)
    v_norm: float  # |v| after the step
    grad_norm: float  # |dL/dv| before the step
    kl: float  # mean per-token KL to the adapter-disabled model (GRPO with kl > 0)
    clip_frac: float  # fraction of tokens whose ratio was clipped (GRPO with clip)
    entropy: float  # mean entropy (nats) over completion tokens of the distribution they were sampled from
    gen_time: float  # seconds sampling completions
    fwd_bwd_time: float  # seconds in forward + backward
    step_time: float  # seconds for the whole step
    samples: tuple = ()  # a few (completion, reward) pairs


def step_log(step: int, kind: str, **fields) -> StepLog:
    """A StepLog with NaN for every field a loop did not measure."""
    defaults = dict.fromkeys(StepLog._fields[2:], _NAN)
    defaults.update(completion_len_max=0, samples=())
    defaults.update(fields)
    return StepLog(step, kind, **defaults)


def log_from_json(entry: dict) -> StepLog:
    fields = dict(entry)
    for name in StepLog._fields:
        if name not in ("step", "kind", "samples", "completion_len_max"):
            fields[name] = unjson_float(fields.get(name))
    fields["samples"] = tuple((str(c), unjson_float(r)) for c, r in fields.get("samples") or ())
    return StepLog(**{k: fields[k] for k in StepLog._fields})
