"""Flax NNX twin: LyCORIS adapters (LoHa, LoKr) with PEFT 0.21.2's semantics and files.

>>> from flax import nnx
>>> import lycoris_jax as lj
>>> model = nnx.Sequential(nnx.Linear(16, 16, rngs=nnx.Rngs(0)))
>>> tuner = lj.LoKrModel(model, lj.LoKrConfig(r=2, target_modules=["layers.0"]))
>>> sorted(tuner.adapter_state_dict())
['base_model.model.layers.0.lokr_w1', 'base_model.model.layers.0.lokr_w2']
"""

from lycoris_core import CheckpointError, LoHaConfig, LoKrConfig, LycorisConfig, NoMatchingModuleError, factorization
from lycoris_core.paths import FORWARD_PATHS
from lycoris_jax import adapted, functional, linen, loha, lokr, methods, pytree
from lycoris_jax.functional import compiling_for
from lycoris_jax.layer import LoHaLayer, LoKrLayer, LycorisLayer, LycorisParam, LycorisScale
from lycoris_jax.tuner import LoHaModel, LoKrModel, LycorisTuner, default_rngs

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
    "LycorisParam",
    "LycorisScale",
    "LycorisTuner",
    "NoMatchingModuleError",
    "adapted",
    "compiling_for",
    "default_rngs",
    "factorization",
    "functional",
    "linen",
    "loha",
    "lokr",
    "methods",
    "pytree",
]
