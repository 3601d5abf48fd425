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
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _modules

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
# What the default targets are called elsewhere, per role, first present name wins: fused maps
# (phi3's qkv_proj and gate_up_proj) take several roles; OPT/BART, Phi, GPT-J/CodeGen, GPT-NeoX/Falcon,
# StarCoder2 and GPT-BigCode, and old Mixtral experts name the same maps otherwise.
_DEFAULT_ALIASES = {
    "q_proj": ("q_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn"),
    "k_proj": ("k_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn"),
    "v_proj": ("v_proj", "qkv_proj", "query_key_value", "Wqkv", "c_attn"),
    "o_proj": ("o_proj", "out_proj", "dense"),
    "gate_proj": ("gate_proj", "gate_up_proj", "w1"),
    "up_proj": ("up_proj", "gate_up_proj", "fc1", "fc_in", "c_fc", "dense_h_to_4h", "w3"),
    "down_proj": ("down_proj", "fc2", "fc_out", "c_proj", "dense_4h_to_h", "w2"),
}
_TIE_STYLES = ("tiled", "structured")
_SVD_METHODS = ("exact", "lowrank")
_LAYER_RE = re.compile(r"\.(\d+)\.")


def _version(t: torch.Tensor) -> int:
    """In-place version counter; inference tensors have none and count as never changed."""
    return -1 if t.is_inference() else t._version


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
    """A 16-hex-digit fingerprint of a weight: shape, dtype, a strided sample and exact integer sums.

    The sums add the values' bit patterns as int64 (all of them, and row sums weighted by the row
    index, which sees swapped rows): integer addition does not depend on the order, so the
    fingerprint is the same on any machine and thread count (float64 sums were not: torch's
    reduction order follows the thread count). Cached per tensor and in-place version, so
    re-attaching to the same model costs nothing.
    """
    w = weight.detach()
    flat = w.reshape(-1)
    stride = max(1, flat.numel() // 4096)
    sample = flat[::stride].to(torch.float32).cpu().numpy().tobytes()
    key = (w.data_ptr(), _version(weight), tuple(w.shape), w.dtype, hash(sample))
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{tuple(w.shape)}|{w.dtype}".encode())
    h.update(sample)
    bits = _BIT_VIEWS.get(w.element_size(), torch.uint8)
    rows = w.contiguous().view(bits).reshape(w.shape[0] if w.dim() else 1, -1).sum(1, dtype=torch.int64)  # (out,)
    weights = torch.arange(1, rows.numel() + 1, dtype=torch.int64, device=rows.device)  # (out,)
    sums = torch.stack([rows.sum(), (rows * weights).sum()])  # int64, wrapping: exact and order-free
    h.update(sums.cpu().numpy().tobytes())
    if len(_FINGERPRINTS) >= _SVD_CACHE_MAX:
        _FINGERPRINTS.pop(next(iter(_FINGERPRINTS)))
    _FINGERPRINTS[key] = h.hexdigest()
    return _FINGERPRINTS[key]


_BIT_VIEWS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
_FINGERPRINTS: dict[tuple, str] = {}
_SVD_CACHE: dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_SVD_CACHE_MAX = 8192


def _canonical_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so the largest-|entry| of U's column is positive."""
    idx = U.abs().argmax(dim=0)  # (r,)
    signs = torch.sign(U[idx, torch.arange(U.shape[1])])  # (r,)
    signs[signs == 0] = 1
    return U * signs, Vh * signs[:, None]


class _Syevr:
    """LAPACK's ssyevr (the eigenvectors of the k largest eigenvalues only) from scipy's public
    Cython LAPACK (`scipy.linalg.cython_lapack`, declared `nogil`), called through ctypes, which
    releases the GIL for the call: two threads then solve two matrices at once. scipy's own
    `eigh` holds the GIL, so threads around it waited on each other. None when unavailable."""

    def __init__(self):
        import ctypes

        from scipy.linalg import cython_lapack

        api = ctypes.pythonapi
        api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
        api.PyCapsule_GetPointer.restype = ctypes.c_void_p
        api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        capsule = cython_lapack.__pyx_capi__["ssyevr"]
        address = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
        i, f, c = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_float), ctypes.c_char_p
        # jobz range uplo n a lda vl vu il iu abstol m w z ldz isuppz work lwork iwork liwork info
        self._call = ctypes.CFUNCTYPE(None, c, c, c, i, f, i, f, f, i, i, f, i, f, f, i, i, f, i, i, i, i)(address)
        self._ctypes = ctypes
        self._lwork: dict[int, tuple[int, int]] = {}

    def __call__(self, a: np.ndarray, k: int) -> np.ndarray:
        """Eigenvectors (n, k) of the k largest eigenvalues of symmetric fp32 `a` (overwritten)."""
        n = a.shape[0]
        a = np.require(a, np.float32, ["C", "W"])
        if n not in self._lwork:  # workspace query, once per size (LAPACK's optimal block size)
            work, iwork = np.zeros(1, np.float32), np.zeros(1, np.int32)
            self._run(a.copy(), n, k, np.zeros(n, np.float32), np.zeros((k, n), np.float32), work, -1, iwork, -1)
            self._lwork[n] = (max(int(work[0]), 26 * n), max(int(iwork[0]), 10 * n))
        lwork, liwork = self._lwork[n]
        z = np.zeros((k, n), np.float32)  # column-major (n, k): row j is eigenvector j
        m = self._run(a, n, k, np.zeros(n, np.float32), z, np.zeros(lwork, np.float32), lwork,
                      np.zeros(liwork, np.int32), liwork)
        if m != k:
            raise np.linalg.LinAlgError(f"ssyevr found {m} of the top {k} eigenvectors")
        return z.T  # (n, k), ascending eigenvalues

    def _run(self, a, n, k, w, z, work, lwork, iwork, liwork) -> int:
        ct = self._ctypes
        f = ct.POINTER(ct.c_float)
        ptr = lambda x: x.ctypes.data_as(ct.POINTER(ct.c_int) if x.dtype == np.int32 else f)  # noqa: E731
        m, info, isuppz = ct.c_int(0), ct.c_int(0), np.zeros(2 * k, np.int32)
        zero = ct.c_float(0.0)
        self._call(b"V", b"I", b"L", ct.byref(ct.c_int(n)), ptr(a), ct.byref(ct.c_int(n)), ct.byref(zero),
                   ct.byref(zero), ct.byref(ct.c_int(n - k + 1)), ct.byref(ct.c_int(n)), ct.byref(zero), ct.byref(m),
                   ptr(w), ptr(z), ct.byref(ct.c_int(n)), ptr(isuppz), ptr(work), ct.byref(ct.c_int(lwork)), ptr(iwork),
                   ct.byref(ct.c_int(liwork)), ct.byref(info))
        if info.value != 0:
            raise np.linalg.LinAlgError(f"ssyevr failed (info={info.value})")
        return m.value


