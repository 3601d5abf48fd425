import math

import pytest
import torch
from test_grpo import ToyTask

from tinylab.adapter import apply_tinylora
from tinylab.grpo import GRPOConfig
from tinylab.models import tiny_model
from tinylab.run import StopTraining
from tinylab.trl import grpo_trainer, trl_args

CONFIG = GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=4, lr=0.05, steps=1, seed=0)


def test_one_trl_step_changes_v_and_nothing_else(tmp_path):
    model, tok = tiny_model("llama", seed=0)
    adapter = apply_tinylora(model, u=4, n_tie="all")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    v0 = adapter.vector()
    seen = []
    trainer = grpo_trainer(model, tok, adapter, ToyTask(), CONFIG, callbacks=[seen.append], output_dir=str(tmp_path))
    assert trainer.args.use_cpu and not trainer.args.bf16 and not trainer.args.gradient_checkpointing
    assert trainer.args.lr_scheduler_type == "constant" and trainer.args.max_grad_norm == 0.0
    assert trainer.args.learning_rate == 0.05 and trainer.args.weight_decay == 0.0
    trainer.train()
    assert not torch.equal(adapter.vector(), v0)
    after = dict(model.named_parameters())
    assert frozen and all(torch.equal(frozen[n], after[n]) for n in frozen)
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())
    assert [s.step for s in seen] == [1] and seen[0].kind == "trl"
    assert math.isfinite(seen[0].reward_mean) and seen[0].v_norm > 0
    assert list(trainer.tinylab_logs.history["step"]) == [1]


def test_stop_training_from_callback_ends_trl_run(tmp_path):
    model, tok = tiny_model("llama", seed=0)
    adapter = apply_tinylora(model, u=1, n_tie="all")

    def stop(log):
        raise StopTraining

    trainer = grpo_trainer(model, tok, adapter, ToyTask(), GRPOConfig(**{**CONFIG.__dict__, "steps": 3}),
                           callbacks=[stop], output_dir=str(tmp_path))
    trainer.train()
    assert trainer.state.global_step == 1


def test_divisibility_checked_before_anything_loads(tmp_path, monkeypatch):
    import trl

    def boom(*a, **kw):
        raise AssertionError("GRPOTrainer must not be built")

    monkeypatch.setattr(trl, "GRPOTrainer", boom)
    model, tok = tiny_model("llama", seed=0)
    adapter = apply_tinylora(model, u=1, n_tie="all")
    with pytest.raises(ValueError, match=r"generation batch \(6 completions.*not divisible by num_generations=4"):
        grpo_trainer(model, tok, adapter, ToyTask(), GRPOConfig(prompts_per_step=2, group_size=4),
                     output_dir=str(tmp_path), per_device_train_batch_size=6)
    with pytest.raises(ValueError, match="kl=0.1 is not supported by the TRL bridge"):
        trl_args(GRPOConfig(kl=0.1), str(tmp_path))
    with pytest.raises(ValueError, match="num_generations=1"):
        trl_args(GRPOConfig(), str(tmp_path), num_generations=1)
