import json
import struct

import pytest
import torch

from tinylab.adapter.attach import apply_tinylora
from tinylab.adapter.config import TinyLoRAConfig
from tinylab.adapter.file_format import AdapterFileError, load_adapter, read_adapter, save_adapter
from tinylab.model.tiny import tiny_model


def _trained(arch="llama", seed=0, **cfg):
    model, tok = tiny_model(arch, seed=seed)
    adapter = apply_tinylora(model, TinyLoRAConfig(**cfg))
    adapter.set_vector(torch.linspace(-1, 1, adapter.num_params))
    return model, tok, adapter


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_round_trip_gives_same_logits(tmp_path, dtype):
    model, tok, adapter = _trained(u=13, n_tie="all", tie="tiled", seed=3)
    ids = tok("Paris is the capital of", return_tensors="pt").input_ids
    path = save_adapter(adapter, tmp_path / "a.tlra", dtype=dtype)
    expected_v = adapter.vector() if dtype == "fp32" else adapter.vector().to(torch.bfloat16).float()
    adapter.set_vector(expected_v)
    with torch.no_grad():
        expected = model(ids).logits
    adapter.remove()
    fresh, _ = tiny_model("llama", seed=3)
    loaded = load_adapter(fresh, path)
    assert loaded.config == adapter.config and loaded.num_params == 13
    assert torch.equal(loaded.vector(), expected_v)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)


def test_thirteen_params_fit_in_256_bytes(tmp_path):
    for cfg in ({"u": 13, "n_tie": "all"}, {"u": 1, "n_tie": 2, "layers": (0,)}):
        *_, adapter = _trained(**cfg)
        assert adapter.num_params in (13, 4)
        size = save_adapter(adapter, tmp_path / "a.tlra").stat().st_size
        assert size <= 256, size


def test_wrong_base_model_refused(tmp_path):
    _, _, adapter = _trained(u=2)
    path = save_adapter(adapter, tmp_path / "a.tlra")
    other, _ = tiny_model("llama", seed=1)  # same architecture, other weights
    with pytest.raises(AdapterFileError, match="another base model"):
        load_adapter(other, path)
    qwen, _ = tiny_model("qwen2", seed=0)
    with pytest.raises(AdapterFileError, match=r"arch llama/2"):
        load_adapter(qwen, path)
    assert all(p.requires_grad for p in qwen.parameters())  # nothing was attached


def test_layer_out_of_range_in_file_is_a_file_error(tmp_path):
    model, _ = tiny_model("llama")
    adapter = apply_tinylora(model, TinyLoRAConfig(layers=(1,)))
    path = save_adapter(adapter, tmp_path / "a.tlra")
    raw = bytearray(path.read_bytes())
    (hlen,) = struct.unpack("<H", raw[6:8])
    header = json.loads(raw[8 : 8 + hlen])
    header["cfg"]["layers"] = [7]
    new = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(bytes(raw[:6]) + struct.pack("<H", len(new)) + new + bytes(raw[8 + hlen :]))
    fresh, _ = tiny_model("llama")
    with pytest.raises(AdapterFileError, match="layers"):
        load_adapter(fresh, path)


def test_bad_dtype_and_nan_refused(tmp_path):
    _, _, adapter = _trained()
    with pytest.raises(ValueError, match="dtype='fp16'"):
        save_adapter(adapter, tmp_path / "a", dtype="fp16")
    path = save_adapter(adapter, tmp_path / "a.tlra")
    raw = bytearray(path.read_bytes())
    raw[-4:] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(raw))
    with pytest.raises(AdapterFileError, match="NaN"):
        read_adapter(path)


def test_not_an_adapter_file(tmp_path):
    path = tmp_path / "x.tlra"
    path.write_bytes(b"\x80\x04\x95 pickle data")
    with pytest.raises(AdapterFileError, match="not a tinylab adapter file"):
        read_adapter(path)


def test_saving_to_a_folder_names_the_folder(tmp_path):
    *_, adapter = _trained()
    with pytest.raises(ValueError, match=r"is a folder; pass a file path inside it, e\.g\. .*adapter\.tlra"):
        save_adapter(adapter, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def _save_load_across(src_dtype, dst_dtype, tmp_path, context, device="cpu"):
    """Train-like v on a `src_dtype` model, save, load into a fresh `dst_dtype` model; both on `device`."""
    src, tok = tiny_model("phi3", seed=4, dtype=src_dtype)
    dst, _ = tiny_model("phi3", seed=4, dtype=dst_dtype)
    src.to(device)
    dst.to(device)
    ids = tok("The capital of France is", return_tensors="pt").input_ids.to(device)
    with context():
        adapter = apply_tinylora(src, TinyLoRAConfig(u=3, n_tie=2))
        adapter.set_vector(torch.linspace(-2, 2, adapter.num_params, device="cpu"))
        adapter.merge()  # the file records the weights before the merge
        path = save_adapter(adapter, tmp_path / f"{src_dtype}.tlra")
        adapter.unmerge()
        loaded = load_adapter(dst, path)
        assert torch.equal(loaded.vector(), adapter.vector()) and loaded.vectors[0].dtype == torch.float32
        assert loaded.vectors[0].device == torch.device(device)
        with torch.no_grad():
            got = dst(ids).logits.float()
            with loaded.disabled():
                base = dst(ids).logits.float()
        with torch.no_grad():
            want = src(ids).logits.float()  # the source model with the adapter it saved
    effect = (want - base).abs().max()
    assert effect > 0.05
    assert (got - want).abs().max() < 0.25 * effect  # bf16 rounding of the weights, not another update


@pytest.mark.parametrize("src_dtype, dst_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16)])
def test_a_file_loads_across_dtypes_off_the_default_device(gpu_stand_in, tmp_path, src_dtype, dst_dtype):
    _save_load_across(src_dtype, dst_dtype, tmp_path, gpu_stand_in)


@pytest.mark.gpu
def test_a_file_written_on_cuda_loads_on_the_cpu_and_back(tmp_path):
    import contextlib

    _save_load_across(torch.bfloat16, torch.float32, tmp_path, contextlib.nullcontext, device="cuda")
    src, _ = tiny_model("llama", seed=0)
    adapter = apply_tinylora(src.to("cuda"), TinyLoRAConfig(u=2))
    adapter.set_vector(torch.ones(adapter.num_params))
    path = save_adapter(adapter, tmp_path / "cuda.tlra")
    assert torch.equal(load_adapter(tiny_model("llama", seed=0)[0], path).vector(), adapter.vector())


def test_files_with_the_exact_fingerprint_of_earlier_versions_still_load(tmp_path):
    from tinylab.adapter.file_format import base_fingerprint

    model, _, adapter = _trained(u=2)
    path = save_adapter(adapter, tmp_path / "a.tlra")
    raw = bytearray(path.read_bytes())
    (hlen,) = struct.unpack("<H", raw[6:8])
    header = json.loads(raw[8 : 8 + hlen])
    assert header["fp"] == base_fingerprint(model, adapter.config)  # portable: rounded to bf16
    header["fp"] = base_fingerprint(model, adapter.config, portable=False)  # what earlier versions wrote
    assert header["fp"] != base_fingerprint(model, adapter.config)
    new = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(bytes(raw[:6]) + struct.pack("<H", len(new)) + new + bytes(raw[8 + hlen :]))
    adapter.remove()
    assert torch.equal(load_adapter(model, path).vector(), adapter.vector())
