"""Tasks: registry, disjoint splits, scoring of the synthetic tasks, reward functions (ours and TRL's call)."""

import math

import pytest

from tinylab import tasks
from tinylab.tasks import RewardShape, Score
from tinylab.tasks.base import Example, Task, completion_text
from tinylab.tasks.capitals import CAPITALS, CapitalAnswerTask, CapitalsTask
from tinylab.tasks.synthetic import ArithmeticTask, ComparisonTask

SYNTHETIC = ["arithmetic", "capitals", "capitals_answer", "compare"]


def _content(example):
    return example.prompt[-1]["content"]


# --- registry


def test_names_and_get():
    assert tasks.names() == ["arithmetic", "capitals", "capitals_answer", "compare", "gsm8k"]
    for name in tasks.names():
        task = tasks.get(name)
        assert isinstance(task, Task) and task.name == name
        assert isinstance(task.max_new_tokens, int) and task.max_new_tokens >= 1
    assert tasks.get("capitals").max_new_tokens <= 16


def test_get_rejects_unknown_names_and_non_tasks():
    with pytest.raises(ValueError, match="'gsm9k'.*arithmetic"):
        tasks.get("gsm9k")
    with pytest.raises(TypeError, match="not a task"):
        tasks.get(object())


def test_get_passes_keywords_and_returns_task_objects_unchanged():
    task = tasks.get("arithmetic", max_operand=3, ops="*")
    assert task.max_operand == 3 and task.ops == "*"
    assert tasks.get(task) is task


def test_register_a_user_task():
    class Echo:  # any object with the protocol's attributes is a task
        name = "echo"
        max_new_tokens = 4

        def examples(self, split="train", n=None, seed=0):
            return [Example("say hi", "hi")]

        def reward(self, completions, answers=None, **kwargs):
            return [float(c == a) for c, a in zip(completions, answers or kwargs["answer"])]

        def score(self, completion, answer):
            return Score(True, completion == answer, answer in completion, completion)

    tasks.register("echo_test", Echo)
    try:
        assert "echo_test" in tasks.names()
        assert isinstance(tasks.get("echo_test"), Task)
    finally:
        tasks._REGISTRY.pop("echo_test")


# --- splits


@pytest.mark.parametrize("name", SYNTHETIC)
def test_splits_are_disjoint_and_cover_the_universe(name):
    task = tasks.get(name)
    train = task.examples("train", n=None, seed=None)
    test = task.examples("test", n=None, seed=None)
    train_prompts = {_content(e) for e in train}
    test_prompts = {_content(e) for e in test}
    assert len(train_prompts) == len(train) and len(test_prompts) == len(test)  # no duplicates either
    assert train_prompts.isdisjoint(test_prompts)
    assert len(test) >= 100  # enough held-out prompts to measure a rate
    fraction = len(test) / (len(train) + len(test))
    assert abs(fraction - task.test_fraction) < 0.02


@pytest.mark.parametrize("name", SYNTHETIC)
def test_sampled_examples_stay_within_their_split(name):
    task = tasks.get(name)
    test_prompts = {_content(e) for e in task.examples("test", n=None, seed=None)}
    for seed in range(5):
        train = task.examples("train", n=50, seed=seed)
        assert not {_content(e) for e in train} & test_prompts


def test_split_seed_changes_the_partition_not_the_disjointness():
    a, b = ComparisonTask(split_seed=0), ComparisonTask(split_seed=1)
    test_a = {_content(e) for e in a.examples("test", None, None)}
    test_b = {_content(e) for e in b.examples("test", None, None)}
    assert test_a != test_b
    assert test_b.isdisjoint({_content(e) for e in b.examples("train", None, None)})


def test_capitals_split_by_country_in_every_phrasing():
    task = CapitalsTask()
    assert len(CAPITALS) >= 80
    cities = {split: {e.answer for e in task.examples(split, None, None)} for split in ("train", "test")}
    assert cities["train"].isdisjoint(cities["test"])
    assert len(cities["train"]) + len(cities["test"]) == len(CAPITALS)
    test = task.examples("test", None, None)
    assert len(test) == len(cities["test"]) * len(task.templates)


