"""The one place where PyTorch and Flax layouts are converted (weights and activations).

Adapter factors never need converting: both twins keep PEFT's layouts. Base weights and
activations do: Linear ``weight (out, in)`` <-> ``kernel (in, out)``; Conv ``weight
(out, in/g, *k)`` <-> ``kernel (*k, in/g, out)``; activations NC... <-> N...C.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "channels_first",
    "channels_last",
    "flax_to_torch_kernel",
    "load_torch_state_into_nnx",
    "torch_to_flax_kernel",
]


def torch_to_flax_kernel(weight: np.ndarray) -> np.ndarray:
    """``(out, in)`` -> ``(in, out)``; ``(out, in/g, *k)`` -> ``(*k, in/g, out)`` (Flax's layout; written
    here, not taken from ``lycoris_jax``, so that a layout bug there cannot hide in both columns)."""
    weight = np.asarray(weight)
    return weight.transpose((*range(2, weight.ndim), 1, 0))


def flax_to_torch_kernel(kernel: np.ndarray) -> np.ndarray:
    """Inverse of :func:`torch_to_flax_kernel`."""
    kernel = np.asarray(kernel)
    n = kernel.ndim
    return kernel.transpose((n - 1, n - 2, *range(n - 2)))


def channels_last(x: np.ndarray) -> np.ndarray:
    """``(N, C, *spatial)`` -> ``(N, *spatial, C)``; 2-D inputs are returned unchanged."""
    return x if x.ndim == 2 else np.moveaxis(x, 1, -1)


def channels_first(x: np.ndarray) -> np.ndarray:
    """Inverse of :func:`channels_last`."""
    return x if x.ndim == 2 else np.moveaxis(x, -1, 1)


def load_torch_state_into_nnx(model: Any, state: Mapping[str, Any]) -> None:
    """Copy a torch ``state_dict`` (tensors or arrays) into an NNX model whose attribute paths
    mirror the torch module paths (``a.0.q.weight`` -> ``model.a[0].q.kernel``)."""
    import jax.numpy as jnp
    from flax import nnx

    for key, value in state.items():
        array = np.asarray(value.detach().float().numpy() if hasattr(value, "detach") else value)
        *path, name = key.split(".")
        node = model
        for part in path:
            node = node[int(part)] if isinstance(node, (list, nnx.List)) else getattr(node, part)
        if name == "weight":
            variable = node.kernel
            array = torch_to_flax_kernel(array)
        elif name == "bias":
            variable = node.bias
        else:
            raise ValueError(f"{key}: no Flax counterpart for torch parameter {name!r}")
        if tuple(variable.shape) != array.shape:
            raise ValueError(f"{key}: torch shape {array.shape} does not fit Flax shape {tuple(variable.shape)}")
        variable[...] = jnp.asarray(array, variable.dtype)
