import contextlib
import dataclasses
import math

import pytest
import torch
from testkit import HYBRID_ARCHS, Example, WordTask, arch_model

from tinylab.adapter.attach import apply_tinylora
from tinylab.model.tiny import tiny_model
from tinylab.train.grpo import GRPOConfig, group_advantages, policy_loss, train_grpo

CONFIG = GRPOConfig(prompts_per_step=2, group_size=3, max_new_tokens=4, lr=0.05, steps=2, seed=0)


def _setup(arch="llama", **adapter_kw):
    model, tok = arch_model(arch)
    adapter = apply_tinylora(model, **({"u": 4, "n_tie": "all"} | adapter_kw))
    return model, tok, adapter


def _frozen(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("vectors")
            and p.requires_grad is False}


@pytest.mark.parametrize("arch", ["llama", "qwen2", *HYBRID_ARCHS])
def test_train_changes_v_and_nothing_else(arch, tmp_path):
    model, tok, adapter = _setup(arch)
    before = _frozen(model)
    v0 = adapter.vector()
    run = train_grpo(model, tok, adapter, WordTask(), dataclasses.replace(CONFIG, checkpoint_dir=str(tmp_path)))
    assert run.status == "finished" and run.step == 2
    assert not torch.equal(adapter.vector(), v0)
    after = dict(model.named_parameters())
    assert before and all(torch.equal(before[n], after[n]) for n in before)
    assert not any(m.merged_R is not None for _, m in adapter.named_modules())


