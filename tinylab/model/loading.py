"""Load a model to work on: the embedded SmolLM2 (`tinylab.model.embedded`), a local folder or a hub id."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from tinylab.model.device import resolve_device, resolve_dtype
from tinylab.model.embedded import embedded_folder
from tinylab.model.tiny import TINY_ARCHS, tiny_model

__all__ = ["load_model"]

log = logging.getLogger(__name__)


def load_model(name: str | os.PathLike | None = None, *, device: str | torch.device = "auto",
               dtype: str | torch.dtype = "auto", **from_pretrained_kwargs):
    """Load `(model, tokenizer)` in eval mode on `device` in `dtype`.

    `name`: None for the embedded SmolLM2-135M-Instruct; a local folder; a Hugging Face hub id
    (needs network; offline, the error says how to pass a local folder instead); or "tiny-<arch>"
    for `tiny_model(arch)` (random weights, for tests and smoke runs).
    `device`: "auto" (CUDA, then MPS, else CPU; see `resolve_device`) or a device this machine has.
    `dtype`: "auto" (bfloat16 on a GPU that runs it, float32 on the CPU; see `resolve_dtype`),
    "float32", "bfloat16", "float16" or the torch dtype. A device or dtype this machine cannot run
    raises ValueError naming what is available. Extra keyword arguments go to `from_pretrained`
    (e.g. `attn_implementation="eager"`); `device_map=` (e.g. "auto" to shard a large model over
    several GPUs) passes through and then places the model instead of `device`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device_map = from_pretrained_kwargs.pop("device_map", None)
    if device_map is not None and device != "auto":
        raise ValueError(f"device={device!r} and device_map={device_map!r} both place the model; pass one "
                         "(device_map for a model sharded over several devices, device for one device)")
    target = resolve_device(device)
    if device_map is not None and not torch.cuda.is_available():
        target = torch.device("cpu")
    dtype = resolve_dtype(dtype, target)
    if name is None:
        source = embedded_folder()
    elif Path(name).expanduser().is_dir():
        source = Path(name).expanduser()
    elif Path(name).expanduser().exists():
        raise ValueError(f"model={str(name)!r} is a file; pass the folder that holds config.json")
    elif str(name).startswith("tiny-") and str(name)[5:] in TINY_ARCHS:  # e.g. tiny-llama: a random test model
        with torch.device("cpu"):  # the same weights whatever the device (CPU RNG), then moved
            model, tokenizer = tiny_model(str(name)[5:], dtype=dtype)
        return model.to(target), tokenizer
    elif str(name).startswith("tiny-") and "/" not in str(name):
        raise ValueError(f"model={str(name)!r}: no such tiny test model; allowed: "
                         f"{', '.join('tiny-' + arch for arch in TINY_ARCHS)}")
    elif str(name).startswith(("/", "./", "../", "~")) or str(name).count("/") > 1:
        raise ValueError(f"model={str(name)!r}: no such folder (a hub id is 'name' or 'org/name'); allowed: "
                         "None (the embedded model), a folder holding config.json, a hub id or tiny-<arch>")
    else:
        source = str(name)
    if device_map is None and target.type != "cpu":
        device_map = {"": str(target)}  # load straight onto the GPU, not through CPU memory
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        with torch.device(target):  # whatever torch's default device is, the weights go to `target`
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map,
                                                         **from_pretrained_kwargs)
    except OSError as err:
        if isinstance(source, Path):
            raise
        raise OSError(
            f"Could not load {source!r} from the Hugging Face hub ({err.__class__.__name__}: {err}). "
            "Without network access, download the model elsewhere and pass its local folder: "
            "tinylab.load_model('/path/to/folder'), or use the embedded model: tinylab.load_model()."
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer
