import pytest
import torch
from testkit import CHAT_AND_RAW_PROMPTS, HYBRID_ARCHS, other_arch
from torch import nn

from tinylab.model.batch import left_pad, pad_token_id, prompt_rows, render_prompts
from tinylab.model.generation import completion_logprobs, generate, greedy_from_prefill, stop_token_ids
from tinylab.model.kv_cache import cache_argument, new_cache
from tinylab.model.tiny import tiny_model

PROMPTS = CHAT_AND_RAW_PROMPTS


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=0)


def test_render_prompts_chat_and_raw(tiny):
    _, tok = tiny
    texts = render_prompts(tok, PROMPTS)
    assert texts[0].endswith("<|im_start|>assistant\n") and "capital of France" in texts[0]
    assert texts[2] == PROMPTS[2]
    with pytest.raises(TypeError, match="list of prompts"):
        render_prompts(tok, "just a string")
    with pytest.raises(TypeError, match="prompt 0 is a int"):
        render_prompts(tok, [3])


def test_render_prompts_without_chat_template_names_the_problem(tiny):
    _, tok = tiny
    saved = tok.chat_template
    tok.chat_template = None
    try:
        with pytest.raises(ValueError, match="no chat template"):
            render_prompts(tok, PROMPTS[:1])
        assert render_prompts(tok, ["plain"]) == ["plain"]
    finally:
        tok.chat_template = saved


def test_generate_shapes_order_and_seed(tiny):
    model, tok = tiny
    r = generate(model, tok, PROMPTS, n=3, max_new_tokens=5, seed=1)
    assert len(r.completions) == 9
    assert r.prompt_ids.shape[0] == r.completion_ids.shape[0] == 9
    assert r.completion_ids.shape == r.completion_mask.shape and r.completion_ids.shape[1] <= 5
    assert r.prompt_ids.shape == r.prompt_mask.shape
    assert torch.equal(r.prompt_ids[0], r.prompt_ids[2]) and not torch.equal(r.prompt_ids[2], r.prompt_ids[3])
    assert r.prompt_mask[:, -1].all()  # left padding: every prompt ends in the last column
    assert r.input_ids.shape == (9, r.prompt_ids.shape[1] + r.completion_ids.shape[1])
    again = generate(model, tok, PROMPTS, n=3, max_new_tokens=5, seed=1)
    other = generate(model, tok, PROMPTS, n=3, max_new_tokens=5, seed=2)
    assert torch.equal(again.completion_ids, r.completion_ids)
    assert not torch.equal(other.completion_ids, r.completion_ids)


