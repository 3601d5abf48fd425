"""A TinyLoRA adapter as a standard LoRA checkpoint, for servers that know LoRA and not TinyLoRA.

Per adapted map the update U diag(S) R Vh is a rank-r product, so it is a LoRA with

    A = Vh                  # (r, in)
    B = U diag(S) R         # (out, r)
    lora_alpha = r          # PEFT's scaling alpha / r = 1: W' = W + B A

written as PEFT's `save_pretrained` writes a `LoraConfig` adapter (`adapter_config.json` and
`adapter_model.safetensors`, no pickle), so PEFT (`PeftModel.from_pretrained`, `load_adapter`,
mixed batches with `adapter_names=`), vLLM's multi-LoRA and LoRAX load it. The tensors are fp32
(what PEFT saves by default); phi3's fused qkv_proj / gate_up_proj are exported as the fused maps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tinylab.adapter.attach import TinyLoRA, check_adapter
from tinylab.basics.checks import check_int

__all__ = ["export_lora"]

_PREFIX = "base_model.model."  # PEFT's prefix of module keys in a saved state dict


def export_lora(adapter: TinyLoRA, folder: str | os.PathLike, *, pad_to: int | None = None) -> Path:
    """Write `adapter`'s update as a PEFT LoRA checkpoint folder; returns the folder.

    `PeftModel.from_pretrained(base_model, folder)` then gives the adapted model's logits (to fp32
    rounding). The rank is the adapter's own r (2 by default), with no padding: vLLM's
    `LLM(..., enable_lora=True, max_lora_rank=R)` takes R in {1, 8, 16, 32, 64, 128, 256, 320,
    512} and loads any adapter of rank <= R as it is (a rank-2 export with `max_lora_rank=8`). An
    adapter above `max_lora_rank` kills vLLM's offline engine: that call and every later one raise
    `EngineDeadError` (the cause, "LoRA rank 16 is greater than max_lora_rank 8", shows only in
    the engine's log), so set `max_lora_rank` to at least the largest rank you serve.
    `pad_to=k` (>= r) adds zero rows to A and zero columns to B for servers that want a fixed rank
    (the same update; lora_alpha = k keeps the scaling at 1).
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    from tinylab.interop.peft_tinylora import peft_target_fields

    check_adapter(adapter)
    r = adapter.config.r
    rank = r if pad_to is None else check_int("pad_to", pad_to, low=r)
    vectors = adapter.vector()  # (n,) fp32
    if not torch.isfinite(vectors).all():
        raise ValueError("the adapter's vector has NaN/inf values; refusing to export it")
    tensors: dict[str, torch.Tensor] = {}
    for name, module in adapter.named_modules():
        R = module.R().detach().double().cpu()  # (r, r)
        U, S, Vh = module.U.double().cpu(), module.S.double().cpu(), module.Vh.double().cpu()  # (out, r), (r,), (r, in)
        A = torch.zeros(rank, Vh.shape[1], dtype=torch.float64, device="cpu")  # (rank, in)
        B = torch.zeros(U.shape[0], rank, dtype=torch.float64, device="cpu")  # (out, rank)
        A[:r], B[:, :r] = Vh, (U * S) @ R  # rows / columns past r stay zero
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = A.float().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = B.float().contiguous()
    peft_config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        inference_mode=True,
        base_model_name_or_path=getattr(adapter.model, "name_or_path", None) or None,
        **peft_target_fields(adapter),
    )
    config_dict = {k: sorted(v) if isinstance(v, set) else v for k, v in peft_config.to_dict().items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    return folder
