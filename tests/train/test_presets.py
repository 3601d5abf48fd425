import dataclasses

import pytest
import torch
import transformers

from tinylab.adapter.targets import count_params, plan_modules
from tinylab.interop.peft_tinylora import peft_groups
from tinylab.interop.trl_bridge import trl_args
from tinylab.train.presets import _SHAPES, PRESETS, estimate, names, override_keys, parse_overrides, preset


def _meta_model(config):
    """A model with the real architecture's module names and shapes, but no weights (meta device)."""
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _qwen2(model: str) -> transformers.Qwen2Config:
    """The shape of a Qwen2.5 model from the facts the presets' estimates use (no download)."""
    params, h, i, layers, kv, head_dim, vocab = _SHAPES[model]
    return transformers.Qwen2Config(hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                                    num_attention_heads=h // head_dim, num_key_value_heads=kv, vocab_size=vocab,
                                    tie_word_embeddings=True)


# Shapes from the models' published config.json files (no download: only module shapes matter here).
QWEN25_7B = transformers.Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)
SMOLLM2_135M = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                        tie_word_embeddings=True)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_configs_that_validate(name, tmp_path):
    p = preset(name)
    assert p == PRESETS[name] and p.training.lr in p.lr_sweep and p.training.seed == p.seeds[0]
    args = trl_args(p.training, str(tmp_path))  # the TRL backend accepts it: batch divisible, kl = 0
    assert args.num_generations == p.training.group_size and args.max_steps == p.training.steps
    # a preset is runnable here exactly when its model needs no hub download
    assert p.runnable_here == (p.model is None or p.model.startswith("tiny-"))


@pytest.mark.parametrize("name, config, modules", [("paper-gsm8k", QWEN25_7B, 196),
                                                   ("paper-gsm8k-shared", QWEN25_7B, 196),
                                                   ("gpu-gsm8k-0.5b", "Qwen/Qwen2.5-0.5B-Instruct", 168),
                                                   ("gpu-gsm8k-1.5b", "Qwen/Qwen2.5-1.5B-Instruct", 196),
                                                   ("cpu-demo", SMOLLM2_135M, 210)])
def test_presets_train_13_numbers_on_their_models(name, config, modules):
    p = preset(name)
    model = _meta_model(_qwen2(config) if isinstance(config, str) else config)
    planned = plan_modules(model, p.adapter)
    assert len(planned) == modules  # layers x 7 maps
    assert count_params(model, p.adapter) == 13
    groups = [m.group for m in planned]
    if p.adapter.tie == "tiled" and p.adapter.n_tie != "all":
        assert groups[: p.adapter.n_tie + 1] == [0] * p.adapter.n_tie + [1]
    if name.startswith("gpu-"):  # the vLLM path exports to PEFT, whose weight_tying must express the groups
        assert groups == peft_groups(len(groups), 1 - (max(groups) + 1) / len(groups))


def test_paper_steps_cover_three_epochs_of_gsm8k():
    t = preset("paper-gsm8k").training
    problems = 7473  # GSM8K's train split; 3 epochs at 64 prompts per step is the paper's "about 350" steps
    assert (t.steps - 1) * t.prompts_per_step < 3 * problems <= t.steps * t.prompts_per_step


@pytest.mark.parametrize("name, gpu_gb", [("gpu-gsm8k-0.5b", 24), ("gpu-gsm8k-1.5b", 48)])
def test_one_gpu_presets_fit_the_gpu_they_name(name, gpu_gb):
    e = estimate(name)
    assert e.total_gb <= gpu_gb and f"{gpu_gb} GB" in preset(name).notes
    assert min(e.weights_gb, e.activations_gb, e.logits_gb, e.kv_cache_gb) > 0 and e.total_gb >= e.weights_gb
    steps = preset(name).training.steps
    longer = estimate(name, steps=2 * steps)  # twice the steps: the same memory and step, twice the hours
    assert longer.total_gb == e.total_gb and longer.step_seconds == e.step_seconds
    assert longer.run_hours == pytest.approx(2 * e.run_hours, abs=0.1)
    bigger = estimate(name, prompts_per_step=8)  # twice the completions: twice the activations and logits
    assert bigger.activations_gb == pytest.approx(2 * e.activations_gb, rel=0.02)
    assert bigger.weights_gb == e.weights_gb and bigger.total_gb > gpu_gb - 4
    assert estimate(name, decode_ms=60).step_seconds > e.step_seconds


