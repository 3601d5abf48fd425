"""Which part of a model is its language decoder: the one answer for the adapter's module plan
(`tinylab.adapter.targets`) and the head analyses (`tinylab.model.attention`).

transformers' `get_decoder()` names it: the text model of a causal LM, the language model of a
vision-language model (not its vision tower, whose layers would share the text layers' numbers).
Where a model gives no answer, or one that is not a module of the model holding others
(ModernBERT's decoder answers its LM head, a single map named `decoder`), it is the whole model.
"""

from __future__ import annotations

import contextlib

from torch import nn

__all__ = ["language_decoder"]


def language_decoder(model: nn.Module) -> tuple[str, nn.Module]:
    """(its `named_modules()` name, "" for the whole model; the module) of `model`'s language decoder."""
    decoder = None
    with contextlib.suppress(AttributeError, NotImplementedError, TypeError, ValueError):
        decoder = model.get_decoder()  # transformers' own answer; absent or unsure: the whole model
    prefix = next((name for name, m in model.named_modules() if m is decoder), None)
    if prefix is None or next(decoder.children(), None) is None:  # not a module of this model, or a leaf
        return "", model
    return prefix, decoder
