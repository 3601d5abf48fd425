"""Training the adapter's numbers: the run (lifecycle, stop, resume, folder), the GRPO and SFT loops, presets."""

from tinylab.train.grpo import GRPOConfig, train_grpo
from tinylab.train.presets import Preset, preset
from tinylab.train.records import NonFiniteError, StepLog, StopTraining
from tinylab.train.run import Run
from tinylab.train.sft import SFTConfig, train_sft

resume = Run.resume

__all__ = ["GRPOConfig", "NonFiniteError", "Preset", "Run", "SFTConfig", "StepLog", "StopTraining", "preset",
           "resume", "train_grpo", "train_sft"]

from tinylab.basics.submodules import submodules_on_demand  # noqa: E402

__getattr__ = submodules_on_demand(__name__)  # tinylab.X.module: imported when first named
