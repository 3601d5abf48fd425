"""Whole experiments as one call: the RL-vs-SFT budget sweep, and a notebook's set-up."""

from tinylab.experiments.notebook import NotebookSetup, notebook_setup
from tinylab.experiments.sweeps import budget_sweep, method_differences

__all__ = ["NotebookSetup", "budget_sweep", "method_differences", "notebook_setup"]

from tinylab.basics.submodules import submodules_on_demand  # noqa: E402

__getattr__ = submodules_on_demand(__name__)  # tinylab.X.module: imported when first named
