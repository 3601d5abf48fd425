"""Measurements shared by training, evaluation and analysis: the gold reply's log-probability, and greedy
replies scored by the task. Written once here and asked for everywhere."""

from tinylab.basics.submodules import submodules_on_demand  # noqa: E402

__getattr__ = submodules_on_demand(__name__)  # tinylab.X.module: imported when first named
