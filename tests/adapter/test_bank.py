"""AdapterBank: a mixed batch equals each row run alone with its adapter; None rows are the base model."""


import pytest
import torch

from tinylab.adapter.attach import apply_tinylora, find_adapter
from tinylab.adapter.bank import AdapterBank
from tinylab.adapter.config import TinyLoRAConfig
from tinylab.adapter.file_format import save_adapter
from tinylab.model.generation import generate
from tinylab.model.tiny import TINY_ARCHS, tiny_model

THIRTEEN = TinyLoRAConfig(u=13, n_tie="all")
TOL = 1e-5
PROMPTS = ["The capital of France is", "2 + 2 =", "Which is larger, 7 or 9?", "Hello there, my name"]


pytestmark = pytest.mark.filterwarnings("ignore")  # default targets on archs with extra maps warn once


def _bank(arch="llama", config=THIRTEEN, k=3, dtype=torch.float32, scale=1.0):
    model, tok = tiny_model(arch, dtype=dtype)
    bank = AdapterBank(model, config)
    g = torch.Generator().manual_seed(1)
    for i in range(k):
        bank.add(f"a{i}", scale * torch.randn(bank.num_params, generator=g))
    return model, tok, bank


def _batch(tok, device="cpu"):
    """Left-padded ids [4, T] of PROMPTS (different lengths) and their mask."""
    rows = [tok(p)["input_ids"] for p in PROMPTS]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long, device=device)  # [B, T]
    mask = torch.zeros_like(ids)  # [B, T]
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r, device=device)
        mask[b, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def _alone(model, bank, name, ids):
    """Logits of one unpadded row [1, T] with `name` applied the ordinary way (None: no adapter)."""
    if name is None:
        return model(ids).logits[0]
    adapter = apply_tinylora(model, bank.config)
    try:
        adapter.set_vector(bank.vector(name))
        return model(ids).logits[0]  # [T, V]
    finally:
        adapter.remove()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_mixed_batch_logits_equal_each_row_alone(arch):
    model, tok, bank = _bank(arch)
    ids, mask = _batch(tok)
    adapters = ["a0", None, "a2", "a1"]
    mixed = bank.forward(ids, mask, adapters).logits  # [B, T, V]
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert torch.equal(mixed[1], base[1])  # the None row is the base model, bit for bit
    for b, name in enumerate(adapters):
        keep = mask[b].bool()
        alone = _alone(model, bank, name, ids[b:b + 1, keep])  # [T_b, V]
        assert (mixed[b, keep] - alone).abs().max() < TOL
        if name is not None:  # the update is not a no-op
            assert (mixed[b, keep] - base[b, keep]).abs().max() > 1e-3
    assert not find_adapter(model)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_mixed_batch_greedy_replies_equal_each_row_alone(arch):
    model, tok, bank = _bank(arch, scale=3.0)
    adapters = ["a2", "a0", None, "a1"]
    mixed = bank.generate(PROMPTS, adapters, tokenizer=tok, max_new_tokens=6)
    for b, name in enumerate(adapters):
        adapter = None if name is None else apply_tinylora(model, bank.config)
        if adapter is not None:
            adapter.set_vector(bank.vector(name))
        alone = generate(model, tok, [PROMPTS[b]], max_new_tokens=6, temperature=0.0)
        if adapter is not None:
            adapter.remove()
        kept = mixed.completion_mask[b].bool()
        assert mixed.completion_ids[b, kept].tolist() == alone.completion_ids[0, alone.completion_mask[0].bool()].tolist()
    ids, mask = _batch(tok)
    out = bank.generate(ids, adapters, attention_mask=mask, max_new_tokens=4, pad_token_id=tok.pad_token_id)
    assert out.shape == (4, ids.shape[1] + 4) and torch.equal(out[:, :ids.shape[1]], ids)


def test_the_maps_a_bank_swaps_in_show_the_base_maps_weight_and_sizes():
    """Model code that reads a map's weight, bias or sizes (Ergo's attention reads o_proj.weight.dtype)
    sees the base map's inside `rows` too."""
    model, tok, bank = _bank()
    bases = dict(model.named_modules())
    with bank.rows(["a0", "a1", None, "a2"]):
        swapped = {name: m for name, m in model.named_modules() if type(m).__name__ == "BankLinear"}
        assert len(swapped) == 14  # the tiny llama's 2 layers x 7 maps
        for name, m in swapped.items():
            base = bases[name]
            assert m.weight is base.weight and m.bias is base.bias
            assert (m.in_features, m.out_features) == (base.in_features, base.out_features)


def test_rows_restores_the_model_exactly_also_on_error():
    model, tok, bank = _bank()
    before = [(n, m) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = _batch(tok)
    with bank.rows(["a0", "a1", None, "a2"]) as inside:
        assert inside is model
        assert [n for n, _ in model.named_modules()] != [n for n, _ in before]  # the maps were replaced
        inside(input_ids=ids, attention_mask=mask)
    with pytest.raises(RuntimeError, match="boom"), bank.rows(["a0", "a1", "a1", "a2"]):
        raise RuntimeError("boom")
    with pytest.raises(ValueError, match="3 rows|shape"), bank.rows(["a0", "a1", "a2"]):
        model(input_ids=ids, attention_mask=mask)  # 4 rows for 3 adapters
    assert [(n, m) for n, m in model.named_modules()] == before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_an_attached_adapter_is_stepped_around_and_comes_back():
    model, tok, bank = _bank()
    ids, mask = _batch(tok)
    attached = apply_tinylora(model, bank.config)
    attached.set_vector(torch.full((13,), 0.5))
    with torch.no_grad():
        adapted = model(input_ids=ids, attention_mask=mask).logits
        with attached.disabled():
            base = model(input_ids=ids, attention_mask=mask).logits
        with bank.rows([None] * 4):
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)
        with bank.rows(["a0", None, None, None]):
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits[1:], base[1:])
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, adapted)
    attached.merge()
    with pytest.raises(ValueError, match="unmerge"), bank.rows(["a0"] * 4):
        pass


