"""Named starting points: a model, where the trained numbers go, and how GRPO trains them.

    p = preset("cpu-demo", steps=5, lr=3e-3)   # overrides are TinyLoRAConfig / GRPOConfig fields
    model, tokenizer = load_model(p.model)
    adapter = apply_tinylora(model, p.adapter)
    run = train_grpo(model, tokenizer, adapter, tasks.get(p.task, **p.task_options), p.training)

Presets:

- `cpu-demo`: the embedded SmolLM2-135M-Instruct on the capital-cities task, one shared vector of
  u = 13, 4 prompts x 8 samples, lr 1e-2 (the settings of an early probe of this project;
  `benchmarks/knowledge.py` measures what such runs do on held-out countries).
- `paper-gsm8k`: the TinyLoRA paper's GSM8K run on Qwen2.5-7B-Instruct (docs/method.md): r = 2,
  u = 1, tiled n_tie = 16 over the 196 modules -> 13 numbers; GRPO, 4 samples per problem,
  64 prompts per step, 3 epochs, up to 4096 new tokens, no KL; lr swept over 1e-7 .. 2e-4.
  NOT RUNNABLE HERE: it needs GPUs and a hub download; tinylab's tests only check its numbers.
- `paper-gsm8k-shared`: the same with the reimplementations' placement, one shared u = 13 vector.
- `gpu-gsm8k-0.5b`, `gpu-gsm8k-1.5b`: one GPU beside the paper's run: Qwen2.5-0.5B-Instruct
  (24 GB GPU, up to 384 new tokens) or Qwen2.5-1.5B-Instruct (48-80 GB GPU, up to 512) on GSM8K
  in bf16, 13 numbers (one shared u = 13 vector, which the PEFT/vLLM path can express), 4 prompts
  x 4 samples per step, 500 steps. Expected memory
  and time: `estimate(name)`, printed by `python -m tinylab.train.presets`. They are ARITHMETIC, not
  measured (no GPU here): weights 2 bytes/param; activations kept for the backward pass
  2 * (10 h + 4 i) bytes per token per layer (bf16; every layer's activations are needed, since
  v sits in every layer); logits 6 bytes per token per vocabulary entry (bf16 + an fp32 copy: TRL's
  backend; tinylab's own loop keeps one 64 MB chunk of them where `tinylab.model.head_logprobs` takes the model);
  KV cache 4 * layers * kv_heads * head_dim bytes per token; tokens = completions x (150 prompt +
  max_new_tokens), the worst case. Time: generation dominates: max_new_tokens decode steps at an
  assumed 30 ms each (Hugging Face generate on a small model), plus 4 * params * tokens FLOPs at
  an assumed 100 TFLOP/s. Check both on your GPU with a few steps before a long run.
- `tiny-cpu`: a 2-step smoke run of the machinery on `tiny_model("llama")` (no network) and the
  local `compare` task. On a random model every built-in reward is 0, so v only moves with a task
  whose rewards differ within a group: `task=path/to/file.py:MyTask` on the `tinylab train` command.

Override keys are the fields of `TinyLoRAConfig` and `GRPOConfig` by name, plus `model`, `task`,
`dtype`, `lr_sweep` and `seeds`. Both configs have a `seed`: `seed=` is the run's (GRPOConfig:
prompt order and sampling), `adapter_seed=` the projections' (TinyLoRAConfig.seed).
`parse_overrides(["lr=3e-3", "n_tie=all"])` reads command-line `key=value` pairs.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

from tinylab.adapter.config import TinyLoRAConfig
from tinylab.basics.checks import check_int, check_number
from tinylab.tasks import check_name
from tinylab.tasks import names as task_names
from tinylab.tasks.base import RewardShape
from tinylab.train.grpo import GRPOConfig

__all__ = ["PRESETS", "Estimate", "Preset", "estimate", "names", "override_keys", "parse_overrides", "parse_value", "preset", "unknown_message"]


class Preset(NamedTuple):
    """A named starting point; `preset(name, **overrides)` gives one with fields replaced."""

    name: str
    model: str | None  # tinylab.load_model name: None = embedded SmolLM2-135M-Instruct, or hub id / folder
    task: str  # tinylab.tasks.get name
    task_options: Mapping[str, Any]  # keyword arguments for tinylab.tasks.get (read-only)
    adapter: TinyLoRAConfig  # where the trained numbers go
    training: GRPOConfig  # how GRPO trains them
    dtype: str  # model weights: "float32" (CPU) or "bfloat16" (the paper's GPUs)
    lr_sweep: tuple[float, ...]  # learning rates worth sweeping; training.lr is one of them
    seeds: tuple[int, ...]  # run seeds for a sweep (training.seed is the first)
    runnable_here: bool  # False: needs GPUs / a hub download; never run or tested in tinylab's CI
    notes: str  # where the numbers come from and what differs from the source


_GSM8K_TRAIN_PROBLEMS = 7473  # GSM8K's train split (openai/gsm8k, main)
_PAPER_PROMPTS_PER_STEP = 64
_PAPER_STEPS = 3 * math.ceil(_GSM8K_TRAIN_PROBLEMS / _PAPER_PROMPTS_PER_STEP)  # 3 epochs = 351 ("about 350")
_PAPER_LR_SWEEP = (1e-7, 1e-6, 1e-5, 1e-4, 2e-4)  # spans the paper's 1e-7 .. 2e-4; its exact grid is not given
_PAPER_NOTES = (
    "TinyLoRA paper (arXiv:2602.04118), GSM8K on Qwen2.5-7B-Instruct, see docs/method.md. Not runnable or "
    "tested here: needs GPUs and the hub model. lr: the paper sweeps 1e-7 .. 2e-4 and reports the best per size "
    "(3 seeds) without saying which; lr_sweep spans that range and lr is its top. Departures: the authors' code "
    "clips the ratio at 0.2 low / 0.4 high (GRPOConfig has one clip: 0.2), and generated with vLLM on merged "
    "weights with truncated importance sampling (tinylab samples from the adapted model itself). "
    "checkpoint_every=25 is tinylab's choice for a long run, not the paper's."
)


# (params, hidden, intermediate, layers, kv_heads, head_dim, vocab) from each model's published config.json
_SHAPES = {
    "Qwen/Qwen2.5-0.5B-Instruct": (494_032_768, 896, 4864, 24, 2, 64, 151936),
    "Qwen/Qwen2.5-1.5B-Instruct": (1_543_714_304, 1536, 8960, 28, 2, 128, 151936),
}


def _one_gpu(name: str, model: str, gpu_gb: int, max_new_tokens: int) -> Preset:
    return Preset(
        name=name,
        model=model,
        task="gsm8k",
        task_options=MappingProxyType({}),
        adapter=TinyLoRAConfig(r=2, u=13, n_tie="all"),
        training=GRPOConfig(prompts_per_step=4, group_size=4, max_new_tokens=max_new_tokens, temperature=1.0, lr=1e-4,
                            steps=500, seed=0, scale_rewards="group", clip=0.2, inner_epochs=1, kl=0.0,
                            checkpoint_every=25),
        dtype="bfloat16",
        lr_sweep=(1e-5, 1e-4, 2e-4),
        seeds=(0, 1, 2),
        runnable_here=False,
        notes=(f"One GPU of {gpu_gb} GB or more: {model} in bf16, 13 numbers as one u=13 vector shared by all "
               "24-28 layers x 7 maps (PEFT's weight_tying=1 expresses it, so the vLLM path can take it; the "
               "paper's tiled n_tie=16 cannot be), 16 completions per step, 500 steps (2,000 of GSM8K's 7,473 "
               "training problems). Memory and time: tinylab.train.presets.estimate(name), arithmetic with stated "
               "assumptions, not measured. lr_sweep: the upper part of the paper's range. Not run here (no GPU)."),
    )


def _paper(name: str, adapter: TinyLoRAConfig, placement: str) -> Preset:
    return Preset(
        name=name,
        model="Qwen/Qwen2.5-7B-Instruct",
        task="gsm8k",
        task_options=MappingProxyType({}),
        adapter=adapter,
        training=GRPOConfig(prompts_per_step=_PAPER_PROMPTS_PER_STEP, group_size=4, max_new_tokens=4096,
                            temperature=1.0, lr=_PAPER_LR_SWEEP[-1], steps=_PAPER_STEPS, seed=0,
                            scale_rewards="group", clip=0.2, inner_epochs=1, kl=0.0, checkpoint_every=25),
        dtype="bfloat16",
        lr_sweep=_PAPER_LR_SWEEP,
        seeds=(0, 1, 2),
        runnable_here=False,
        notes=f"{placement}. {_PAPER_NOTES}",
    )


PRESETS: Mapping[str, Preset] = MappingProxyType({
    "cpu-demo": Preset(
        name="cpu-demo",
        model=None,
        task="capitals",
        task_options=MappingProxyType({"shape": RewardShape(correct=1.0, flexible=0.5)}),
        adapter=TinyLoRAConfig(r=2, u=13, n_tie="all"),
        training=GRPOConfig(prompts_per_step=4, group_size=8, max_new_tokens=None, temperature=1.0, lr=1e-2,
                            steps=10, seed=0, scale_rewards="group", kl=0.0),
        dtype="float32",
        lr_sweep=(3e-3, 1e-2, 3e-2),
        seeds=(0,),
        runnable_here=True,
        notes=("The settings of an early CPU probe (benchmarks/knowledge.py measures the current recipe): "
               "SmolLM2-135M-Instruct, one u=13 vector shared by all 210 modules, 4 prompts x 8 samples, "
               "lr 1e-2, 10 steps. Half credit for a "
               "reply that contains the city without being only the city approximates the probe's reward "
               "(full credit for the city, halved when the reply is longer): strict-only rewards are all zero "
               "at the start, since the base model never answers with the city alone."),
    ),
    "paper-gsm8k": _paper("paper-gsm8k", TinyLoRAConfig(r=2, u=1, n_tie=16, tie="tiled"),
                          "r=2, u=1, tiled n_tie=16: ceil(196 / 16) = 13 trained numbers"),
    "paper-gsm8k-shared": _paper("paper-gsm8k-shared", TinyLoRAConfig(r=2, u=13, n_tie="all"),
                                 "r=2, one u=13 vector shared by all 196 modules (the reimplementations' 13)"),
    "gpu-gsm8k-0.5b": _one_gpu("gpu-gsm8k-0.5b", "Qwen/Qwen2.5-0.5B-Instruct", 24, 384),
    "gpu-gsm8k-1.5b": _one_gpu("gpu-gsm8k-1.5b", "Qwen/Qwen2.5-1.5B-Instruct", 48, 512),
    "tiny-cpu": Preset(
        name="tiny-cpu",
        model="tiny-llama",
        task="compare",
        task_options=MappingProxyType({}),
        adapter=TinyLoRAConfig(r=2, u=4, n_tie="all"),
        training=GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=4, lr=0.05, steps=2, seed=0),
        dtype="float32",
        lr_sweep=(0.05,),
        seeds=(0,),
        runnable_here=True,
        notes="A smoke run of the machinery (two steps, a random 2-layer model), not an experiment.",
    ),
})


class Estimate(NamedTuple):
    """Expected peak memory (GB) and time of a one-GPU preset: arithmetic, not measured (see module doc)."""

    weights_gb: float
    activations_gb: float
    logits_gb: float
    kv_cache_gb: float
    total_gb: float
    step_seconds: float
    run_hours: float


def estimate(name: str, *, prompt_tokens: int = 150, decode_ms: float = 30.0, tflops: float = 100.0,
             **overrides) -> Estimate:
    """The arithmetic estimate for `preset(name, **overrides)` on a model in `_SHAPES` (assumptions
    in the module doc): `estimate("gpu-gsm8k-0.5b", prompts_per_step=8)` for a larger batch."""
    p = preset(name, **overrides)
    if p.model not in _SHAPES:
        raise ValueError(unknown_message("model to estimate", str(p.model), sorted(_SHAPES)))
    params, h, i, layers, kv_heads, head_dim, vocab = _SHAPES[p.model]
    t = p.training
    tokens = t.prompts_per_step * t.group_size * (prompt_tokens + t.max_new_tokens)
    gb = 1e9
    weights = 2 * params / gb
    activations = 2 * (10 * h + 4 * i) * layers * tokens / gb
    logits = 6 * vocab * tokens / gb
    kv = 4 * layers * kv_heads * head_dim * tokens / gb
    step = t.max_new_tokens * decode_ms / 1e3 + 4 * params * tokens / (tflops * 1e12)
    return Estimate(round(weights, 1), round(activations, 1), round(logits, 1), round(kv, 2),
                    round(weights + activations + logits + kv, 1), round(step, 1), round(step * t.steps / 3600, 1))

_ADAPTER_FIELDS = {f.name: f.name for f in dataclasses.fields(TinyLoRAConfig) if f.name != "seed"}
_ADAPTER_FIELDS["adapter_seed"] = "seed"
_TRAINING_FIELDS = {f.name for f in dataclasses.fields(GRPOConfig)}
_PRESET_FIELDS = ("model", "task", "task_options", "dtype", "lr_sweep", "seeds")
_DTYPES = ("float32", "bfloat16", "float16")


def names() -> list[str]:
    """The preset names, sorted."""
    return sorted(PRESETS)


def override_keys() -> list[str]:
    """Every key `preset(name, **overrides)` accepts, sorted."""
    return sorted({*_ADAPTER_FIELDS, *_TRAINING_FIELDS, *_PRESET_FIELDS})


def unknown_message(kind: str, bad: str, allowed: Sequence[str]) -> str:
    """`unknown KIND 'bad' (did you mean ...?); allowed: a, b, ...` for a name that is not one of `allowed`."""
    close = difflib.get_close_matches(bad, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {bad!r}{hint}; allowed: {', '.join(allowed)}"


def preset(name: str, **overrides) -> Preset:
    """The preset `name` with `overrides` applied; each is checked by the config that owns it.

    Raises ValueError for an unknown name, TypeError for an unknown override key (both list what
    exists), and the configs' own ValueError for a value out of range.
    """
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(unknown_message("preset", str(name), names()))
    unknown = [k for k in overrides if k not in override_keys()]
    if unknown:
        raise TypeError(unknown_message("preset override", unknown[0], override_keys()))
    base = PRESETS[name]
    adapter = {_ADAPTER_FIELDS[k]: v for k, v in overrides.items() if k in _ADAPTER_FIELDS}
    training = {k: v for k, v in overrides.items() if k in _TRAINING_FIELDS}
    top = {k: v for k, v in overrides.items() if k in _PRESET_FIELDS}
    if "task" in top:
        _check_task(top["task"])
    if "dtype" in top and top["dtype"] not in _DTYPES:
        raise ValueError(f"dtype={top['dtype']!r} is not allowed: choose one of {list(_DTYPES)}")
    if "task_options" in top:
        top["task_options"] = MappingProxyType(dict(top["task_options"]))
    if "model" in top and (not isinstance(top["model"], str) or not top["model"].strip()):
        raise ValueError(f"model={top['model']!r}: allowed: a non-empty string (a built-in name, a folder or a hub id)")
    for key in ("lr_sweep", "seeds"):
        if key in top:
            top[key] = tuple(top[key]) if isinstance(top[key], (list, tuple)) else (top[key],)
            if not top[key]:
                raise ValueError(f"{key}=[]: give at least one value")
            for value in top[key]:  # each as GRPOConfig checks its lr / seed
                if key == "seeds":
                    check_int(f"{key} entry", value)
                else:
                    check_number(f"{key} entry", value, low=0, low_open=True, high=10)
    return base._replace(
        adapter=dataclasses.replace(base.adapter, **adapter),
        training=dataclasses.replace(base.training, **training),
        **top,
    )


def _check_task(task) -> None:
    """A preset's task: a registered name (an unknown one is `tasks.check_name`'s error, the one every
    function gives), or `path/to/file.py:Name` / `module:Name` for the command line to import."""
    if not isinstance(task, str) or not task:
        raise TypeError(f"task={task!r:.80}: a preset names its task: one of {task_names()}, "
                        "path/to/file.py:Name or module:Name")
    if ":" not in task:
        check_name(task)


def parse_value(text: str):
    """A command-line value: JSON (numbers, true/false/null, lists, quoted strings), Python's
    None/True/False, else the text itself (`tie=structured`, `n_tie=all`)."""
    special = {"None": None, "True": True, "False": False}
    if text in special:
        return special[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`["lr=3e-3", "layers=[0,1]", "n_tie=all"]` -> {"lr": 0.003, "layers": [0, 1], "n_tie": "all"}.

    Keys are checked against `override_keys()` here, so a typo on the command line fails before
    any model loads.
    """
    if isinstance(pairs, str):
        pairs = [pairs]
    out = {}
    for pair in pairs:
        key, sep, text = str(pair).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {pair!r} is not key=value (e.g. lr=3e-3); allowed keys: "
                             f"{', '.join(override_keys())}")
        if key not in override_keys():
            raise ValueError(unknown_message("override key", key, override_keys()))
        out[key] = parse_value(text.strip())
    return out


if __name__ == "__main__":  # python -m tinylab.train.presets: the one-GPU presets' estimates
    import sys

    for key in names():
        if PRESETS[key].model in _SHAPES:
            sys.stdout.write(f"{key}: {estimate(key)}\n")
