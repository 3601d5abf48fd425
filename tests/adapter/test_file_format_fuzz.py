"""Fuzzing the adapter-file loader: every input loads correctly or raises AdapterFileError, fast and small.

Adapter files are shared between people, so `read_adapter` / `load_adapter` see untrusted bytes.
Each strategy below feeds generated files through the loader and checks the contract on every one:

- the call returns (and the result then agrees with the bytes) or raises `AdapterFileError`; any
  other exception fails the test and hypothesis shrinks the input;
- it takes less than a second of CPU time (the calling thread's; wall time is only checked against a
  looser hang limit, since CI machines are shared and a busy neighbour stretches wall time);
- its peak resident memory grows by less than a bound (Linux VmHWM, reset before each call through
  /proc/self/clear_refs, so allocations made in C by torch and numpy count too);
- when `load_adapter` refuses a file, nothing is attached to the model.

Every test here and in the load-level file runs alone in a fresh process (`fresh_process` marker,
tests/fresh_process.py): the bounds measure the loader's call and nothing else, never what other
tests left in a shared pytest worker (under two xdist workers, the large-allocation check once saw
no peak there).

Most inputs go through `read_adapter` on a file in a tmp folder (parse level); fewer go through
`load_adapter` on a tiny llama. `BUDGET` is the number of generated inputs per strategy (hypothesis
`max_examples`, derandomized so CI sees the same inputs every run), 10,000+ in total; each test
asserts that it ran its share. The load-level strategies are in `test_file_format_fuzz_load.py`; the
measuring and the corpus are in tests/testkit.py. `pytest tests/adapter/test_file_format_fuzz*.py -s`
prints per strategy the count, the slowest input and the largest memory peak.
"""

from __future__ import annotations

import json
import os
import struct
import time

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from testkit import (
    BUDGET,
    COUNTS,
    PARSE_PEAK_BYTES,
    PEAK,
    SLOWEST,
    blob_of,
    fuzz,
    load_file,
    make_corpus,
    measured,
    mutated,
    parse_file,
    split_blob,
)

from tinylab.adapter.config import DEFAULT_TARGETS
from tinylab.adapter.file_format import (
    MAX_FILE_BYTES,
    AdapterFileError,
    read_adapter,
)
from tinylab.model.tiny import tiny_model

pytestmark = pytest.mark.fresh_process  # each test alone in a fresh process: see tests/fresh_process.py


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=0)[0]


@pytest.fixture(scope="module")
def corpus(tiny, tmp_path_factory) -> list[bytes]:
    return make_corpus(tiny, tmp_path_factory.mktemp("corpus"))


@pytest.fixture(autouse=True)
def _no_disk_svd_cache(monkeypatch):
    monkeypatch.setenv("TINYLAB_SVD_DISK_CACHE", "0")  # loads must not write into the user's cache


def test_budget_is_at_least_10000_inputs_and_the_bounds_catch_a_large_allocation():
    assert sum(BUDGET.values()) >= 10_000
    with pytest.raises(AssertionError, match="peak memory"):  # a C-side (torch) allocation is seen
        with measured("selftest", PARSE_PEAK_BYTES):
            # 128 MiB, touched: above glibc's largest mmap threshold (32 MiB), so it is always fresh pages
            # (a 32 MiB block could reuse heap pages an earlier test left resident, and not raise the peak)
            torch.ones(32 << 20)
    with pytest.raises(AssertionError, match="CPU time"):
        with measured("selftest", PARSE_PEAK_BYTES):
            end = time.thread_time() + 1.05
            while time.thread_time() < end:
                pass
    for table in (COUNTS, SLOWEST, PEAK):
        table.pop("selftest")


def test_valid_files_load(corpus, tiny, tmp_path):
    for blob in corpus:
        assert not isinstance(parse_file(blob, tmp_path / "a.tlra", "valid"), AdapterFileError)
        assert not isinstance(load_file(tiny, blob, tmp_path / "a.tlra", "valid"), AdapterFileError)


# ---------------------------------------------------------------------------------------------
# Parse level: read_adapter


def test_truncated_files_are_refused(corpus, tmp_path):
    """Every truncation of every valid file (exhaustive: hypothesis would only find these same cuts)."""
    for blob in corpus:
        for cut in range(len(blob)):
            assert isinstance(parse_file(blob[:cut], tmp_path / "a.tlra", "truncated"), AdapterFileError)
    assert COUNTS["truncated"] >= BUDGET["truncated"]


