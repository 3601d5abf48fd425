"""The TinyLoRA adapter: a handful of trained scalars steering frozen rank-r SVD directions.

For every adapted linear map W (out x in), frozen:

    U, S, Vh = truncated SVD of W, rank r     # U (out, r), S (r,), Vh (r, in)
    P        = seeded random tensor (u, r, r) # one per module, never trained, N(0, 1/r) like PEFT
    v        = trained vector (u,), fp32      # shared by the modules of one tying group
    R        = sum_i v_i P_i                  # (r, r)
    W'       = W + U diag(S) R Vh

Convention: S multiplies the rows of R (the paper's formula as written). PEFT splits sqrt(S) over
both sides (U sqrt(S) R' sqrt(S) Vh); the two agree through R' = S^1/2 R S^-1/2, which is what
`tinylab.peft_interop` converts. The forward never builds the (out, in) update:

    y = x W^T + (((x Vh^T) R^T) * S) U^T

At v = 0 the added term is exactly zero, so the adapted model is bit-identical to the base.
SVD signs are canonicalised (largest |entry| of each column of U positive), so the same weights
give the same U, S, Vh on every machine and a saved v means the same update everywhere.

Tying: `tiled` groups `n_tie` consecutive modules in model order (q,k,v,o,gate,up,down of layer
0, then layer 1, ...); `structured` groups modules of one type across `n_tie` consecutive layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _modules

from tinylab.checks import is_int
from tinylab.seeds import derived_seed
from tinylab.svd import _svds, _version, weight_fingerprint
from tinylab.targets import (
    DEFAULT_TARGETS,
    ModuleInfo,
    _groups,
    count_params,
    linear_modules,
    plan_modules,
    select_modules,
)

__all__ = [
    "DEFAULT_TARGETS",
    "ModuleInfo",
    "TinyLoRA",
    "TinyLoRAConfig",
    "TinyLoRALinear",
    "apply_tinylora",
    "count_params",
    "find_adapter",
    "linear_modules",
    "plan_modules",
    "weight_fingerprint",
]
"""`DEFAULT_TARGETS`, `ModuleInfo`, `count_params`, `linear_modules` and `plan_modules` live in
`tinylab.targets` (module selection) and `weight_fingerprint` in `tinylab.svd`; re-exported here."""

_TIE_STYLES = ("tiled", "structured")
_SVD_METHODS = ("exact", "lowrank")


@dataclasses.dataclass(frozen=True)
class TinyLoRAConfig:
    """Where the trained scalars go and how many there are. `dataclasses.replace` is the sweep API."""

    r: int = 2
    """Rank of the frozen SVD directions; R is (r, r). The paper uses 2. At least 1, at most min(out, in)."""
    u: int = 1
    """Length of each trained vector v. May exceed r*r (the paper sweeps up to 64 at r = 2)."""
    n_tie: int | str = 1
    """Modules sharing one v: 1 (untied) .. number of adapted modules, or "all" for one shared v."""
    tie: str = "tiled"
    """"tiled" (consecutive modules in model order) or "structured" (same type across layers)."""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """Last component of the linear modules' names to adapt. The default 7 also take the names other
    architectures give the same maps (phi3's fused qkv_proj and gate_up_proj, OPT's out_proj, fc1,
    fc2, ...); roles the model lacks are skipped, and in-block linear maps left out are warned about."""
    layers: tuple[int, ...] | None = None
    """Layer indexes to adapt; None means all layers."""
    seed: int = 0
    """Seed of the random projections P (with each module's name)."""
    svd: str = "exact"
    """"exact" (top-r singular triplets to fp32 precision) or "lowrank" (randomized, seeded)."""
    group_sizes: tuple[int, ...] | None = None
    """Explicit tiled groups: sizes of consecutive groups in model order, summing to the number of
    adapted modules (e.g. the budget planner's "proportional" placement). Overrides n_tie and tie."""

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        if self.targets is not None and not isinstance(self.targets, tuple):
            object.__setattr__(self, "targets", tuple(self.targets))
        if self.layers is not None and not isinstance(self.layers, tuple):
            if is_int(self.layers):
                object.__setattr__(self, "layers", (self.layers,))
            else:
                object.__setattr__(self, "layers", tuple(self.layers))
        if not is_int(self.r) or self.r < 1:
            raise ValueError(f"r={self.r!r} is not allowed: r must be an integer >= 1 (the paper uses 2)")
        if not is_int(self.u) or self.u < 1:
            raise ValueError(f"u={self.u!r} is not allowed: u must be an integer >= 1 (the paper sweeps 1..64)")
        if self.n_tie != "all" and (not is_int(self.n_tie) or self.n_tie < 1):
            raise ValueError(
                f"n_tie={self.n_tie!r} is not allowed: n_tie must be an integer >= 1 "
                "(at most the number of adapted modules) or 'all'"
            )
        if self.tie not in _TIE_STYLES:
            raise ValueError(f"tie={self.tie!r} is not allowed: choose one of {list(_TIE_STYLES)}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"targets={self.targets!r} is not allowed: give a non-empty list of module names")
        if self.layers is not None:
            if not self.layers or not all(is_int(i) and i >= 0 for i in self.layers):
                raise ValueError(
                    f"layers={self.layers!r} is not allowed: give None (all) or non-negative layer indexes"
                )
        if not is_int(self.seed):
            raise ValueError(f"seed={self.seed!r} is not allowed: seed must be an integer")
        if self.group_sizes is not None:
            if not isinstance(self.group_sizes, tuple):
                object.__setattr__(self, "group_sizes", tuple(self.group_sizes))
            if not self.group_sizes or not all(is_int(k) and k >= 1 for k in self.group_sizes):
                raise ValueError(
                    f"group_sizes={self.group_sizes!r} is not allowed: give None or positive integers "
                    "summing to the number of adapted modules"
                )
        if self.svd not in _SVD_METHODS:
            raise ValueError(f"svd={self.svd!r} is not allowed: choose one of {list(_SVD_METHODS)}")
        for name in ("r", "u", "seed") + (("n_tie",) if self.n_tie != "all" else ()):
            object.__setattr__(self, name, int(getattr(self, name)))  # numpy integers become ints (JSON)
        for name in ("layers", "group_sizes"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))


# ---------------------------------------------------------------------------------------------
# The adapted module


def _low_rank(h: torch.Tensor, rows: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
    """start + h @ rows as a new (N, out) tensor: h (N, r), rows (r, out) contiguous, start a bias
    (out,), a base output (N, out) or None. For r <= 4, r elementwise passes: MKL's K = r gemm is
    slower than them at many widths on the CPU; from r = 8 the gemm wins (`benchmarks/adapter.py`
    prints the forward and decode costs)."""
    r = rows.shape[0]
    if r > 4:
        return torch.mm(h, rows) if start is None else torch.addmm(start, h, rows)
    out = torch.mul(h[:, :1], rows[0]) if start is None else torch.addcmul(start, h[:, :1], rows[0])
    for i in range(1, r):
        out.addcmul_(h[:, i : i + 1], rows[i])  # (N, out) += h_i (U diag(S) R)_i
    return out


class TinyLoRALinear(nn.Module):
    """A frozen `nn.Linear` plus the TinyLoRA update; `v` may be shared with other modules.

    U, S, Vh live on the base weight's device in its dtype; P and v stay fp32 (P on the weight's
    device, v on its group's first module's device: a model split across devices reads it there).
    """

    adapts_linear = True  # how `tinylab.targets.linear_modules` recognises an adapted map

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

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (so code reading `.weight` keeps working)."""
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

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
        versions = (_version(U), _version(S), _version(P))
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
        or not, is always seen; the update is added out of place, so y stays as hooks saw it
        (`_low_rank` for many rows). Without grad (generation, evaluation) the rows are kept until
        v changes, and a plain `nn.Linear` base is called as `F.linear`:
        - v = 0: the base's own `F.linear`, so the output is bit-identical to the base model's;
        - few rows (decoding, where Python overhead is most of the cost): base, then one addmm;
        - many rows (prefill): the rank-r update is written first (`_low_rank`) and the base
          product accumulates onto it (gemm with beta = 1): no extra read-write pass over the output.
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
            h = F.linear(x2, self._buffers["Vh"])  # (N, r)
            if x2.shape[0] <= 64:
                out = F.linear(x2, weight, bias).addmm_(h, rows)  # (N, out)
            else:
                out = _low_rank(h, rows, bias)  # (N, out): the update
                out.addmm_(x2, weight.T)  # (N, out) += x W^T, inside the gemm
            return out.view(*x.shape[:-1], out.shape[-1])
        y = base(x)  # (..., out): hooks see it unchanged, autograd keeps it
        rows = self._update().T.to(y.dtype) if torch.is_grad_enabled() else self._kept_rows(y.dtype)  # (r, out)
        if rows is None:
            return y
        r = rows.shape[0]
        h = F.linear(x, self._buffers["Vh"]).reshape(-1, r)  # (N, r)
        out = y.reshape(-1, y.shape[-1])  # (N, out)
        if out.shape[0] <= 64:
            return torch.addmm(out, h, rows).view(y.shape)
        return _low_rank(h, rows.contiguous(), out).view(y.shape)  # a new tensor: y stays as hooks saw it

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight; the original is kept so unmerge() is bit-exact."""
        if self.merged_R is None:
            R = self.R().detach().clone()
            self._original = self.base.weight.detach().clone()
            self.base.weight += self.delta_weight(R).to(self.base.weight.dtype)
            self.merged_R = R

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_R is not None:
            self.base.weight.copy_(self._original)
            self._original = None
            self.merged_R = None

    def extra_repr(self) -> str:
        return f"r={self.U.shape[1]}, u={self.P.shape[0]}"


def _projection(seed: int, name: str, u: int, r: int) -> torch.Tensor:
    """P for one module: N(0, 1/r) on the CPU from a generator seeded by derived_seed(seed, module
    name) (the same numbers on every machine; the module moves P to its weight's device)."""
    g = torch.Generator(device="cpu").manual_seed(derived_seed(seed, name))
    return torch.randn(u, r, r, generator=g, device="cpu") / math.sqrt(r)  # (u, r, r) fp32


class TinyLoRA:
    """Handle on an attached adapter: its trained vectors, its modules, and switches."""

    def __init__(self, model: nn.Module, config: TinyLoRAConfig, modules: list[ModuleInfo], vectors, wrapped,
                 saved_requires_grad: dict[str, bool], fingerprints: dict[str, str]):
        self.model = model
        self.config = config
        self.modules = modules
        self.vectors = vectors  # nn.ParameterList, one (u,) fp32 vector per tying group
        self._wrapped = wrapped  # name -> TinyLoRALinear
        self._saved_requires_grad = saved_requires_grad
        self.fingerprints = fingerprints  # module name -> weight fingerprint
        self.attached = True

    # --- counting and parameters
    @property
    def num_params(self) -> int:
        return len(self.vectors) * self.config.u

    @property
    def num_groups(self) -> int:
        return len(self.vectors)

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.vectors)

    def named_modules(self) -> Iterator[tuple[str, TinyLoRALinear]]:
        return iter(self._wrapped.items())

    def vector(self) -> torch.Tensor:
        """All trained numbers as one detached fp32 vector, groups in order."""
        return torch.cat([v.detach().reshape(-1).float().cpu() for v in self.vectors])  # (n,), from any devices

    @torch.no_grad()
    def set_vector(self, values: torch.Tensor | Sequence[float]) -> None:
        values = torch.as_tensor(values, dtype=torch.float32, device="cpu").reshape(-1)  # (n,)
        if values.numel() != self.num_params:
            raise ValueError(f"got {values.numel()} values; this adapter has {self.num_params} parameters")
        if self.merged:
            raise RuntimeError("unmerge() before changing v")
        for i, v in enumerate(self.vectors):
            v.copy_(values[i * self.config.u : (i + 1) * self.config.u])

    def groups(self) -> dict[int, list[str]]:
        """Tying group -> the module names sharing its vector."""
        out: dict[int, list[str]] = {}
        for m in self.modules:
            out.setdefault(m.group, []).append(m.name)
        return out

    # --- switches
    @property
    def merged(self) -> bool:
        return any(m.merged_R is not None for m in self._wrapped.values())

    @contextlib.contextmanager
    def disabled(self):
        """The base model: the adapter contributes nothing inside the block (never a second copy)."""
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        previous = {n: m.enabled for n, m in self._wrapped.items()}
        for m in self._wrapped.values():
            m.enabled = False
        try:
            yield self.model
        finally:
            for n, m in self._wrapped.items():
                m.enabled = previous[n]
            if was_merged:
                self.merge()

    def merge(self) -> None:
        """Add U diag(S) R Vh into each weight (fast generation); unmerge() restores the exact originals.

        While merged, a copy of each adapted weight is held (as many bytes as the adapted weights).
        """
        self._check_attached()
        for m in self._wrapped.values():
            m.merge()

    def unmerge(self) -> None:
        for m in self._wrapped.values():
            m.unmerge()

    def remove(self) -> nn.Module:
        """Put the original modules back and restore every parameter's requires_grad."""
        if not self.attached:
            return self.model
        self.unmerge()
        for name, wrapper in self._wrapped.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, wrapper.base)
        for name, p in self.model.named_parameters():
            if name in self._saved_requires_grad:
                p.requires_grad_(self._saved_requires_grad[name])
        self.attached = False
        return self.model

    def _check_attached(self) -> None:
        if not self.attached:
            raise RuntimeError("this adapter was removed; attach a new one with apply_tinylora")

    def __repr__(self) -> str:
        return (f"TinyLoRA({self.num_params} params, {len(self.modules)} modules, {self.num_groups} groups, "
                f"{self.config})")