class RecordingToyTask(WordTask):
    """WordTask that keeps every batch of completions it scores, to recompute the step logs."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def reward(self, completions, answers, **kwargs):
        self.batches.append((list(completions), list(answers)))
        return super().reward(completions, answers)


def test_step_log_and_history(tmp_path):
    model, tok, adapter = _setup()
    seen = []
    task = RecordingToyTask()
    run = train_grpo(model, tok, adapter, task, dataclasses.replace(CONFIG, checkpoint_dir=str(tmp_path)),
                     callbacks=[seen.append])
    assert [s.step for s in seen] == [1, 2]
    df = run.history
    assert list(df["step"]) == [1, 2] and set(df["kind"]) == {"grpo"}
    for log, (completions, answers) in zip(seen, task.batches):  # each field recomputed from what was sampled
        rewards = [len(set(c)) / 10 for c in completions]
        groups = [rewards[i:i + CONFIG.group_size] for i in range(0, len(rewards), CONFIG.group_size)]
        scores = [task.score(c, a) for c, a in zip(completions, answers)]
        assert log.reward_mean == pytest.approx(sum(rewards) / len(rewards), rel=1e-6)
        assert log.zero_spread == pytest.approx(sum(len(set(g)) == 1 for g in groups) / len(groups))
        assert log.format_rate == pytest.approx(sum(s.formatted for s in scores) / len(scores))
        assert log.correct_rate == pytest.approx(sum(s.correct_strict for s in scores) / len(scores))
        assert [c for c, _ in log.samples] == completions[::CONFIG.group_size]
    log = seen[-1]
    assert 1 <= log.completion_len <= log.completion_len_max <= 4
    assert log.gen_time > 0 and log.fwd_bwd_time > 0 and log.step_time >= log.gen_time + log.fwd_bwd_time
    assert math.isclose(log.v_norm, float(adapter.vector().norm()), rel_tol=1e-6)
    assert log.grad_norm > 0 and math.isfinite(log.loss)
    assert math.isnan(log.kl) and math.isnan(log.clip_frac)  # not measured with kl = 0 and no clip


def test_completion_lengths_and_the_share_cut_at_the_limit(tmp_path, monkeypatch):
    import tinylab.train.grpo as grpo

    model, tok, adapter = _setup()
    model.generation_config.eos_token_id = list(range(0, model.config.vocab_size, 4))  # a quarter of tokens end one
    rollouts = []

    def spy(*args, **kwargs):
        rollouts.append(generate(*args, **kwargs))
        return rollouts[-1]

    generate = grpo.generate
    monkeypatch.setattr(grpo, "generate", spy)
    seen = []
    train_grpo(model, tok, adapter, RecordingToyTask(), dataclasses.replace(CONFIG, checkpoint_dir=str(tmp_path)),
               callbacks=[seen.append])
    limit, stops = CONFIG.max_new_tokens, torch.tensor(sorted(set(range(0, model.config.vocab_size, 4)) | {tok.eos_token_id}))
    total = 0
    for log, rollout in zip(seen, rollouts, strict=True):
        total += int(rollout.prompt_mask.sum() + rollout.completion_mask.sum())  # TRL's num_tokens: no padding
        assert log.num_tokens == total
        lengths = rollout.completion_mask.sum(1)
        last = rollout.completion_ids.gather(1, (lengths - 1)[:, None]).squeeze(1)  # each completion's last token
        cut = (lengths == limit) & ~torch.isin(last, stops)  # at the limit without ending on a stop token
        assert log.clipped_ratio == pytest.approx(float(cut.float().mean()))
        assert log.completion_len_min == float(lengths.min()) and log.completion_len_max == int(lengths.max())
        mask = rollout.completion_mask  # the entropy of the sampling distribution, over completion tokens
        assert log.entropy == pytest.approx(float((rollout.token_entropy * mask).sum() / mask.sum()), rel=1e-6)
        assert 0 < log.entropy <= math.log(model.config.vocab_size)
    assert 0 < sum(log.clipped_ratio for log in seen) < len(seen)  # both kinds occurred


def test_kl_and_clip_with_inner_epochs(tmp_path):
    model, tok, adapter = _setup()
    before = _frozen(model)
    cfg = dataclasses.replace(CONFIG, kl=0.1, clip=0.2, inner_epochs=2, lr=2.0, checkpoint_dir=str(tmp_path))
    run = train_grpo(model, tok, adapter, WordTask(), cfg)
    # the stats are the last inner pass's: after one update at lr 2 the policy differs from the
    # reference (kl > 0) and some ratios left [0.8, 1.2] in their advantage's direction (clip_frac > 0;
    # at lr 0.5 none do on this model and seed)
    assert all(log.kl > 0 and log.clip_frac > 0 for log in run.logs)
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


def test_policy_loss_is_token_level():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([1.0, -2.0])
    cfg = GRPOConfig()
    loss, stats = policy_loss(logp, logp.detach(), None, adv, mask, mask.sum(), cfg)
    assert math.isclose(float(loss), -(1 + 1 - 2) / 3)  # ratio 1: -(sum of A over tokens) / tokens
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 3, -1 / 3, 0], [2 / 3, 0, 0]]))


@pytest.mark.parametrize("advantage", [1.5, -1.5])
def test_clipping_acts_only_where_the_ratio_left_the_range_in_the_advantage_direction(advantage):
    """PPO's bound with eps = 0.2: a token whose ratio is above 1.2 with A > 0 (or below 0.8 with
    A < 0) gets no gradient; every other token, also one outside the range on the other side, gets
    d/dlogp (-ratio * A) / n = -ratio * A / n."""
    ratios = torch.tensor([[0.5, 0.79, 0.9, 1.0, 1.1, 1.21, 1.5]])  # [1, 7]: 2 below, 3 inside, 2 above
    old = torch.full_like(ratios, -1.0)  # [1, 7]
    logp = (old + ratios.log()).requires_grad_(True)  # [1, 7]
    mask = torch.ones_like(ratios, dtype=torch.long)  # [1, 7]
    adv = torch.tensor([advantage])  # [1]
    loss, stats = policy_loss(logp, old, None, adv, mask, mask.sum(), GRPOConfig(clip=0.2))
    (grad,) = torch.autograd.grad(loss, logp)
    clipped = ratios > 1.2 if advantage > 0 else ratios < 0.8  # [1, 7]
    assert clipped.sum() == 2 and (grad[clipped] == 0).all()
    torch.testing.assert_close(grad[~clipped], -ratios[~clipped] * advantage / 7)
    assert stats["clip_frac"] == pytest.approx(2 / 7)
    # the same tokens without clipping: every gradient is -ratio * A / n, none is zero
    loss, stats = policy_loss(logp, old, None, adv, mask, mask.sum(), GRPOConfig())
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -ratios * advantage / 7)
    assert math.isnan(stats["clip_frac"])


def test_policy_loss_is_fp32_for_bf16_inputs():
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.long)
    loss, _ = policy_loss(logp, logp.detach() - 0.1, logp.detach(), torch.tensor([1.0], dtype=torch.bfloat16),
                          mask, mask.sum(), GRPOConfig(clip=0.2, kl=0.1))
    assert loss.dtype == torch.float32
    loss.backward()
    assert logp.grad.dtype == torch.bfloat16 and (logp.grad != 0).all()


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
        train_grpo(model, tok, adapter, WordTask(), {"lr": 1})
    other, _ = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="not attached to this model"):
        train_grpo(other, tok, adapter, WordTask(), dataclasses.replace(CONFIG, checkpoint_dir=str(tmp_path)))


class TopToken:
    """A one-token task on a tiny model: the reply is or is not the token the untrained model likes most.

    `prefer=True` rewards that token, `prefer=False` every other one. At temperature 0.07 the
    untrained tiny llama (seed 0) gives it about half the probability on each prompt, so most groups
    of 8 have spread from step 1 and the exact expected reward, P(top token), is read off the logits
    with no sampling noise. The test asks for both directions, which a drift of v cannot fake: a
    random move of v tends to lower P(top) (the top token has the most mass to lose), so P(top)
    rising under `prefer=True` is GRPO following its reward. `prefer=False` alone would be too easy.
    """

    max_new_tokens = 1
    PROMPTS = ["Say a word.", "Name a thing."]

    def __init__(self, tok, top_ids, prefer: bool):
        self.name = "prefer-top" if prefer else "avoid-top"
        self.answers = [tok.decode([int(t)]) for t in top_ids]
        self.prefer = prefer

    def examples(self, split, n, seed):
        return [Example(p, a) for p, a in zip(self.PROMPTS, self.answers)]

    def reward(self, completions, answers, **kwargs):
        return [float((c == a) == self.prefer) for c, a in zip(completions, answers)]


def _top_token_probability(model, tok, ids=None, temperature=0.07):
    """P(the untrained model's top token) per prompt at `temperature`, and the top ids."""
    from tinylab.model.batch import left_pad, pad_token_id, prompt_rows

    prompt_ids, mask = left_pad(prompt_rows(tok, TopToken.PROMPTS), pad_token_id(tok))  # [2, P]
    with torch.no_grad():
        probs = (model(input_ids=prompt_ids, attention_mask=mask).logits[:, -1].float() / temperature).softmax(-1)
    ids = probs.argmax(-1) if ids is None else ids  # [2]
    return probs.gather(1, ids[:, None]).squeeze(1), ids  # [2], [2]


@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_raises_the_mean_reward_in_the_direction_it_is_rewarded(seed, tmp_path):
    model, tok = tiny_model("llama", seed=0)
    p_before, top = _top_token_probability(model, tok)
    assert 0.25 < float(p_before.mean()) < 0.75  # the reward is neither out of reach nor already earned
    cfg = GRPOConfig(prompts_per_step=2, group_size=8, max_new_tokens=1, temperature=0.07, lr=0.1, steps=8,
                     seed=seed)
    after = {}
    for prefer in (True, False):
        model, tok = tiny_model("llama", seed=0)
        adapter = apply_tinylora(model, u=4, n_tie=1)
        task = TopToken(tok, top, prefer)
        run = train_grpo(model, tok, adapter, task, dataclasses.replace(cfg, checkpoint_dir=str(tmp_path / task.name)))
        assert run.status == "finished"
        after[prefer] = float(_top_token_probability(model, tok, top)[0].mean())
    before = float(p_before.mean())
    assert after[True] > before + 0.1  # rewarded for the top token: more of it
    assert after[False] < before - 0.3  # rewarded for anything else: less of it


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_vector_is_refused_before_the_first_step(bad, tmp_path):
    model, tok, adapter = _setup()
    v = torch.zeros(adapter.num_params)
    v[2] = bad
    adapter.set_vector(v)
    with pytest.raises(ValueError, match=rf"vector v is not finite: 1 of 4 entries are NaN/inf \(at \[2\]: \[{bad}\]\)"):
        train_grpo(model, tok, adapter, WordTask(), dataclasses.replace(CONFIG, checkpoint_dir=str(tmp_path / "a")))
    assert not (tmp_path / "a").exists()  # refused before the run folder was made
    adapter.set_vector(torch.zeros(adapter.num_params))
    run = train_grpo(model, tok, adapter, WordTask(), dataclasses.replace(CONFIG, checkpoint_dir=str(tmp_path / "b")),
                     start=False)
    adapter.set_vector(v)  # set by hand between making the Run and training it
    with pytest.raises(ValueError, match="vector v is not finite"):
        run.train()
    assert run.status == "created" and run.step == 0


@pytest.mark.parametrize("where", ["gpu_stand_in", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_grpo_makes_every_tensor_on_the_model_device(where, dtype, gpu_stand_in, tmp_path):
    """On the GPU stand-in (a tensor made without device= lands on meta and fails) and on CUDA."""
    model, tok = tiny_model("llama", seed=0, dtype=dtype)
    adapter = apply_tinylora(model.to("cuda" if where == "cuda" else "cpu"), u=4, n_tie="all")
    with gpu_stand_in() if where == "gpu_stand_in" else contextlib.nullcontext():
        run = train_grpo(model, tok, adapter, WordTask(), dataclasses.replace(CONFIG, checkpoint_dir=str(tmp_path)))
    assert run.status == "finished" and run.step == 2 and all(math.isfinite(log.loss) for log in run.logs)
    assert adapter.vector().abs().sum() > 0
    assert all(v.dtype == torch.float32 for v in adapter.parameters())  # the trained vector stays fp32