def test_generate_leaves_global_rng_alone(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    generate(model, tok, PROMPTS[:1], n=2, max_new_tokens=3, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_greedy_matches_unpadded_hf_generate(tiny):
    """Left padding + shared-prefix cache gives the same greedy tokens as one prompt at a time."""
    model, tok = tiny
    r = generate(model, tok, PROMPTS, n=2, max_new_tokens=6, temperature=0, batch_size=2)
    for i, prompt in enumerate(PROMPTS):
        text = render_prompts(tok, [prompt])[0]
        ids = tok(text, add_special_tokens=isinstance(prompt, str), return_tensors="pt")["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        expected = out[0, ids.shape[1]:]
        got = r.completion_ids[2 * i][: len(expected)]
        assert torch.equal(got, expected), (i, got, expected)
        assert torch.equal(r.completion_ids[2 * i], r.completion_ids[2 * i + 1])  # greedy: the group agrees


def test_batch_size_does_not_change_greedy_output(tiny):
    model, tok = tiny
    whole = generate(model, tok, PROMPTS, n=2, max_new_tokens=4, temperature=0)
    chunked = generate(model, tok, PROMPTS, n=2, max_new_tokens=4, temperature=0, batch_size=1)
    assert whole.completions == chunked.completions


class _EOSAt(nn.Module):
    """Wraps a model so odd rows emit EOS as their 3rd generated token (observation only, no weights)."""

    def __init__(self, model, eos):
        super().__init__()
        self.model, self.eos, self.calls, self.rows = model, eos, 0, []
        self.config, self.generation_config = model.config, model.generation_config

    def forward(self, **kw):
        self.rows.append(kw["input_ids"].shape[0])
        out = self.model(**kw)
        if self.calls == 2:
            out.logits[1::2, -1, :] = -1e4
            out.logits[1::2, -1, self.eos] = 1e4
        self.calls += 1
        return out


def test_completion_stops_at_eos_and_keeps_it(tiny):
    model, tok = tiny
    eos = tok.eos_token_id
    wrapped = _EOSAt(model, eos)
    r = generate(wrapped, tok, PROMPTS[:2], n=2, max_new_tokens=6, temperature=0)
    assert r.completion_ids.shape[1] == 6
    assert wrapped.rows == [2, 4, 4, 4, 4, 4]  # prefill, then every row to the end (AdapterBank.rows needs it)
    plain = generate(model, tok, PROMPTS[:2], n=2, max_new_tokens=6, temperature=0)
    assert torch.equal(r.completion_ids[[0, 2]], plain.completion_ids[[0, 2]])  # the rows that go on
    for row in (1, 3):
        assert r.completion_ids[row, 2] == eos
        assert r.completion_mask[row].tolist() == [1, 1, 1, 0, 0, 0]
        assert tok.eos_token not in r.completions[row]
    assert r.completion_mask[0].all() and r.completion_mask[2].all()
    assert eos in stop_token_ids(model, tok)


def test_completion_logprobs_match_unpadded_forward(tiny):
    model, tok = tiny
    r = generate(model, tok, PROMPTS, n=2, max_new_tokens=5, seed=3)
    with torch.no_grad():
        lp = completion_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask)
        assert lp.shape == r.completion_ids.shape
        for row in (0, 3, 5):
            keep = r.attention_mask[row].bool()
            ids = r.input_ids[row][keep][None]
            n = int(r.completion_mask[row].sum())
            logits = model(input_ids=ids).logits[0].float().log_softmax(-1)
            targets = ids[0, -n:]
            expected = logits[-n - 1:-1].gather(-1, targets[:, None]).squeeze(-1)
            torch.testing.assert_close(lp[row, :n], expected, atol=1e-4, rtol=1e-4)
            assert (lp[row, n:] == 0).all()
        hot = completion_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask, temperature=0.5)
        assert not torch.allclose(hot, lp)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_entropy_is_that_of_the_distribution_each_token_was_drawn_from(tiny, temperature):
    """Rollout.token_entropy: at each completion token, the entropy of softmax(logits / temperature) of
    an unpadded forward (fp64 here), 0 after the end; greedy replies have none."""
    model, tok = tiny
    r = generate(model, tok, PROMPTS, n=2, max_new_tokens=6, temperature=temperature, seed=5)
    assert r.token_entropy.shape == r.completion_ids.shape and r.token_entropy.dtype == torch.float32
    with torch.no_grad():
        for row in range(len(r.completions)):
            keep = r.attention_mask[row].bool()
            ids = r.input_ids[row][keep][None]
            n = int(r.completion_mask[row].sum())
            logp = (model(input_ids=ids).logits[0, -n - 1:-1].double() / temperature).log_softmax(-1)  # [n, V]
            expected = -(logp.exp() * logp).sum(-1)  # [n]
            torch.testing.assert_close(r.token_entropy[row, :n].double(), expected, atol=1e-4, rtol=1e-4)
            assert (r.token_entropy[row, n:] == 0).all()
    assert generate(model, tok, PROMPTS[:1], max_new_tokens=3, temperature=0).token_entropy is None


def test_bad_arguments_name_the_value(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="n=0: must be an integer >= 1"):
        generate(model, tok, PROMPTS, n=0, max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens=0: must be an integer >= 1"):
        generate(model, tok, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature=-1: must be a finite number >= 0"):
        generate(model, tok, PROMPTS, max_new_tokens=3, temperature=-1)
    with pytest.raises(ValueError, match="batch_size=0: must be an integer >= 1"):
        generate(model, tok, PROMPTS, max_new_tokens=3, batch_size=0)
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(model, tok, [], max_new_tokens=3)
    with pytest.raises(ValueError, match="context of 512 tokens"):
        generate(model, tok, ["word " * 600], max_new_tokens=3)


def test_shared_prompt_logprobs_match_and_carry_gradients():
    from tinylab.adapter.attach import apply_tinylora

    model, tok = tiny_model("llama", seed=0)
    adapter = apply_tinylora(model, u=2, n_tie="all")
    adapter.set_vector([0.3, -0.2])
    r = generate(model, tok, PROMPTS, n=3, max_new_tokens=4, seed=0)
    grads = []
    values = []
    for g in (1, 3):
        lp = completion_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask, group_size=g)
        (v,) = torch.autograd.grad(lp.sum(), list(adapter.parameters()))
        values.append(lp.detach())
        grads.append(v)
    torch.testing.assert_close(values[0], values[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)
    assert grads[0].abs().sum() > 0
    one = completion_logprobs(model, r.input_ids[:, :-3], r.attention_mask[:, :-3], r.completion_mask[:, :1],
                              group_size=3)
    torch.testing.assert_close(one, values[0][:, :1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="different prompts"):
        completion_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask, group_size=9)
    with pytest.raises(ValueError, match="group_size=2"):
        completion_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask, group_size=2)


def _generate_and_score(model, tok):
    """generate + completion_logprobs (shared prompt) + backward: the two model calls of an RL step."""
    r = generate(model, tok, PROMPTS, n=2, max_new_tokens=4, seed=7)
    lp = completion_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask, group_size=2)
    lp.sum().backward()
    device = next(model.parameters()).device
    assert all(t.device == device for t in r[1:]) and lp.device == device
    assert lp.dtype == torch.float32  # log-probabilities in fp32 whatever the model's dtype
    return r, lp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_and_logprobs_make_every_tensor_on_the_model_device(dtype, gpu_stand_in):
    """Under the stand-in a tensor made without device= lands on meta and fails; sampling uses a
    CPU generator, so the completions do not depend on torch's default device either."""
    from tinylab.adapter.attach import apply_tinylora

    model, tok = tiny_model("llama", seed=0, dtype=dtype)
    adapter = apply_tinylora(model, u=2, n_tie="all")
    adapter.set_vector([0.3, -0.2])
    expected, expected_lp = _generate_and_score(model, tok)
    grad = adapter.vectors[0].grad.clone()
    adapter.vectors[0].grad = None
    with gpu_stand_in():
        r, lp = _generate_and_score(model, tok)
    assert r.completions == expected.completions and torch.equal(r.completion_ids, expected.completion_ids)
    torch.testing.assert_close(lp, expected_lp, atol=0, rtol=0)
    torch.testing.assert_close(adapter.vectors[0].grad, grad, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_and_logprobs_on_cuda(dtype):
    model, tok = tiny_model("llama", seed=0, dtype=dtype)
    r, lp = _generate_and_score(model.to("cuda"), tok)
    assert r.completion_ids.is_cuda and lp.is_cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_from_prefill_continues_as_generate(dtype, gpu_stand_in):
    """A prefill of prompt + continuation, its continuation cropped off, continues as generate does."""
    from tinylab.model.batch import teacher_forced_batch

    model, tok = tiny_model("llama", seed=0, dtype=dtype)
    expected = generate(model, tok, PROMPTS, max_new_tokens=5, temperature=0).completions
    batch = teacher_forced_batch(tok, PROMPTS, [[5, 6, 7]] * len(PROMPTS), model.device)
    P = batch.input_ids.shape[1] - 3
    cache = new_cache()
    with torch.no_grad(), gpu_stand_in():
        positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, P+3]
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions,
                    use_cache=True, logits_to_keep=4, **{cache_argument(model): cache})
        cache.crop(-3)
        got = greedy_from_prefill(model, tok, cache, out.logits[:, 0], batch.attention_mask[:, :P], max_new_tokens=5)
    assert got == expected
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        greedy_from_prefill(model, tok, cache, out.logits[:, 0], batch.attention_mask[:, :P], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"expected \[B, V\] and \[B, P\]"):
        greedy_from_prefill(model, tok, cache, out.logits, batch.attention_mask[:, :P], max_new_tokens=2)


