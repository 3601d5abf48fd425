"""The gold log-probability (tinylab.measures.gold): batched and padded, it must equal one plain forward
per example; it follows the adapter and carries its gradient; bad examples are refused by name."""

import pytest
import torch

from tinylab.adapter.attach import apply_tinylora
from tinylab.adapter.config import TinyLoRAConfig
from tinylab.measures.gold import GoldSet, gold_pairs, mean_logprob
from tinylab.model.batch import prompt_rows
from tinylab.model.tiny import tiny_model

EXAMPLES = [("Name a fruit:", " apple pie"), ("Two plus two is", " four"),
            ([{"role": "user", "content": "Say hello to the whole wide world, please."}], "Hello, world!")]


def _plain(model, tok, prompt, gold) -> float:
    """Mean log p of the gold tokens after the prompt: one unpadded sequence, no batching."""
    ids = prompt_rows(tok, [prompt])[0]
    tail = tok(gold, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids + tail])).logits[0, len(ids) - 1:-1].float()  # [len(tail), V]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tail)[:, None]).mean().item()


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_batched_gold_logprobs_equal_one_plain_forward_each(batch_size):
    model, tok = tiny_model("llama", seed=0)
    gold = GoldSet(model, tok, EXAMPLES, batch_size=batch_size)
    with torch.no_grad():
        got = gold.logprobs()
    assert got.shape == (3,) and got.dtype == torch.float32 and len(gold) == 3
    expected = torch.tensor([_plain(model, tok, p, g) for p, g in EXAMPLES])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_gold_logprobs_follow_the_adapter_and_carry_its_gradient():
    model, tok = tiny_model("llama", seed=0)
    adapter = apply_tinylora(model, TinyLoRAConfig(u=3, n_tie="all"))
    gold = GoldSet(model, tok, EXAMPLES[:2])
    with torch.no_grad():
        at_zero = gold.logprobs()
    adapter.set_vector(torch.tensor([0.5, -0.5, 0.25]))
    moved = gold.logprobs()
    assert not torch.allclose(moved.detach(), at_zero, atol=1e-4)
    moved.sum().backward()
    assert adapter.vectors[0].grad is not None and adapter.vectors[0].grad.abs().sum() > 0


def test_the_solution_target_and_bad_examples():
    model, tok = tiny_model("llama", seed=0)
    Example = type("Example", (), {})
    ex = Example()
    ex.prompt, ex.answer, ex.solution = "Two plus two is", "4", " four, of course"
    solution = GoldSet(model, tok, [ex], target="solution")
    assert solution.golds == [" four, of course"]
    with torch.no_grad():
        assert solution.logprobs().item() == pytest.approx(_plain(model, tok, ex.prompt, ex.solution), abs=1e-4)
    with pytest.raises(ValueError, match=r"target='solution' but examples \[0\] have no solution"):
        GoldSet(model, tok, [("a", "b")], target="solution")
    with pytest.raises(ValueError, match="target='reply'"):
        GoldSet(model, tok, [("a", "b")], target="reply")
    with pytest.raises(ValueError, match=r"examples \[1\] have a gold answer of zero tokens"):
        GoldSet(model, tok, [("a", "b"), ("c", "")])
    with pytest.raises(ValueError, match=r"examples\[1\]=.*must be an Example or a \(prompt, answer\) pair"):
        gold_pairs([("a", "b"), ("c",)])
    with pytest.raises(ValueError, match="non-empty list"):
        gold_pairs([])


def test_mean_logprob_averages_over_the_mask_only():
    lp = torch.tensor([[-1.0, -3.0, 0.0], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(mean_logprob(lp, mask), torch.tensor([-2.0, -2.0]))
