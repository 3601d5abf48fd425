import dataclasses

import pytest
import torch
import transformers

from tinylab.adapter import TinyLoRAConfig, count_params, plan_modules
from tinylab.grpo import GRPOConfig
from tinylab.presets import PRESETS, Preset, names, override_keys, parse_overrides, preset
from tinylab.tasks.base import RewardShape


def _meta_model(config):
    """A model with the real architecture's module names and shapes, but no weights (meta device)."""
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


# Shapes from the models' published config.json files (no download: only module shapes matter here).
QWEN25_7B = transformers.Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)
SMOLLM2_135M = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                        tie_word_embeddings=True)


def test_presets_are_records_of_the_configs():
    assert names() == ["cpu-demo", "paper-gsm8k", "paper-gsm8k-shared"]
    for name in names():
        p = preset(name)
        assert isinstance(p, Preset) and p.name == name and p == PRESETS[name]
        assert isinstance(p.adapter, TinyLoRAConfig) and isinstance(p.training, GRPOConfig)
        assert p.training.lr in p.lr_sweep and p.training.seed == p.seeds[0]
        assert p.training.kl == 0.0


@pytest.mark.parametrize("name", ["paper-gsm8k", "paper-gsm8k-shared"])
def test_paper_presets_give_13_numbers_on_qwen25_7b(name):
    p = preset(name)
    model = _meta_model(QWEN25_7B)
    planned = plan_modules(model, p.adapter)
    assert len(planned) == 196  # 28 layers x 7 maps
    assert count_params(model, p.adapter) == 13
    if name == "paper-gsm8k":
        assert (p.adapter.r, p.adapter.u, p.adapter.n_tie, p.adapter.tie) == (2, 1, 16, "tiled")
        assert [m.group for m in planned[:17]] == [0] * 16 + [1]  # 16 consecutive modules per vector


def test_paper_presets_follow_docs_tinylora_and_are_marked_not_runnable():
    for name in ("paper-gsm8k", "paper-gsm8k-shared"):
        p = preset(name)
        t = p.training
        assert (p.model, p.task, p.dtype) == ("Qwen/Qwen2.5-7B-Instruct", "gsm8k", "bfloat16")
        assert (t.group_size, t.prompts_per_step, t.max_new_tokens, t.kl) == (4, 64, 4096, 0.0)
        assert t.steps == 351  # 3 epochs of 7,473 problems at 64 per step ("about 350")
        assert (min(p.lr_sweep), max(p.lr_sweep)) == (1e-7, 2e-4)
        assert p.seeds == (0, 1, 2)
        assert p.runnable_here is False and "Not runnable" in p.notes


def test_cpu_demo_gives_13_numbers_on_the_embedded_architecture():
    p = preset("cpu-demo")
    assert p.model is None and p.runnable_here and p.dtype == "float32"
    model = _meta_model(SMOLLM2_135M)
    assert len(plan_modules(model, p.adapter)) == 210
    assert count_params(model, p.adapter) == 13
    t = p.training
    assert (t.prompts_per_step, t.group_size, t.lr, t.steps, t.temperature) == (4, 8, 1e-2, 10, 1.0)
    assert p.task == "capitals" and p.task_options["shape"] == RewardShape(correct=1.0, flexible=0.5)


def test_overrides_go_to_the_config_that_owns_them():
    p = preset("cpu-demo", u=4, n_tie=7, lr=3e-3, steps=2, seed=5, adapter_seed=9, model="/some/folder",
               checkpoint_dir="/tmp/run", lr_sweep=[1e-3], seeds=3)
    assert (p.adapter.u, p.adapter.n_tie, p.adapter.seed) == (4, 7, 9)
    assert (p.training.lr, p.training.steps, p.training.seed, p.training.checkpoint_dir) == (3e-3, 2, 5, "/tmp/run")
    assert p.model == "/some/folder" and p.lr_sweep == (1e-3,) and p.seeds == (3,)
    assert PRESETS["cpu-demo"].adapter.u == 13 and PRESETS["cpu-demo"].training.lr == 1e-2  # unchanged
    assert p.adapter == dataclasses.replace(PRESETS["cpu-demo"].adapter, u=4, n_tie=7, seed=9)


def test_unknown_names_and_keys_list_what_exists():
    with pytest.raises(ValueError, match=r"unknown preset 'gpu-demo'.*allowed: cpu-demo, paper-gsm8k, paper-gsm8k-shared"):
        preset("gpu-demo")
    with pytest.raises(TypeError, match=r"unknown preset override 'n_ties' \(did you mean 'n_tie'\?\); allowed: .*lr"):
        preset("cpu-demo", n_ties=4)
    with pytest.raises(TypeError, match=r"'learning_rate'.*allowed: .*prompts_per_step"):
        preset("paper-gsm8k", learning_rate=1e-5)


def test_bad_values_raise_the_configs_own_errors():
    with pytest.raises(ValueError, match=r"u=0 is not allowed"):
        preset("cpu-demo", u=0)
    with pytest.raises(ValueError, match=r"lr=-1 is not allowed"):
        preset("cpu-demo", lr=-1)
    with pytest.raises(ValueError, match=r"group_size=1 is not allowed: an integer >= 2"):
        preset("paper-gsm8k", group_size=1)
    with pytest.raises(ValueError, match=r"dtype='fp8' is not allowed"):
        preset("cpu-demo", dtype="fp8")


def test_preset_records_cannot_be_changed_in_place():
    p = preset("cpu-demo")
    with pytest.raises(TypeError):
        p.task_options["shape"] = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.training.lr = 1.0
    with pytest.raises(TypeError):
        PRESETS["mine"] = p


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
    from tinylab.adapter import apply_tinylora
    from tinylab.grpo import train_grpo
    from tinylab.tasks import get

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
