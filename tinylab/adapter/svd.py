"""The SVD engine of the adapter: exact top-r factors of each weight, cached by its fingerprint.

`svds` returns (U, S, Vh) in fp32 with canonical signs (the largest |entry| of each column of U
positive, so the same weights give the same factors on every machine) for many weights at once.
Each weight is read on the CPU in fp32 whatever its device and dtype (the factors are then moved
to the weight's device and dtype by the adapted module): the exact method reduces the smaller Gram
matrix with LAPACK's ssyevr (through ctypes, without the GIL, so several threads solve several
weights at once) and separates the top r by a Rayleigh-Ritz step in fp64.

Factors are cached in memory and on disk (`$TINYLAB_CACHE/svd`, one safetensors file per weight
fingerprint, rank and method, written atomically; `TINYLAB_SVD_DISK_CACHE=0` turns the disk off).
`benchmarks/adapter.py` prints what attaching costs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from tinylab.basics.atomic import write_atomic

__all__ = ["clear_memory_cache", "svds", "tensor_version", "weight_fingerprint"]

log = logging.getLogger(__name__)


def tensor_version(t: torch.Tensor) -> int:
    """In-place version counter; inference tensors have none and count as never changed."""
    return -1 if t.is_inference() else t._version



def weight_fingerprint(weight: torch.Tensor, *, portable: bool = False) -> str:
    """A 16-hex-digit fingerprint of a weight: shape, dtype, a strided sample and exact integer sums.

    The sums add the values' bit patterns as int64 (all of them, and row sums weighted by the row
    index, which sees swapped rows): integer addition does not depend on the order, so the
    fingerprint is the same on any device, machine and thread count (float64 sums were not: torch's
    reduction order follows the thread count). Cached per tensor and in-place version, so
    re-attaching to the same model costs nothing.

    `portable=True` fingerprints the values rounded to bfloat16 instead (the dtype is left out):
    an fp32 model and the same model cast to bf16 then give the same fingerprint. The adapter file
    uses it; the SVD cache uses the exact one (the factors of bf16 weights differ).
    """
    w = weight.detach()
    flat = w.reshape(-1)
    stride = max(1, flat.numel() // 4096)
    sample = flat[::stride].to(torch.float32).cpu().numpy().tobytes()
    key = (w.data_ptr(), tensor_version(weight), tuple(w.shape), w.dtype, hash(sample), portable)
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    h = hashlib.blake2b(digest_size=8)
    if portable:
        w = w.to(torch.bfloat16)  # (out, in)
        sample = w.reshape(-1)[::stride].to(torch.float32).cpu().numpy().tobytes()
        h.update(f"{tuple(w.shape)}|bf16-rounded".encode())
    else:
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


def clear_memory_cache() -> None:
    """Forget the SVDs and weight fingerprints kept in this process (the disk cache stays): the next
    attach reads them from `TINYLAB_CACHE` or computes them again."""
    _SVD_CACHE.clear()
    _FINGERPRINTS.clear()


def _canonical_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so the largest-|entry| of U's column is positive."""
    idx = U.abs().argmax(dim=0)  # (r,)
    signs = torch.sign(U[idx, torch.arange(U.shape[1], device=U.device)])  # (r,)
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

    LAPACK's syevr on that subset only (torch's `eigh` computes all eigenvectors). The fp32
    vectors are orthonormal to fp32 rounding only; a fp64 QR makes them exactly so, which the
    Rayleigh-Ritz step needs (without it the singular values were off by fp32 rounding).
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

    numpy sees `A @ A.T` and calls BLAS syrk (half a gemm's work), and releases the GIL while it runs."""
    W32 = W.float().numpy()  # (out, in)
    return W32 @ W32.T if W.shape[0] <= W.shape[1] else W32.T @ W32  # (n, n)


def _exact_svd(W: torch.Tensor, r: int, gram: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets of W (any float dtype in, fp64 out), exact to fp64 rounding of a
    Rayleigh-Ritz step. `gram`: `_gram(W)` when already computed.

    The top k = r + 8 eigenvectors of the smaller Gram matrix (fp32, e.g. 576 x 576) span the top
    singular subspace to fp32 precision: their error is set by the gap from sigma_r to sigma_(k+1),
    not by the gap to sigma_(r+1). The SVD of W projected on that subspace, in fp64, then separates
    the top r exactly. The spectra of trained weights are often too flat at the top for iterative
    solvers (sigma_(r+1) / sigma_r close to 1), so the Gram matrix is reduced densely; a subspace
    iteration on top of it would gain only a factor (sigma_(k+1) / sigma_r)^2 a pass.
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
    from tinylab.basics.cache import cache_dir

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

    tensors = {"U": U.contiguous(), "S": S.contiguous(), "Vh": Vh.contiguous()}
    try:  # atomic: readers see the old file or the whole new one
        write_atomic(path, lambda tmp: save_file(tensors, tmp))
    except OSError as err:  # a read-only cache only costs speed
        log.debug("could not write SVD cache %s: %s", path, err)


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


def svds(weights: list[tuple[torch.Tensor, str]], r: int, method: str) -> list[tuple]:
    """(U, S, Vh) in fp32 with canonical signs for many (weight, fingerprint) pairs, cached by
    fingerprint (memory, then disk); uncached "exact" ones on one thread per
    core, each with one torch / BLAS thread (`benchmarks/adapter.py` prints the attach time).

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
