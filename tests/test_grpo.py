import dataclasses
import math
import random
from typing import NamedTuple

import pytest
import torch

from tinylab.adapter import apply_tinylora
from tinylab.grpo import GRPOConfig, group_advantages, policy_loss, train_grpo
from tinylab.models import tiny_model


class Example(NamedTuple):
    prompt: object
    answer: str
    solution: str | None = None


class Score(NamedTuple):
    formatted: bool
    correct_strict: bool
    correct_flexible: bool
    extracted: str | None


class ToyTask:
    """Follows the Task protocol; rewards the number of distinct characters (always some spread)."""

    name = "toy"
    max_new_tokens = 6
    WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "peach"]

    def __init__(self, nan_on_call: int | None = None):
        self.calls = 0
        self.nan_on_call = nan_on_call

    def examples(self, split, n, seed):
        words = self.WORDS[:6] if split == "train" else self.WORDS[6:]
        rng = random.Random(seed)
        words = rng.sample(words, len(words))[:n]  # n=None: all
        return [Example([{"role": "user", "content": f"Say {w}."}], w, f"{w}.") for w in words]

    def reward(self, completions, answers, **kwargs):
        self.calls += 1
        if self.calls == self.nan_on_call:
            return [math.nan] * len(completions)
        return [len(set(c)) / 10 for c in completions]

    def score(self, completion, answer):
        first = completion.strip().split("\n")[0] if completion.strip() else ""
        return Score(bool(first), first == answer, answer in completion, first or None)


CONFIG = GRPOConfig(prompts_per_step=2, group_size=3, max_new_tokens=4, lr=0.05, steps=2, seed=0)


def _setup(arch="llama", **adapter_kw):
    model, tok = tiny_model(arch, seed=0)
    adapter = apply_tinylora(model, **({"u": 4, "n_tie": "all"} | adapter_kw))
    return model, tok, adapter


def _frozen(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("vectors")
            and p.requires_grad is False}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_train_changes_v_and_nothing_else(arch, tmp_path):
    model, tok, adapter = _setup(arch)
    before = _frozen(model)
    v0 = adapter.vector()
    run = train_grpo(model, tok, adapter, ToyTask(), dataclasses.replace(CONFIG, checkpoint_dir=str(tmp_path)))
    assert run.status == "finished" and run.step == 2
    assert not torch.equal(adapter.vector(), v0)
    after = dict(model.named_parameters())
    assert before and all(torch.equal(before[n], after[n]) for n in before)
    assert not any(m.merged_R is not None for _, m in adapter.named_modules())


def test_step_log_and_history(tmp_path):
    model, tok, adapter = _setup()
    seen = []
    run = train_grpo(model, tok, adapter, ToyTask(), dataclasses.replace(CONFIG, checkpoint_dir=str(tmp_path)),
                     callbacks=[seen.append])
    assert [s.step for s in seen] == [1, 2]
    df = run.history
    assert list(df["step"]) == [1, 2] and set(df["kind"]) == {"grpo"}
    log = seen[-1]
    assert 0 <= log.zero_spread <= 1 and 0 <= log.format_rate <= 1 and 0 <= log.correct_rate <= 1
    assert 1 <= log.completion_len <= log.completion_len_max <= 4
    assert log.gen_time > 0 and log.fwd_bwd_time > 0 and log.step_time >= log.gen_time + log.fwd_bwd_time
    assert math.isclose(log.v_norm, float(adapter.vector().norm()), rel_tol=1e-6)
    assert log.grad_norm > 0 and math.isfinite(log.loss)
    assert len(log.samples) == 2 and all(isinstance(c, str) and isinstance(r, float) for c, r in log.samples)
    assert math.isnan(log.kl)  # not measured with kl = 0


