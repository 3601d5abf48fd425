"""The basics every layer uses: argument checks, seeds, atomic writes, the cache folder, submodules on first
use. Imports nothing of tinylab outside this folder."""

from tinylab.basics.submodules import submodules_on_demand  # noqa: E402

__getattr__ = submodules_on_demand(__name__)  # tinylab.X.module: imported when first named
