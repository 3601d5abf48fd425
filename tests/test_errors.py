"""One test per row of docs/errors.md: a bad input gives a ValueError/TypeError whose message names
the bad value and what is allowed, before anything is changed or trained."""

import dataclasses
import re
import tempfile

import pytest

from tinylab.adapter.attach import apply_tinylora, find_adapter
from tinylab.adapter.config import TinyLoRAConfig
from tinylab.adapter.file_format import AdapterFileError, load_adapter, save_adapter
from tinylab.adapter.planner import plan_budget
from tinylab.model.tiny import tiny_model
from tinylab.tasks.base import Example, Score, ScoredTask
from tinylab.train.grpo import GRPOConfig, train_grpo


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


@pytest.fixture
def model(tiny):
    yield tiny[0]
    assert not find_adapter(tiny[0]), "a failed call left an adapter attached"


LORA_XS = r"allowed 1\.\.56 for this model \(14 modules x r\*r=4, the LoRA-XS size\)"


# --- budget (tinylab.adapter.planner.plan_budget) ---------------------------------------------------------


def test_budget_zero(model):
    with pytest.raises(ValueError, match=rf"n_params=0 is out of range: {LORA_XS}"):
        plan_budget(model, 0)


def test_budget_negative(model):
    with pytest.raises(ValueError, match=rf"n_params=-3 is out of range: {LORA_XS}"):
        plan_budget(model, -3)


@pytest.mark.parametrize("bad", [2.5, "13", True, None])
def test_budget_not_an_integer(model, bad):
    with pytest.raises(ValueError, match=rf"n_params={bad!r} is not an integer: {LORA_XS}".replace("'", "'?")):
        plan_budget(model, bad)


def test_budget_above_the_lora_xs_size(model):
    with pytest.raises(ValueError, match=rf"n_params=57 is out of range: {LORA_XS}"):
        plan_budget(model, 57)
    assert plan_budget(model, 56).achieved == 56  # the largest allowed budget works


def test_budget_u_out_of_range(model):
    with pytest.raises(ValueError, match=r"u=0 is not allowed: u must be an integer >= 1"):
        plan_budget(model, 13, u=0)


# --- placement (TinyLoRAConfig, apply_tinylora) -------------------------------------------------


def test_unknown_target_module_names_list_the_models_linear_modules(model):
    with pytest.raises(ValueError, match=r"targets \['qproj'\] match no linear module in this model; its linear "
                                         r"module types are \['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', "
                                         r"'up_proj', 'down_proj'\] \(e\.g\. \['model\.layers\.0\.self_attn\.q_proj'"):
        apply_tinylora(model, TinyLoRAConfig(targets=("qproj",)))
    with pytest.raises(ValueError, match=r"targets \['attn'\] match no linear module.*'q_proj'"):
        apply_tinylora(model, TinyLoRAConfig(targets=("q_proj", "attn")))


def test_layer_indexes_out_of_range(model):
    with pytest.raises(ValueError, match=r"layers \[5\] are out of range: this model has layers 0\.\.1"):
        apply_tinylora(model, TinyLoRAConfig(layers=(0, 5)))
    with pytest.raises(ValueError, match=r"layers=\(-1,\) is not allowed: give None \(all\) or non-negative"):
        TinyLoRAConfig(layers=(-1,))


def test_gpt2_targets_that_match_nothing_name_its_module_kinds():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(ValueError, match=r"targets \['q_proj'\] match no linear module.*types are \['c_attn', "
                                         r"'attn.c_proj', 'c_fc', 'mlp.c_proj'\]"):
        apply_tinylora(gpt2, TinyLoRAConfig(targets=("q_proj",)))
    assert not find_adapter(gpt2)


def test_n_tie_out_of_range(model):
    with pytest.raises(ValueError, match=r"n_tie=99 is out of range: allowed 1\.\.14 \(or 'all'\) for 14 adapted"):
        apply_tinylora(model, TinyLoRAConfig(n_tie=99))
    for bad in (0, -2, "ALL", 1.5):
        with pytest.raises(ValueError, match=rf"n_tie={bad!r} is not allowed: n_tie must be an integer >= 1 .* or 'all'"):
            TinyLoRAConfig(n_tie=bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "4"])
def test_u_out_of_range(bad):
    with pytest.raises(ValueError, match=rf"u={bad!r} is not allowed: u must be an integer >= 1"):
        TinyLoRAConfig(u=bad)


def test_rank_larger_than_a_module(model):
    with pytest.raises(ValueError, match=r"r=99 is too large for model\.layers\.0\.self_attn\.q_proj \(64x64\): "
                                         r"allowed 1\.\.64"):
        apply_tinylora(model, TinyLoRAConfig(r=99))