def test_kl_and_clip_with_inner_epochs(tmp_path):
    model, tok, adapter = _setup()
    before = _frozen(model)
    cfg = dataclasses.replace(CONFIG, kl=0.1, clip=0.2, inner_epochs=2, checkpoint_dir=str(tmp_path))
    run = train_grpo(model, tok, adapter, ToyTask(), cfg)
    log = run.logs[-1]
    assert log.kl >= 0 and 0 <= log.clip_frac <= 1
    assert run.optimizer.state_dict()["state"][0]["step"] == 4  # 2 steps x 2 inner epochs
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    none = group_advantages(r, 3, "none")
    assert none.dtype == torch.float32  # advantages are fp32 whatever the rewards' dtype
    torch.testing.assert_close(none, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0]))
    group = group_advantages(r.bfloat16(), 3, "group")
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert group.dtype == torch.float32 and math.isclose(float(group[0]), (2 / 3) / (std + 1e-4), rel_tol=1e-6)
    assert (group[3:] == 0).all()


def test_policy_loss_is_token_level_and_clips():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([1.0, -2.0])
    cfg = GRPOConfig()
    loss, stats = policy_loss(logp, logp.detach(), None, adv, mask, mask.sum(), cfg)
    assert math.isclose(float(loss), -(1 + 1 - 2) / 3)  # ratio 1: -(sum of A over tokens) / tokens
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 3, -1 / 3, 0], [2 / 3, 0, 0]]))
    old = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, 0.0, 0.0]])  # first token's ratio e^0.5 > 1 + 0.2
    logp.grad = None
    loss, stats = policy_loss(logp, old, None, adv, mask, mask.sum(), dataclasses.replace(cfg, clip=0.2))
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0 and stats["clip_frac"] == pytest.approx(1 / 3)


def test_dropping_zero_advantage_rows_gives_the_same_gradient():
    """What the loop does with kl = 0: rows of groups with equal rewards are skipped."""
    torch.manual_seed(0)
    logits = torch.randn(4, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    adv = torch.tensor([0.5, 0.0, -0.5, 0.0])
    cfg = GRPOConfig()
    full, _ = policy_loss(logits, logits.detach(), None, adv, mask, mask.sum(), cfg)
    (g_full,) = torch.autograd.grad(full, logits)
    rows = (adv != 0).nonzero().squeeze(-1)
    part, _ = policy_loss(logits[rows], logits.detach()[rows], None, adv[rows], mask[rows], mask.sum(), cfg)
    (g_part,) = torch.autograd.grad(part, logits)
    torch.testing.assert_close(g_full, g_part)


@pytest.mark.parametrize("field, value, message", [
    ("prompts_per_step", 0, "prompts_per_step=0: must be an integer >= 1"),
    ("group_size", 1, "group_size=1: must be an integer >= 2"),
    ("max_new_tokens", 0, "max_new_tokens=0: must be an integer >= 1, or None"),
    ("temperature", 0.0, "temperature=0.0: must be a finite number > 0 and <= 10"),
    ("lr", -1.0, "lr=-1.0: must be a finite number > 0 and <= 10"),
    ("lr", float("nan"), "lr=nan: must be a finite number"),
    ("steps", 2.5, "steps=2.5: must be an integer >= 1"),
    ("steps", True, "steps=True: must be an integer"),
    ("scale_rewards", "batch", "scale_rewards='batch': allowed values are 'group', 'none'"),
    ("clip", 1.5, "clip=1.5: must be a finite number > 0 and < 1, or None"),
    ("inner_epochs", 2, "inner_epochs=2 needs clip"),
    ("kl", -0.1, "kl=-0.1: must be a finite number >= 0"),
    ("checkpoint_every", -1, "checkpoint_every=-1: must be an integer >= 0"),
    ("seed", "x", "seed='x': must be an integer"),
])
def test_config_errors_name_value_and_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**{field: value})


def test_wrong_arguments(tmp_path):
    model, tok, adapter = _setup()
    with pytest.raises(TypeError, match="GRPOConfig"):
        train_grpo(model, tok, adapter, ToyTask(), {"lr": 1})
    other, _ = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="attached to model"):
        train_grpo(other, tok, adapter, ToyTask(), dataclasses.replace(CONFIG, checkpoint_dir=str(tmp_path)))
