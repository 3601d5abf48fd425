import contextlib
import dataclasses
import math

import pytest
import torch
from testkit import Example, WordTask

from tinylab import resume
from tinylab.adapter.attach import apply_tinylora
from tinylab.model.tiny import tiny_model
from tinylab.train.grpo import GRPOConfig
from tinylab.train.records import StopTraining
from tinylab.train.sft import SFTConfig, _solution_batch, train_sft


def _fresh():
    model, tok = tiny_model("llama", seed=0)
    return model, tok, apply_tinylora(model, u=4, n_tie="all")


class OneExample(WordTask):
    name = "one"

    def examples(self, split, n, seed):
        return [Example([{"role": "user", "content": "Say apple."}], "apple", "apple, apple, apple.")]


def test_sft_lowers_the_loss_and_trains_only_v(tmp_path):
    model, tok, adapter = _fresh()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    cfg = SFTConfig(batch_size=1, lr=0.1, steps=6, checkpoint_dir=str(tmp_path))
    seen = []
    run = train_sft(model, tok, adapter, OneExample(), cfg, callbacks=[seen.append])
    assert run.status == "finished" and [s.kind for s in seen] == ["sft"] * 6
    losses = run.history["loss"].tolist()
    assert losses[-1] < losses[0]
    assert adapter.vector().abs().sum() > 0
    after = dict(model.named_parameters())
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)
    assert seen[0].completion_len == len(tok("apple, apple, apple.", add_special_tokens=False)["input_ids"]) + 1


def test_solution_batch_targets_are_solution_plus_eos():
    _, tok = tiny_model("llama", seed=0)
    examples = [Example([{"role": "user", "content": "Say apple."}], "apple", "apple."),
                Example("a raw prompt", "pear", "a pear, then a much longer solution.")]
    ids, attn, target_mask = _solution_batch(tok, examples, max_tokens=256)
    for i, ex in enumerate(examples):
        row = ids[i, -target_mask.shape[1]:][target_mask[i].bool()]
        assert tok.decode(row[:-1]) == ex.solution and int(row[-1]) == tok.eos_token_id
    assert attn[:, -target_mask.shape[1]:].equal(target_mask)
    assert target_mask[0].sum() != target_mask[1].sum()  # two lengths: the shorter row is right-padded
    cut = _solution_batch(tok, examples, max_tokens=2).continuation_mask  # 2 solution tokens + EOS
    assert cut.shape[1] == 3 and cut.sum(1).tolist() == [3, 3]


def test_sft_accepts_a_grpo_config_and_resumes(tmp_path):
    model, tok, adapter = _fresh()
    full = train_sft(model, tok, adapter, WordTask(),
                     SFTConfig(batch_size=2, steps=3, lr=0.05, checkpoint_dir=str(tmp_path / "a"))).vector

    def stop(log):
        if log.step == 1:
            raise StopTraining

    model, tok, adapter = _fresh()
    grpo_cfg = GRPOConfig(prompts_per_step=2, steps=3, lr=0.05, checkpoint_dir=str(tmp_path / "b"))
    run = train_sft(model, tok, adapter, WordTask(), grpo_cfg, callbacks=[stop])
    assert run.step == 1 and run.config == SFTConfig.from_grpo(grpo_cfg)
    model2, tok2 = tiny_model("llama", seed=0)
    resumed = resume(tmp_path / "b", model2, tok2, WordTask())
    assert resumed.kind == "sft" and resumed.step == 3
    torch.testing.assert_close(resumed.vector, full, atol=1e-6, rtol=0)


def test_sft_needs_solutions(tmp_path):
    class NoSolutions(WordTask):
        def examples(self, split, n, seed):
            return [ex._replace(solution=None) for ex in super().examples(split, n, seed)]

    model, tok, adapter = _fresh()
    with pytest.raises(ValueError, match="no reference solution"):
        train_sft(model, tok, adapter, NoSolutions(), SFTConfig(checkpoint_dir=str(tmp_path)))


def test_sft_config_errors():
    with pytest.raises(ValueError, match="batch_size=0: must be an integer >= 1"):
        SFTConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"lr=0: must be a finite number > 0 and <= 10"):
        SFTConfig(lr=0)
    with pytest.raises(ValueError, match="max_tokens=0: must be an integer >= 1"):
        SFTConfig(max_tokens=0)
    with pytest.raises(TypeError, match="SFTConfig"):
        train_sft(*_fresh(), WordTask(), dataclasses.asdict(SFTConfig()))


def test_non_finite_vector_is_refused_before_the_first_step(tmp_path):
    model, tok, adapter = _fresh()
    adapter.set_vector(torch.tensor([0.0, float("nan"), 0.0, float("-inf")]))
    with pytest.raises(ValueError, match=r"vector v is not finite: 2 of 4 entries are NaN/inf \(at \[1, 3\]"):
        train_sft(model, tok, adapter, WordTask(), SFTConfig(checkpoint_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["gpu_stand_in", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_sft_makes_every_tensor_on_the_model_device(where, dtype, gpu_stand_in, tmp_path):
    """On the GPU stand-in (a tensor made without device= lands on meta and fails) and on CUDA."""
    device = torch.device("cuda" if where == "cuda" else "cpu")
    model, tok = tiny_model("llama", seed=0, dtype=dtype)
    adapter = apply_tinylora(model.to(device), u=4, n_tie="all")
    config = SFTConfig(batch_size=2, steps=2, lr=0.1, checkpoint_dir=str(tmp_path))
    with gpu_stand_in() if where == "gpu_stand_in" else contextlib.nullcontext():
        assert _solution_batch(tok, OneExample().examples("train", None, 0), 8, device).input_ids.device == device
        run = train_sft(model, tok, adapter, OneExample(), config)
    assert run.status == "finished" and run.step == 2 and all(math.isfinite(x) for x in run.history["loss"])
    assert adapter.vector().abs().sum() > 0 and all(v.dtype == torch.float32 for v in adapter.parameters())
