"""evaluate / compare on tiny models: batch-size invariance, a well-formed report, base vs adapted."""

import math

import pandas as pd
import pytest
import torch

from tinylab.adapter.attach import apply_tinylora, find_adapter
from tinylab.evaluation.report import Comparison, EvalReport, compare, evaluate
from tinylab.model.batch import render_prompts
from tinylab.model.tiny import tiny_model
from tinylab.tasks import GSM8K, get
from tinylab.tasks.base import Example, Score

COLUMNS = ["prompt", "reply", "extracted", "gold", "formatted", "correct_strict", "correct_flexible", "length",
           "truncated", "reward"]


def test_the_functions_do_not_shadow_their_module():
    """`tinylab.evaluate` is the function and the module is `tinylab.evaluation.report` (notebook 05 calls
    `tinylab.compare`; `tinylab.evaluate.compare` raised AttributeError when the two shared a name)."""
    import tinylab
    import tinylab.evaluation.report

    assert tinylab.evaluate is tinylab.evaluation.report.evaluate and tinylab.compare is tinylab.evaluation.report.compare
    assert evaluate.__module__ == compare.__module__ == "tinylab.evaluation.report"


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=0)


class Mixed:
    """A user task (no tinylab base class): prompts of very different lengths, strings and chats."""

    name = "mixed"
    max_new_tokens = 6

    def examples(self, split="test", n=None, seed=0):
        words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
        out = []
        for i in range(10):
            text = " ".join(words[: 1 + (7 * i) % 10]) + f" {i}?"
            out.append(Example(text if i % 3 == 0 else [{"role": "user", "content": text}], str(i)))
        return out[:n]

    def score(self, completion, answer):
        return Score(formatted=len(completion) > 0, correct_strict=answer in completion,
                     correct_flexible=True, extracted=completion[:3])

    def reward(self, completions, answers=None, **kwargs):
        return [None if i % 2 else 0.5 for i, _ in enumerate(completions)]