# --- tasks, prompts, tokenizers -----------------------------------------------------------------


class _Empty(ScoredTask):
    name = "empty"

    def examples(self, split="train", n=None, seed=0):
        return []

    def score(self, completion, answer):
        return Score(False, False, False, None)


class _Long(_Empty):
    name = "long"
    max_new_tokens = 8

    def examples(self, split="train", n=None, seed=0):
        return [Example("word " * 600, "1")] * (n or 2)


def test_task_with_no_examples(tiny, tmp_path):
    from tinylab.evaluation.report import evaluate

    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"task 'empty' gave no examples for split='test'"):
        evaluate(model, tokenizer, _Empty(), n=4, progress=False)
    adapter = apply_tinylora(model, TinyLoRAConfig(n_tie="all"))
    try:
        with pytest.raises(ValueError, match=r"task 'empty' gave no 'train' examples; it needs at least one"):
            train_grpo(model, tokenizer, adapter, _Empty(), GRPOConfig(steps=1, checkpoint_dir=str(tmp_path / "r")))
    finally:
        adapter.remove()


def test_prompt_longer_than_the_context(tiny):
    from tinylab.evaluation.report import evaluate
    from tinylab.model.generation import generate

    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"a prompt of 501 tokens plus max_new_tokens=20 exceeds the model's context "
                                         r"of 512 tokens; shorten the prompt or lower max_new_tokens to at most 11"):
        generate(model, tokenizer, ["word " * 500], max_new_tokens=20)
    with pytest.raises(ValueError, match=r"a prompt of 601 tokens leaves no room in the model's context of 512 tokens"):
        evaluate(model, tokenizer, _Long(), n=1, progress=False)  # a task's prompt, via the evaluation


def test_prompt_alone_longer_than_the_context_gives_no_negative_advice(tiny):
    from tinylab.model.generation import generate

    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"601 tokens.*context of 512 tokens") as err:
        generate(model, tokenizer, ["word " * 600], max_new_tokens=4)
    assert "at most -" not in str(err.value)


def test_tokenizer_without_a_chat_template(tiny, tmp_path):
    from tinylab.evaluation.report import evaluate
    from tinylab.model.batch import render_prompts
    from tinylab.tasks import get

    model, _ = tiny
    plain = tiny_model("llama")[1]
    plain.chat_template = None
    message = (r"prompt 0 is a list of chat messages but the tokenizer has no chat template; pass plain strings or "
               r"set tokenizer\.chat_template")
    with pytest.raises(ValueError, match=message):
        render_prompts(plain, [[{"role": "user", "content": "What is 2+2?"}]])
    capitals = get("capitals")  # gives chat messages
    with pytest.raises(ValueError, match=message):
        evaluate(model, plain, capitals, n=2, progress=False)
    adapter = apply_tinylora(model, TinyLoRAConfig(n_tie="all"))
    try:
        with pytest.raises(ValueError, match=message):
            train_grpo(model, plain, adapter, capitals, GRPOConfig(steps=1, prompts_per_step=1, group_size=2,
                                                                   checkpoint_dir=str(tmp_path / "r")))
        assert adapter.vector().abs().sum() == 0  # nothing was trained
    finally:
        adapter.remove()


# --- training settings ---------------------------------------------------------------------------


def test_num_generations_that_does_not_divide_the_batch():
    from tinylab.interop.trl_bridge import trl_args

    out = tempfile.mkdtemp()
    with pytest.raises(ValueError, match=r"the generation batch \(10 completions .*\) is not divisible by "
                                         r"num_generations=4; allowed: a multiple of 4"):
        trl_args(GRPOConfig(prompts_per_step=3, group_size=4), out, generation_batch_size=10)
    with pytest.raises(ValueError, match=r"num_generations=1 is not allowed: an integer >= 2"):
        trl_args(GRPOConfig(prompts_per_step=3, group_size=4), out, num_generations=1)


@pytest.mark.parametrize("field, bad, allowed", [
    ("group_size", 1, r"must be an integer >= 2"), ("prompts_per_step", 0, r"must be an integer >= 1"),
    ("lr", 0.0, r"must be a finite number > 0 and <= 10"), ("temperature", float("inf"), r"> 0 and <= 10"),
    ("clip", 1.5, r"must be a finite number > 0 and < 1, or None"), ("scale_rewards", "std", r"'group', 'none'"),
])
def test_training_settings_out_of_range(field, bad, allowed):
    with pytest.raises(ValueError, match=rf"{field}={bad!r}: .*{allowed}"):
        GRPOConfig(**{field: bad})


