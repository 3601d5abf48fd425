"""The basics every layer uses: argument checks, seeds, atomic writes, the cache folder. Imports nothing of tinylab."""

from tinylab.basics.submodules import submodules_on_demand  # noqa: E402

__getattr__ = submodules_on_demand(__name__)  # tinylab.X.module: imported when first named