@given(data=st.data())
def _wrong_length(corpus, folder, data):
    blob = data.draw(st.sampled_from(corpus))
    header, payload = split_blob(blob)
    if data.draw(st.booleans()):
        header["n"] = data.draw(st.integers(-3, 4 * header["n"] + 3).filter(lambda n: n != header["n"]))
    else:
        extra = data.draw(st.binary(min_size=1, max_size=64))
        payload = payload + extra if data.draw(st.booleans()) else payload[: -len(extra)]
    result = parse_file(blob_of(header, payload, dtype=blob[5]), folder / "a.tlra", "wrong_length")
    if header["n"] * (4 if blob[5] == 0 else 2) != len(payload):
        assert isinstance(result, AdapterFileError)


def test_wrong_lengths(corpus, tmp_path):
    fuzz("wrong_length", _wrong_length, corpus, tmp_path)


@given(data=st.data())
def _huge_sizes(corpus, folder, data):
    blob = data.draw(st.sampled_from(corpus))
    header, payload = split_blob(blob)
    kind = data.draw(st.sampled_from(["n", "header_len", "u"]))
    if kind == "n":
        header["n"] = data.draw(st.sampled_from([2**31, 2**32 + 1, 2**63, 2**64, 10**100, -(2**63)])
                                | st.integers(MAX_FILE_BYTES // 4, 10**30))
        blob = blob_of(header, payload, dtype=blob[5])
    elif kind == "header_len":
        declared = data.draw(st.integers(len(blob) - 7, 0xFFFF))
        blob = blob[:6] + struct.pack("<H", declared) + blob[8:]
    else:  # a config asking for huge vectors while the file holds a few numbers
        header["cfg"] = dict(header["cfg"], u=data.draw(st.integers(2**16, 2**62)))
        blob = blob_of(header, payload, dtype=blob[5])
    assert isinstance(parse_file(blob, folder / "a.tlra", "huge_sizes"), AdapterFileError)


def test_huge_declared_sizes(corpus, tmp_path):
    fuzz("huge_sizes", _huge_sizes, corpus, tmp_path)


def test_huge_and_special_files_are_refused_without_reading_them(tmp_path):
    sparse = tmp_path / "sparse.tlra"
    with open(sparse, "wb") as f:
        f.truncate(1 << 40)  # 1 TiB declared by the file system, nothing on disk
    over = tmp_path / "over.tlra"
    over.write_bytes(b"TLRA\x01\x00\x10\x00" + b"0" * MAX_FILE_BYTES)  # a few bytes over the limit
    fifo = tmp_path / "fifo.tlra"
    os.mkfifo(fifo)  # opening it for reading would block until someone writes
    for target, message in ((sparse, "at most"), (over, "at most"), ("/dev/zero", "not a regular file"),
                            ("/dev/urandom", "not a regular file"), (tmp_path, "not a regular file"),
                            (fifo, "not a regular file"), (tmp_path / "missing.tlra", "cannot read")):
        with measured("special_files", PARSE_PEAK_BYTES), pytest.raises(AdapterFileError, match=message):
            read_adapter(target)


def _non_finite(draw, width: int) -> bytes:
    """A NaN or +-inf bit pattern: all exponent bits set, any mantissa (0 gives inf)."""
    sign = draw(st.integers(0, 1))
    if width == 4:
        return struct.pack("<I", (sign << 31) | (0xFF << 23) | draw(st.integers(0, (1 << 23) - 1)))
    return struct.pack("<H", (sign << 15) | (0xFF << 7) | draw(st.integers(0, (1 << 7) - 1)))


@given(data=st.data())
def _nan_inf(corpus, folder, data):
    blob = bytearray(data.draw(st.sampled_from(corpus)))
    header, payload = split_blob(bytes(blob))
    width = 4 if blob[5] == 0 else 2
    start = len(blob) - len(payload)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, header["n"] - 1))
        blob[start + i * width : start + (i + 1) * width] = _non_finite(data.draw, width)
    result = parse_file(bytes(blob), folder / "a.tlra", "nan_inf")
    assert isinstance(result, AdapterFileError) and "NaN or inf" in str(result)


def test_nan_and_inf_values_are_refused(corpus, tmp_path):
    fuzz("nan_inf", _nan_inf, corpus, tmp_path)


@given(data=st.data())
def _dtype_version(corpus, folder, data):
    blob = bytearray(data.draw(st.sampled_from(corpus)))
    original = bytes(blob[4:6])
    blob[4] = data.draw(st.sampled_from([0, 1, 2, 255]) | st.integers(0, 255))
    blob[5] = data.draw(st.sampled_from([0, 1, 2, 3, 255]) | st.integers(0, 255))
    result = parse_file(bytes(blob), folder / "a.tlra", "dtype_version")
    assert isinstance(result, AdapterFileError) == (bytes(blob[4:6]) != original)


def test_wrong_dtype_codes_and_versions(corpus, tmp_path):
    fuzz("dtype_version", _dtype_version, corpus, tmp_path)


