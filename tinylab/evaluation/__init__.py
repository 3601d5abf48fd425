"""Measuring a model on a task: greedy evaluation, base-vs-adapted comparison with controls, paired statistics."""

from tinylab.evaluation.paired_stats import PairedDifference, paired
from tinylab.evaluation.report import Comparison, EvalReport, compare, evaluate

__all__ = ["Comparison", "EvalReport", "PairedDifference", "compare", "evaluate", "paired"]

from tinylab.basics.submodules import submodules_on_demand  # noqa: E402

__getattr__ = submodules_on_demand(__name__)  # tinylab.X.module: imported when first named