def test_estimate_names_the_models_it_knows():
    with pytest.raises(ValueError, match=r"unknown model to estimate 'Qwen/Qwen2.5-7B-Instruct'.*allowed: Qwen/Qwen2.5-0.5B"):
        estimate("paper-gsm8k")


def test_overrides_go_to_the_config_that_owns_them():
    p = preset("cpu-demo", u=4, n_tie=7, lr=3e-3, steps=2, seed=5, adapter_seed=9, model="/some/folder",
               checkpoint_dir="/tmp/run", lr_sweep=[1e-3], seeds=3)
    assert (p.adapter.u, p.adapter.n_tie, p.adapter.seed) == (4, 7, 9)
    assert (p.training.lr, p.training.steps, p.training.seed, p.training.checkpoint_dir) == (3e-3, 2, 5, "/tmp/run")
    assert p.model == "/some/folder" and p.lr_sweep == (1e-3,) and p.seeds == (3,)
    assert PRESETS["cpu-demo"].adapter.u == 13 and PRESETS["cpu-demo"].training.lr == 1e-2  # unchanged
    assert p.adapter == dataclasses.replace(PRESETS["cpu-demo"].adapter, u=4, n_tie=7, seed=9)


def test_unknown_names_and_keys_list_what_exists():
    with pytest.raises(ValueError, match=rf"unknown preset 'gpu-demo'.*allowed: {', '.join(sorted(PRESETS))}$"):
        preset("gpu-demo")
    with pytest.raises(TypeError, match=r"unknown preset override 'n_ties' \(did you mean 'n_tie'\?\); allowed: .*lr"):
        preset("cpu-demo", n_ties=4)
    with pytest.raises(TypeError, match=r"'learning_rate'.*allowed: .*prompts_per_step"):
        preset("paper-gsm8k", learning_rate=1e-5)
    assert names() == sorted(PRESETS)


def test_bad_values_raise_the_configs_own_errors():
    with pytest.raises(ValueError, match=r"u=0"):
        preset("cpu-demo", u=0)
    with pytest.raises(ValueError, match=r"lr=-1"):
        preset("cpu-demo", lr=-1)
    with pytest.raises(ValueError, match=r"group_size=1"):
        preset("paper-gsm8k", group_size=1)
    with pytest.raises(ValueError, match=r"dtype='fp8' is not allowed"):
        preset("cpu-demo", dtype="fp8")
    assert PRESETS["cpu-demo"] == preset("cpu-demo")  # a failed override leaves the registry alone


def test_parse_overrides_reads_command_line_pairs():
    parsed = parse_overrides(["lr=3e-3", "n_tie=all", "layers=[0, 1]", "clip=None", "tie=structured",
                              "steps=5", "model=HuggingFaceTB/SmolLM2-135M-Instruct", "checkpoint_dir=runs/a=b"])
    assert parsed == {"lr": 3e-3, "n_tie": "all", "layers": [0, 1], "clip": None, "tie": "structured",
                      "steps": 5, "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "checkpoint_dir": "runs/a=b"}
    p = preset("cpu-demo", **{k: v for k, v in parsed.items() if k != "model"})
    assert p.adapter.layers == (0, 1) and p.training.clip is None and p.training.lr == 3e-3
    with pytest.raises(ValueError, match=r"override 'lr' is not key=value"):
        parse_overrides(["lr"])
    with pytest.raises(ValueError, match=r"unknown override key 'stpes' \(did you mean 'steps'\?\)"):
        parse_overrides(["stpes=3"])
    assert set(override_keys()) >= {"u", "n_tie", "lr", "group_size", "seed", "adapter_seed", "model"}


@pytest.mark.slow
def test_cpu_demo_runs_one_step_on_the_embedded_model(embedded, tmp_path):
    from tinylab.adapter.attach import apply_tinylora
    from tinylab.tasks import get
    from tinylab.train.grpo import train_grpo

    model, tokenizer = embedded
    p = preset("cpu-demo", steps=1, prompts_per_step=2, group_size=2, max_new_tokens=8,
               checkpoint_dir=str(tmp_path / "run"))
    adapter = apply_tinylora(model, p.adapter)
    try:
        assert adapter.num_params == 13
        run = train_grpo(model, tokenizer, adapter, get(p.task, **p.task_options), p.training)
        assert len(run.history) == 1 and (tmp_path / "run" / "adapter.tlra").is_file()
    finally:
        adapter.remove()
