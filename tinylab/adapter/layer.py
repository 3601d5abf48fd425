"""The TinyLoRA adapter: a handful of trained scalars steering frozen rank-r SVD directions.

For every adapted linear map W (out x in), frozen:

    U, S, Vh = truncated SVD of W, rank r     # U (out, r), S (r,), Vh (r, in)
    P        = seeded random tensor (u, r, r) # one per module, never trained, N(0, 1/r) like PEFT
    v        = trained vector (u,), fp32      # shared by the modules of one tying group
    R        = sum_i v_i P_i                  # (r, r)
    W'       = W + U diag(S) R Vh

Convention: S multiplies the rows of R (the paper's formula as written). PEFT splits sqrt(S) over
both sides (U sqrt(S) R' sqrt(S) Vh); the two agree through R' = S^1/2 R S^-1/2, which is what
`tinylab.interop.peft_tinylora` converts. The forward never builds the (out, in) update:

    y = x W^T + (((x Vh^T) R^T) * S) U^T

At v = 0 the added term is exactly zero, so the adapted model is bit-identical to the base.
SVD signs are canonicalised (largest |entry| of each column of U positive), so the same weights
give the same U, S, Vh on every machine and a saved v means the same update everywhere.

Tying: `tiled` groups `n_tie` consecutive modules in model order (q,k,v,o,gate,up,down of layer
0, then layer 1, ...); `structured` groups modules of one type across `n_tie` consecutive layers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _modules

from tinylab.adapter.svd import tensor_version
from tinylab.basics.seeds import derived_seed

__all__ = ["TinyLoRALinear", "WrapsLinear", "project", "projection"]


class WrapsLinear:
    """The wrapped base map's `in_features`, `out_features`, `weight` and `bias` (`self.base`), for a
    module standing in for a linear map: model code that reads them off the map it calls keeps
    working (Ergo's attention reads `o_proj.weight.dtype`)."""

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias


class TinyLoRALinear(WrapsLinear, nn.Module):
    """A frozen `nn.Linear` plus the TinyLoRA update; `v` may be shared with other modules.

    U, S, Vh live on the base weight's device in its dtype; P and v stay fp32 (P on the weight's
    device, v on its group's first module's device: a model split across devices reads it there).
    """

    adapts_linear = True  # how `tinylab.adapter.targets.linear_modules` recognises an adapted map

    def __init__(self, base: nn.Linear, U, S, Vh, P, v: nn.Parameter):
        super().__init__()
        self.base = base
        dtype, device = base.weight.dtype, base.weight.device
        self.register_buffer("U", U.to(device=device, dtype=dtype, copy=True), persistent=False)  # (out, r)
        self.register_buffer("S", S.to(device=device, dtype=dtype, copy=True), persistent=False)  # (r,)
        self.register_buffer("Vh", Vh.to(device=device, dtype=dtype, copy=True), persistent=False)  # (r, in)
        self.register_buffer("P", P.to(device=device), persistent=False)  # (u, r, r) fp32
        self.v = v  # (u,) fp32, trained
        self.enabled = True
        self.merged_R: torch.Tensor | None = None  # (r, r) R that was merged into base.weight
        self._original: torch.Tensor | None = None  # (out, in) base weight before merge()

    def R(self) -> torch.Tensor:
        P = self._buffers["P"]  # (u, r, r) fp32, on this module's device
        return torch.einsum("u,uij->ij", self.v.to(P.device), P)  # (r, r) fp32

    def delta_weight(self, R: torch.Tensor | None = None) -> torch.Tensor:
        """U diag(S) R Vh in fp32, (out, in). Only for merging and tests: the forward never builds it."""
        R = self.R() if R is None else R
        return (self.U.float() * self.S.float()) @ R.float() @ self.Vh.float()  # (out, in)

    def _basis(self) -> torch.Tensor:
        """G, kept until a frozen buffer is replaced or written in place: (u, out*r) with
        G_i = U diag(S) P_i when u <= 16, else U diag(S) (out, r) (G would hold u copies of U)."""
        buffers = self._buffers
        U, S, P = buffers["U"], buffers["S"], buffers["P"]  # (out, r), (r,), (u, r, r)
        versions = (tensor_version(U), tensor_version(S), tensor_version(P))
        kept = self.__dict__.get("_kept_basis")  # (U, S, P, versions, G)
        if kept is None or kept[0] is not U or kept[1] is not S or kept[2] is not P or kept[3] != versions:
            u = P.shape[0]
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable under autograd
                US = U.float() * S.float()  # (out, r)
                G = torch.einsum("or,urs->uos", US, P.float()).reshape(u, -1) if u <= 16 else US  # (u, out*r)
            kept = self.__dict__["_kept_basis"] = (U, S, P, versions, G)
        return kept[4]

    def _update(self) -> torch.Tensor:
        """U diag(S) R (out, r) in fp32, built from v (with v's graph under autograd): one small product."""
        P, G = self.P, self._basis()  # (u, r, r), see _basis
        v = self.v.to(device=G.device, dtype=torch.float32)  # (u,), with v's graph
        u, r = P.shape[0], P.shape[1]
        if u <= 16:
            return (v @ G).view(-1, r)  # (out, r)
        R = (v @ P.float().reshape(u, -1)).view(r, r)  # (r, r) = sum_i v_i P_i
        return G @ R  # (out, r)

    def _kept_rows(self, dtype: torch.dtype) -> torch.Tensor | None:
        """(U diag(S) R)^T as contiguous (r, out) rows in `dtype`, or None when R is exactly zero
        (v = 0: the module is the base exactly), for forwards without grad. Kept until v (any
        optimizer step, `set_vector`, a `.data` swap) or a frozen buffer changes. The hot path
        reads `_parameters` / `_buffers` directly: `nn.Module.__getattr__` is slow next to a small
        matmul, and decoding calls every adapted module once per token."""
        v, buffers = self._parameters["v"], self._buffers
        U, S, P = buffers["U"], buffers["S"], buffers["P"]  # (out, r), (r,), (u, r, r)
        try:
            key = (v._version, v.data_ptr(), dtype, U._version, S._version, P._version)
        except RuntimeError:  # an inference tensor (replaced under inference_mode) has no version: no keeping
            key = None
        kept = self.__dict__.get("_rows_cache")  # (key, U, S, P, rows)
        if key is not None and kept is not None and kept[0] == key and kept[1] is U and kept[2] is S and kept[3] is P:
            return kept[4]
        # Built on the first call after attaching or after v changes, straight from R: the autograd
        # path's (u, out*r) basis (_basis) would cost more to build after each attach.
        with torch.inference_mode(False), torch.no_grad():
            R = self.R().float()  # (r, r)
            rows = torch.mm(R.T, (U.float() * S.float()).T).to(dtype) if R.any() else None  # (r, out), contiguous
        self.__dict__["_rows_cache"] = (key, U, S, P, rows)
        return rows

    def _plain_base(self) -> bool:
        """The base is a plain `nn.Linear` with no hooks and no patched forward (e.g. accelerate's),
        outside autocast: it may be called as `F.linear`, and its fresh output written in place."""
        base = self._modules["base"]
        return type(base) is nn.Linear and "forward" not in base.__dict__ and not (
            base._forward_hooks or base._forward_pre_hooks or _modules._global_forward_hooks
            or _modules._global_forward_pre_hooks or torch.is_autocast_enabled("cpu")
            or torch.is_autocast_enabled("cuda"))  # autocast casts F.linear's output, not addmm_'s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = base(x) + (x Vh^T) (U diag(S) R)^T; the (out, in) update is never built.

        U diag(S) R (out, r) = sum_i v_i G_i with G_i = U diag(S) P_i: G depends only on the frozen
        buffers and is kept (rebuilt if one is replaced or written in place). Under autograd each
        call rebuilds U diag(S) R from v (one small product), so a v changed by any optimizer, fused
        or not, is always seen; the update is added out of place, so y stays as hooks saw it. Without
        grad (generation, evaluation) the rows are kept until v changes, and a plain `nn.Linear`
        base is called as `F.linear` with the rank-r update added in place (one K = r gemm):
        at v = 0 the output is the base's own `F.linear`, bit-identical to the base model's.
        `benchmarks/adapter.py` prints the prefill and decode cost against the base model.
        """
        base = self._modules["base"]
        if not self.enabled or self.merged_R is not None:
            return base(x)
        if not torch.is_grad_enabled() and self._plain_base():
            weight, bias = base._parameters["weight"], base._parameters["bias"]  # (out, in), (out,)
            rows = self._kept_rows(x.dtype)  # (r, out) or None
            if rows is None:
                return F.linear(x, weight, bias)
            x2 = x.reshape(-1, x.shape[-1])  # (N, in)
            out = F.linear(x2, weight, bias).addmm_(project(x2, self._buffers["Vh"]), rows)  # (N, out)
            return out.view(*x.shape[:-1], out.shape[-1])
        y = base(x)  # (..., out): hooks see it unchanged, autograd keeps it
        rows = self._update().T.to(y.dtype) if torch.is_grad_enabled() else self._kept_rows(y.dtype)  # (r, out)
        if rows is None:
            return y
        h = project(x.reshape(-1, x.shape[-1]), self._buffers["Vh"])  # (N, r)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h, rows)  # (N, out), a new tensor: y stays as hooks saw it
        # Reshaped without becoming a view for autograd (as torch.matmul does): a caller adding into the
        # output in place (Falcon's MLP) would otherwise drop the gradient hooks registered on it.
        return out if out.shape == y.shape else torch.ops.aten._unsafe_view(out, y.shape)

    def original_weight(self) -> torch.Tensor:
        """The base weight (out, in) as it was before any merge (the kept copy while merged)."""
        return self._original if self._original is not None else self.base.weight

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight; the original is kept so unmerge() is bit-exact."""
        if self.merged_R is None:
            R = self.R().detach().clone()
            self._original = self.base.weight.detach().clone()
            self.base.weight.add_(self.delta_weight(R).to(self.base.weight.dtype))  # in place: a Conv1D's view too
            self.merged_R = R

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_R is not None:
            self.base.weight.copy_(self._original)
            self._original = None
            self.merged_R = None

    def extra_repr(self) -> str:
        return f"r={self.U.shape[1]}, u={self.P.shape[0]}"


_MKL = torch.backends.mkl.is_available()  # the CPU BLAS whose kernel choice `project` works around


def project(x2: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """x2 Vh^T, (N, in) -> (N, r). In fp32 on the CPU with N >= 32 rows it is computed as (Vh x2^T)^T, a
    transposed view: MKL runs a product with r = 2 output columns several times slower than the same
    product with 2 output rows, and this product reads the whole input again (`benchmarks/adapter.py`
    prints the prefill cost against the base). Elsewhere F.linear is kept: in bf16 on the CPU and for a
    few decoding rows it is the faster one, a GPU's own kernels serve either form, and CPU builds
    without MKL were not measured."""
    if x2.shape[0] >= 32 and x2.dtype == torch.float32 and x2.device.type == "cpu" and _MKL:
        return torch.mm(Vh, x2.T).T  # (N, r)
    return F.linear(x2, Vh)  # (N, r)


def projection(seed: int, name: str, u: int, r: int) -> torch.Tensor:
    """P for one module: N(0, 1/r) on the CPU from a generator seeded by derived_seed(seed, module
    name) (the same numbers on every machine; the module moves P to its weight's device)."""
    g = torch.Generator(device="cpu").manual_seed(derived_seed(seed, name))
    return torch.randn(u, r, r, generator=g, device="cpu") / math.sqrt(r)  # (u, r, r) fp32