def test_examples_are_seeded():
    task = ArithmeticTask()
    assert task.examples("test", 20, seed=3) == task.examples("test", 20, seed=3)
    assert task.examples("test", 20, seed=3) != task.examples("test", 20, seed=4)
    assert ArithmeticTask().examples("train", 5, seed=None) == task.examples("train", 5, seed=None)


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="validation"), "split='validation'.*train"),
    (dict(split="test", n=10**6), r"n=1000000: must be an integer >= 0 and <= 1980 \(compare/test has 1980 "),
    (dict(split="test", n=-1), "n=-1: must be an integer >= 0"),
    (dict(split="test", n=2.0), "n=2.0: must be an integer"),
])
def test_examples_reject_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ComparisonTask().examples(**kwargs)


@pytest.mark.parametrize("cls, kwargs, match", [
    (ComparisonTask, dict(max_value=1), "max_value=1"),
    (ArithmeticTask, dict(ops="/"), "ops='/'"),
    (ArithmeticTask, dict(max_operand=0), "max_operand=0"),
    (CapitalsTask, dict(templates=("no placeholder",)), "templates="),
    (CapitalsTask, dict(test_fraction=1.0), "test_fraction=1.0: must be a finite number > 0 and < 1"),
    (ComparisonTask, dict(split_seed=True), "split_seed=True: must be an integer"),
])
def test_constructors_reject_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_every_solution_scores_full_marks(name):
    task = tasks.get(name)
    examples = task.examples("train", None, None) + task.examples("test", None, None)
    assert all(e.solution is not None for e in examples)
    scores = [task.score(e.solution, e.answer) for e in examples]
    assert all(s.formatted and s.correct_strict and s.correct_flexible for s in scores)
    assert set(task.reward([e.solution for e in examples], [e.answer for e in examples])) == {1.0}


def test_comparison_answers_are_right_and_balanced():
    examples = ComparisonTask().examples("test", None, None)
    for e in examples[:200]:
        a, b = (int(w) for w in _content(e).removeprefix("Is ").split("?")[0].split(" greater than "))
        assert e.answer == ("yes" if a > b else "no")
    share_yes = sum(e.answer == "yes" for e in examples) / len(examples)
    assert 0.4 < share_yes < 0.6


# --- scoring


@pytest.mark.parametrize("reply, gold, expected", [
    ("Yes", "yes", (True, True, True)),
    ("**No.** 3 is less than 5", "no", (True, True, True)),
    ("No", "yes", (True, False, False)),
    ("I think yes", "yes", (False, False, True)),
    ("Nope, yes", "yes", (False, False, True)),  # "nope" is not "no"
    ("Yesterday no", "no", (False, False, True)),
    ("", "yes", (False, False, False)),
])
def test_comparison_score(reply, gold, expected):
    s = ComparisonTask().score(reply, gold)
    assert (s.formatted, s.correct_strict, s.correct_flexible) == expected


@pytest.mark.parametrize("reply, gold, expected", [
    ("12", "12", (True, True, True, "12")),
    (" 12. ", "12", (True, True, True, "12")),
    ("-7", "-7", (True, True, True, "-7")),
    ("7", "-7", (True, False, False, "7")),
    ("7 + 5 = 12", "12", (False, False, True, "12")),
    ("The answer is 1,012", "1012", (False, False, True, "1012")),
    ("12 apples", "12", (False, False, True, "12")),
    ("twelve", "12", (False, False, False, None)),
])
def test_arithmetic_score(reply, gold, expected):
    s = ArithmeticTask().score(reply, gold)
    assert (s.formatted, s.correct_strict, s.correct_flexible, s.extracted) == expected


@pytest.mark.parametrize("reply, gold, expected", [
    ("Paris", "Paris", (True, True, True)),
    ('"Paris."', "Paris", (True, True, True)),
    ("paris\n\nParis is the capital and largest city of France.", "Paris", (False, True, True)),
    ("The capital of France is Paris.", "Paris", (False, False, True)),
    ("Parisian", "Paris", (True, False, False)),
    ("Lyon", "Paris", (True, False, False)),
    ("Brasilia", "Brasília", (True, True, True)),  # accents ignored
    ("Bogota, Colombia", "Bogotá", (True, False, True)),
    ("Washington DC", "Washington, D.C.", (True, True, True)),
    ("Washington", "Washington, D.C.", (True, True, True)),
    ("Kiev", "Kyiv", (True, True, True)),
    ("Port au Prince", "Port-au-Prince", (True, True, True)),
    ("Delhi", "New Delhi", (True, False, False)),
    ("", "Paris", (False, False, False)),
])
def test_capitals_score(reply, gold, expected):
    s = CapitalsTask().score(reply, gold)
    assert (s.formatted, s.correct_strict, s.correct_flexible) == expected


