"""export_lora: a PEFT LoRA checkpoint with the TinyLoRA model's logits; PEFT's mixed batch equals the bank's."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tinylab.adapter.attach import apply_tinylora
from tinylab.adapter.bank import AdapterBank
from tinylab.adapter.config import TinyLoRAConfig
from tinylab.interop.lora_export import export_lora
from tinylab.model.tiny import TINY_ARCHS, tiny_model

peft = pytest.importorskip("peft")  # a declared dependency

TOL = 1e-5


pytestmark = pytest.mark.filterwarnings("ignore")


def _ids(length=12):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 2000, (2, length), generator=g)  # [B, T]


def _adapted(arch, config, seed=1, dtype=torch.float32):
    model, _ = tiny_model(arch, dtype=dtype)
    adapter = apply_tinylora(model, config)
    adapter.set_vector(torch.randn(adapter.num_params, generator=torch.Generator().manual_seed(seed)))
    return model, adapter


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("r, pad_to", [(2, None), (1, None), (2, 8)])
def test_peft_lora_gives_the_tinylora_logits(tmp_path, arch, r, pad_to):
    """The default is the adapter's own rank (rank 1 too: vLLM's max_lora_rank takes 1); pad_to=8 pads."""
    config = TinyLoRAConfig(r=r, u=13, n_tie="all") if pad_to is None else TinyLoRAConfig(u=2, n_tie=3)
    model, adapter = _adapted(arch, config)
    ids = _ids()
    with torch.no_grad():
        ours = model(ids).logits
        with adapter.disabled():
            base = model(ids).logits
    folder = export_lora(adapter, tmp_path / arch, pad_to=pad_to)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    rank = pad_to or config.r
    assert cfg["peft_type"] == "LORA" and cfg["r"] == rank and cfg["lora_alpha"] == rank
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert len(tensors) == 2 * len(adapter.modules)
    name, module = next(adapter.named_modules())
    A = tensors[f"base_model.model.{name}.lora_A.weight"]  # (rank, in)
    B = tensors[f"base_model.model.{name}.lora_B.weight"]  # (out, rank)
    assert A.shape == (rank, module.in_features) and B.shape == (module.out_features, rank)
    assert not A[config.r:].any() and not B[:, config.r:].any()  # the padding is zeros
    assert (B.double() @ A.double() - module.delta_weight().double()).abs().max() < 1e-6

    fresh, _ = tiny_model(arch)
    peft_model = peft.PeftModel.from_pretrained(fresh, str(folder))
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert (ours - base).abs().max() > 1e-3  # the update is not a no-op
    assert (ours - theirs).abs().max() < TOL


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_peft_mixed_batch_matches_the_bank(tmp_path, arch):
    config = TinyLoRAConfig(u=13, n_tie="all")
    model, tok = tiny_model(arch)
    bank = AdapterBank(model, config)
    g = torch.Generator().manual_seed(3)
    for i in range(3):
        bank.add(f"a{i}", 3 * torch.randn(13, generator=g))
    handle = apply_tinylora(model, config)
    for name in bank.names:
        handle.set_vector(bank.vector(name))
        export_lora(handle, tmp_path / name)
    handle.remove()

    fresh, _ = tiny_model(arch)
    peft_model = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "a0"), adapter_name="a0")
    for name in bank.names[1:]:
        peft_model.load_adapter(str(tmp_path / name), adapter_name=name)
    ids = torch.randint(0, 2000, (5, 9), generator=g)  # [B, T]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[4, :2] = 0
    rows = ["a2", "a0", None, "a1", "a0"]
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    ours = bank.generate(ids, rows, **kwargs)
    with torch.no_grad():
        theirs = peft_model.generate(input_ids=ids, adapter_names=[r or "__base__" for r in rows], **kwargs)
    assert torch.equal(ours, theirs)
    assert len({tuple(row) for row in ours[:, ids.shape[1]:].tolist()}) > 1  # rows differ


def test_bad_input():
    model, adapter = _adapted("llama", TinyLoRAConfig(u=1))
    with pytest.raises(ValueError, match="pad_to=1: must be an integer >= 2"):
        export_lora(adapter, "unused", pad_to=1)
    with pytest.raises(TypeError, match="TinyLoRA handle"):
        export_lora(model, "unused")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_under_the_gpu_stand_in(tmp_path, gpu_stand_in, dtype):
    model, adapter = _adapted("llama", TinyLoRAConfig(u=13, n_tie="all"), dtype=dtype)
    with gpu_stand_in():
        folder = export_lora(adapter, tmp_path / "out", pad_to=8)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.gpu
def test_export_on_cuda(tmp_path):
    model, adapter = _adapted("llama", TinyLoRAConfig(u=13, n_tie="all"))
    model.to("cuda")
    folder = export_lora(adapter, tmp_path / "out")
    assert (folder / "adapter_model.safetensors").is_file()
