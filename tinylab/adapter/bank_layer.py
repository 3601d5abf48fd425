"""The module an `AdapterBank` puts in place of each adapted linear map inside `bank.rows(...)`.

For row b of the batch, with R_b = sum_i v_{b,i} P_i built from the bank's table:

    h   = x Vh^T                    # (B, T, r)   once for the whole batch
    g_b = h_b R_b^T                 # (B, T, r)   one batched r x r product
    y   = x W^T + g (U diag(S))^T   # (B, T, out) once for the whole batch

Rows whose adapter is None are left out of the update (their outputs are the base map's, bit for
bit). `swapped` puts modules in and takes them out again, also on error; `bare` steps around any
TinyLoRA adapter attached to the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tinylab.adapter.layer import TinyLoRALinear, WrapsLinear, project

__all__ = ["BankLinear", "Factors", "bare", "plain", "swapped"]


class Factors(NamedTuple):
    """The frozen tensors of one adapted map, shared by every adapter in the bank."""

    name: str  # named_modules() name
    group: int  # tying group: which of the adapter's vectors drives it
    Vh: torch.Tensor  # (r, in), the model's dtype
    rows: torch.Tensor  # (r, out) = (U diag(S))^T, the model's dtype, contiguous
    P: torch.Tensor  # (u, r, r) fp32


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


@contextlib.contextmanager
def swapped(model: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """Put `replacements` (name -> module) into `model` for the block; the originals go back after it."""
    originals: dict[str, nn.Module] = {}
    try:
        for name, module in replacements.items():
            parent, child = _parent(model, name)
            originals[name] = parent._modules[child]
            setattr(parent, child, module)
        yield model
    finally:
        for name, module in originals.items():
            parent, child = _parent(model, name)
            setattr(parent, child, module)


def plain(module: nn.Module) -> nn.Module:
    """The plain linear map under an attached (unmerged) TinyLoRA module, or the module itself."""
    if isinstance(module, TinyLoRALinear):
        if module.merged_R is not None:
            raise ValueError("an adapter attached to this model is merged into its weights; call adapter.unmerge() "
                             "before using an AdapterBank on the model")
        return module.base
    return module


def bare(model: nn.Module):
    """The model without any attached TinyLoRA modules for the block (they go back after it)."""
    return swapped(model, {n: plain(m) for n, m in model.named_modules() if isinstance(m, TinyLoRALinear)})


class BankLinear(WrapsLinear, nn.Module):
    """A linear map plus, for each row of the batch, its own adapter's rank-r update (see the module doc)."""

    def __init__(self, base: nn.Module, factors: Factors, Rt: torch.Tensor, batch: int,
                 selected: torch.Tensor | None):
        super().__init__()
        self.base = base
        self.name = factors.name
        self.Vh, self.rows = factors.Vh, factors.rows  # (r, in), (r, out)
        self.Rt = Rt  # (B_a, r, r): R_b^T for each adapted row, the model's dtype
        self.batch = batch  # B, rows the block was opened for
        self.selected = selected  # (B_a,) long indexes of the adapted rows; None = every row

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        """g = (x Vh^T) R_b^T for the adapted rows of x (B_a, T, in): (B_a * T, r)."""
        Vh, Rt = self.Vh.to(x.dtype), self.Rt.to(x.dtype)  # (r, in), (B_a, r, r)
        h = project(x.reshape(-1, x.shape[-1]), Vh)  # (B_a*T, r)
        return torch.bmm(h.reshape(Rt.shape[0], -1, Rt.shape[1]), Rt).reshape(-1, Rt.shape[1])  # (B_a*T, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.dim() == 2  # (B*T, in), as OPT's MLP flattens its rows: row-major, so (B, T) again below
        if x.dim() < 2 or (x.shape[0] % self.batch if flat else x.shape[0] != self.batch):
            raise ValueError(f"{self.name} got an input of shape {tuple(x.shape)} but bank.rows() was given "
                             f"{self.batch} adapters; allowed: inputs of {self.batch} rows, one per adapter")
        base, rows = self.base, self.rows.to(x.dtype)  # rows (r, out)
        x3 = x.reshape(self.batch, -1, x.shape[-1])  # (B, T, in)
        if self.selected is not None:  # some rows take the base model: only the others get an update
            out = base(x3)  # (B, T, out)
            g = self._update(x3.index_select(0, self.selected))  # (B_a*T, r)
            delta = torch.mm(g, rows).view(len(self.selected), x3.shape[1], -1)  # (B_a, T, out)
            return out.index_add_(0, self.selected, delta).view(*x.shape[:-1], -1)
        g = self._update(x3)  # (B*T, r)
        x2 = x3.reshape(-1, x.shape[-1])  # (N, in)
        fast = type(base) is nn.Linear and not (torch.is_grad_enabled() or base._forward_hooks
                                                or base._forward_pre_hooks)
        if fast:  # the base product, then the rank-r update added in place
            out = F.linear(x2, base.weight, base.bias).addmm_(g, rows)  # (N, out)
        else:
            out = torch.addmm(base(x2), g, rows)  # (N, out), out of place: autograd and hooks see base(x)
        return out.view(*x.shape[:-1], -1)