@pytest.mark.parametrize("reply, gold, expected", [
    ("The capital of France is Paris.\nAnswer: Paris", "Paris", (True, True, True)),
    ("The capital of France is Paris. Answer: **Paris**.", "Paris", (True, True, True)),
    ("The capital of France is Paris.", "Paris", (False, False, True)),  # the base model's reply: no answer line
    ("Paris", "Paris", (False, False, True)),
    ("The capital of Vietnam is Hanoi. Answer: Vietnam.", "Hanoi", (True, False, True)),  # copies the wrong name
    ("Answer: Lyon\nAnswer: Paris", "Paris", (True, True, True)),  # the last answer line counts
    ("Answer: Paris\nAnswer: Lyon", "Paris", (True, False, True)),
    ("Answer: Answer: Answer: Answer: Answer: Answer:", "Paris", (False, False, False)),
    ("Answer:\nParis", "Paris", (False, False, True)),  # the answer belongs on the answer line
    ("Answer:   ", "Paris", (False, False, False)),
    ("Answer: The capital of France is Paris", "Paris", (False, False, True)),  # more than 4 words
    ('answer: "Washington DC"', "Washington, D.C.", (True, True, True)),
    ("Answer: Kiev", "Kyiv", (True, True, True)),
    ("", "Paris", (False, False, False)),
    ("My answer: Lyon. Answer: Paris", "Paris", (True, True, True)),  # the last "Answer:" on the line counts
    ("Answer: Paris. My answer: Lyon", "Paris", (True, False, True)),
    ("The capital is Parisian. Answer: Lyon", "Paris", (True, False, False)),  # whole words only
])
def test_capital_answer_score(reply, gold, expected):
    s = CapitalAnswerTask().score(reply, gold)
    assert (s.formatted, s.correct_strict, s.correct_flexible) == expected


@pytest.mark.parametrize("task", [CapitalsTask(countries="world"), CapitalAnswerTask(countries="world")],
                         ids=["capitals", "capitals_answer"])
def test_a_strict_correct_reply_is_flexible_correct_for_every_capital_and_spelling(task):
    """Strict ignores spaces inside a name ("Sana a" is Sanaa); flexible must accept what strict does."""
    line = "{}" if task.name == "capitals" else "The capital is {}.\nAnswer: {}"
    checked = 0
    for city in task.capitals():
        names = set(task._aliases.get(city.replace(" ", "").lower(), ())) | {city}
        for name in names:
            for spelling in (name, name.replace(" ", ""), name.replace("'", " "), name.replace("-", " ")):
                s = task.score(line.format(spelling, spelling), city)
                if s.correct_strict:
                    checked += 1
                    assert s.correct_flexible, (city, spelling)
    assert checked >= len(task.capitals())
    sanaa = task.score(line.format("Sana'a", "Sana'a"), "Sanaa")
    assert sanaa.correct_strict and sanaa.correct_flexible
    assert task.score("I think it is Sana'a, in the north.", "Sanaa").correct_flexible  # named anywhere


def test_capital_answer_prompts_ask_for_the_line_and_solutions_score_strict():
    task = CapitalAnswerTask()
    train, test = task.examples("train", None, None), task.examples("test", None, None)
    assert {e.answer for e in train}.isdisjoint({e.answer for e in test})
    assert len(train) + len(test) == len(CAPITALS) * len(task.templates)
    for e in train + test:
        assert _content(e).endswith('End your reply with "Answer: <city>".')
        assert task.score(e.solution, e.answer).correct_strict, e.solution
    # the same split by country as the capitals task
    assert {e.answer for e in test} == {e.answer for e in CapitalsTask().examples("test", None, None)}


# --- rewards


def test_reward_shape_gives_partial_credit_in_order():
    shape = RewardShape(correct=1.0, flexible=0.3, formatted=0.1)
    task = CapitalsTask(shape=shape)
    replies = ["Paris", "It is Paris, of course.", "Lyon", "I am not sure about that one."]
    assert task.reward(replies, ["Paris"] * 4) == [1.0, 0.3, 0.1, 0.0]
    assert CapitalsTask().reward(replies, ["Paris"] * 4) == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("bad", [math.nan, "1", True])
