"""The KV cache of generation and scoring: made by the model itself, copied per completion, cropped,
and moved into a preallocated static cache for decoding, each where transformers does it exactly.

`prefill` runs prompts with a cache the model builds from its own config (a hybrid model's
linear-attention or state-space layers, a model's own cache class). `repeat_rows` and `drop_last`
change a cache in place only when it holds keys and values alone; otherwise they say so and the
caller runs the prompts again (`tinylab.model.generation`, `tinylab.analysis.readout`).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from tinylab.model.batch import positions_of
from tinylab.model.device import model_device

__all__ = ["cache_argument", "decoding_cache", "decoding_mask", "drop_last", "new_cache", "prefill", "repeat_rows",
           "static_length"]


def new_cache():
    """An empty KV cache (transformers' `DynamicCache`): the model fills it in place, layer by layer."""
    from transformers import DynamicCache

    return DynamicCache()


def prefill(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, *, logits_to_keep: int = 1):
    """(the model's output, its KV cache) for left-padded prompts [B, P] with the positions generation
    uses. The model makes the cache itself, from its own config: a hybrid model's linear-attention
    or state-space layers (Qwen3.5, Qwen3-Next, Mamba, Zamba2, Nemotron-H) and a model's own cache
    class (MiniMax) are as it expects them. A model that returns no cache is a ValueError.

    The forward runs with torch's default device set to the model's: transformers makes some of a new
    cache's tensors without a device and moves them later (a sliding-window layer's window size,
    Mistral, Gemma 2 and 3, ...), which fails where the default device cannot hold data."""
    with torch.device(model_device(model)):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions_of(mask), use_cache=True,
                    logits_to_keep=logits_to_keep)
    cache = out.get("cache", None)  # transformers >= 5.24
    cache = out.get("past_key_values", None) if cache is None else cache
    if cache is None:
        raise ValueError(f"{type(model).__name__} returned no KV cache with use_cache=True; allowed: models that "
                         "cache their keys and values (generation decodes one token at a time from the cache)")
    return out, cache


def _keys_and_values_only(cache) -> bool:
    """Whether `cache` is a transformers `DynamicCache` of plain key/value layers (full or sliding
    window), the ones whose rows and positions transformers copies and crops exactly. Any other cache
    (a hybrid model's recurrent or convolution state, a model's own cache class) may hold state those
    methods leave behind."""
    from transformers import cache_utils

    plain = tuple(t for t in (getattr(cache_utils, "DynamicLayer", None),
                              getattr(cache_utils, "DynamicSlidingWindowLayer", None)) if t is not None)
    layers = getattr(cache, "layers", None)
    return type(cache) is cache_utils.DynamicCache and bool(layers) and all(type(layer) in plain for layer in layers)


def drop_last(cache, count: int) -> bool:
    """Remove the last `count` positions of `cache` in place; False, and the cache untouched, unless it
    holds keys and values only (a recurrent state has already read those positions)."""
    if not _keys_and_values_only(cache):
        return False
    cache.crop(-count)
    return True


def repeat_rows(cache, n: int) -> bool:
    """Repeat each row of `cache` n times in place (row i becomes rows i*n..i*n+n-1); False, and the
    cache untouched, unless it holds keys and values only (a recurrent or convolution state, which
    transformers' repeat may leave at one row per prompt)."""
    if not _keys_and_values_only(cache):
        return False
    cache.batch_repeat_interleave(n)
    return True


def cache_argument(model: nn.Module) -> str:
    """The keyword under which `model`'s forward takes its KV cache: "cache" (transformers >= 5.24,
    where "past_key_values" is a deprecated alias due to go in 5.40) or "past_key_values" (before).
    Read from the forward's signature; a forward that names neither (a wrapper taking **kwargs)
    gets the name of the installed transformers."""
    parameters = inspect.signature(model.forward).parameters
    if "cache" in parameters or "past_key_values" in parameters:
        return "cache" if "cache" in parameters else "past_key_values"
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "cache" if (major, minor) >= (5, 24) else "past_key_values"


def decoding_cache(model: nn.Module, cache, new_tokens: int):
    """`cache`'s keys and values in a transformers `StaticCache` with room for `new_tokens` more, so
    each decoded token is written in place (a `DynamicCache` copies every layer's whole cache to
    append one token). Returns `cache` itself before transformers 5 (whose static layers work
    differently), when its layers are not all plain full-attention `DynamicLayer`s, when the
    model's config asks for other static layers (sliding windows, ...), when transformers says the
    model cannot run on a static cache (`_can_compile_fullgraph` not True: GPT-Neo's local windows
    are placed by the key length) and for ALiBi models other than BLOOM (Falcon's `alibi=True`
    builds its bias from the keys it was given). The decoding loop gives a static cache's model an
    attention mask as long as the cache (`_decoding_mask`)."""
    import transformers
    from transformers import StaticCache
    from transformers.cache_utils import DynamicLayer, StaticLayer

    layers, config = getattr(cache, "layers", None), getattr(model, "config", None)
    if (int(transformers.__version__.split(".")[0]) < 5 or not layers or config is None
            or getattr(model, "_can_compile_fullgraph", False) is not True
            or (getattr(config, "alibi", False) and getattr(config, "model_type", None) != "bloom")
            or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers)):
        return cache
    with torch.device(layers[0].keys.device):  # StaticLayer makes its length counter without a device
        static = StaticCache(config=config, max_cache_len=cache.get_seq_length() + new_tokens)
    if len(static.layers) != len(layers) or any(type(layer) is not StaticLayer for layer in static.layers):
        return cache
    for i, layer in enumerate(layers):
        static.update(layer.keys, layer.values, i)
    return static


def static_length(cache) -> int | None:
    """A transformers `StaticCache`'s full length, None for any other cache."""
    from transformers import StaticCache

    return cache.get_max_length() if isinstance(cache, StaticCache) else None


def decoding_mask(mask: torch.Tensor, length: int | None) -> torch.Tensor:
    """The 2-D attention mask [rows, seen] for a decoding step, zero-padded on the right to a static
    cache's full `length` (transformers pads it the same way; BLOOM builds its ALiBi bias from it)."""
    if length is None or length <= mask.shape[1]:
        return mask
    return nn.functional.pad(mask, (0, length - mask.shape[1]))  # [rows, length]