# --- config keys that do not exist ---------------------------------------------------------------


def test_unknown_config_key_in_a_preset():
    from tinylab.train.presets import preset

    with pytest.raises(TypeError, match=r"unknown preset override 'n_ties' \(did you mean 'n_tie'\?\); allowed: "
                                        r".*\bn_tie\b.*\bprompts_per_step\b"):
        preset("cpu-demo", n_ties=3)
    with pytest.raises(ValueError, match=r"unknown preset 'cpu_demo' \(did you mean 'cpu-demo'\?\); allowed: cpu-demo"):
        preset("cpu_demo")


def test_unknown_config_key_on_the_command_line(model, capsys):
    from tinylab.cli import main
    from tinylab.train.presets import parse_overrides

    with pytest.raises(ValueError, match=r"unknown override key 'learning_rate'; allowed: .*\blr\b"):
        parse_overrides(["learning_rate=1e-3"])
    with pytest.raises(SystemExit) as exit_:
        main(["attach", "--params", "13", "--model", "tiny-llama", "--budget", "13"])
    assert exit_.value.code == 2
    assert "tinylab attach: error: unrecognized arguments: --budget 13" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["attach", "--params", "13", "--model", "tiny-llama", "--strategy", "best"])
    assert re.search(r"invalid choice: 'best' \(choose from '?tiled'?, '?top'?, '?proportional'?\)",
                     capsys.readouterr().err)  # quoted or not, by Python version
    with pytest.raises(SystemExit) as exit_:
        main(["attach", "--params", "0", "--model", "tiny-llama"])
    assert exit_.value.code == 2
    assert "tinylab attach: error: n_params=0 is out of range: allowed 1..56" in capsys.readouterr().err


def test_unknown_config_key_in_adapter_overrides(model):
    with pytest.raises(TypeError, match=r"unknown TinyLoRAConfig fields \['n_ties'\]; allowed: \[.*'n_tie'"):
        apply_tinylora(model, n_ties=3)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'n_ties'"):
        TinyLoRAConfig(n_ties=3)  # the dataclass itself: Python's message; the fields are dataclasses.fields()
    assert "n_tie" in {f.name for f in dataclasses.fields(TinyLoRAConfig)}


