"""tinylab/model/kv_cache.py: which KV caches are copied and cropped in place, the cache keyword, and
the static cache decoding moves into."""

import pytest
import torch
from testkit import CHAT_AND_RAW_PROMPTS, other_arch
from torch import nn

from tinylab.model.batch import left_pad, pad_token_id, prompt_rows
from tinylab.model.generation import generate
from tinylab.model.kv_cache import cache_argument
from tinylab.model.tiny import TINY_ARCHS, tiny_model

PROMPTS = CHAT_AND_RAW_PROMPTS


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=0)


def test_cache_argument_follows_the_forward_signature():
    """The cache keyword is read from the model's forward; a wrapper taking **kwargs gets the installed
    transformers' name (a wrong name would be swallowed by **kwargs and decode without a cache)."""
    import transformers

    class Wrapper(nn.Module):
        def forward(self, **kwargs):
            return kwargs

    model, _ = tiny_model("llama", seed=0)
    renamed = tuple(int(part) for part in transformers.__version__.split(".")[:2]) >= (5, 24)
    assert cache_argument(model) == ("cache" if renamed else "past_key_values")
    assert cache_argument(Wrapper()) == cache_argument(model)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_decoding_cache_decodes_as_the_growing_cache(arch, monkeypatch):
    """Copying the prefill into a StaticCache (keys and values written in place while decoding) gives
    the same greedy and sampled completions as the DynamicCache the prefill filled; a cache whose layers
    are not plain full-attention ones is returned as it is."""
    from transformers import DynamicCache, StaticCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    import tinylab.model.generation as generation

    model, tok = tiny_model(arch, seed=0)
    runs = {}
    for name, convert in (("static", generation.decoding_cache), ("dynamic", lambda model, cache, n: cache)):
        used = []

        def noted(model, cache, n, convert=convert, used=used):
            cache = convert(model, cache, n)
            used.append(type(cache))
            return cache

        monkeypatch.setattr(generation, "decoding_cache", noted)
        runs[name] = (generate(model, tok, PROMPTS, n=2, max_new_tokens=6, temperature=0),
                      generate(model, tok, PROMPTS, n=2, max_new_tokens=6, seed=4), used)
    monkeypatch.undo()
    (greedy, sampled, used), (greedy_d, sampled_d, used_d) = runs["static"], runs["dynamic"]
    assert set(used_d) == {DynamicCache}
    if arch == "llama":
        assert set(used) == {StaticCache}  # the common case takes the preallocated cache
    assert greedy.completions == greedy_d.completions and torch.equal(greedy.completion_ids, greedy_d.completion_ids)
    assert sampled.completions == sampled_d.completions
    cache = DynamicCache()
    cache.layers = [DynamicSlidingWindowLayer(sliding_window=4)]
    assert generation.decoding_cache(model, cache, 3) is cache


def test_only_a_cache_of_keys_and_values_is_repeated_or_cropped_in_place(tiny):
    """transformers' repeat and crop are exact for a DynamicCache of key/value layers only: a llama's
    prefill cache is repeated and cropped; a cache with a recurrent layer (Qwen3-Next's linear
    attention) or of a model's own class (which may hold state those methods leave behind, as Zaya's
    and DeepSeek-V4's do) is left untouched, and the callers run the prompts again instead."""
    from transformers import DynamicCache

    from tinylab.model.kv_cache import drop_last, prefill, repeat_rows

    model, tok = tiny
    ids, mask = left_pad(prompt_rows(tok, PROMPTS[:2]), pad_token_id(tok), torch.device("cpu"))  # [2, P]
    with torch.no_grad():
        _, cache = prefill(model, ids, mask)
        keys = cache.layers[0].keys.clone()  # [2, KV, P, d]
        assert repeat_rows(cache, 3) and torch.equal(cache.layers[0].keys, keys.repeat_interleave(3, dim=0))
        assert drop_last(cache, 2) and cache.get_seq_length() == ids.shape[1] - 2
        hybrid = other_arch("qwen3_next_hybrid", tok)
        _, cache = prefill(hybrid, ids, mask)
        assert not repeat_rows(cache, 3) and not drop_last(cache, 2)
        assert all(layer.keys.shape[0] == 2 for layer in cache.layers if hasattr(layer, "keys"))

    class OwnCache(DynamicCache):
        pass

    own = OwnCache()
    own.update(keys, keys, 0)
    assert not repeat_rows(own, 3) and not drop_last(own, 1) and own.layers[0].keys.shape == keys.shape


def _sliding_window_mistral(tok):
    import transformers as tr
    from testkit import seeded_model

    return seeded_model(tr.MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, sliding_window=4, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))


@pytest.mark.parametrize("arch", ["mistral_window_4", "modernbert_decoder"])
def test_a_sliding_window_cache_generates_and_scores_under_the_gpu_stand_in(arch, tiny, gpu_stand_in):
    """transformers makes a sliding-window cache layer's window size without a device and moves it to
    the keys' device on first use: under the stand-in that tensor is on meta and the move fails unless
    the cache is made with the model's device as the default. Same completions and scores as on the CPU."""
    from tinylab.model.generation import completion_logprobs

    tok = tiny[1]
    model = _sliding_window_mistral(tok) if arch == "mistral_window_4" else other_arch(arch, tok)

    def run():
        rollout = generate(model, tok, PROMPTS, n=2, max_new_tokens=6, seed=3)
        scores = completion_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.completion_mask,
                                     group_size=2)
        return rollout, scores

    on_cpu = run()
    with gpu_stand_in():
        stand_in = run()
    assert torch.equal(stand_in[0].input_ids, on_cpu[0].input_ids)
    assert stand_in[1].device.type == "cpu" and torch.allclose(stand_in[1], on_cpu[1], atol=1e-6)
