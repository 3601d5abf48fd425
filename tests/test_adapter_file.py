import json
import struct

import pytest
import torch

from tinylab.adapter import TinyLoRAConfig, apply_tinylora
from tinylab.adapter_file import AdapterFileError, load_adapter, read_adapter, save_adapter
from tinylab.models import tiny_model


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