def test_unknown_command_line_option_lists_the_commands_options(capsys):
    from tinylab.cli import main

    with pytest.raises(SystemExit):
        main(["attach", "--params", "13", "--model", "tiny-llama", "--budget", "13"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --budget 13" in err and "--params" in err and "--strategy" in err


def test_unknown_config_key_in_trl_overrides():
    from tinylab.interop.trl_bridge import trl_args

    with pytest.raises(TypeError, match=r"unknown field of TRL's GRPOConfig 'learning_rat' \(did you mean "
                                        r"'learning_rate'\?\); allowed: .*\bbeta\b.*\bnum_generations\b"):
        trl_args(GRPOConfig(), tempfile.mkdtemp(), learning_rat=1e-3)


# --- adapter files --------------------------------------------------------------------------------


def test_adapter_file_for_another_base_model(tiny, tmp_path):
    model, _ = tiny
    adapter = apply_tinylora(model, TinyLoRAConfig(u=13, n_tie="all"))
    path = save_adapter(adapter, tmp_path / "a.tlra")
    adapter.remove()
    other = tiny_model("llama", seed=1)[0]
    with pytest.raises(AdapterFileError, match=r"was trained on another base model \(arch llama/2, weights [0-9a-f]{16}\)"
                                               r"; this model is llama/2 with weights [0-9a-f]{16}"):
        load_adapter(other, path)
    assert issubclass(AdapterFileError, ValueError) and not find_adapter(other)


def test_an_adapter_of_another_model_gets_the_same_error_everywhere(tmp_path):
    from tinylab.widgets import KnobPanel

    from tinylab import (
        GRPOConfig,
        attention_patterns,
        attribute_numbers,
        compare,
        evaluate,
        head_effects,
        heads_by_number,
        landscape,
        sweep_number,
        train_grpo,
    )
    from tinylab.tasks.base import Example

    model, tok = tiny_model("llama", seed=0)
    other, _ = tiny_model("llama", seed=1)
    examples = [Example("What is 2+2?", "4")]
    foreign = apply_tinylora(other, u=2, n_tie="all")
    message = "this adapter is not attached to this model"
    calls = [
        lambda: train_grpo(model, tok, foreign, "capitals", GRPOConfig(steps=1, checkpoint_dir=str(tmp_path / "r"))),
        lambda: evaluate(model, tok, "capitals", n=2, adapter=foreign),
        lambda: compare(model, tok, "capitals", foreign, n=2),
        lambda: head_effects(model, tok, foreign, ["Hi"]),
        lambda: attribute_numbers(model, tok, foreign, examples),
        lambda: sweep_number(model, tok, foreign, examples, 0, [0.0, 1.0]),
        lambda: landscape(model, tok, foreign, examples, (0, 1), [0.0], [0.0]),
        lambda: attention_patterns(model, tok, "Hi", 0, 0, foreign),
        lambda: heads_by_number(model, tok, foreign, ["Hi"]),
        lambda: KnobPanel(model, tok, foreign, examples, examples),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()
    foreign.remove()
    with pytest.raises(ValueError, match=message):
        attention_patterns(other, tok, "Hi", 0, 0, foreign)  # removed: adapted would silently equal base
    with pytest.raises(ValueError, match=message):
        save_adapter(foreign, tmp_path / "a.tlra")


def test_a_model_that_already_has_an_adapter_gets_the_same_error_everywhere(tmp_path):
    from tinylab import export_peft, import_peft, module_importance, resume

    model, tok = tiny_model("llama", seed=0)
    adapter = apply_tinylora(model, u=2, n_tie="all")
    path = save_adapter(adapter, tmp_path / "a.tlra")
    export_peft(adapter, tmp_path / "peft")
    train_grpo(model, tok, adapter, "capitals", GRPOConfig(steps=1, prompts_per_step=1, group_size=2,
                                                           max_new_tokens=2, checkpoint_dir=str(tmp_path / "run")))
    message = "this model already has a TinyLoRA adapter"
    calls = {
        "apply_tinylora": (lambda: apply_tinylora(model, u=2), "call adapter.remove() first"),
        "load_adapter": (lambda: load_adapter(model, path), "call adapter.remove() first"),
        "import_peft": (lambda: import_peft(model, tmp_path / "peft"), "call adapter.remove() first"),
        "module_importance": (lambda: module_importance(model, tok, "capitals", n_prompts=1),
                              "(importance probes the base model): call adapter.remove() first"),
        "resume": (lambda: resume(tmp_path / "run", model, tok, "capitals"),
                   "pass it as resume(..., adapter=adapter), or call adapter.remove() first"),
    }
    for name, (call, tail) in calls.items():
        with pytest.raises(ValueError) as caught:
            call()
        assert str(caught.value).startswith(message) and str(caught.value).endswith(tail), (name, caught.value)


def test_a_task_name_is_resolved_the_same_way_everywhere(tmp_path):
    from tinylab.widgets import KnobPanel

    from tinylab import GRPOConfig, evaluate, module_importance, preset, tasks, train_grpo
    from tinylab.analysis.head_ablation import Scorer
    from tinylab.evaluation.controls import control_examples
    from tinylab.interop.trl_bridge import trl_args
    from tinylab.tasks.base import Example
    from tinylab.train.grpo import train_pool

    examples = [Example("What is 2+2?", "4")]

    model, tok = tiny_model("llama", seed=0)
    adapter = apply_tinylora(model, u=2, n_tie="all")
    config = GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=3,
                        checkpoint_dir=str(tmp_path / "ok"))
    run = train_grpo(model, tok, adapter, "capitals", config)  # a name works where a Task does
    assert run.status == "finished" and run.task_name == "capitals"
    unknown = r"unknown task 'capitols'; choose one of \['arithmetic', 'capitals'"
    calls = [
        lambda: train_grpo(model, tok, adapter, "capitols", config),
        lambda: evaluate(model, tok, "capitols", n=2),
        lambda: module_importance(tiny_model("llama", seed=2)[0], tok, "capitols", n_prompts=2),
        lambda: preset("tiny-cpu", task="capitols"),  # at once, not when the run loads the task
        lambda: KnobPanel(model, tok, adapter, examples, examples, task="capitols"),
        lambda: train_pool("capitols", 0),
        lambda: trl_args(GRPOConfig(), str(tmp_path / "trl"), "capitols"),
        lambda: control_examples("capitols", examples),
        lambda: Scorer(model, tok, ["What is 2+2?"], ["4"], "capitols", None, 2),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=unknown):
            call()
    capitals = tasks.get("capitals")
    assert train_pool("capitals", 0) == train_pool(capitals, 0)
    args = trl_args(GRPOConfig(), str(tmp_path / "trl"), "capitals")
    assert args.max_completion_length == capitals.max_new_tokens != 64  # the task's, not the default
    some = capitals.examples("test", 2, 0)
    assert control_examples("capitals", some) == control_examples(capitals, some) != some
    assert Scorer(model, tok, ["What is 2+2?"], ["4"], "capitals", None, 2).max_new_tokens == capitals.max_new_tokens