@given(blob=st.binary(max_size=4096))
@example(blob=b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94.")
@example(blob=b"PK\x03\x04" + b"\x00" * 60)  # the start of a torch.save zip
def _random_bytes(folder, blob):
    result = parse_file(blob, folder / "a.tlra", "random_bytes")
    if not blob.startswith(b"TLRA"):
        assert isinstance(result, AdapterFileError)


def test_random_bytes(tmp_path):
    fuzz("random_bytes", _random_bytes, tmp_path)


@given(prefix=st.sampled_from([b"TLRA", b"TLRA\x01", b"TLRA\x01\x00", b"TLRA\x01\x01"]), rest=st.binary(max_size=2048))
def _random_bytes_after_magic(folder, prefix, rest):
    parse_file(prefix + rest, folder / "a.tlra", "random_bytes_after_magic")


def test_random_bytes_after_the_magic(tmp_path):
    fuzz("random_bytes_after_magic", _random_bytes_after_magic, tmp_path)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_field_values = {
    "r": st.integers(-2, 70) | _json,
    "u": st.integers(-2, 40) | _json,
    "n_tie": st.sampled_from(["all", "ALL", 0]) | st.integers(-1, 30) | _json,
    "tie": st.sampled_from(["tiled", "structured", "other"]) | _json,
    "targets": st.lists(st.sampled_from([*DEFAULT_TARGETS, "lm_head", "", "q"]), max_size=8) | _json,
    "layers": st.none() | st.lists(st.integers(-2, 5), max_size=4) | st.integers(-1, 5) | _json,
    "group_sizes": st.none() | st.lists(st.integers(-1, 15), max_size=5) | _json,
    "seed": st.integers(-(2**64), 2**64) | _json,
    "svd": st.sampled_from(["exact", "lowrank", "svd"]) | _json,
}


@st.composite
def _cfg(draw):
    """Some config fields with plausible or arbitrary JSON values, sometimes an unknown field."""
    keys = draw(st.lists(st.sampled_from(sorted(_field_values)), unique=True, max_size=5))
    cfg = {k: draw(_field_values[k]) for k in keys}
    if draw(st.integers(0, 9)) == 0:
        cfg[draw(st.text(min_size=1, max_size=8))] = draw(_json)
    return cfg


@st.composite
def _header_and_payload(draw):
    """A random header (the right keys with random values, or any JSON) and n finite values."""
    n = draw(st.integers(1, 64))
    dtype = draw(st.integers(0, 1))
    values = np.asarray(draw(st.lists(st.floats(-1e4, 1e4, width=32), min_size=n, max_size=n)), "<f4")
    payload = values.tobytes() if dtype == 0 else (values.view("<u4") >> 16).astype("<u2").tobytes()
    shape = draw(st.integers(0, 3))
    if shape == 0:
        return draw(_json), payload, dtype
    header = {"n": n if shape != 3 else draw(_json), "cfg": draw(_cfg()) if shape != 2 else draw(_json),
              "arch": "llama/2", "fp": "0123456789abcdef"}
    if draw(st.booleans()):
        header["arch"] = draw(_json)
    if draw(st.booleans()):
        header["fp"] = draw(st.text(alphabet="0123456789abcdefXYZ", min_size=14, max_size=18))
    if draw(st.integers(0, 4)) == 0:
        key = draw(st.sampled_from(["n", "cfg", "arch", "fp", "extra"]))
        header.pop(key) if key in header else header.update({key: 1})
    return header, payload, dtype


@given(hp=_header_and_payload())
def _random_json_header(folder, hp):
    header, payload, dtype = hp
    text = json.dumps(header, separators=(",", ":")).encode()[:4096]  # NaN/Infinity literals included
    parse_file(blob_of(text, payload, dtype=dtype), folder / "a.tlra", "random_json_header")


def test_random_json_headers(tmp_path):
    fuzz("random_json_header", _random_json_header, tmp_path)


@given(depth=st.integers(1, 4080), opener=st.sampled_from(["[", '{"a":', '{"cfg":[', "[{}"]))
@example(depth=4000, opener="[")  # json.loads raised RecursionError here before the loader fix
@example(depth=810, opener='{"a":')
def _deep_json(folder, depth, opener):
    text = (opener * depth).encode()[:4096]
    assert isinstance(parse_file(blob_of(text, b"\x00" * 4), folder / "a.tlra", "deep_json"), AdapterFileError)


def test_deeply_nested_json_headers(tmp_path):
    fuzz("deep_json", _deep_json, tmp_path)


@given(data=st.data())
def _mutated_parse(corpus, folder, data):
    parse_file(data.draw(mutated(corpus)), folder / "a.tlra", "mutated")


def test_mutated_valid_files(corpus, tmp_path):
    fuzz("mutated", _mutated_parse, corpus, tmp_path)
