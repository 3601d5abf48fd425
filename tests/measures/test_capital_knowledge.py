"""The knowledge strata: the probability of each capital after "The capital of X is", checked
against a plain forward pass of the whole sequence, one name at a time."""

import math

import pytest
import torch

from tinylab.measures.capital_knowledge import capital_knowledge
from tinylab.model.tiny import tiny_model
from tinylab.tasks import world_capitals


def _by_code(*codes):
    table = {c.code: c for c in world_capitals.countries()}
    return [table[code] for code in codes]


def _plain_logprob(model, tokenizer, country, name) -> float:
    """log p(name | chat prompt + "The capital of X is"), one unpadded sequence, no batching."""
    messages = [{"role": "user", "content": f"What is the capital of {country.name}?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    ids += tokenizer(f"The capital of {country.name} is", add_special_tokens=False).input_ids
    tail = tokenizer(f" {name}", add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids + tail])).logits[0, len(ids) - 1:-1].float()  # [len(tail), V]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tail)[:, None]).sum().item()


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_model("llama", seed=3)
    # one country with two aliases (names of three lengths in one padded batch) and two without
    return model, tokenizer, _by_code("NOR", "USA", "PHL")


def test_probability_is_the_best_accepted_name_after_the_begun_reply(tiny):
    model, tokenizer, countries = tiny
    out = capital_knowledge(model, tokenizer, countries, batch_size=3)  # batches mix countries and lengths
    assert list(out) == [c.capital for c in countries]
    for country in countries:
        expected = max(_plain_logprob(model, tokenizer, country, name) for name in (country.capital, *country.aliases))
        got = out[country.capital]
        assert (got.code, got.country) == (country.code, country.name)
        assert math.log(got.p) == pytest.approx(expected, abs=1e-4)
        assert got.stratum == world_capitals.stratum(got.p)


def test_an_alias_the_model_prefers_decides_the_probability(tiny):
    model, tokenizer, countries = tiny
    usa = countries[1]
    names = (usa.capital, *usa.aliases)
    each = [_plain_logprob(model, tokenizer, usa, name) for name in names]
    assert len(set(round(x, 3) for x in each)) == len(names)  # the names do score differently
    p = capital_knowledge(model, tokenizer, [usa]).get(usa.capital).p
    assert math.log(p) == pytest.approx(max(each), abs=1e-4)
    assert math.log(p) > min(each) + 1e-3


def test_batch_size_does_not_change_the_result(tiny):
    model, tokenizer, countries = tiny
    one = capital_knowledge(model, tokenizer, countries, batch_size=1)
    many = capital_knowledge(model, tokenizer, countries, batch_size=16)
    for capital in one:
        assert one[capital].p == pytest.approx(many[capital].p, rel=1e-4)


def test_strata_follow_the_models_knowledge():
    """A random tiny model does not know Oslo; one whose output only ever allows the tokens of " Oslo"
    gives it (1/n)^n for n distinct tokens, and the stratum that probability falls in."""
    model, tokenizer = tiny_model("llama", seed=0)
    norway = _by_code("NOR")[0]
    assert capital_knowledge(model, tokenizer, [norway])["Oslo"].stratum == "does not know"
    tail = tokenizer(" Oslo", add_special_tokens=False).input_ids
    assert len(set(tail)) == len(tail)
    head = model.lm_head
    with torch.no_grad():
        head.weight.zero_()  # logits = the bias alone: uniform over the allowed tokens at every position
        head.bias = torch.nn.Parameter(torch.full((head.out_features,), -1e4))
        head.bias[tail] = 0.0
    got = capital_knowledge(model, tokenizer, [norway])["Oslo"]
    assert got.p == pytest.approx((1 / len(tail)) ** len(tail), rel=1e-4)
    assert got.stratum == world_capitals.stratum(got.p)


def test_follows_the_models_device():
    model, tokenizer = tiny_model("llama", seed=0)
    with torch.device("meta"):  # a tensor made without the model's device would land on meta and fail
        out = capital_knowledge(model, tokenizer, _by_code("NOR"))
    assert 0.0 < out["Oslo"].p < 1.0


def test_bad_input_names_the_value():
    model, tokenizer = tiny_model("llama", seed=0)
    with pytest.raises(ValueError, match=r"countries\[0\]='Norway'"):
        capital_knowledge(model, tokenizer, ["Norway"])
    with pytest.raises(ValueError, match="batch_size"):
        capital_knowledge(model, tokenizer, _by_code("NOR"), batch_size=0)
