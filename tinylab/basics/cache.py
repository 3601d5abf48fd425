"""The user cache folder tinylab writes converted models, tokenizers and SVD factors into."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The user cache folder: `$TINYLAB_CACHE`, else `~/.cache/tinylab`."""
    return Path(os.environ.get("TINYLAB_CACHE") or Path.home() / ".cache" / "tinylab")
