"""Which part of a model is its language decoder: the one answer for the adapter's module plan
(`tinylab.adapter.targets`) and the head analyses (`tinylab.model.attention`).

transformers' `get_decoder()` names it: the text model of a causal LM, the language model of a
vision-language model (not its vision tower, whose layers would share the text layers' numbers).
Where a model gives no answer, or one that is not a module of the model holding others
(ModernBERT's decoder answers its LM head, a single map named `decoder`), it is the whole model.

Inside it, the decoder's own layers are the stack nearest the top: where two stacks of numbered
layers share numbers (Phi-4-multimodal's vision and audio encoders sit inside its decoder), the one
with the shortest module path (`nearest_stacks`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable

from torch import nn

__all__ = ["language_decoder", "layer_of", "nearest_stacks", "stack_of"]

_INDEX = re.compile(r"\.(\d+)\.")


def language_decoder(model: nn.Module) -> tuple[str, nn.Module]:
    """(its `named_modules()` name, "" for the whole model; the module) of `model`'s language decoder."""
    decoder = None
    with contextlib.suppress(AttributeError, NotImplementedError, TypeError, ValueError):
        decoder = model.get_decoder()  # transformers' own answer; absent or unsure: the whole model
    prefix = next((name for name, m in model.named_modules() if m is decoder), None)
    if prefix is None or next(decoder.children(), None) is None:  # not a module of this model, or a leaf
        return "", model
    return prefix, decoder


def layer_of(name: str) -> int | None:
    """The layer index in a module name (`model.layers.3.mlp.up_proj` -> 3), None outside the blocks."""
    m = _INDEX.search(f".{name}.")
    return int(m.group(1)) if m else None


def stack_of(name: str) -> str | None:
    """The stack a module name's layer sits in: its part before the first layer index
    (`model.layers.3.mlp.up_proj` -> `model.layers`), None outside any layer."""
    m = _INDEX.search(f".{name}.")
    return f".{name}."[1:m.start()] if m else None


def nearest_stacks(names: Iterable[str]) -> list[str]:
    """The stacks of `names` (`stack_of`), in order of appearance; where two of them share a layer
    number, only those nearest the top (fewest path components): a tower's or an encoder's layers
    inside the decoder give way to the decoder's own. Stacks at the same depth are all kept."""
    layers: dict[str, set[int]] = {}
    for name in names:
        if (stack := stack_of(name)) is not None:
            layers.setdefault(stack, set()).add(layer_of(name))
    if sum(len(numbers) for numbers in layers.values()) == len(set().union(*layers.values())):
        return list(layers)  # no number in two stacks
    depth = min(stack.count(".") for stack in layers)
    return [stack for stack in layers if stack.count(".") == depth]