def test_greedy_from_prefill_after_reply_tokens_already_read(gpu_stand_in):
    """A prefill of prompt + the first m greedy tokens, those tokens given as `decoded`, continues
    into generate's replies (m of the 5 tokens read, the rest decoded); bad `decoded` is refused."""
    from tinylab.model.batch import teacher_forced_batch
    from tinylab.model.kv_cache import prefill

    model, tok = tiny_model("llama", seed=0)
    rollout = generate(model, tok, PROMPTS, max_new_tokens=5, temperature=0)
    stops = stop_token_ids(model, tok)
    for m in (1, 4):
        first = rollout.completion_ids[:, :m]  # [B, m]
        assert rollout.completion_mask[:, :m].all() and not torch.isin(first, torch.tensor(stops)).any()
        batch = teacher_forced_batch(tok, PROMPTS, first.tolist(), model.device)  # [B, P+m], no right padding
        with torch.no_grad(), gpu_stand_in():
            out, cache = prefill(model, batch.input_ids, batch.attention_mask)
            got = greedy_from_prefill(model, tok, cache, out.logits[:, -1], batch.attention_mask, max_new_tokens=5,
                                      decoded=batch.input_ids[:, -m:])
        assert got == rollout.completions
    logits, mask, decoded = out.logits[:, -1], batch.attention_mask, batch.input_ids[:, -4:]
    with pytest.raises(ValueError, match=r"m < max_new_tokens = 4"):
        greedy_from_prefill(model, tok, cache, logits, mask, max_new_tokens=4, decoded=decoded)
    with pytest.raises(ValueError, match=r"decoded \(2, 4\): expected \[B, m\] with B = 3 rows"):
        greedy_from_prefill(model, tok, cache, logits, mask, max_new_tokens=5, decoded=decoded[:2])
    with pytest.raises(ValueError, match="decoded holds a stop token"):
        greedy_from_prefill(model, tok, cache, logits, mask, max_new_tokens=5,
                            decoded=torch.full_like(decoded, stops[0]))


