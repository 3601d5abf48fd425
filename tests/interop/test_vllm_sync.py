"""The weights the TRL bridge pushes to vLLM (without vLLM): base names, W + dW, W never written."""

from types import SimpleNamespace

import pytest
import torch

from tinylab.adapter.attach import apply_tinylora
from tinylab.interop.trl_bridge import grpo_trainer, peft_model
from tinylab.interop.vllm_sync import merged_weights, use_exact_sync, vllm_engine_kwargs, vllm_on_cpu
from tinylab.model.tiny import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore")


def _adapted(arch="llama", dtype=torch.float32, **config):
    model, tok = tiny_model(arch, seed=1, dtype=dtype)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = apply_tinylora(model, **(config or dict(u=4, n_tie="all")))
    adapter.set_vector(torch.randn(adapter.num_params, generator=torch.Generator().manual_seed(0)))
    return model, tok, adapter, base


def _expected(base, adapter, arch="llama") -> dict[str, torch.Tensor]:
    """round(W + dW) in W's dtype for the adapted maps, every other base parameter as it is."""
    out = dict(base)
    for name, module in adapter.named_modules():
        W, dW = base[f"{name}.weight"], module.delta_weight()  # dW (out, in)
        dW = dW.T if arch == "gpt2" else dW  # GPT-2's Conv1D maps store their weights (in, out)
        out[f"{name}.weight"] = (W.float() + dW).to(W.dtype)
    return out


def _untouched(model, base) -> bool:
    now = {n.removeprefix("base_model.model.").replace(".base_layer", "").replace(".base.conv.", ".")
           .replace(".base.", "."): p
           for n, p in model.named_parameters() if "tinylora_" not in n}
    return all(torch.equal(now[n], base[n]) for n in base)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tinylab_model_gives_base_names_with_w_plus_dw_and_w_stays_bit_exact(arch, dtype):
    model, _, adapter, base = _adapted(arch, dtype)
    expected = _expected(base, adapter, arch)
    for _ in range(10):  # any number of syncs
        pushed = dict(merged_weights(model))
    assert sorted(pushed) == sorted(base)  # the base model's own names, the vector left out
    assert all(pushed[n].dtype == base[n].dtype and torch.equal(pushed[n], expected[n]) for n in base)
    changed = [n for n in base if not torch.equal(pushed[n], base[n])]
    assert len(changed) == len(adapter.modules)  # every adapted weight carries its update
    assert _untouched(model, base)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_the_peft_model_the_bridge_builds_gives_the_same_weights(tmp_path, arch):
    model, _, adapter, base = _adapted(arch, u=4, n_tie=7 if arch == "llama" else 4)
    expected = _expected(base, adapter, arch)
    wrapped = peft_model(adapter, tmp_path / "peft")
    for _ in range(10):
        pushed = dict(merged_weights(wrapped))
    assert sorted(pushed) == sorted(base)
    for name in base:  # PEFT splits sqrt(S) over both factors: the same dW up to fp32 rounding
        torch.testing.assert_close(pushed[name], expected[name], rtol=1e-5, atol=1e-6)
    assert _untouched(wrapped, base)
    wrapped.merge_adapter()
    with pytest.raises(ValueError, match="the PEFT adapter is merged"):
        dict(merged_weights(wrapped))


def test_under_the_gpu_stand_in(gpu_stand_in):
    model, _, adapter, base = _adapted(dtype=torch.bfloat16)
    with gpu_stand_in():
        pushed = dict(merged_weights(model))
    assert all(t.device.type == "cpu" for t in pushed.values())
    assert torch.equal(pushed["model.layers.0.self_attn.q_proj.weight"],
                       _expected(base, adapter)["model.layers.0.self_attn.q_proj.weight"])


def test_a_disabled_or_merged_tinylab_adapter(tmp_path):
    model, _, adapter, base = _adapted()
    with adapter.disabled():
        assert all(torch.equal(t, base[n]) for n, t in merged_weights(model))
    adapter.merge()
    with pytest.raises(ValueError, match="the tinylab adapter is merged"):
        dict(merged_weights(model))


def test_trls_generation_gets_the_exact_sync(tmp_path):
    """What `grpo_trainer` puts into TRL's VLLMGeneration: its weight iterator becomes merged_weights."""
    from accelerate import Accelerator
    from trl.distributed import DistributedBackend

    model, _, adapter, base = _adapted()
    expected = _expected(base, adapter)
    wrapped = peft_model(adapter, tmp_path / "peft")
    sync = SimpleNamespace(model=wrapped, mode="colocate", _dist=DistributedBackend(Accelerator(cpu=True)))
    use_exact_sync(sync)
    for _ in range(5):
        pushed = dict(sync._iter_named_params())
    assert sorted(pushed) == sorted(base) and _untouched(wrapped, base)
    torch.testing.assert_close(pushed, expected, rtol=1e-5, atol=1e-6)
    assert hasattr(sync, "sync_weights") == vllm_on_cpu()  # TRL's own push unless vLLM runs on its CPU backend
    fsdp = SimpleNamespace(model=wrapped, mode="colocate", _dist=SimpleNamespace(is_fsdp=True, gather_params=None))
    use_exact_sync(fsdp)
    assert not hasattr(fsdp, "_iter_named_params")  # under FSDP TRL's own sync stays


def test_engine_kwargs_reach_trls_llm_and_are_undone(monkeypatch):
    import trl.generation.vllm_generation as trl_vllm

    calls = []

    def fake_llm(**kwargs):
        calls.append(kwargs)

    monkeypatch.setattr(trl_vllm, "LLM", fake_llm, raising=False)
    with vllm_engine_kwargs(dtype=torch.float32, enforce_eager=True):
        trl_vllm.LLM(model="m", enforce_eager=False)  # what TRL passes itself wins
    assert calls == [dict(model="m", dtype=torch.float32, enforce_eager=False)]
    assert trl_vllm.LLM is fake_llm
    monkeypatch.delattr(trl_vllm, "LLM")
    with pytest.raises(ImportError, match="vLLM is not installed"):
        with vllm_engine_kwargs(dtype=torch.float32):
            pass


def test_vllm_engine_is_only_for_colocated_vllm(tmp_path):
    from testkit import WordTask

    from tinylab.train.grpo import GRPOConfig

    model, tok, adapter, base = _adapted()
    config = GRPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=4, steps=1)
    with pytest.raises(ValueError, match=r"vllm_engine=\{.dtype.: .float32.\} is not allowed here.*use_vllm=True"):
        grpo_trainer(model, tok, adapter, WordTask(), config, output_dir=str(tmp_path), vllm_engine={"dtype": "float32"})
    assert adapter.attached and _untouched(model, base)