def _gsm8k(n=12):
    """GSM8K with made-up problems of very different lengths (no data files, no network)."""
    words = "a farmer has some apples and sells part of them at the market every single day of the week".split()
    rows = [{"question": f"{' '.join(words[: 2 + (5 * i) % len(words)])}: how many are {i} + {i}?",
             "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(n)]
    return GSM8K(source={"train": rows, "test": rows})


def _lively(model, seed=0):
    """Re-draw the weights with std 0.2: at the default 0.02 a tied-embedding tiny model just repeats
    its last input token, the same reply for every prompt, which would make the comparison vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma"])
def test_replies_do_not_depend_on_batch_size(arch):
    """Greedy fp32 replies with left padding must be identical in batches of 1, 3 and 16."""
    model, tokenizer = tiny_model(arch, seed=1)
    _lively(model)
    task = _gsm8k()
    reports = {bs: evaluate(model, tokenizer, task, n=12, batch_size=bs, max_new_tokens=8, progress=False)
               for bs in (1, 3, 16)}
    texts = render_prompts(tokenizer, [e.prompt for e in task.examples("test", 12, 0)])
    lengths = {len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts}
    assert len(lengths) > 6  # very different prompt lengths, so batches are padded
    first = list(reports[1].table["reply"])
    assert len(set(first)) == 12  # every prompt gets its own reply
    for bs in (3, 16):
        assert list(reports[bs].table["reply"]) == first
        assert list(reports[bs].table["length"]) == list(reports[1].table["length"])


def test_report_is_well_formed(llama):
    model, tokenizer = llama
    task = get("capitals")
    report = evaluate(model, tokenizer, task, n=7, batch_size=3, progress=False)
    assert isinstance(report, EvalReport)
    assert (report.task, report.split, report.n, report.max_new_tokens, report.params) == ("capitals", "test", 7, 16,
                                                                                          None)
    table = report.table
    assert isinstance(table, pd.DataFrame) and list(table.columns) == COLUMNS and len(table) == 7
    examples = task.examples("test", 7, 0)
    assert list(table["prompt"]) == [e.prompt[-1]["content"] for e in examples]  # rows in example order
    assert list(table["gold"]) == [e.answer for e in examples]
    for _, row in table.iterrows():
        s = task.score(row["reply"], row["gold"])
        assert (row["formatted"], row["correct_strict"], row["correct_flexible"], row["extracted"]) == tuple(s)
    assert report.strict == table["correct_strict"].mean() and report.formatted == table["formatted"].mean()
    assert report.flexible == table["correct_flexible"].mean()
    assert report.mean_length == table["length"].mean() and 0 <= report.mean_length <= 16
    assert report.truncated == table["truncated"].mean()
    assert all(table.loc[table["truncated"], "length"] == 16)
    assert report.seconds > 0 and "capitals/test n=7" in report.summary()


def test_lengths_and_cutoffs_count_generated_tokens(llama, monkeypatch):
    """Length = tokens before the end-of-turn token; a reply without one was cut at max_new_tokens."""
    from tinylab.model.generation import Rollout

    model, tokenizer = llama
    eos = tokenizer.eos_token_id

    def fake_generate(model, tokenizer, prompts, **kwargs):
        assert kwargs["temperature"] == 0.0 and kwargs["max_new_tokens"] == 4
        ids = torch.tensor([[5, 6, eos, eos], [5, 6, 7, 8], [eos, eos, eos, eos]])[: len(prompts)]  # [b, L]
        mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])[: len(prompts)]  # [b, L]
        return Rollout(["x"] * len(prompts), ids, ids, mask, torch.ones_like(ids))

    monkeypatch.setattr("tinylab.measures.replies.generate", fake_generate)
    report = evaluate(model, tokenizer, Mixed(), n=3, batch_size=3, max_new_tokens=4, progress=False)
    assert sorted(zip(report.table["length"], report.table["truncated"])) == [(0, False), (2, False), (4, True)]
    assert report.mean_length == 2.0 and report.truncated == pytest.approx(1 / 3)


def test_user_task_with_string_prompts_and_none_rewards(llama):
    model, tokenizer = llama
    report = evaluate(model, tokenizer, Mixed(), n=10, batch_size=4, progress=False)
    assert report.n == 10 and report.flexible == 1.0
    rewards = list(report.table["reward"])
    assert rewards[0] == 0.5 and math.isnan(rewards[1])
    assert report.table["prompt"][0] == "alpha 0?"


def test_evaluate_rejects_bad_arguments(llama):
    model, tokenizer = llama
    for kwargs, match in [(dict(n=0), "n=0"), (dict(n=2, batch_size=0), "batch_size=0"),
                          (dict(n=2, max_new_tokens=0), "max_new_tokens=0")]:
        with pytest.raises(ValueError, match=match):
            evaluate(model, tokenizer, "compare", progress=False, **kwargs)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        evaluate(model, tokenizer, "nope", n=2)
    with pytest.raises(TypeError, match="TinyLoRA handle"):
        evaluate(model, tokenizer, "compare", n=2, adapter=3)


def _adapted(seed=0):
    model, tokenizer = tiny_model("llama", seed=seed)
    adapter = apply_tinylora(model, u=4, n_tie="all", svd="exact")
    adapter.set_vector(torch.tensor([30.0, -20.0, 25.0, 40.0]))  # large enough to change greedy replies
    return model, tokenizer, adapter


def test_compare_lines_up_base_and_adapted():
    model, tokenizer, adapter = _adapted()
    task = _gsm8k()
    result = compare(model, tokenizer, task, adapter, n=6, batch_size=4, max_new_tokens=6, progress=False)
    assert isinstance(result, Comparison)
    base_alone = evaluate(model, tokenizer, task, n=6, max_new_tokens=6, progress=False, adapter=None)
    with adapter.disabled():
        disabled = evaluate(model, tokenizer, task, n=6, max_new_tokens=6, progress=False)
    assert list(result.base.table["reply"]) == list(disabled.table["reply"])
    assert list(result.adapted.table["reply"]) == list(base_alone.table["reply"])  # adapter on after compare
    assert list(result.base.table["reply"]) != list(result.adapted.table["reply"])
    assert result.base.params is None and result.adapted.params == 4
    table = result.table
    assert len(table) == 6 and list(table["base_reply"]) == list(result.base.table["reply"])
    assert list(table["prompt"]) == list(result.base.table["prompt"]) == list(result.adapted.table["prompt"])
    for _, row in table.iterrows():
        expected = {(True, True): "kept", (True, False): "lost", (False, True): "gained", (False, False): "neither"}
        assert row["change"] == expected[(row["base_correct_strict"], row["adapted_correct_strict"])]
    summary = result.summary()
    assert list(summary.columns) == ["base", "adapted", "delta", "low", "high", "p_value", "gained", "lost",
                                     "beyond_noise"]  # no control asked for, no control column


def test_compare_and_evaluate_load_an_adapter_file_and_remove_it(tmp_path):
    from tinylab.adapter.file_format import save_adapter

    model, tokenizer, adapter = _adapted()
    with_handle = evaluate(model, tokenizer, "compare", n=4, progress=False, adapter=adapter)
    path = save_adapter(adapter, tmp_path / "a.tlra")
    adapter.remove()
    assert not find_adapter(model)
    from_file = evaluate(model, tokenizer, "compare", n=4, progress=False, adapter=path)
    assert list(from_file.table["reply"]) == list(with_handle.table["reply"]) and from_file.params == 4
    assert not find_adapter(model)
    result = compare(model, tokenizer, "compare", path, n=4, progress=False)
    assert list(result.adapted.table["reply"]) == list(with_handle.table["reply"])
    assert not find_adapter(model)


def test_compare_needs_an_adapter_of_this_model(llama):
    model, tokenizer = llama
    with pytest.raises(ValueError, match="needs an adapter"):
        compare(model, tokenizer, "compare", None, n=2)
    _, _, other = _adapted()
    with pytest.raises(ValueError, match="not attached to this model"):
        compare(model, tokenizer, "compare", other, n=2)


@pytest.mark.slow
def test_embedded_model_capitals_report_and_batch_invariance(embedded):
    """The embedded model on a few held-out capitals: batched replies equal one-at-a-time replies."""
    model, tokenizer = embedded
    one = evaluate(model, tokenizer, "capitals", n=4, batch_size=1, max_new_tokens=8, progress=False)
    batched = evaluate(model, tokenizer, "capitals", n=4, batch_size=4, max_new_tokens=8, progress=False)
    assert list(one.table["reply"]) == list(batched.table["reply"])
    assert all(len(reply) > 0 for reply in batched.table["reply"])
    task = get("capitals")  # the rate is the task's own reading of these replies
    named = [task.score(reply, gold).correct_flexible for reply, gold in zip(batched.table["reply"],
                                                                            batched.table["gold"])]
    assert batched.flexible == sum(named) / 4


def test_compare_reports_paired_statistics_per_measure():
    from tinylab.evaluation.paired_stats import paired

    model, tokenizer, adapter = _adapted()
    result = compare(model, tokenizer, _gsm8k(), adapter, n=12, batch_size=6, max_new_tokens=6, progress=False,
                     control_seed=3)
    for measure, column in (("strict", "correct_strict"), ("flexible", "correct_flexible"), ("formatted", "formatted")):
        expected = paired(list(result.base.table[column]), list(result.adapted.table[column]))
        assert result.paired[measure] == expected
        assert list(result.table[f"base_{column}"]) == list(result.base.table[column])
        assert list(result.table[f"adapted_{column}"]) == list(result.adapted.table[column])
    summary = result.summary()
    assert list(summary.columns[:3]) == ["base", "adapted", "delta"]
    assert summary.loc["flexible", "low"] == result.paired["flexible"].low
    assert summary.loc["formatted", "gained"] == result.paired["formatted"].gained
    assert summary.loc["mean_length", "delta"] == result.adapted.mean_length - result.base.mean_length
    lines = result.report().splitlines()
    assert len(lines) == 4 and all("[95% CI" in line and "noise" in line for line in lines[1:])
    assert lines[2] == result.paired["flexible"].line("  flexible ")
    assert result.prompt is result.random is None


class _Prompted:
    """A task whose examples are another task's under its prompt control (to check compare's row)."""

    def __init__(self, task):
        self.task, self.name, self.max_new_tokens = task, task.name, task.max_new_tokens

    def examples(self, split="test", n=None, seed=0):
        from tinylab.evaluation.controls import control_examples

        return control_examples(self.task, self.task.examples(split, n, seed))

    def score(self, completion, answer):
        return self.task.score(completion, answer)

    def reward(self, completions, answers=None, **kwargs):
        return self.task.reward(completions, answers, **kwargs)


def test_compare_with_the_prompt_and_random_direction_controls():
    model, tokenizer = tiny_model("llama", seed=1)
    _lively(model)
    adapter = apply_tinylora(model, u=2, n_tie=7, svd="exact")  # two groups of 7 modules
    adapter.set_vector(torch.tensor([3.0, -4.0, 0.5, 12.0]))
    own = adapter.vector().clone()
    task = get("capitals_answer")
    kwargs = dict(n=6, batch_size=6, max_new_tokens=6, progress=False)
    result = compare(model, tokenizer, task, adapter, controls=("prompt", "random"), draws=2, **kwargs)
    assert torch.equal(adapter.vector(), own)  # restored after the random directions
    with adapter.disabled():
        prompted = evaluate(model, tokenizer, _Prompted(task), **kwargs)
    assert list(result.prompt.table["reply"]) == list(prompted.table["reply"])
    assert list(result.table["prompt_reply"]) == list(prompted.table["reply"])
    assert list(result.prompt.table["reply"]) != list(result.base.table["reply"])  # the prompt changed them
    assert result.prompt_paired["strict"].diff == result.adapted.strict - result.prompt.strict
    assert len(result.random.reports) == len(result.random.vectors) == 2
    for report, vector in zip(result.random.reports, result.random.vectors):
        assert torch.tensor(vector[:2]).norm() == pytest.approx(5.0) and torch.tensor(vector[2:]).norm() == \
            pytest.approx(own[2:].norm().item())
        adapter.set_vector(torch.tensor(vector))
        assert list(evaluate(model, tokenizer, task, **kwargs).table["reply"]) == list(report.table["reply"])
    adapter.set_vector(own)
    rates = result.random.rates()
    assert rates.loc["strict", "mean"] == pytest.approx(sum(r.strict for r in result.random.reports) / 2)
    summary = result.summary()
    assert summary.loc["formatted", "prompt_control"] == result.prompt.formatted
    assert summary.loc["flexible", "random_mean"] == rates.loc["flexible", "mean"]
    text = result.report()
    assert "adapted vs prompt control" in text and "random-direction control (2 draws" in text
    with pytest.raises(ValueError, match=r"controls='sft': allowed values are 'prompt', 'random'"):
        compare(model, tokenizer, task, adapter, controls=("sft",), **kwargs)
    with pytest.raises(ValueError, match="task 'mixed' has no prompt control"):
        compare(model, tokenizer, Mixed(), adapter, controls=("prompt",), **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_evaluate_and_compare_follow_the_model_off_the_default_device(gpu_stand_in, dtype):
    """The GPU stand-in: torch's default device is meta while the model sits on the CPU; a tensor
    made without the model's device would land on meta and fail."""
    model, tokenizer = tiny_model("llama", seed=1, dtype=dtype)
    adapter = apply_tinylora(model, u=2, n_tie="all", svd="exact")
    adapter.set_vector(torch.tensor([30.0, -20.0]))
    reference = evaluate(model, tokenizer, "capitals_answer", n=4, max_new_tokens=5, progress=False)
    with gpu_stand_in():
        assert torch.empty(1).device.type == "meta"
        report = evaluate(model, tokenizer, "capitals_answer", n=4, max_new_tokens=5, progress=False)
        result = compare(model, tokenizer, "capitals_answer", adapter, n=4, max_new_tokens=5, progress=False,
                         controls=("prompt", "random"), draws=1, vectors={"SFT": [1.0, 2.0]})
    assert list(report.table["reply"]) == list(reference.table["reply"])
    assert list(result.adapted.table["reply"]) == list(reference.table["reply"])
    assert next(model.parameters()).dtype == dtype and adapter.vector().tolist() == [30.0, -20.0]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_evaluate_and_compare_on_cuda(dtype):
    model, tokenizer = tiny_model("llama", seed=1, dtype=dtype)
    adapter = apply_tinylora(model, u=2, n_tie="all", svd="exact")
    adapter.set_vector(torch.tensor([30.0, -20.0]))
    reference = evaluate(model, tokenizer, "capitals_answer", n=4, max_new_tokens=5, progress=False)
    model.to("cuda")
    result = compare(model, tokenizer, "capitals_answer", adapter, n=4, max_new_tokens=5, progress=False,
                     controls=("prompt", "random"), draws=1)
    assert result.adapted.n == 4 and adapter.vector().tolist() == [30.0, -20.0]
    if dtype == torch.float32:
        assert list(result.adapted.table["reply"]) == list(reference.table["reply"])


def test_compare_scores_other_vectors_of_the_same_adapter_as_their_own_rows():
    model, tokenizer = tiny_model("llama", seed=1)
    _lively(model)
    adapter = apply_tinylora(model, u=2, n_tie=7, svd="exact")
    adapter.set_vector(torch.tensor([3.0, -4.0, 0.5, 12.0]))
    own = adapter.vector().clone()
    other = torch.tensor([-6.0, 2.0, 9.0, -1.0])
    kwargs = dict(n=6, batch_size=6, max_new_tokens=6, progress=False)
    adapter.merge()  # scored unmerged, merged again after
    result = compare(model, tokenizer, "capitals_answer", adapter, vectors={"SFT": other}, **kwargs)
    assert adapter.merged and torch.equal(adapter.vector(), own)
    adapter.unmerge()
    adapter.set_vector(other)
    alone = evaluate(model, tokenizer, "capitals_answer", **kwargs)
    adapter.set_vector(own)
    assert list(result.others["SFT"].table["reply"]) == list(alone.table["reply"])
    assert list(result.table["SFT_reply"]) == list(alone.table["reply"])
    assert list(alone.table["reply"]) != list(result.adapted.table["reply"])  # another vector, other replies
    d = result.others_paired["SFT"]["flexible"]
    assert d.diff == pytest.approx(result.adapted.flexible - alone.flexible) and d.n == 6
    assert result.summary().loc["strict", "SFT"] == alone.strict
    assert "adapted vs SFT" in result.report()
    with pytest.raises(ValueError, match="vector 'SFT' has 3 values; this adapter has 4"):
        compare(model, tokenizer, "capitals_answer", adapter, vectors={"SFT": [1.0, 2.0, 3.0]}, **kwargs)
    with pytest.raises(ValueError, match=r"vector 'x' holds NaN or inf at positions \[1\]"):
        compare(model, tokenizer, "capitals_answer", adapter, vectors={"x": [1.0, float("nan"), 0, 0]}, **kwargs)
    with pytest.raises(ValueError, match=r"\['base'\] are taken"):
        compare(model, tokenizer, "capitals_answer", adapter, vectors={"base": other}, **kwargs)
    assert torch.equal(adapter.vector(), own)