@pytest.mark.gpu
def test_greedy_from_prefill_on_cuda():
    model, tok = tiny_model("llama", seed=0)
    model.to("cuda")
    ids, mask = left_pad(prompt_rows(tok, PROMPTS), pad_token_id(tok), "cuda")  # [B, P]
    cache = new_cache()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
    got = greedy_from_prefill(model, tok, cache, out.logits[:, -1], mask, max_new_tokens=4)
    assert got == generate(model, tok, PROMPTS, max_new_tokens=4, temperature=0).completions


def test_generation_uses_the_current_cache_api_without_deprecation_warnings():
    """tinylab's own model calls (sampling, greedy, scoring with a shared prompt, the knob readout's
    prefill and greedy continuation) raise no FutureWarning or DeprecationWarning, and transformers
    logs no deprecation (it logs the output's `past_key_values` alias instead of warning)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    from tinylab.analysis.readout import Reader
    from tinylab.measures.gold import GoldSet

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    hf_logger = hf_logging.get_logger("transformers")
    level = hf_logger.level
    logging.Logger.warning_once.cache_clear()  # a warning logged once before this test is logged again
    hf_logger.addHandler(handler)
    hf_logger.setLevel(logging.WARNING)
    try:
        for arch in ("llama", "qwen2", "gemma"):
            model, tok = tiny_model(arch, seed=0)
            with warnings.catch_warnings():
                warnings.simplefilter("error", FutureWarning)
                warnings.simplefilter("error", DeprecationWarning)
                sampled = generate(model, tok, PROMPTS, n=2, max_new_tokens=4, seed=0)
                greedy = generate(model, tok, PROMPTS, max_new_tokens=4, temperature=0)
                completion_logprobs(model, sampled.input_ids, sampled.attention_mask, sampled.completion_mask,
                                    group_size=2)
                gold = GoldSet(model, tok, [(p, "a b") for p in PROMPTS])  # the reply prompts: one shared prefill
                readout = Reader(model, tok, PROMPTS, gold, max_new_tokens=4)()
            assert readout.replies == greedy.completions  # the cache the readout continues from is used
    finally:
        hf_logger.removeHandler(handler)
        hf_logger.setLevel(level)
    deprecations = [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
    assert not deprecations, deprecations


@pytest.mark.parametrize("size, block", [(7, 2), (7, 3), (1000, 256), (49152, 256)])
def test_draw_follows_the_distribution_and_never_draws_a_zero(size, block):
    """Inverse-CDF sampling in two levels: frequencies match the probabilities (rows need not sum to
    1), a zero entry is never drawn, also at block edges, and the seed fixes the draws."""
    from tinylab.model.generation import draw

    g = torch.Generator().manual_seed(0)
    p = torch.rand(size, generator=g) ** 4  # uneven, some tiny
    p[torch.randperm(size, generator=g)[:5]] += size / 10  # a few entries with most of the mass
    p[torch.randperm(size, generator=g)[: size // 3]] = 0  # zeros inside blocks and at their edges
    p[-1] = 0.0
    p = p * 3.0  # unnormalised
    probs = p[None].expand(40_000 if size < 10_000 else 2_000, -1).contiguous()  # [rows, size]
    picks = draw(probs, torch.Generator().manual_seed(1), block=block)  # [rows]
    assert picks.dtype == torch.long and picks.device.type == "cpu"
    assert (p[picks] > 0).all()  # no zero entry ever
    counts = torch.bincount(picks, minlength=size).double()
    expected = (p / p.sum()).double() * len(picks)
    big = expected > 200  # entries with enough draws for a 6-sigma check
    assert big.sum() >= 2
    assert ((counts[big] - expected[big]).abs() <= 6 * expected[big].sqrt()).all()
    assert torch.equal(draw(probs, torch.Generator().manual_seed(1), block=block), picks)
    one_hot = torch.zeros(4, size)
    spots = torch.tensor([0, min(block - 1, size - 1), min(block, size - 1), size - 1])
    one_hot[torch.arange(4), spots] = 1.0
    assert torch.equal(draw(one_hot, g, block=block), spots)
    for bad in (float("nan"), float("inf")):
        broken = one_hot.clone()
        broken[2, 0] = bad
        with pytest.raises(ValueError, match=f"row 2 of the probabilities sums to {bad}"):
            draw(broken, g, block=block)
    with pytest.raises(ValueError, match="row 0 of the probabilities sums to 0.0"):
        draw(torch.zeros(1, size), g, block=block)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_match_log_softmax(dtype):
    from tinylab.model.generation import token_logprobs

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 50, generator=g) * 4).to(dtype)
    targets = torch.randint(0, 50, (3, 5), generator=g)
    for temperature in (1.0, 0.7):
        want = (logits.float() / temperature).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
        got = token_logprobs(logits, targets, temperature)
        assert got.dtype == torch.float32 and got.shape == (3, 5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("name", ["bloom", "falcon_alibi", "gpt_neo_window_8"])
def test_greedy_decoding_matches_transformers_where_the_cache_must_stay_dynamic_or_the_mask_full(name, tiny):
    """BLOOM reads its ALiBi bias from the mask (a static cache needs it as long as the cache);
    Falcon's alibi=True and GPT-Neo's local windows (8 tokens here, prompts and replies longer) cannot
    decode on a static cache at all: each greedy reply is transformers' own, token for token."""
    _, tok = tiny
    model = other_arch(name, tok)
    prompts = ["What is the capital of France? Answer in one word, please.", "Name a colour."]
    ours = generate(model, tok, prompts, max_new_tokens=12, temperature=0)
    for i, prompt in enumerate(prompts):
        ids = tok(render_prompts(tok, [prompt])[0], return_tensors="pt", add_special_tokens=True)  # as generate
        theirs = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                                eos_token_id=stop_token_ids(model, tok))[0, ids.input_ids.shape[1]:]
        kept = ours.completion_ids[i][ours.completion_mask[i].bool()]
        assert kept.tolist() == theirs[: len(kept)].tolist(), (name, i)
        assert len(kept) == len(theirs)


