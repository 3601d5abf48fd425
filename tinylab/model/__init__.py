"""The model under study: loading (embedded SmolLM2, folders, hub ids), tiny test models, devices and dtypes,
token batches, generation, attention modes, and GPT-2's Conv1D maps seen as linear maps."""

from tinylab.model.device import available_devices, model_device, model_dtype, resolve_device, resolve_dtype
from tinylab.model.loading import load_model
from tinylab.model.tiny import TINY_ARCHS, tiny_model

__all__ = ["TINY_ARCHS", "available_devices", "load_model", "model_device", "model_dtype", "resolve_device",
           "resolve_dtype", "tiny_model"]

from tinylab.basics.submodules import submodules_on_demand  # noqa: E402

__getattr__ = submodules_on_demand(__name__)  # tinylab.X.module: imported when first named
