"""Controls: the prompt control's examples and the random-direction control's vectors (norms per
tying group, seeded directions, the adapter's own vector restored exactly, also on error)."""

import pytest
import torch

from tinylab.adapter.attach import apply_tinylora
from tinylab.evaluation.controls import control_examples, random_directions
from tinylab.model.tiny import tiny_model
from tinylab.tasks import GSM8K, get
from tinylab.tasks.base import Example
from tinylab.tasks.gsm8k import EXPLICIT, INSTRUCTION


@pytest.fixture
def adapted():
    model, _ = tiny_model("llama", seed=0)
    adapter = apply_tinylora(model, u=3, n_tie=7, svd="exact")  # 14 modules in 2 groups of 7
    adapter.set_vector(torch.tensor([0.3, -0.4, 1.2, 5.0, 0.0, -12.0]))
    return adapter


def _group_norms(vector, u=3):
    return [float(torch.as_tensor(vector[i:i + u]).norm()) for i in range(0, len(vector), u)]


def test_random_directions_keep_each_groups_norm_and_restore_the_vector(adapted):
    own = adapted.vector().clone()
    seen = []
    with random_directions(adapted, draws=3, seed=0) as settings:
        for vector in settings:
            assert torch.equal(vector, adapted.vector())  # what is yielded is what is set
            assert _group_norms(vector) == pytest.approx(_group_norms(own), rel=1e-6)  # 1.3 and 13.0
            seen.append(vector.clone())
    assert len(seen) == 3 and not torch.allclose(seen[0], seen[1]) and not torch.allclose(seen[1], seen[2])
    assert all(not torch.allclose(v, own) for v in seen)  # a random direction, not the trained one
    assert torch.equal(adapted.vector(), own)  # bit for bit
    with random_directions(adapted, draws=3, seed=0) as settings:
        again = [v.clone() for v in settings]
    with random_directions(adapted, draws=1, seed=1) as settings:
        other = next(iter(settings)).clone()
    assert all(torch.equal(a, b) for a, b in zip(seen, again)) and not torch.allclose(other, seen[0])


def test_random_directions_restore_on_error_and_refuse_bad_input(adapted):
    own = adapted.vector().clone()
    with pytest.raises(RuntimeError, match="boom"):
        with random_directions(adapted, draws=2) as settings:
            next(iter(settings))
            assert not torch.equal(adapted.vector(), own)
            raise RuntimeError("boom")
    assert torch.equal(adapted.vector(), own)
    with pytest.raises(ValueError, match="draws=0: must be an integer >= 1"):
        with random_directions(adapted, draws=0):
            pass
    adapted.merge()  # a merged adapter is unmerged inside (the draws must reach the forward) and merged after
    with random_directions(adapted, draws=1) as settings:
        drawn = next(iter(settings))
        assert not adapted.merged and torch.equal(adapted.vector(), drawn)
    assert adapted.merged and torch.equal(adapted.vector(), own)


def test_zero_vectors_stay_zero(adapted):
    adapted.set_vector(torch.zeros(6))
    with random_directions(adapted, draws=2) as settings:
        assert all(torch.equal(v, torch.zeros(6)) for v in settings)


@pytest.mark.parametrize("name", ["capitals", "capitals_answer", "compare", "arithmetic"])
def test_prompt_control_prepends_one_worked_training_example(name):
    task = get(name)
    examples = task.examples("test", 5, 0)
    controlled = control_examples(task, examples)
    train_prompts = {str(e.prompt) for e in task.examples("train", None, None)}
    test_prompts = {str(e.prompt) for e in task.examples("test", None, None)}
    for ex, ctl in zip(examples, controlled):
        assert (ctl.answer, ctl.solution) == (ex.answer, ex.solution)
        worked, reply, asked = ctl.prompt[:-2], ctl.prompt[-2], ctl.prompt[-1]
        assert ctl.prompt[-1:] == ex.prompt and asked["role"] == "user"
        assert str(worked) in train_prompts and str(worked) not in test_prompts  # never a held-out question
        assert reply["role"] == "assistant"
        gold = next(e for e in task.examples("train", None, None) if e.prompt == worked)
        assert reply["content"] == gold.solution and task.score(gold.solution, gold.answer).correct_strict


def test_gsm8k_prompt_control_spells_out_the_answer_line():
    rows = [{"question": "Ann has 3 pens and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}]
    task = GSM8K(source={"test": rows})
    (ex,) = task.examples("test", None, None)
    (ctl,) = control_examples(task, [ex])
    assert INSTRUCTION in ex.prompt[0]["content"] and INSTRUCTION not in ctl.prompt[0]["content"]
    assert ctl.prompt[0]["content"] == ex.prompt[0]["content"].replace(INSTRUCTION, EXPLICIT)
    assert "####" in EXPLICIT and task.control_prompt("q? " + INSTRUCTION) == "q? " + EXPLICIT


def test_a_task_without_a_prompt_control_is_named():
    class Plain:  # a task (it scores replies) without control_prompt
        name = "plain"

        def score(self, reply, answer):
            return None

    with pytest.raises(ValueError, match="task 'plain' has no prompt control; give it a method control_prompt"):
        control_examples(Plain(), [Example("q", "a")])


def test_other_vectors_are_set_in_turn_and_the_own_vector_restored_also_on_error(adapted):
    from tinylab.evaluation.controls import other_vectors

    own = adapted.vector().clone()
    a, b = torch.arange(6.0), -torch.arange(6.0)
    with other_vectors(adapted, {"a": a, "b": b.tolist()}) as names:
        seen = [(name, adapted.vector().clone()) for name in names]
    assert [n for n, _ in seen] == ["a", "b"] and torch.equal(seen[0][1], a) and torch.equal(seen[1][1], b)
    assert torch.equal(adapted.vector(), own)
    with pytest.raises(RuntimeError, match="boom"):
        with other_vectors(adapted, {"a": a}) as names:
            next(iter(names))
            raise RuntimeError("boom")
    assert torch.equal(adapted.vector(), own)
    with pytest.raises(ValueError, match="vector 'short' has 2 values; this adapter has 6"):
        with other_vectors(adapted, {"a": a, "short": [1.0, 2.0]}):
            pass
    assert torch.equal(adapted.vector(), own)
