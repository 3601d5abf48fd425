"""Which part of a model is its language decoder: the one answer for the adapter's module plan
(`tinylab.adapter.targets`) and the head analyses (`tinylab.model.attention`).

transformers' `get_decoder()` names it: the text model of a causal LM, the language model of a
vision-language model (not its vision tower, whose layers would share the text layers' numbers).
Where a model gives no answer, or one that is not a module of the model holding others
(ModernBERT's decoder answers its LM head, a single map named `decoder`), it is the whole model.

Inside it, the decoder's own layers are the stack nearest the top: where two stacks of numbered
layers share numbers (Phi-4-multimodal's vision and audio encoders sit inside its decoder), the one
with the shortest module path (`nearest_stacks`). Where stacks at the same depth are made of one
class of layer and share numbers (HRM's L and H modules, which run in turn), they are the decoder's
layers one stack after another (`layer_offsets`); stacks of different classes (XLM's `attentions`
and `ffns`) are the parts of one numbered layer.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable

from torch import nn

__all__ = ["language_decoder", "layer_numbers", "layer_of", "layer_offsets", "nearest_stacks", "stack_of"]

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


def layer_offsets(model: nn.Module) -> dict[str, int]:
    """What to add to the layer index of a name in each stack (`stack_of`) of the language decoder for its
    layer number: nonzero only where the decoder's own stacks (`nearest_stacks`) share numbers and
    their layers are all of one class (HRM's L and H modules: numbered one stack after another, in
    model order). Empty elsewhere, where the index is the layer number."""
    prefix, decoder = language_decoder(model)
    kinds: dict[str, str] = {}  # a layer module's name -> its class
    for name, module in decoder.named_modules():
        full = f"{prefix}.{name}".strip(".")
        if full.rpartition(".")[2].isdigit() and stack_of(full) == full.rpartition(".")[0]:  # a layer itself
            kinds[full] = type(module).__name__
    own = nearest_stacks(kinds)
    numbers = {stack: {layer_of(name) for name in kinds if stack_of(name) == stack} for stack in own}
    shared = sum(map(len, numbers.values())) > len(set().union(*numbers.values()))
    if len(own) < 2 or not shared or len({kinds[name] for name in kinds if stack_of(name) in own}) > 1:
        return {}
    offsets, start = {}, 0
    for stack in own:
        offsets[stack], start = start, start + max(numbers[stack]) + 1
    return offsets


def layer_numbers(model: nn.Module) -> Callable[[str], int | None]:
    """The decoder's layer number of a module name (`layer_of` plus its stack's `layer_offsets`), None
    outside the layers: the one numbering of the module plan and the head analyses."""
    offsets = layer_offsets(model)

    def number(name: str) -> int | None:
        index = layer_of(name)
        return None if index is None else index + offsets.get(stack_of(name), 0)

    return number
