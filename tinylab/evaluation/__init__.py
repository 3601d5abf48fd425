"""Measuring a model on a task: greedy evaluation, base-vs-adapted comparison with controls, paired statistics."""

from tinylab.evaluation.paired_stats import PairedDifference, paired
from tinylab.evaluation.report import Comparison, EvalReport, compare, evaluate

__all__ = ["Comparison", "EvalReport", "PairedDifference", "compare", "evaluate", "paired"]
