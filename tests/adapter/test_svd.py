"""The SVD engine (tinylab.adapter.svd): exact factors, fingerprints, the cache, threads, devices and dtypes."""

import pytest
import torch

from tinylab.adapter.attach import apply_tinylora
from tinylab.adapter.config import TinyLoRAConfig
from tinylab.model.tiny import tiny_model


@pytest.fixture
def llama():
    return tiny_model("llama", seed=0)


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (64, 64)])
@pytest.mark.parametrize("r", [1, 2, 4])
def test_exact_svd_on_a_flat_spectrum_matches_a_full_svd(shape, r):
    """Trained weights have flat tops (neighbouring singular values about 1% apart): the subset
    eigen-solver and the fp64 refinement must still give the full SVD's triplets."""
    from tinylab.adapter.svd import _canonical_signs, _exact_svd

    g = torch.Generator().manual_seed(sum(shape) + r)
    m, n = shape
    Q1 = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64)).Q
    spectrum = torch.linspace(10.0, 9.0, min(m, n), dtype=torch.float64)  # neighbours 0.1-3% apart
    W = Q1 @ torch.diag(spectrum) @ Q2.T
    U, S, Vh = _exact_svd(W, r)
    U, Vh = _canonical_signs(U, Vh)
    U0, S0, Vh0 = torch.linalg.svd(W, full_matrices=False)
    U0, Vh0 = _canonical_signs(U0[:, :r], Vh0[:r])
    torch.testing.assert_close(S, S0[:r], rtol=1e-9, atol=0)
    torch.testing.assert_close(U, U0, rtol=0, atol=1e-5)
    torch.testing.assert_close(Vh, Vh0, rtol=0, atol=1e-5)


def test_reattach_reuses_cached_svd(llama, monkeypatch):
    import tinylab.adapter.svd as svd

    model, _ = llama
    apply_tinylora(model, TinyLoRAConfig(n_tie=2)).remove()
    calls = []
    monkeypatch.setattr(svd, "_exact_svd", lambda *a: calls.append(a))
    adapter = apply_tinylora(model, TinyLoRAConfig(u=13, n_tie="all"))
    assert calls == [] and adapter.num_params == 13


def test_clearing_the_memory_cache_computes_again_without_a_disk_cache(llama, monkeypatch):
    import tinylab.adapter.svd as svd

    model, _ = llama
    monkeypatch.setenv("TINYLAB_SVD_DISK_CACHE", "0")
    apply_tinylora(model, TinyLoRAConfig(r=3)).remove()
    computed = []
    exact = svd._exact_svd
    monkeypatch.setattr(svd, "_exact_svd", lambda *a: computed.append(1) or exact(*a))
    apply_tinylora(model, TinyLoRAConfig(r=3)).remove()
    assert computed == []  # kept in memory
    svd.clear_memory_cache()
    adapter = apply_tinylora(model, TinyLoRAConfig(r=3))
    assert len(computed) == len(adapter.modules)


def test_lowrank_svd_is_deterministic(llama, monkeypatch):
    import tinylab.adapter.svd as svd

    model, _ = llama
    monkeypatch.setenv("TINYLAB_SVD_DISK_CACHE", "0")  # neither run may read the other's factors back
    svd.clear_memory_cache()
    a = apply_tinylora(model, TinyLoRAConfig(svd="lowrank"))
    first = [m.U.clone() for _, m in a.named_modules()]
    a.remove()
    svd.clear_memory_cache()
    b = apply_tinylora(model, TinyLoRAConfig(svd="lowrank"))
    assert all(torch.equal(x, m.U) for x, (_, m) in zip(first, b.named_modules()))


def test_fingerprint_is_exact_and_the_same_on_any_thread_count():
    """float64 sums changed with torch's thread count (1 thread: ...678, 8 threads: ...694 on one
    weight); the fingerprint must not, and one changed value anywhere must change it."""
    import tinylab.adapter.svd as svd

    g = torch.Generator().manual_seed(0)
    n = 1536 * 1024
    W = (torch.randn(n, generator=g) * torch.logspace(-8, 0, n)[torch.randperm(n, generator=g)]).view(1536, 1024)
    before = torch.get_num_threads()
    prints = set()
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            svd._FINGERPRINTS.clear()
            prints.add(svd.weight_fingerprint(W))
    finally:
        torch.set_num_threads(before)
    assert len(prints) == 1
    changed = W.clone()
    changed[7, 5] = torch.nextafter(changed[7, 5], torch.tensor(1.0))  # one ulp, off the strided sample
    swapped = W.clone()
    swapped[[3, 4]] = W[[4, 3]]
    others = {svd.weight_fingerprint(changed), svd.weight_fingerprint(swapped)}
    assert len(others) == 2 and not others & prints