def _syevr() -> _Syevr | None:
    global _SYEVR
    if _SYEVR is None:
        try:
            _SYEVR = _Syevr()
        except Exception as err:  # an unusual scipy build: scipy.linalg.eigh (holds the GIL) instead
            log.debug("no GIL-free ssyevr (%s): using scipy.linalg.eigh", err)
            _SYEVR = False
    return _SYEVR or None


_SYEVR: _Syevr | bool | None = None


def _top_eigenvectors(gram: np.ndarray, k: int) -> torch.Tensor:
    """An fp64 orthonormal basis (n, k) of the eigenvectors of the k largest eigenvalues of a
    symmetric fp32 matrix (overwritten).

    LAPACK's syevr on that subset only: on a 576 x 576 Gram matrix 8-12 ms here against 30 ms
    for torch's `eigh`, which computes all eigenvectors. The fp32 vectors are orthonormal to
    ~1e-7 only; a fp64 QR makes them exactly so, which the Rayleigh-Ritz step needs (without it the
    singular values were off by 1e-7 relative).
    """
    solver = _syevr()
    if solver is not None:
        vectors = solver(gram, k)
    else:
        from scipy.linalg import eigh

        n = gram.shape[0]
        vectors = eigh(gram, subset_by_index=[n - k, n - 1], driver="evr", check_finite=False, overwrite_a=True)[1]
    return torch.linalg.qr(torch.from_numpy(np.ascontiguousarray(vectors)).double()).Q.contiguous()  # (n, k)


def _gram(W: torch.Tensor) -> np.ndarray:
    """The smaller Gram matrix of W (out, in) in fp32, as numpy: W W^T (out <= in) or W^T W.

    numpy sees `A @ A.T` and calls BLAS syrk (half a gemm's work: 5.9 ms against torch's 10.7 ms
    for SmolLM2's 1536 x 576 up_proj on one thread), and releases the GIL while it runs."""
    W32 = W.float().numpy()  # (out, in)
    return W32 @ W32.T if W.shape[0] <= W.shape[1] else W32.T @ W32  # (n, n)


