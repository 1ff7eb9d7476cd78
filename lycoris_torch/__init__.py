"""PyTorch twin: LyCORIS adapters (LoHa, LoKr) with PEFT 0.21.2's semantics and files.

>>> import torch, lycoris_torch as lt
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 16))
>>> tuner = lt.LoKrModel(model, lt.LoKrConfig(r=2, target_modules=["0"]))
>>> sorted(tuner.adapter_state_dict())
['base_model.model.0.lokr_w1', 'base_model.model.0.lokr_w2']
"""

from lycoris_core import CheckpointError, LoHaConfig, LoKrConfig, LycorisConfig, NoMatchingModuleError, factorization
from lycoris_core.paths import FORWARD_PATHS
from lycoris_torch import functional, loha, lokr, methods, paths
from lycoris_torch.layer import LoHaLayer, LoKrLayer, LycorisLayer
from lycoris_torch.tuner import LoHaModel, LoKrModel, LycorisTuner, ModulesToSaveWrapper

__all__ = [
    "FORWARD_PATHS",
    "CheckpointError",
    "LoHaConfig",
    "LoHaLayer",
    "LoHaModel",
    "LoKrConfig",
    "LoKrLayer",
    "LoKrModel",
    "LycorisConfig",
    "LycorisLayer",
    "LycorisTuner",
    "ModulesToSaveWrapper",
    "NoMatchingModuleError",
    "factorization",
    "functional",
    "loha",
    "lokr",
    "methods",
    "paths",
]
