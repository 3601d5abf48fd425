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
import hashlib
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_TIE_STYLES = ("tiled", "structured")
_SVD_METHODS = ("exact", "lowrank")
_LAYER_RE = re.compile(r"\.(\d+)\.")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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
    """Last component of the linear modules' names to adapt. With the default 7, missing ones are skipped."""
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
            if _is_int(self.layers):
                object.__setattr__(self, "layers", (self.layers,))
            else:
                object.__setattr__(self, "layers", tuple(self.layers))
        if not _is_int(self.r) or self.r < 1:
            raise ValueError(f"r={self.r!r} is not allowed: r must be an integer >= 1 (the paper uses 2)")
        if not _is_int(self.u) or self.u < 1:
            raise ValueError(f"u={self.u!r} is not allowed: u must be an integer >= 1 (the paper sweeps 1..64)")
        if self.n_tie != "all" and (not _is_int(self.n_tie) or self.n_tie < 1):
            raise ValueError(
                f"n_tie={self.n_tie!r} is not allowed: n_tie must be an integer >= 1 "
                "(at most the number of adapted modules) or 'all'"
            )
        if self.tie not in _TIE_STYLES:
            raise ValueError(f"tie={self.tie!r} is not allowed: choose one of {list(_TIE_STYLES)}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"targets={self.targets!r} is not allowed: give a non-empty list of module names")
        if self.layers is not None:
            if not self.layers or not all(_is_int(i) and i >= 0 for i in self.layers):
                raise ValueError(
                    f"layers={self.layers!r} is not allowed: give None (all) or non-negative layer indexes"
                )
        if not _is_int(self.seed):
            raise ValueError(f"seed={self.seed!r} is not allowed: seed must be an integer")
        if self.group_sizes is not None:
            if not isinstance(self.group_sizes, tuple):
                object.__setattr__(self, "group_sizes", tuple(self.group_sizes))
            if not self.group_sizes or not all(_is_int(k) and k >= 1 for k in self.group_sizes):
                raise ValueError(
                    f"group_sizes={self.group_sizes!r} is not allowed: give None or positive integers "
                    "summing to the number of adapted modules"
                )
        if self.svd not in _SVD_METHODS:
            raise ValueError(f"svd={self.svd!r} is not allowed: choose one of {list(_SVD_METHODS)}")


class ModuleInfo(NamedTuple):
    """One adapted module: its `named_modules()` name, layer index, type and tying group."""

    name: str
    layer: int
    kind: str
    group: int


# ---------------------------------------------------------------------------------------------
# SVD with a fingerprint-keyed cache (memory, then disk)


def weight_fingerprint(weight: torch.Tensor) -> str:
    """A 16-hex-digit fingerprint of a weight: shape, dtype, a strided sample and two float64 sums.

    Cached per tensor and in-place version, so re-attaching to the same model costs nothing.
    """
    w = weight.detach()
    flat = w.reshape(-1)
    stride = max(1, flat.numel() // 4096)
    sample = flat[::stride].to(torch.float32).cpu().numpy().tobytes()
    key = (w.data_ptr(), weight._version, tuple(w.shape), w.dtype, hash(sample))
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{tuple(w.shape)}|{w.dtype}".encode())
    h.update(sample)
    sums = torch.stack([flat.sum(dtype=torch.float64), torch.linalg.vector_norm(flat, dtype=torch.float64)])
    h.update(sums.cpu().numpy().tobytes())
    if len(_FINGERPRINTS) >= _SVD_CACHE_MAX:
        _FINGERPRINTS.pop(next(iter(_FINGERPRINTS)))
    _FINGERPRINTS[key] = h.hexdigest()
    return _FINGERPRINTS[key]


_FINGERPRINTS: dict[tuple, str] = {}
_SVD_CACHE: dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_SVD_CACHE_MAX = 8192


def _canonical_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so the largest-|entry| of U's column is positive."""
    idx = U.abs().argmax(dim=0)  # (r,)
    signs = torch.sign(U[idx, torch.arange(U.shape[1])])  # (r,)
    signs[signs == 0] = 1
    return U * signs, Vh * signs[:, None]


def _top_eigenvectors(gram: np.ndarray, k: int) -> torch.Tensor:
    """Eigenvectors of the k largest eigenvalues of a symmetric fp32 matrix, as contiguous fp64 (n, k).

    LAPACK's syevr on that subset only (scipy): on a 576 x 576 Gram matrix 12 ms here against 43 ms
    for torch's `eigh`, which computes all eigenvectors.
    """
    from scipy.linalg import eigh

    n = gram.shape[0]
    vectors = eigh(gram, subset_by_index=[n - k, n - 1], driver="evr", check_finite=False, overwrite_a=True)[1]
    return torch.from_numpy(np.ascontiguousarray(vectors)).double()


def _exact_svd(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets of W (fp64 in, fp64 out), exact to fp64 rounding of a Rayleigh-Ritz step.

    The top r + 8 eigenvectors of the smaller Gram matrix (fp32, e.g. 576 x 576) span the top
    singular subspace to fp32 precision; one fp64 subspace iteration and a Rayleigh-Ritz SVD on
    that subspace make the triplets exact. The spectra of trained weights are too flat at the top
    for iterative solvers (SmolLM2's up_proj: sigma_3 / sigma_2 = 0.99), so the Gram matrix is
    reduced densely.

    LAPACK returns column-major eigenvectors and Q factors; multiplying `W.T` by one of those takes
    a slow non-BLAS path (10x slower), so every small basis is made contiguous first.
    """
    out_f, in_f = W.shape
    k = min(r + 8, out_f, in_f)
    W32 = W.float().numpy()
    if out_f <= in_f:
        Q = _top_eigenvectors(W32 @ W32.T, k)  # (out, k)
        Q = torch.linalg.qr(W.T @ Q).Q.contiguous()  # (in, k)
    else:
        Q = _top_eigenvectors(W32.T @ W32, k)  # (in, k)
    Q_out = torch.linalg.qr(W @ Q).Q.contiguous()  # (out, k)
    Q = torch.linalg.qr(W.T @ Q_out).Q.contiguous()  # (in, k): one fp64 refinement
    Ub, S, Vbh = torch.linalg.svd(W @ Q, full_matrices=False)  # (out, k), (k,), (k, k)
    return Ub[:, :r], S[:r], (Q @ Vbh.T).T[:r]  # (out, r), (r,), (r, in)


def _lowrank_svd(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized truncated SVD (torch.svd_lowrank), seeded so it is the same every time."""
    q = min(r + 6, min(W.shape))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        U, S, V = torch.svd_lowrank(W, q=q, niter=2)
    return U[:, :r], S[:r], V[:, :r].T


def _svd_disk_path(key: tuple[str, int, str]) -> str | None:
    if os.environ.get("TINYLAB_SVD_DISK_CACHE", "1") == "0":
        return None
    from tinylab.models import cache_dir

    fp, r, method = key
    return os.path.join(cache_dir(), "svd", f"{fp}-{method}-r{r}.safetensors")


def _load_svd_from_disk(path: str | None, r: int, out_f: int, in_f: int):
    if path is None or not os.path.isfile(path):
        return None
    from safetensors.torch import load_file

    try:
        t = load_file(path)
        U, S, Vh = t["U"], t["S"], t["Vh"]
    except Exception:  # a damaged cache file is recomputed, never trusted
        return None
    if U.shape != (out_f, r) or S.shape != (r,) or Vh.shape != (r, in_f):
        return None
    if not (torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()):
        return None
    return U, S, Vh


def _save_svd_to_disk(path: str | None, U, S, Vh) -> None:
    if path is None:
        return
    from safetensors.torch import save_file

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.close(fd)
        save_file({"U": U.contiguous(), "S": S.contiguous(), "Vh": Vh.contiguous()}, tmp)
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
    except OSError as err:  # a read-only cache only costs speed
        log.debug("could not write SVD cache %s: %s", path, err)
        with contextlib.suppress(OSError, UnboundLocalError):
            os.remove(tmp)


def truncated_svd(weight: torch.Tensor, r: int, method: str = "exact", fingerprint: str | None = None):
    """(U, S, Vh) in fp32 with canonical signs, cached by the weight's fingerprint."""
    fp = fingerprint or weight_fingerprint(weight)
    key = (fp, r, method)
    if key in _SVD_CACHE:
        return _SVD_CACHE[key]
    out_f, in_f = weight.shape
    path = _svd_disk_path(key)
    found = _load_svd_from_disk(path, r, out_f, in_f)
    if found is None:
        W = weight.detach().to(device="cpu", dtype=torch.float64)
        U, S, Vh = _exact_svd(W, r) if method == "exact" else _lowrank_svd(W, r)
        U, Vh = _canonical_signs(U, Vh)
        found = (U.float().contiguous(), S.float().contiguous(), Vh.float().contiguous())
        _save_svd_to_disk(path, *found)
    if len(_SVD_CACHE) >= _SVD_CACHE_MAX:
        _SVD_CACHE.pop(next(iter(_SVD_CACHE)))
    _SVD_CACHE[key] = found
    return found


def _svds(weights: list[tuple[torch.Tensor, str]], r: int, method: str) -> list[tuple]:
    """truncated_svd for many weights; uncached ones on two threads of one BLAS / intra-op thread
    each (SmolLM2's 210: 5.1 s against 7.6 s one at a time on 2 cores; scipy's syevr holds the GIL,
    the products around it do not).

    Only "exact" runs threaded: "lowrank" seeds and draws from torch's global RNG, which threads
    would share (a race that gave different factors run to run); it is cheap enough serially."""
    from threadpoolctl import threadpool_limits

    todo = [(w, fp) for w, fp in weights if (fp, r, method) not in _SVD_CACHE]
    threads = torch.get_num_threads()
    threaded = method == "exact" and len(todo) > 8 and threads > 1
    # scipy's BLAS follows torch's thread count (its own default, all cores, oversubscribes a busy machine)
    with threadpool_limits(1 if threaded else threads, user_api="blas"):
        if threaded:
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(min(threads, 4)) as pool:
                    list(pool.map(lambda wf: truncated_svd(wf[0], r, method, wf[1]), todo))
            finally:
                torch.set_num_threads(threads)
        return [truncated_svd(w, r, method, fp) for w, fp in weights]


# ---------------------------------------------------------------------------------------------
# The adapted module


class TinyLoRALinear(nn.Module):
    """A frozen `nn.Linear` plus the TinyLoRA update; `v` may be shared with other modules."""

    def __init__(self, base: nn.Linear, U, S, Vh, P, v: nn.Parameter):
        super().__init__()
        self.base = base
        dtype, device = base.weight.dtype, base.weight.device
        self.register_buffer("U", U.to(device=device, dtype=dtype), persistent=False)  # (out, r)
        self.register_buffer("S", S.to(device=device, dtype=dtype), persistent=False)  # (r,)
        self.register_buffer("Vh", Vh.to(device=device, dtype=dtype), persistent=False)  # (r, in)
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
        return torch.einsum("u,uij->ij", self.v, self.P.to(self.v.device))  # (r, r)

    def delta_weight(self, R: torch.Tensor | None = None) -> torch.Tensor:
        """U diag(S) R Vh in fp32, (out, in). Only for merging and tests: the forward never builds it."""
        R = self.R() if R is None else R
        return (self.U.float() * self.S.float()) @ R.float() @ self.Vh.float()  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = base(x) + (x Vh^T) (U diag(S) R)^T, added onto the base output without a temporary.

        U diag(S) R (out, r) = sum_i v_i G_i with G_i = U diag(S) P_i: G depends only on the frozen
        buffers and is kept (rebuilt if one is replaced or written in place), so each call costs one
        small product with v, and a v changed by any optimizer, fused or not, is always seen. For
        u > 16 only U diag(S) is kept (G would hold u copies of U). Few rows (decoding): one addmm.
        Many rows: r addcmul passes, because MKL's K = r gemm is up to 10x slower at some widths
        (e.g. 1536). Without grad and without hooks on `base`, both run in place on base's fresh
        output. At v = 0 they add exact zeros, so the output is bit-identical to the base model's.
        """
        y = self.base(x)  # (..., out)
        if not self.enabled or self.merged_R is not None:
            return y
        buffers = self._buffers
        U, S, Vh, P = buffers["U"], buffers["S"], buffers["Vh"], buffers["P"]  # (out, r), (r,), (r, in), (u, r, r)
        u, r = P.shape[0], P.shape[1]
        versions = (U._version, S._version, P._version)
        kept = self.__dict__.get("_kept_basis")  # (U, S, P, versions, G)
        if kept is None or kept[0] is not U or kept[1] is not S or kept[2] is not P or kept[3] != versions:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable under autograd
                US = U.float() * S.float()  # (out, r)
                G = torch.einsum("or,urs->uos", US, P.float()).reshape(u, -1) if u <= 16 else US  # (u, out*r)
            kept = self.__dict__["_kept_basis"] = (U, S, P, versions, G)
        v = self.v.float()  # (u,)
        if u <= 16:
            US_R = (v @ kept[4]).view(-1, r).to(y.dtype)  # (out, r): U diag(S) R
        else:
            R = (v @ P.float().reshape(u, -1)).view(r, r)  # (r, r) = sum_i v_i P_i
            US_R = (kept[4] @ R).to(y.dtype)  # (out, r): U diag(S) R
        h = F.linear(x.reshape(-1, x.shape[-1]), Vh)  # (N, r)
        out = y.reshape(-1, y.shape[-1])  # (N, out)
        in_place = not (torch.is_grad_enabled() or type(self.base) is not nn.Linear or not y.is_contiguous()
                        or self.base._forward_hooks or nn.modules.module._global_forward_hooks)
        if out.shape[0] <= 64:
            out = out.addmm_(h, US_R.T) if in_place else torch.addmm(out, h, US_R.T)  # (N, out)
            return out.view(y.shape)
        rows = US_R.T.contiguous()  # (r, out)
        first = 0
        if not in_place:
            out, first = torch.addcmul(out, h[:, :1], rows[0]), 1  # (N, out)
        for i in range(first, r):
            out.addcmul_(h[:, i : i + 1], rows[i])  # (N, out) += h_i (U diag(S) R)_i
        return out.view(y.shape)

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


# ---------------------------------------------------------------------------------------------
# Finding modules, grouping them, attaching


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Linear, int | None]]:
    """Every `nn.Linear` (or already adapted module) with its layer index (None outside the blocks)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, TinyLoRALinear):
            found.append((name, module.base, _layer_of(name)))
        elif isinstance(module, nn.Linear) and not name.endswith(".base"):
            found.append((name, module, _layer_of(name)))
    return found


def _layer_of(name: str) -> int | None:
    m = _LAYER_RE.search(f".{name}.")
    return int(m.group(1)) if m else None


def _num_layers(model: nn.Module, linears) -> int:
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if n is None:
        n = 1 + max((layer for _, _, layer in linears if layer is not None), default=-1)
    return n


def _select(model: nn.Module, config: TinyLoRAConfig) -> list[tuple[str, nn.Linear, int]]:
    """The modules to adapt, in model order; errors name the bad value and what exists."""
    linears = linear_modules(model)
    in_blocks = [(n, m, layer) for n, m, layer in linears if layer is not None]
    kinds = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, _, _ in in_blocks))
    lenient = config.targets == DEFAULT_TARGETS
    missing = [t for t in config.targets if t not in kinds]
    if missing and (not lenient or len(missing) == len(config.targets)):
        raise ValueError(
            f"targets {missing} match no linear module in this model; its linear module types are {kinds} "
            f"(e.g. {[n for n, _, _ in in_blocks[:3]]})"
        )
    n_layers = _num_layers(model, linears)
    if config.layers is not None:
        bad = [i for i in config.layers if i >= n_layers]
        if bad:
            raise ValueError(f"layers {bad} are out of range: this model has layers 0..{n_layers - 1}")
    wanted_layers = None if config.layers is None else set(config.layers)
    chosen = [
        (n, m, layer)
        for n, m, layer in in_blocks
        if n.rsplit(".", 1)[-1] in config.targets and (wanted_layers is None or layer in wanted_layers)
    ]
    if not chosen:
        raise ValueError(f"no module matches targets={list(config.targets)} in layers={config.layers}")
    for n, m, _ in chosen:
        if config.r > min(m.in_features, m.out_features):
            raise ValueError(
                f"r={config.r} is too large for {n} ({m.out_features}x{m.in_features}): "
                f"allowed 1..{min(m.in_features, m.out_features)}"
            )
    return chosen


def _groups(chosen: Sequence[tuple[str, nn.Linear, int]], config: TinyLoRAConfig) -> list[int]:
    """Tying group of each chosen module, numbered in order of first appearance in the model."""
    n = len(chosen)
    if config.group_sizes is not None:
        if sum(config.group_sizes) != n:
            raise ValueError(
                f"group_sizes sum to {sum(config.group_sizes)} but {n} modules are adapted: they must sum to {n}"
            )
        return [g for g, size in enumerate(config.group_sizes) for _ in range(size)]
    n_tie = n if config.n_tie == "all" else config.n_tie
    if n_tie > n:
        raise ValueError(f"n_tie={config.n_tie} is out of range: allowed 1..{n} (or 'all') for {n} adapted modules")
    if config.tie == "tiled":
        return [i // n_tie for i in range(n)]
    kinds = [name.rsplit(".", 1)[-1] for name, _, _ in chosen]
    layers_of = {k: sorted({lay for kk, (_, _, lay) in zip(kinds, chosen) if kk == k}) for k in set(kinds)}
    keys = [(k, layers_of[k].index(lay) // n_tie) for k, (_, _, lay) in zip(kinds, chosen)]
    order = {key: j for j, key in enumerate(dict.fromkeys(keys))}
    return [order[key] for key in keys]


def plan_modules(model: nn.Module, config: TinyLoRAConfig) -> list[ModuleInfo]:
    """The modules `config` would adapt in `model`, with their tying groups; no SVD, nothing attached."""
    chosen = _select(model, config)
    return [ModuleInfo(name, layer, name.rsplit(".", 1)[-1], g)
            for (name, _, layer), g in zip(chosen, _groups(chosen, config))]


def count_params(model: nn.Module, config: TinyLoRAConfig) -> int:
    """Exact number of trained scalars `config` gives on `model` (groups x u), without attaching."""
    return (max(m.group for m in plan_modules(model, config)) + 1) * config.u


def _projection(seed: int, name: str, u: int, r: int) -> torch.Tensor:
    """P for one module: N(0, 1/r) from a generator seeded by (seed, module name)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return torch.randn(u, r, r, generator=g) / math.sqrt(r)  # (u, r, r)


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
        return torch.cat([v.detach().reshape(-1) for v in self.vectors]).float().cpu()

    @torch.no_grad()
    def set_vector(self, values: torch.Tensor | Sequence[float]) -> None:
        values = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
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

        While merged, a copy of each adapted weight is held (for SmolLM2: 0.5 GB in fp32).
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

    `overrides` are TinyLoRAConfig fields (`apply_tinylora(model, u=13, n_tie="all")`).
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

    chosen = _select(model, config)
    group_of = _groups(chosen, config)
    n_groups = max(group_of) + 1
    vectors = nn.ParameterList(
        [nn.Parameter(torch.zeros(config.u, dtype=torch.float32, device=chosen[0][1].weight.device))
         for _ in range(n_groups)]
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