def _exact_svd(W: torch.Tensor, r: int, gram: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets of W (any float dtype in, fp64 out), exact to fp64 rounding of a
    Rayleigh-Ritz step. `gram`: `_gram(W)` when already computed.

    The top k = r + 8 eigenvectors of the smaller Gram matrix (fp32, e.g. 576 x 576) span the top
    singular subspace to fp32 precision: their error is set by the gap from sigma_r to sigma_(k+1),
    not by the gap to sigma_(r+1). The SVD of W projected on that subspace, in fp64, then separates
    the top r exactly. The spectra of trained weights are too flat at the top for iterative
    solvers (SmolLM2's up_proj: sigma_3 / sigma_2 = 0.99), so the Gram matrix is reduced densely;
    a subspace iteration on top of it would gain only (sigma_(k+1) / sigma_r)^2 ~ 0.9 a pass.
    """
    out_f, in_f = W.shape
    k = min(r + 8, out_f, in_f)
    Q = _top_eigenvectors(_gram(W) if gram is None else gram, k)  # (n, k), n = min(out, in)
    W64 = W.double()  # (out, in)
    if out_f <= in_f:  # Q spans the top left singular vectors
        Ub, S, Vh = torch.linalg.svd(Q.T @ W64, full_matrices=False)  # (k, k), (k,), (k, in)
        return (Q @ Ub)[:, :r], S[:r], Vh[:r]  # (out, r), (r,), (r, in)
    U, S, Vbh = torch.linalg.svd(W64 @ Q, full_matrices=False)  # (out, k), (k,), (k, k)
    return U[:, :r], S[:r], (Vbh @ Q.T)[:r]  # (out, r), (r,), (r, in)


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


def _cached_svd(key: tuple[str, int, str], shape) -> tuple | None:
    """The factors for `key` from memory, else from the disk cache (then kept in memory too)."""
    if key in _SVD_CACHE:
        return _SVD_CACHE[key]
    found = _load_svd_from_disk(_svd_disk_path(key), key[1], *shape)
    if found is not None:
        _keep(key, found)
    return found


def _keep(key: tuple[str, int, str], factors: tuple) -> None:
    if len(_SVD_CACHE) >= _SVD_CACHE_MAX:
        _SVD_CACHE.pop(next(iter(_SVD_CACHE)))
    _SVD_CACHE[key] = factors


def _compute_svd(weight: torch.Tensor, r: int, method: str, gram: np.ndarray | None = None) -> tuple:
    """(U, S, Vh) in fp32 with canonical signs, computed (no cache)."""
    W = weight.detach().to(device="cpu")  # (out, in)
    U, S, Vh = _exact_svd(W, r, gram) if method == "exact" else _lowrank_svd(W.double(), r)
    U, Vh = _canonical_signs(U, Vh)
    return U.float().contiguous(), S.float().contiguous(), Vh.float().contiguous()


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _svds(weights: list[tuple[torch.Tensor, str]], r: int, method: str) -> list[tuple]:
    """(U, S, Vh) in fp32 with canonical signs for many (weight, fingerprint) pairs, cached by
    fingerprint (memory, then disk); uncached "exact" ones on one thread per
    core, each with one torch / BLAS thread (SmolLM2's 210 maps on 2 cores: 1.45 s wall, 2.9 s serial).

    Every step of a worker releases the GIL (numpy's syrk, ctypes' ssyevr, torch's products), and
    each factor is computed by the same single-threaded code whichever thread runs it, so the bits
    do not depend on the thread count. "lowrank" draws from torch's global RNG, which threads would
    share, and stays serial.
    """
    from threadpoolctl import threadpool_limits

    keys = [(fp, r, method) for _, fp in weights]
    found = [_cached_svd(key, w.shape) for key, (w, _) in zip(keys, weights)]
    todo = [i for i, f in enumerate(found) if f is None]
    if not todo:
        return found
    threads = torch.get_num_threads()

    def compute(i: int) -> None:
        found[i] = _compute_svd(weights[i][0], r, method)
        _save_svd_to_disk(_svd_disk_path(keys[i]), *found[i])

    parallel = method == "exact" and len(todo) > 4 and threads > 1 and _syevr() is not None
    # scipy's BLAS default (all cores) oversubscribes; torch at one thread for "exact" in both paths
    with threadpool_limits(1, user_api="blas"), _torch_threads(1 if method == "exact" else threads):
        if parallel:
            with ThreadPoolExecutor(min(threads, 8)) as pool:
                list(pool.map(compute, todo))
        else:
            for i in todo:
                compute(i)
    for i in todo:
        _keep(keys[i], found[i])
    return found


# ---------------------------------------------------------------------------------------------
# The adapted module


def _low_rank(h: torch.Tensor, rows: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
    """start + h @ rows as a new (N, out) tensor: h (N, r), rows (r, out) contiguous, start a bias
    (out,), a base output (N, out) or None. For r <= 4, r elementwise passes: MKL's K = r gemm is
    4-7x slower than them at widths such as 512, 1024, 1536, 2048 (1024 x 2 @ 2 x 1536: 327 us vs
    74 us here) and only a little faster at others (576: 37 vs 43 us); from r = 8 the gemm wins."""
    r = rows.shape[0]
    if r > 4:
        return torch.mm(h, rows) if start is None else torch.addmm(start, h, rows)
    out = torch.mul(h[:, :1], rows[0]) if start is None else torch.addcmul(start, h[:, :1], rows[0])
    for i in range(1, r):
        out.addcmul_(h[:, i : i + 1], rows[i])  # (N, out) += h_i (U diag(S) R)_i
    return out


class TinyLoRALinear(nn.Module):
    """A frozen `nn.Linear` plus the TinyLoRA update; `v` may be shared with other modules."""

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
        return torch.einsum("u,uij->ij", self.v, self.P.to(self.v.device))  # (r, r)

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
        P, G, v = self.P, self._basis(), self.v.float()  # (u, r, r), see _basis, (u,)
        u, r = P.shape[0], P.shape[1]
        if u <= 16:
            return (v @ G).view(-1, r)  # (out, r)
        R = (v @ P.float().reshape(u, -1)).view(r, r)  # (r, r) = sum_i v_i P_i
        return G @ R  # (out, r)

    def _kept_rows(self, dtype: torch.dtype) -> torch.Tensor | None:
        """(U diag(S) R)^T as contiguous (r, out) rows in `dtype`, or None when R is exactly zero
        (v = 0: the module is the base exactly), for forwards without grad. Kept until v (any
        optimizer step, `set_vector`, a `.data` swap) or a frozen buffer changes. The hot path
        reads `_parameters` / `_buffers` directly: `nn.Module.__getattr__` costs ~1 us a name, and
        decoding calls 210 adapted modules per token."""
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
        # path's (u, out*r) basis (_basis) would cost ~0.1 ms a module to build after each attach.
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
    targets = _resolve_targets(config.targets, kinds)
    missing = [t for t in targets if t not in kinds]
    if missing or not targets:
        raise ValueError(
            f"targets {missing or list(config.targets)} match no linear module in this model; its linear module "
            f"types are {kinds} (e.g. {[n for n, _, _ in in_blocks[:3]]})" + _unsupported_hint(model)
        )
    left = sorted(set(kinds) - set(targets)) if config.targets == DEFAULT_TARGETS else []
    if left:
        warnings.warn(f"default targets adapt {list(targets)}; this model's blocks also have linear maps {left}, "
                      "left frozen: pass targets=... to include them", stacklevel=3)
    n_layers = _num_layers(model, linears)
    if config.layers is not None:
        bad = [i for i in config.layers if i >= n_layers]
        if bad:
            raise ValueError(f"layers {bad} are out of range: this model has layers 0..{n_layers - 1}")
    wanted_layers = None if config.layers is None else set(config.layers)
    chosen = [
        (n, m, layer)
        for n, m, layer in in_blocks
        if n.rsplit(".", 1)[-1] in targets and (wanted_layers is None or layer in wanted_layers)
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


def _resolve_targets(targets: tuple[str, ...], kinds: list[str]) -> tuple[str, ...]:
    """The module types `targets` names in a model with these in-block linear types: the default 7
    map each role to its first present alias (none when the model lacks the role); others as given."""
    if targets != DEFAULT_TARGETS:
        return targets
    present = (next((a for a in _DEFAULT_ALIASES[t] if a in kinds), None) for t in targets)
    return tuple(dict.fromkeys(a for a in present if a is not None))


def _unsupported_hint(model: nn.Module) -> str:
    n = sum(type(m).__name__ == "Conv1D" for m in model.modules())
    return f"; its {n} transformers Conv1D layers (GPT-2 style) cannot be adapted: only nn.Linear" if n else ""


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
