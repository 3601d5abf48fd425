"""Which device and dtype a model runs on: choosing them for loading, and reading them off a model."""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["available_devices", "model_device", "model_dtype", "resolve_device", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEVICE_TYPES = ("cpu", "cuda", "mps")


def available_devices() -> list[str]:
    """The devices this machine can run a model on: "cpu", then "cuda:0" ... and "mps" when present."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device `load_model(device=...)` puts the model on.

    "auto": CUDA when available (under a launcher, the process's own GPU: `cuda:$LOCAL_RANK`), then
    MPS, else the CPU. Anything else must name a device this machine has (`available_devices()`).
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a device name; allowed: 'auto' or one of "
                         f"{available_devices()}") from err
    if resolved.type not in _DEVICE_TYPES:
        raise ValueError(f"device={device!r} is not supported; allowed: 'auto' or one of {available_devices()}")
    if resolved.type == "cuda" and resolved.index is None and torch.cuda.is_available():
        resolved = torch.device("cuda", torch.cuda.current_device())
    if resolved.type != "cpu" and str(resolved) not in available_devices():
        raise ValueError(f"device={device!r} is not available on this machine; available: {available_devices()}")
    return resolved


def _runs_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "mps":
        try:
            torch.ones(1, dtype=torch.bfloat16, device=device)
        except (RuntimeError, TypeError):
            return False
    return True


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """The weight dtype `load_model(dtype=...)` uses on `device`.

    "auto": bfloat16 on a GPU that runs it (CUDA, MPS), float32 on the CPU or a GPU without bf16.
    Otherwise one of float32, bfloat16, float16 (name or torch dtype) that the device can run.
    """
    device = torch.device(device)
    if dtype == "auto":
        return torch.bfloat16 if device.type != "cpu" and _runs_bf16(device) else torch.float32
    if isinstance(dtype, torch.dtype):
        chosen = dtype if dtype in _DTYPES.values() else None
    else:
        chosen = _DTYPES.get(dtype.removeprefix("torch.")) if isinstance(dtype, str) else None
    if chosen is None:
        raise ValueError(f"dtype={dtype!r} is not allowed: 'auto' or one of {list(_DTYPES)}")
    if chosen == torch.bfloat16 and not _runs_bf16(device):
        raise ValueError(f"dtype=bfloat16 cannot run on {device} (no bf16 support); allowed there: float32, "
                         "float16, or 'auto'")
    return chosen


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's input embeddings (where token ids go), else of its first parameter."""
    return _reference_weight(model).device


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: its input embeddings' weight dtype, else its first floating
    parameter's (a quantized model's integer weights are not its compute dtype)."""
    weight = _reference_weight(model)
    if weight.is_floating_point():
        return weight.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), weight.dtype)


def _reference_weight(model: nn.Module) -> torch.Tensor:
    """The input embeddings' weight, else the first parameter: what `model_device` and `model_dtype` read."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    return next(model.parameters())