def find_adapter(model: nn.Module) -> bool:
    """True when a TinyLoRA adapter is attached to `model`."""
    return any(isinstance(m, TinyLoRALinear) for m in model.modules())


def apply_tinylora(model: nn.Module, config: TinyLoRAConfig | None = None, **overrides) -> TinyLoRA:
    """Attach TinyLoRA to `model` in place; afterwards only the adapter's vectors require grad.

    `overrides` are TinyLoRAConfig fields (`apply_tinylora(model, u=13, n_tie="all")`). The model
    may be on any device and in any float dtype: the SVD is computed on the CPU in fp32/fp64 (and
    cached), then U, S, Vh move to each weight's device and dtype; P is drawn on the CPU and moved;
    each trained vector is fp32 on the device of its group's first module. Weights on the "meta"
    device (offloaded by a `device_map`) cannot be read and are refused.
    """
    if config is None:
        config = TinyLoRAConfig()
    if not isinstance(config, TinyLoRAConfig):
        raise TypeError(f"config must be a TinyLoRAConfig, got {type(config).__name__}")
    if overrides:
        fields = {f.name for f in dataclasses.fields(TinyLoRAConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"unknown TinyLoRAConfig fields {unknown}; allowed: {sorted(fields)}")
        config = dataclasses.replace(config, **overrides)
    if find_adapter(model):
        raise ValueError("this model already has a TinyLoRA adapter: call adapter.remove() first")

    chosen = select_modules(model, config)
    group_of = _groups(chosen, config)
    offloaded = [name for name, linear, _ in chosen if linear.weight.device.type == "meta"]
    if offloaded:
        raise ValueError(f"{len(offloaded)} adapted weights are on the meta device (e.g. {offloaded[0]}): they were "
                         "offloaded (device_map with disk/CPU offload) or never loaded; load the model onto real "
                         "devices (device_map='auto' without offload, or one device) before apply_tinylora")
    first_device = {}
    for (_, linear, _), group in zip(chosen, group_of):
        first_device.setdefault(group, linear.weight.device)
    vectors = nn.ParameterList(
        [nn.Parameter(torch.zeros(config.u, dtype=torch.float32, device=first_device[g]))  # (u,) fp32
         for g in range(len(first_device))]
    )
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)

    fingerprints = {name: weight_fingerprint(linear.weight) for name, linear, _ in chosen}
    factors = _svds([(linear.weight, fingerprints[name]) for name, linear, _ in chosen], config.r, config.svd)
    modules, wrapped = [], {}
    for (name, linear, layer), group, (U, S, Vh) in zip(chosen, group_of, factors):
        P = _projection(config.seed, name, config.u, config.r)
        wrapper = TinyLoRALinear(linear, U, S, Vh, P, vectors[group])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
        modules.append(ModuleInfo(name, layer, name.rsplit(".", 1)[-1], group))
        wrapped[name] = wrapper
    return TinyLoRA(model, config, modules, vectors, wrapped, saved, fingerprints)