def test_reward_shape_rejects_non_numbers(bad):
    with pytest.raises(ValueError, match="RewardShape.flexible"):
        RewardShape(flexible=bad)


@pytest.mark.parametrize("name", SYNTHETIC + ["gsm8k"])
def test_reward_accepts_trl_keyword_call(name):
    """TRL 1.16 GRPOTrainer._calculate_rewards calls reward_func(prompts=, completions=, completion_ids=,
    **dataset_columns, trainer_state=, log_extra=, log_metric=); conversational completions are
    lists of messages."""
    if name == "gsm8k":
        task = tasks.get(name, source={"test": [{"question": "2 + 5?", "answer": "2 + 5 = 7\n#### 7"}]})
        examples = task.examples("test", 1, 0) + [Example("3 * 4?", "12")]
        good = "2 + 5 = 7\n#### 7"
    else:
        task = tasks.get(name)
        examples = task.examples("test", 2, 0)
        good = examples[0].solution
    completions = [[{"role": "assistant", "content": good}], [{"role": "assistant", "content": "zzz"}]]
    rewards = task.reward(
        prompts=[e.prompt for e in examples], completions=completions, completion_ids=[[1], [2]],
        answer=[e.answer for e in examples], solution=[e.solution for e in examples],
        trainer_state=None, log_extra=lambda *a: None, log_metric=lambda *a: None,
    )
    assert rewards == [1.0, 0.0]
    assert task.reward([good, "zzz"], [e.answer for e in examples]) == rewards


def test_reward_rejects_mismatched_or_missing_answers():
    task = ComparisonTask()
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        task.reward(["yes", "no"], ["yes"])
    with pytest.raises(TypeError, match="gold answers"):
        task.reward(completions=["yes"])
    with pytest.raises(TypeError, match="lists"):
        task.reward("yes", "yes")


def test_completion_text_reads_message_forms():
    assert completion_text("hi") == "hi"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"text": "b"}]}]) == "ab"
    with pytest.raises(TypeError, match="int"):
        completion_text(3)


def test_reward_drives_trl_grpo_trainer(tmp_path):
    """One real GRPOTrainer step on a tiny model with a task's reward: TRL logs its mean."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from tinylab.model.tiny import tiny_model

    model, tokenizer = tiny_model("llama", seed=0)
    model.train()
    # partial credit for a short reply, so the tiny model's 4-token replies earn different rewards
    task = CapitalsTask(shape=RewardShape(formatted=0.5))
    seen, returned = [], []

    class Recording:  # a callable instance, one of the forms TRL names its reward after
        __name__ = "compare_reward"

        def __call__(self, **kwargs):
            seen.append(sorted(kwargs))
            rewards = task.reward(**kwargs)
            returned.extend(rewards)
            return rewards

    rows = [e._asdict() for e in task.examples("train", 4, 0)]
    args = GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, max_steps=1, per_device_train_batch_size=4,
        num_generations=2, max_completion_length=4, learning_rate=1e-3, report_to=[], logging_steps=1,
        save_strategy="no", gradient_checkpointing=False, dataloader_num_workers=0, seed=0,
    )
    torch.manual_seed(0)
    trainer = GRPOTrainer(model=model, reward_funcs=[Recording()], args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    assert seen and {"answer", "completions", "prompts"} <= set(seen[0])
    logged = [h for h in trainer.state.log_history if "rewards/compare_reward/mean" in h]
    # TRL logs the mean of what the task returned for this step's 4 completions (2 prompts x 2)
    assert len(returned) == 4 and len(set(returned)) > 1
    assert logged and logged[0]["rewards/compare_reward/mean"] == pytest.approx(sum(returned) / len(returned))


def test_doctests_of_the_reward_functions_hold():
    import doctest

    import tinylab.tasks.base
    import tinylab.tasks.capitals
    import tinylab.tasks.gsm8k
    import tinylab.tasks.synthetic

    for module in (tinylab.tasks.base, tinylab.tasks.capitals, tinylab.tasks.gsm8k, tinylab.tasks.synthetic):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
