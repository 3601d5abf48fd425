"""transformers' `Conv1D` (GPT-2, GPT, ...) seen as a linear map, so the adapter and the analyses
that read an (out, in) weight work on it unchanged.

A `Conv1D` computes y = x W + b with W stored (in, out), the transpose of `nn.Linear`'s.
`LinearView` holds the Conv1D as its one submodule and shows it as a linear map: `weight` is the
(out, in) transposed *view* of the Conv1D's own weight (no copy; an in-place write, as `merge()`
does, writes the Conv1D's weight), `bias`, `in_features` and `out_features` are the Conv1D's, and
its forward is the Conv1D's. Device moves, dtype casts and state dicts reach the Conv1D as before.
`as_linear` is the one place that decides what counts as a linear map; `original` gives back the
module to put into the model when an adapter is removed.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LinearView", "as_linear", "is_conv1d", "original"]


def is_conv1d(module: nn.Module) -> bool:
    """A transformers `Conv1D` (recognised by its class name and its (in, out) weight and `nf`)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and getattr(module, "nf", None) == weight.shape[1])


class LinearView(nn.Module):
    """A transformers `Conv1D` as a linear map: `weight` (out, in) is a view of its (in, out) weight."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        if not is_conv1d(conv):
            raise TypeError(f"LinearView wraps a transformers Conv1D, got {type(conv).__name__}")
        self.conv = conv

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight.t()  # (out, in), shares the Conv1D's storage

    @property
    def bias(self) -> torch.Tensor | None:
        return self.conv.bias

    @property
    def in_features(self) -> int:
        return self.conv.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.conv.weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def as_linear(module: nn.Module) -> nn.Module | None:
    """`module` itself if it is an `nn.Linear`, a `LinearView` of it if it is a Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module
    if is_conv1d(module):
        return LinearView(module)
    return None


def original(module: nn.Module) -> nn.Module:
    """The module to put back into the model: the Conv1D under a `LinearView`, else `module`."""
    return module.conv if isinstance(module, LinearView) else module