@pytest.mark.parametrize("n, k", [(1, 1), (7, 3), (64, 10), (300, 10)])
def test_gil_free_syevr_matches_scipy(n, k):
    from scipy.linalg import eigh

    from tinylab.adapter.svd import _syevr

    solver = _syevr()
    assert solver is not None  # scipy's Cython LAPACK is there on every supported scipy
    a = torch.randn(n + 5, n, generator=torch.Generator().manual_seed(n)).numpy()
    gram = a.T @ a  # (n, n) fp32
    expected = eigh(gram.copy(), subset_by_index=[n - k, n - 1], driver="evr")[1]
    assert (solver(gram.copy(), k) == expected).all()


def test_threaded_and_serial_svds_give_the_same_bits(monkeypatch):
    """Many uncached weights run on one thread per core; the factors must not depend on it."""
    import tinylab.adapter.svd as svd

    monkeypatch.setenv("TINYLAB_SVD_DISK_CACHE", "0")
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(shape, generator=g) for shape in [(96, 40), (40, 96), (64, 64)] * 4]
    results = {}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            svd.clear_memory_cache()
            results[threads] = svd.svds(
                [(w, svd.weight_fingerprint(w)) for w in weights], 2, "exact")
    finally:
        torch.set_num_threads(before)
    for one, two in zip(results[1], results[2]):
        assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_editing_one_adapters_factors_leaves_the_svd_cache_alone(llama):
    """Module buffers are copies: an in-place edit (as tests and head studies do) must not reach the
    cached factors that the next attach gets (it once made an unrelated later test see no update)."""
    model, _ = llama
    first = apply_tinylora(model, TinyLoRAConfig())
    name, mod = next(iter(first.named_modules()))
    U = mod.U.clone()
    with torch.no_grad():
        mod.U.zero_()
        mod.Vh.zero_()
    first.remove()
    again = dict(apply_tinylora(model, TinyLoRAConfig()).named_modules())[name]
    assert torch.equal(again.U, U) and again.Vh.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factors_are_computed_on_the_cpu_whatever_the_default_device(gpu_stand_in, dtype):
    """With torch's default device "meta" (the stand-in for a GPU), the factors of a weight are the
    same CPU fp32 tensors as without it, and the fingerprint is the same."""
    import tinylab.adapter.svd as svd

    W = (torch.randn(48, 80, generator=torch.Generator().manual_seed(5))).to(dtype)  # (out, in)
    svd.clear_memory_cache()
    expected_fp = svd.weight_fingerprint(W)
    expected = svd._compute_svd(W, 3, "exact")
    svd._FINGERPRINTS.clear()
    with gpu_stand_in():
        fp = svd.weight_fingerprint(W)
        U, S, Vh = svd.svds([(W, fp)], 3, "exact")[0]
        lowrank = svd._compute_svd(W, 3, "lowrank")
    assert fp == expected_fp
    for got, want in zip((U, S, Vh), expected):
        assert got.device.type == "cpu" and got.dtype == torch.float32 and torch.equal(got, want)
    assert all(t.device.type == "cpu" for t in lowrank)


def test_portable_fingerprint_is_the_same_in_fp32_and_bf16_and_tells_weights_apart():
    from tinylab.adapter.svd import weight_fingerprint

    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 32, generator=g)  # (out, in)
    other = W.clone()
    other[10, 3] += 0.25  # a change bf16 can see
    assert weight_fingerprint(W) != weight_fingerprint(W.to(torch.bfloat16))  # the exact one keeps the dtype
    assert weight_fingerprint(W, portable=True) == weight_fingerprint(W.to(torch.bfloat16), portable=True)
    assert weight_fingerprint(W, portable=True) != weight_fingerprint(other, portable=True)
    assert weight_fingerprint(W, portable=True) != weight_fingerprint(W)
