"""The adapter file format: the trained vector, its config and the base model's fingerprint, no pickle.

(A training run's folder, with its optimizer state and history, is another thing: see the run folder.)

A TinyLoRA adapter is defined by its config and v; U, S, Vh come from the base weights and P from
the seed, so a file needs nothing else. 13 fp32 numbers take 52 bytes; the whole file is ~150.

Layout (all integers little-endian):

    offset  size  field
    0       4     magic b"TLRA"
    4       1     format version (1)
    5       1     dtype of the values: 0 = float32, 1 = bfloat16
    6       2     header length H (uint16, at most 4096)
    8       H     UTF-8 JSON object:
                    "n"    number of values (int)
                    "cfg"  the TinyLoRAConfig fields that differ from their defaults
                    "arch" model type and layer count of the base model, e.g. "llama/30"
                    "fp"   16-hex-digit fingerprint of the adapted base weights, rounded
                           to bfloat16: a file written from an fp32 model loads into the same
                           model in bf16 and the reverse, on any device (files written before
                           the rounding, with the exact fingerprint, still load)
    8+H     n*w   the values, w = 4 (float32) or 2 (bfloat16)

The loader reads at most `MAX_FILE_BYTES`, checks every field before it allocates anything sized by
the file (the count the config gives on the model, and at most `MAX_PROJECTION_BYTES` of random
projections P), refuses NaN/inf values and a different base model, and raises `AdapterFileError`
(a `ValueError`) for every malformed input.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import struct
from pathlib import Path

import numpy as np
import torch

from tinylab.adapter.attach import TinyLoRA, apply_tinylora, check_adapter
from tinylab.adapter.config import TinyLoRAConfig
from tinylab.adapter.svd import weight_fingerprint
from tinylab.adapter.targets import plan_modules, select_modules
from tinylab.basics.atomic import write_bytes_atomic

__all__ = ["MAX_FILE_BYTES", "MAX_PROJECTION_BYTES", "AdapterFileError", "adapter_fingerprint", "base_fingerprint",
           "config_from_json", "config_to_json", "load_adapter", "model_arch", "read_adapter", "save_adapter"]

MAGIC = b"TLRA"
VERSION = 1
MAX_FILE_BYTES = 1 << 20
MAX_PROJECTION_BYTES = 1 << 26
"""Largest total size of the P tensors (modules x u x r x r fp32) a loaded file may ask for: 64 MiB."""
_MAX_HEADER = 4096
_DTYPES = {"fp32": 0, "bf16": 1}
_WIDTH = {0: 4, 1: 2}
_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(TinyLoRAConfig)}


class AdapterFileError(ValueError):
    """A file that is not a valid tinylab adapter for this model (malformed, damaged, or another base)."""


def model_arch(model) -> str:
    config = getattr(model, "config", None)
    return f"{getattr(config, 'model_type', type(model).__name__)}/{getattr(config, 'num_hidden_layers', '?')}"


def _combine(named_fingerprints) -> str:
    h = hashlib.blake2b(digest_size=8)
    for name, fp in named_fingerprints:
        h.update(f"{name}={fp};".encode())
    return h.hexdigest()


def base_fingerprint(model, config: TinyLoRAConfig, *, portable: bool = True) -> str:
    """Fingerprint of the weights `config` adapts in `model` (names, shapes and values rounded to
    bfloat16, so the same on any device and in fp32 or bf16). `portable=False`: the exact values
    and dtype (what files written before the rounding hold)."""
    return _combine((name, weight_fingerprint(linear.weight, portable=portable))
                    for name, linear, _ in select_modules(model, config, warn=False))


def config_to_json(config: TinyLoRAConfig) -> dict:
    out = {}
    for name, f in _CONFIG_FIELDS.items():
        value = getattr(config, name)
        if value != f.default:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def save_adapter(adapter: TinyLoRA, path: str | os.PathLike, *, dtype: str = "fp32") -> Path:
    """Write the adapter to the file `path` atomically; returns the path. `dtype`: "fp32" or "bf16".

    The file records the base weights rounded to bf16, so it loads into the same base model on
    any device in fp32 or bf16. `path` naming an existing folder is a ValueError.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed: choose one of {list(_DTYPES)}")
    if getattr(adapter, "source", None) not in (None, "tinylab"):
        raise ValueError(
            f"this adapter was imported from {adapter.source} and carries its own projections and factors; "
            "export it with tinylab.interop.peft_tinylora.export_peft instead"
        )
    check_adapter(adapter)
    v = adapter.vector()  # (n,) fp32
    if not torch.isfinite(v).all():
        raise ValueError("the adapter's vector has NaN/inf values; refusing to save it")
    header = {"n": v.numel(), "cfg": config_to_json(adapter.config), "arch": model_arch(adapter.model),
              "fp": adapter_fingerprint(adapter)}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    if dtype == "fp32":
        payload = v.numpy().astype("<f4").tobytes()
    else:
        payload = v.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    blob = MAGIC + struct.pack("<BBH", VERSION, _DTYPES[dtype], len(header_bytes)) + header_bytes + payload
    return write_bytes_atomic(path, blob)  # a folder path is a ValueError naming it


