"""Fuzzing `load_adapter` (the load-level strategies of `test_file_format_fuzz.py`, whose measuring and
corpus, in tests/testkit.py, this file shares; each test runs alone in a fresh process): every file
loads correctly or raises AdapterFileError, fast and small, and a refused file attaches nothing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from testkit import (
    blob_of,
    fuzz,
    load_file,
    make_corpus,
    mutated,
    split_blob,
)

from tinylab.adapter.config import DEFAULT_TARGETS, TinyLoRAConfig
from tinylab.adapter.file_format import MAX_FILE_BYTES, AdapterFileError, base_fingerprint
from tinylab.adapter.targets import count_params
from tinylab.model.tiny import tiny_model

pytestmark = pytest.mark.fresh_process  # each test alone in a fresh process: see tests/fresh_process.py


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=0)[0]  # the same model as the parse-level file's


@pytest.fixture(scope="module")
def corpus(tiny, tmp_path_factory) -> list[bytes]:
    return make_corpus(tiny, tmp_path_factory.mktemp("corpus"))


@pytest.fixture(autouse=True)
def _no_svd_files(monkeypatch):
    monkeypatch.setenv("TINYLAB_SVD_DISK_CACHE", "0")  # loads must not write into the user's cache


# ---------------------------------------------------------------------------------------------
# Load level: load_adapter on the tiny llama


@given(data=st.data())
def _foreign_fingerprint(corpus, model, folder, data):
    blob = data.draw(st.sampled_from(corpus))
    header, payload = split_blob(blob)
    header["fp"] = data.draw(st.text(alphabet="0123456789abcdef", min_size=16, max_size=16)
                             .filter(lambda fp: fp != header["fp"]))
    result = load_file(model, blob_of(header, payload, dtype=blob[5]), folder / "a.tlra", "load_foreign_fingerprint")
    assert isinstance(result, AdapterFileError) and "another base model" in str(result)


def test_valid_header_with_another_base_fingerprint(corpus, tiny, tmp_path):
    fuzz("load_foreign_fingerprint", _foreign_fingerprint, corpus, tiny, tmp_path)


def test_files_of_another_base_model_are_refused(corpus, tmp_path):
    for arch, seed in (("llama", 1), ("qwen2", 0), ("gemma", 0)):
        other = tiny_model(arch, seed=seed)[0]
        for blob in corpus:
            assert isinstance(load_file(other, blob, tmp_path / "a.tlra", "load_other_model"), AdapterFileError)
        assert all(p.requires_grad for p in other.parameters())


@st.composite
def _plausible_cfg(draw):
    """Config fields that pass TinyLoRAConfig's own checks more often than not, some far too large."""
    cfg = {}
    if draw(st.booleans()):
        cfg["u"] = draw(st.integers(1, 16) | st.sampled_from([2**16, 2**18, 10**6, 2**62]))
    if draw(st.booleans()):
        cfg["r"] = draw(st.integers(1, 40))
    if draw(st.booleans()):
        cfg["n_tie"] = draw(st.sampled_from(["all", 2**40]) | st.integers(1, 20))
    if draw(st.booleans()):
        cfg["tie"] = draw(st.sampled_from(["tiled", "structured"]))
    if draw(st.integers(0, 3)) == 0:
        cfg["layers"] = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3))
    if draw(st.integers(0, 3)) == 0:
        cfg["targets"] = draw(st.lists(st.sampled_from([*DEFAULT_TARGETS, "lm_head", "embed"]), min_size=1,
                                       max_size=4, unique=True))
    if draw(st.integers(0, 4)) == 0:
        cfg["group_sizes"] = draw(st.lists(st.integers(1, 14), min_size=1, max_size=6))
    if draw(st.integers(0, 4)) == 0:
        cfg["svd"] = "lowrank"
    if draw(st.booleans()):
        cfg["seed"] = draw(st.integers(-(2**63), 2**63))
    return cfg


def _header_for(model, cfg: dict, n: int | None, pick) -> bytes:
    """A file whose fingerprint matches `model` for `cfg` whenever cfg selects modules there."""
    try:
        config = TinyLoRAConfig(**cfg)
        fp = base_fingerprint(model, config)  # depends on targets and layers only
        planned = count_params(model, config)
    except ValueError:
        fp, planned = "0123456789abcdef", 13
    if n is None:
        n = pick([planned, planned, max(1, planned - 1), planned + cfg.get("u", 1)])
    if not 1 <= n <= MAX_FILE_BYTES // 4:
        n = 13
    values = np.random.default_rng(n).standard_normal(n).astype("<f4")
    return blob_of({"n": n, "cfg": cfg, "arch": "llama/2", "fp": fp}, values.tobytes())


@given(data=st.data())
def _random_config(model, folder, data):
    cfg = data.draw(_plausible_cfg())
    blob = _header_for(model, cfg, None, lambda options: data.draw(st.sampled_from(options)))
    load_file(model, blob, folder / "a.tlra", "load_random_config")


def test_random_configs_with_the_right_fingerprint(tiny, tmp_path):
    """The header matches the model but the config asks for anything: a count that does not match,
    n_tie out of range, huge u or r, layers or targets the model does not have."""
    fuzz("load_random_config", _random_config, tiny, tmp_path)


@pytest.mark.parametrize("cfg, n", [
    ({"u": 100_000, "r": 32, "n_tie": "all"}, 100_000),  # P: 14 x 100,000 x 32 x 32 fp32 = 5.7 GB
    ({"u": 200_000, "r": 4, "n_tie": "all"}, 200_000),  # P: 179 MB
    ({"u": 2, "n_tie": 999}, 2),  # a plain ValueError from apply_tinylora before the fix
    ({"u": 2, "n_tie": 3}, 2),  # a count that does not match: refused before anything is allocated
])
def test_regressions_found_by_fuzzing(tiny, tmp_path, cfg, n):
    result = load_file(tiny, _header_for(tiny, cfg, n, None), tmp_path / "a.tlra", "regressions")
    assert isinstance(result, AdapterFileError)


@given(data=st.data())
def _load_mutated(corpus, model, folder, data):
    load_file(model, data.draw(mutated(corpus)), folder / "a.tlra", "load_mutated")


def test_load_mutated_valid_files(corpus, tiny, tmp_path):
    fuzz("load_mutated", _load_mutated, corpus, tiny, tmp_path)
