"""Greedy replies scored by the task (tinylab.measures.replies): batching by length must not change a
reply or its place; lengths and cut-offs are counted; scores keep format and correctness apart."""

import pytest
import torch
from testkit import WordTask

from tinylab.measures.replies import MEASURES, greedy_replies, score_shares, scored_replies
from tinylab.model.generation import generate, stop_token_ids
from tinylab.model.tiny import tiny_model

PROMPTS = ["Hi", "A much longer prompt with many more words in it than the others", "Two words",
           [{"role": "user", "content": "Say fig."}], "Count: one two three"]


def test_replies_come_back_in_prompt_order_whatever_the_batching():
    model, tok = tiny_model("llama", seed=0)
    alone = [generate(model, tok, [p], max_new_tokens=5, temperature=0.0).completions[0] for p in PROMPTS]
    for batch_size in (1, 2, 8):
        replies = greedy_replies(model, tok, PROMPTS, max_new_tokens=5, batch_size=batch_size)
        assert replies.texts == alone, batch_size
        assert len(replies.lengths) == len(replies.truncated) == len(PROMPTS)


def test_lengths_and_cut_offs_are_counted():
    model, tok = tiny_model("llama", seed=0)
    replies = greedy_replies(model, tok, PROMPTS, max_new_tokens=3)
    out = generate(model, tok, PROMPTS, max_new_tokens=3, temperature=0.0)
    stops = stop_token_ids(model, tok)
    for i, (length, cut) in enumerate(zip(replies.lengths, replies.truncated)):
        kept = int(out.completion_mask[i].sum())
        ended = int(out.completion_ids[i, kept - 1]) in stops
        assert cut == (not ended) and length == kept - (1 if ended else 0) and 0 <= length <= 3
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_replies(model, tok, PROMPTS, max_new_tokens=0)


def test_score_shares_keep_format_and_correctness_apart():
    task = WordTask()  # formatted: a non-empty first line; strict: it is the answer; flexible: the answer anywhere
    shares = score_shares(task, ["fig", "I say fig", "", "plum"], ["fig", "fig", "fig", "fig"])
    assert set(shares) == set(MEASURES)
    assert shares == {"strict": 0.25, "flexible": 0.5, "formatted": 0.75}
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        score_shares("nope", ["a"], ["a"])


def test_scored_replies_are_the_greedy_replies_scored():
    model, tok = tiny_model("llama", seed=0)
    task = WordTask()
    examples = task.examples("test", None, 0)
    shares, texts = scored_replies(model, tok, examples, task, max_new_tokens=4)
    assert texts == greedy_replies(model, tok, [e.prompt for e in examples], max_new_tokens=4).texts
    assert shares == score_shares(task, texts, [e.answer for e in examples])
    assert torch.tensor(list(shares.values())).le(1).all()