@pytest.mark.parametrize("name", HYBRID_ARCHS)
def test_a_recurrent_cache_generates_and_scores_as_transformers(name, tiny):
    """Qwen3-Next with a linear-attention layer, and Mamba: their caches hold a recurrent state that
    transformers cannot copy per row, so each prompt runs once per completion. Greedy replies (two per
    prompt, prompts of different lengths, left-padded together) are transformers' own token for
    token; log-probabilities scored with and without shared prompts agree, gradients included."""
    from tinylab.adapter.attach import apply_tinylora

    _, tok = tiny
    model = other_arch(name, tok)
    prompts = ["What is the capital of France? Answer in one word, please.", "Name a colour."]
    ours = generate(model, tok, prompts, n=2, max_new_tokens=8, temperature=0)
    assert torch.equal(ours.completion_ids[0::2], ours.completion_ids[1::2])
    for i, prompt in enumerate(prompts):
        ids = tok(render_prompts(tok, [prompt])[0], return_tensors="pt", add_special_tokens=True)  # as generate
        theirs = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                                eos_token_id=stop_token_ids(model, tok))[0, ids.input_ids.shape[1]:]
        kept = ours.completion_ids[2 * i][ours.completion_mask[2 * i].bool()]
        assert kept.tolist() == theirs[: len(kept)].tolist() and len(kept) == len(theirs), (name, i)
    adapter = apply_tinylora(model, u=2, n_tie="all")
    adapter.set_vector([0.3, -0.2])
    r = generate(model, tok, prompts, n=3, max_new_tokens=5, seed=0)
    scored = []
    for g in (1, 3):
        lp = completion_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask, group_size=g)
        scored.append((lp.detach(), torch.autograd.grad(lp.sum(), list(adapter.parameters()))[0]))
    torch.testing.assert_close(scored[0][0], scored[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scored[0][1], scored[1][1], atol=1e-4, rtol=1e-4)
    assert scored[0][1].abs().sum() > 0


def test_a_model_that_gives_every_positions_logits_is_scored_on_the_completion():
    """TrOCR's decoder ignores logits_to_keep and returns the logits of every position: the completion
    tokens are still scored from the positions before them, as a full forward's log-softmax says."""
    import transformers as tr
    from testkit import seeded_model

    model = seeded_model(tr.TrOCRConfig(vocab_size=128, d_model=32, decoder_layers=2, decoder_attention_heads=4,
                                        decoder_ffn_dim=64, max_position_embeddings=64))
    ids = torch.tensor([[5, 9, 2, 7, 7, 3], [0, 4, 8, 1, 6, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    completion_mask = torch.ones(2, 3, dtype=torch.long)
    with torch.no_grad():
        ours = completion_logprobs(model, ids, mask, completion_mask)  # [2, 3]
        full = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    want = torch.log_softmax(full[:, 2:5].float(), -1).gather(-1, ids[:, 3:, None]).squeeze(-1)  # [2, 3]
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