def test_add_remove_names_and_sources(tmp_path):
    model, tok, bank = _bank(k=0)
    adapter = apply_tinylora(model, THIRTEEN)
    adapter.set_vector(torch.arange(13.0))
    bank.add("handle", adapter)
    save_adapter(adapter, tmp_path / "x.tlra")
    adapter.remove()
    bank.add("file", tmp_path / "x.tlra")
    bank.add("tensor", torch.ones(1, 13))
    assert bank.names == ["handle", "file", "tensor"] and len(bank) == 3 and "file" in bank
    assert torch.equal(bank.vector("handle"), torch.arange(13.0)) and torch.equal(bank.vector("file"), torch.arange(13.0))
    bank.remove("handle")
    assert bank.names == ["file", "tensor"] and torch.equal(bank.vector("tensor"), torch.ones(13))
    assert bank.table.shape == (2, 1, 13) and bank.table.dtype == torch.float32
    held = bank.allocated_bytes
    for i in range(20):  # past the first growth of the table
        bank.add(f"n{i}", torch.full((13,), float(i)))
    assert bank.allocated_bytes > held and bank.allocated_bytes >= bank.table.numel() * 4
    assert torch.equal(bank.vector("n17"), torch.full((13,), 17.0)) and len(bank) == 22


@pytest.mark.parametrize("kind", ["file.safetensors", "folder"])
def test_save_and_load_round_trip(tmp_path, kind):
    model, tok, bank = _bank(config=TinyLoRAConfig(u=2, n_tie=3))
    path = bank.save(tmp_path / kind)
    loaded = AdapterBank.load(model, path)
    assert sorted(loaded.names) == sorted(bank.names) and loaded.config == bank.config
    assert all(torch.equal(loaded.vector(n), bank.vector(n)) for n in bank.names)
    other, _ = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="another base model"):
        AdapterBank.load(other, path)


def _unchanged(bank, names, table):
    return bank.names == names and torch.equal(bank.table, table)


def test_refused_adds_name_the_difference_and_leave_the_bank_unchanged(tmp_path):
    model, tok, bank = _bank()
    names, table = bank.names, bank.table.clone()
    cases = [
        ("a0", torch.zeros(13), "already in the bank"),
        ("", torch.zeros(13), "name=''"),
        ("a/b", torch.zeros(13), "without '/'"),
        ("short", torch.zeros(12), "12 numbers; allowed: 13"),
        ("shape", torch.zeros(13, 1), r"shape \(13, 1\); allowed: \(13,\) or \(1, 13\)"),
        ("nan", torch.tensor([0.0] * 5 + [float("nan")] + [0.0] * 7), "nan at index 5; allowed: finite"),
        ("inf", torch.tensor([float("inf")] + [0.0] * 12), "inf at index 0; allowed: finite"),
        ("text", "not a path.tlra", "cannot read adapter file"),
        ("words", ["x"] * 13, "list is not allowed"),
    ]
    for name, value, message in cases:
        with pytest.raises(ValueError, match=message):
            bank.add(name, value)
        assert _unchanged(bank, names, table)
    for config, message in [(TinyLoRAConfig(u=13, n_tie="all", seed=5), "projection seed 5 \\(the bank's: 0\\)"),
                            (TinyLoRAConfig(u=4, n_tie="all"), "u 4 \\(the bank's: 13\\)")]:
        adapter = apply_tinylora(model, config)
        with pytest.raises(ValueError, match=message):
            bank.add("other", adapter)
        save_adapter(adapter, tmp_path / "other.tlra")
        adapter.remove()
        with pytest.raises(ValueError, match=message):
            bank.add("other", tmp_path / "other.tlra")
        assert _unchanged(bank, names, table)
    other, _ = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="another base model"):
        bank.add("other", apply_tinylora(other, THIRTEEN))
    assert _unchanged(bank, names, table)


def test_bad_rows_name_the_row_and_the_allowed_values():
    model, tok, bank = _bank()
    ids, mask = _batch(tok)
    with pytest.raises(ValueError, match=r"adapters\[2\]='zz' is not in this bank; allowed: None .*'a0', 'a1', 'a2'"):
        bank.forward(ids, mask, ["a0", None, "zz", "a1"])
    with pytest.raises(ValueError, match="adapters names 3 rows but the batch has 4"):
        bank.forward(ids, mask, ["a0", None, "a1"])
    with pytest.raises(ValueError, match="adapters names 5 rows but the batch has 4"):
        bank.generate(PROMPTS, ["a0"] * 5, tokenizer=tok, max_new_tokens=2)
    with pytest.raises(ValueError, match="adapters='a0' is not allowed"):
        bank.forward(ids, mask, "a0")
    with pytest.raises(ValueError, match=r"adapters\[0\]=3 is not in this bank"):
        bank.forward(ids, mask, [3, None, None, None])
    with pytest.raises(ValueError, match="name='zz' is not in this bank"):
        bank.remove("zz")
    with pytest.raises(ValueError, match="tokenizer"):
        bank.generate(PROMPTS, ["a0"] * 4, max_new_tokens=2)


def _device_checks(model, tok, dtype):
    """Bank, forward and both generate paths on `model` as it is (device and dtype)."""
    bank = AdapterBank(model, THIRTEEN)
    g = torch.Generator(device="cpu").manual_seed(1)
    for i in range(3):
        bank.add(f"a{i}", torch.randn(13, generator=g, device="cpu"))
    assert bank.table.dtype == torch.float32 and bank.table.device == model.device
    device = model.device
    ids, mask = _batch(tok, device)
    adapters = ["a0", None, "a1", "a2"]
    mixed = bank.forward(ids, mask, adapters).logits  # [B, T, V]
    assert mixed.device == device and mixed.dtype == dtype
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert torch.equal(mixed[1], base[1])
    assert (mixed[0].float() - base[0].float()).abs().max() > 1e-3
    out = bank.generate(ids, adapters, attention_mask=mask, max_new_tokens=3, pad_token_id=tok.pad_token_id)
    assert out.device == device
    replies = bank.generate(PROMPTS, adapters, tokenizer=tok, max_new_tokens=3)
    assert len(replies.completions) == 4
    bank.add("late", torch.ones(13, device="cpu"))
    bank.remove("a0")
    assert bank.table.device == device


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_everything_stays_on_the_models_device(gpu_stand_in, dtype):
    model, tok = tiny_model("llama", dtype=dtype)
    with gpu_stand_in():
        _device_checks(model, tok, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda(dtype):
    model, tok = tiny_model("llama", dtype=dtype)
    _device_checks(model.to("cuda"), tok, dtype)
