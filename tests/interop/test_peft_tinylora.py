"""PEFT TinyLoRA interop: export to / import from PEFT checkpoints, same logits within 1e-5."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinylab.adapter.attach import apply_tinylora, find_adapter
from tinylab.adapter.layer import projection
from tinylab.interop.peft_tinylora import export_peft, import_peft, peft_groups
from tinylab.model.tiny import tiny_model

peft = pytest.importorskip("peft")  # a declared dependency; present wherever tinylab is installed

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _ids(seed=0, length=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2000, (2, length), generator=g)  # [B, L]


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits.float()  # [B, L, V]


def _peft_load(arch, folder):
    base, _ = tiny_model(arch, seed=0)
    return peft.PeftModel.from_pretrained(base, str(folder))


def _peft_vectors(peft_model):
    return {int(k): v.detach() for k, v in peft_model.base_model.tinylora_v["default"].items()}


@pytest.mark.parametrize(
    "arch, fields, n_peft_vectors",
    [
        ("llama", dict(u=3, n_tie=7), 2),  # 14 modules, 2 groups of 7: PEFT weight_tying expresses it
        ("llama", dict(u=13, n_tie="all"), 1),
        ("qwen2", dict(u=2), 14),  # untied
        ("mistral", dict(u=2, n_tie=4), 14),  # groups 4,4,4,2: not PEFT's grouping -> untied copies
        ("gemma", dict(u=2, n_tie=2, tie="structured"), 14),  # structured -> untied copies
        ("llama", dict(u=2, targets=("q_proj", "down_proj"), layers=(1,)), 2),
        ("qwen2", dict(u=2, group_sizes=(3, 3, 3, 5)), 4),  # PEFT's own shape of groups: kept tied
        ("phi3", dict(u=2), 8),  # fused qkv_proj / gate_up_proj: 4 maps a layer
        ("qwen3", dict(u=13, n_tie="all"), 1),
        ("gpt2", dict(u=2), 8),  # transformers Conv1D maps, weights stored (in, out): PEFT's fan_in_fan_out
        ("gpt2", dict(u=3, targets=("c_proj",)), 4),  # both c_proj of a layer (attention and MLP)
    ],
)
def test_export_loads_in_peft_with_same_logits(tmp_path, arch, fields, n_peft_vectors):
    model, _ = tiny_model(arch, seed=0)
    ids = _ids()
    base_logits = _logits(model, ids)
    adapter = apply_tinylora(model, **fields)
    adapter.set_vector(torch.randn(adapter.num_params, generator=torch.Generator().manual_seed(1)))
    ours = _logits(model, ids)
    assert (ours - base_logits).abs().max() > 1e-2  # the update is not a no-op

    export_peft(adapter, tmp_path / "exported")
    peft_model = _peft_load(arch, tmp_path / "exported")
    theirs = _logits(peft_model, ids)
    assert (ours - theirs).abs().max() < TOL
    long_ids = _ids(length=48)  # 96 rows per linear call: the forward's many-rows path
    assert (_logits(model, long_ids) - _logits(peft_model, long_ids)).abs().max() < TOL

    vectors = _peft_vectors(peft_model)
    assert len(vectors) == n_peft_vectors
    ours_per_module = {m.name: adapter.vectors[m.group].detach() for m in adapter.modules}
    peft_layers = {n[len("base_model.model."):]: mod for n, mod in peft_model.named_modules()
                   if isinstance(mod, peft.tuners.tinylora.layer.Linear)}
    assert list(peft_layers) == [m.name for m in adapter.modules]  # PEFT adapted exactly our modules
    for name, layer in peft_layers.items():  # each module sees its own group's v
        torch.testing.assert_close(vectors[int(layer._tinylora_v_key["default"])], ours_per_module[name])

    # Laid out as PEFT's own save_pretrained writes it: re-saving what PEFT loaded gives the same file.
    peft_model.save_pretrained(tmp_path / "resaved")
    mine = load_file(tmp_path / "exported" / "adapter_model.safetensors")
    resaved = load_file(tmp_path / "resaved" / "adapter_model.safetensors")
    assert sorted(mine) == sorted(resaved)
    for key in mine:
        assert mine[key].dtype == resaved[key].dtype and torch.equal(mine[key], resaved[key]), key
    cfg_mine = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    cfg_resaved = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())
    for cfg in (cfg_mine, cfg_resaved):
        cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT writes a set in arbitrary order
    assert cfg_mine == cfg_resaved


def test_export_conversion_is_needed(tmp_path):
    """Sanity of the test above: PEFT's own factors with our unconverted P give other logits."""
    model, _ = tiny_model("llama", seed=0)
    adapter = apply_tinylora(model, u=1, n_tie="all")
    adapter.set_vector([1.5])
    export_peft(adapter, tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    for name, module in adapter.named_modules():
        state[f"base_model.model.{name}.tinylora_P"] = module.P.clone()
    save_file(state, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    ids = _ids()
    assert (_logits(model, ids) - _logits(_peft_load("llama", tmp_path), ids)).abs().max() > 1e-3


def _peft_checkpoint(tmp_path, arch="llama", **config):
    """A checkpoint made by PEFT itself (its SVD, its P) with random v; returns (folder, PEFT logits)."""
    base, _ = tiny_model(arch, seed=0)
    peft_model = peft.get_peft_model(base, peft.TinyLoraConfig(target_modules=SEVEN, **config))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for v in peft_model.base_model.tinylora_v["default"].values():
            v.copy_(torch.randn(v.shape, generator=g))
    peft_model.save_pretrained(tmp_path)
    return tmp_path, _logits(peft_model, _ids())


@pytest.mark.parametrize(
    "weight_tying, save_projection, tying, num_params",
    [
        (0.0, True, dict(n_tie=1, group_sizes=None), 14 * 2),
        (0.5, True, dict(n_tie=2, group_sizes=None), 7 * 2),  # 7 groups of 2 = tiled n_tie=2
        (1.0, False, dict(n_tie="all"), 2),  # P regenerated from PEFT's projection_seed
        (0.7, True, dict(group_sizes=(3, 3, 3, 5)), 4 * 2),  # the last PEFT group absorbs the rest
    ],
)
def test_import_matches_peft(tmp_path, weight_tying, save_projection, tying, num_params):
    folder, theirs = _peft_checkpoint(tmp_path, u=2, weight_tying=weight_tying, save_projection=save_projection)
    model, _ = tiny_model("llama", seed=0)
    base_logits = _logits(model, _ids())
    assert (theirs - base_logits).abs().max() > 1e-2

    adapter = import_peft(model, folder)
    assert adapter.source == "peft"
    assert {k: getattr(adapter.config, k) for k in tying} == tying and adapter.num_params == num_params
    assert (_logits(model, _ids()) - theirs).abs().max() < TOL

    # The handle carries the checkpoint's factors and P, not tinylab's seeded ones.
    state = load_file(folder / "adapter_model.safetensors")
    name, module = next(adapter.named_modules())
    assert not torch.allclose(module.P, projection(adapter.config.seed, name, 2, 2))
    B = state[f"base_model.model.{name}.tinylora_B"]  # (out, r)
    torch.testing.assert_close(module.U * module.S.sqrt(), B)
    torch.testing.assert_close(torch.linalg.vector_norm(module.U, dim=0), torch.ones(2))
    groups = peft_groups(len(adapter.modules), weight_tying)
    for info, group in zip(adapter.modules, groups):
        v_file = state[f"base_model.tinylora_v.{group}"]
        torch.testing.assert_close(adapter.vectors[info.group].detach(), v_file)

    with adapter.disabled():  # the base model is still underneath
        assert torch.equal(_logits(model, _ids()), base_logits)


def test_import_then_export_round_trip(tmp_path):
    folder, theirs = _peft_checkpoint(tmp_path / "peft", u=3, weight_tying=0.5)
    model, _ = tiny_model("llama", seed=0)
    adapter = import_peft(model, folder)
    export_peft(adapter, tmp_path / "again")
    assert (_logits(_peft_load("llama", tmp_path / "again"), _ids()) - theirs).abs().max() < TOL


def test_save_adapter_refuses_imported_adapter(tmp_path):
    from tinylab.adapter.file_format import save_adapter

    folder, _ = _peft_checkpoint(tmp_path / "peft", u=1, weight_tying=1.0)
    model, _ = tiny_model("llama", seed=0)
    adapter = import_peft(model, folder)
    with pytest.raises(ValueError, match="peft"):
        save_adapter(adapter, tmp_path / "a.tinylora")


def test_peft_groups_mirror_peft():
    assert peft_groups(14, 0.0) == list(range(14))
    assert peft_groups(14, 1.0) == [0] * 14
    assert peft_groups(14, 0.7) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3]
    with pytest.raises(ValueError, match="weight_tying=1.5"):
        peft_groups(14, 1.5)


def test_bad_checkpoints_are_refused_and_leave_the_model_untouched(tmp_path):
    model, _ = tiny_model("llama", seed=0)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        import_peft(model, tmp_path / "missing")

    folder, _ = _peft_checkpoint(tmp_path / "ok", u=2)
    cfg = json.loads((folder / "adapter_config.json").read_text())

    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LORA"}))
    (lora / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="peft_type='LORA'"):
        import_peft(model, lora)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps(cfg))
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="safetensors only"):
        import_peft(model, pickled)

    wrong_r = tmp_path / "wrong_r"
    wrong_r.mkdir()
    (wrong_r / "adapter_config.json").write_text(json.dumps({**cfg, "r": 3}))
    (wrong_r / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="do not match"):
        import_peft(model, wrong_r)
    assert not find_adapter(model)
    assert all(p.requires_grad for p in model.parameters())

    base, _ = tiny_model("llama", seed=0)
    odd = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]  # not a targets x layers set
    peft.get_peft_model(base, peft.TinyLoraConfig(target_modules=odd, u=1)).save_pretrained(tmp_path / "odd")
    with pytest.raises(ValueError, match="no TinyLoRAConfig"):
        import_peft(model, tmp_path / "odd")
    assert not find_adapter(model)