def adapter_fingerprint(adapter: TinyLoRA) -> str:
    """The portable base fingerprint of the adapter's modules, from the weights before any merge."""
    wrapped = dict(adapter.named_modules())  # name -> TinyLoRALinear
    return _combine((m.name, weight_fingerprint(wrapped[m.name].original_weight(), portable=True))
                    for m in adapter.modules)


def read_adapter(path: str | os.PathLike) -> tuple[TinyLoRAConfig, dict, torch.Tensor]:
    """Parse and validate a file without a model: (config, header, values fp32)."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as err:
        raise AdapterFileError(f"cannot read adapter file {path}: {err}") from err
    if not stat.S_ISREG(info.st_mode):  # a folder, a device, or a FIFO (whose open() would block)
        raise AdapterFileError(f"cannot read adapter file {path}: not a regular file")
    size = info.st_size
    if size > MAX_FILE_BYTES:
        raise AdapterFileError(f"{path} is {size} bytes; adapter files are at most {MAX_FILE_BYTES} bytes")
    try:
        with open(path, "rb") as f:
            blob = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:  # no read permission, removed in between, ...
        raise AdapterFileError(f"cannot read adapter file {path}: {err}") from err
    return _parse(blob, str(path))


def _parse(blob: bytes, where: str = "<bytes>") -> tuple[TinyLoRAConfig, dict, torch.Tensor]:
    if len(blob) > MAX_FILE_BYTES:
        raise AdapterFileError(f"{where}: larger than {MAX_FILE_BYTES} bytes")
    if len(blob) < 8 or blob[:4] != MAGIC:
        raise AdapterFileError(f"{where}: not a tinylab adapter file (expected magic b'TLRA' and an 8-byte prefix)")
    version, dtype_code, header_len = struct.unpack("<BBH", blob[4:8])
    if version != VERSION:
        raise AdapterFileError(f"{where}: format version {version} is not supported (this tinylab reads {VERSION})")
    if dtype_code not in _WIDTH:
        raise AdapterFileError(f"{where}: dtype code {dtype_code} is not allowed (0 = float32, 1 = bfloat16)")
    if header_len > _MAX_HEADER or 8 + header_len > len(blob):
        raise AdapterFileError(f"{where}: header length {header_len} exceeds the file or the {_MAX_HEADER}-byte limit")
    try:
        header = json.loads(blob[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # RecursionError: "[[[[..." nested deeply
        raise AdapterFileError(f"{where}: header is not valid UTF-8 JSON ({type(err).__name__}: {err})") from err
    if not isinstance(header, dict) or set(header) != {"n", "cfg", "arch", "fp"}:
        raise AdapterFileError(f"{where}: header must be an object with keys n, cfg, arch, fp")
    n, cfg, arch, fp = header["n"], header["cfg"], header["arch"], header["fp"]
    width = _WIDTH[dtype_code]
    payload = blob[8 + header_len :]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or n * width != len(payload):
        raise AdapterFileError(
            f"{where}: header says n={n!r} values but the file holds {len(payload)} bytes of "
            f"{'float32' if width == 4 else 'bfloat16'} values"
        )
    if not isinstance(arch, str) or not isinstance(fp, str) or len(fp) != 16:
        raise AdapterFileError(f"{where}: arch must be a string and fp a 16-hex-digit string")
    config = config_from_json(cfg, where)
    if n % config.u:
        raise AdapterFileError(f"{where}: n={n} values is not a whole number of vectors of u={config.u}")
    if dtype_code == 0:
        values = torch.from_numpy(np.frombuffer(payload, dtype="<f4").astype(np.float32))
    else:
        bits = torch.from_numpy(np.frombuffer(payload, dtype="<i2").astype(np.int16))
        values = bits.view(torch.bfloat16).float()
    if not torch.isfinite(values).all():
        raise AdapterFileError(f"{where}: the vector holds NaN or inf values")
    return config, header, values


def config_from_json(cfg, where: str) -> TinyLoRAConfig:
    if not isinstance(cfg, dict):
        raise AdapterFileError(f"{where}: cfg must be a JSON object")
    unknown = sorted(set(cfg) - set(_CONFIG_FIELDS))
    if unknown:
        raise AdapterFileError(f"{where}: unknown config fields {unknown}; allowed: {sorted(_CONFIG_FIELDS)}")
    fields = {}
    for key, value in cfg.items():
        if key in ("targets", "layers") and isinstance(value, list):
            value = tuple(value)
        fields[key] = value
    try:
        return TinyLoRAConfig(**fields)
    except (TypeError, ValueError) as err:
        raise AdapterFileError(f"{where}: invalid config: {err}") from err


def load_adapter(model, path: str | os.PathLike) -> TinyLoRA:
    """Re-apply a saved adapter to `model`; refuses a different base model with a clear error."""
    config, header, values = read_adapter(path)
    try:
        fp = base_fingerprint(model, config)
    except ValueError as err:
        raise AdapterFileError(f"{path} does not fit this model ({model_arch(model)}): {err}") from err
    if fp != header["fp"] and header["fp"] == base_fingerprint(model, config, portable=False):
        fp = header["fp"]  # a file written before the bf16 rounding, on this very model and dtype
    if fp != header["fp"] or header["arch"] != model_arch(model):  # same weights in another architecture: refused too
        raise AdapterFileError(
            f"{path} was trained on another base model (arch {header['arch']}, weights {header['fp']}); "
            f"this model is {model_arch(model)} with weights {fp}. Load the model it was trained on."
        )
    try:
        planned = plan_modules(model, config, warn=False)  # no allocation: names and tying groups only
    except ValueError as err:
        raise AdapterFileError(f"{path} does not fit this model ({model_arch(model)}): {err}") from err
    count = (max(m.group for m in planned) + 1) * config.u
    if count != header["n"]:
        raise AdapterFileError(f"{path} holds {header['n']} values but its config gives {count} on this model")
    projection_bytes = len(planned) * config.u * config.r * config.r * 4
    if projection_bytes > MAX_PROJECTION_BYTES:
        raise AdapterFileError(
            f"{path} asks for u={config.u}, r={config.r} on {len(planned)} modules: {projection_bytes} bytes of "
            f"projections, more than the {MAX_PROJECTION_BYTES}-byte limit (u * r * r * modules * 4)"
        )
    adapter = apply_tinylora(model, config)
    adapter.set_vector(values)
    return adapter