def test_export_refuses_a_non_adapter(tmp_path):
    model, _ = tiny_model("llama", seed=0)
    with pytest.raises(TypeError, match="TinyLoRA handle"):
        export_peft(model, tmp_path)


def _round_trip_on(device, dtype, tmp_path, context):
    """Export from a model on `device` in `dtype` and import into a fresh one, inside `context`."""
    from tinylab.adapter.config import TinyLoRAConfig

    model, _ = tiny_model("phi3", seed=0, dtype=dtype)
    fresh, _ = tiny_model("phi3", seed=0, dtype=dtype)
    model.to(device)
    fresh.to(device)
    ids = _ids().to(device)
    with context():
        adapter = apply_tinylora(model, TinyLoRAConfig(u=3, n_tie=2))
        adapter.set_vector(torch.linspace(-3, 3, adapter.num_params, device="cpu"))
        want = _logits(model, ids)
        with adapter.disabled():
            base = _logits(model, ids)
        export_peft(adapter, tmp_path / "peft")
        imported = import_peft(fresh, tmp_path / "peft")
        got = _logits(fresh, ids)
    assert all(v.dtype == torch.float32 and v.device == torch.device(device) for v in imported.vectors)
    assert torch.equal(imported.vector(), adapter.vector())
    for _, module in imported.named_modules():
        assert module.U.dtype == dtype and module.U.device == module.base.weight.device
    effect = (want - base).abs().max()
    assert effect > 0.05 and (got - want).abs().max() < (1e-4 if dtype == torch.float32 else 0.1 * effect)
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {t.device.type for t in tensors.values()} == {"cpu"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_and_import_off_the_default_device(gpu_stand_in, tmp_path, dtype):
    _round_trip_on("cpu", dtype, tmp_path, gpu_stand_in)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_and_import_on_cuda(tmp_path, dtype):
    import contextlib

    _round_trip_on("cuda", dtype, tmp_path, contextlib.nullcontext)
