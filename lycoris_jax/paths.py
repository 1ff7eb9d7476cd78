"""The ``"merged"`` and ``"factored"`` forward paths (``lycoris_core.paths``), shared by the NNX
layers and the Linen transform.

:func:`folded_call` runs a layer once with ``W + Σ ΔW``. For a Linear layer its backward pass is
the frozen layer's (``dx`` through ``W``, ``dW`` only if asked) plus each adapter's factored
gradients (``lokr``/``loha.linear_grads``): neither ΔW nor its rank-r products are kept or formed
again. Other layers form ΔW again in the backward pass (``jax.checkpoint``).
:func:`factored_delta` is the ``"factored"`` branch of a Linear adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from lycoris_jax import functional, loha, lokr

__all__ = ["Fold", "factored_conv", "factored_delta", "folded_call", "linear_grads_of"]

_LINEAR = {"LOKR": (lokr.linear_forward, lokr.linear_grads), "LOHA": (loha.linear_forward, loha.linear_grads)}
_CONV = {"LOKR": lokr.conv_forward, "LOHA": loha.conv_forward}


def linear_grads_of(peft_type: str) -> Callable[..., Any]:
    """``linear_grads`` of the algorithm ``peft_type`` (``"LOKR"``/``"LOHA"``)."""
    return _LINEAR[peft_type][1]


@dataclass(frozen=True)
class Fold:
    """One adapter folded into a kernel.

    ``factors`` in PEFT's names; ``scale`` (0-d, may be traced); ``rows`` ``(out,)`` the rank-dropout
    row factors or ``None``; ``keep`` the module-dropout draw (``True`` or a traced bool).
    """

    factors: Mapping[str, jax.Array]
    scale: Any
    rows: jax.Array | None = None
    keep: Any = True


def _arrays(folds: Sequence[Fold]) -> tuple:
    return tuple(
        (dict(f.factors), jnp.asarray(f.scale), f.rows, None if f.keep is True else jnp.asarray(f.keep)) for f in folds
    )


def _kept(value: jax.Array, keep: Any) -> jax.Array:
    return value if keep is None else jnp.where(keep, value, jnp.zeros_like(value))


def folded_call(
    call: Callable[[jax.Array, jax.Array, Any], jax.Array],
    x: jax.Array,
    kernel: jax.Array,
    bias: Any,
    folds: Sequence[Fold],
    delta: Callable[[Mapping[str, jax.Array], Any, Any], jax.Array],
    *,
    dtype: Any,
    linear: tuple[str, int, int] | None = None,
) -> jax.Array:
    """``call(x, W + Σ keep·ΔW, bias)``: one layer call with the adapters folded in.

    ``call(x, kernel, bias)`` is the layer's own forward with another kernel; ``delta(factors,
    scale, rows)`` gives ΔW in the kernel's layout, rank-dropout ``rows`` applied; ``dtype`` is the
    folded kernel's. ``linear=(peft_type, out, in)`` marks a plain Linear layer, whose backward pass
    is factored (module and rank dropout applied to ``dy``).
    """
    arrays = _arrays(folds)

    def fold(kernel: jax.Array, arrays: tuple) -> jax.Array:
        total = kernel.astype(dtype)
        for factors, scale, rows, keep in arrays:
            total = total + _kept(delta(factors, scale, rows), keep).astype(dtype)
        return total

    if linear is None:
        return jax.checkpoint(lambda x, k, b, a: call(x, fold(k, a), b))(x, kernel, bias, arrays)
    peft_type, out_features, in_features = linear
    grads = linear_grads_of(peft_type)

    @jax.custom_vjp
    def run(x: jax.Array, kernel: jax.Array, bias: Any, arrays: tuple) -> jax.Array:
        return call(x, fold(kernel, arrays), bias)

    def forward(x: jax.Array, kernel: jax.Array, bias: Any, arrays: tuple) -> tuple[jax.Array, tuple]:
        return run(x, kernel, bias, arrays), (x, kernel, bias, arrays)

    def backward(res: tuple, dy: jax.Array) -> tuple:
        x, kernel, bias, arrays = res
        # the frozen layer's backward (dW is dead code unless the kernel is trained too)
        _, frozen = jax.vjp(lambda x, k, b: call(x, k, b), x, kernel.astype(dtype), bias)
        dx, dkernel, dbias = frozen(dy)
        tokens = math.prod(x.shape[:-1])
        x2 = functional.reshape(x, (tokens, in_features))
        dy2 = functional.reshape(dy, (tokens, out_features))
        darrays = []
        for factors, scale, rows, keep in arrays:
            fdtype = jnp.result_type(*factors.values())
            dyi = dy2.astype(fdtype) if rows is None else (dy2 * rows).astype(fdtype)
            dxi, dfactors, dscale = grads(x2.astype(fdtype), _kept(dyi, keep), factors, scale)
            dx = dx + functional.reshape(dxi, x.shape).astype(dx.dtype)
            darrays.append((dfactors, jnp.reshape(dscale, jnp.shape(scale)).astype(scale.dtype), None, None))
        return dx.astype(x.dtype), dkernel.astype(kernel.dtype), dbias, tuple(darrays)

    run.defvjp(forward, backward)
    return run(x, kernel, bias, arrays)


def factored_delta(
    peft_type: str, x: jax.Array, factors: Mapping[str, jax.Array], scale: Any, out_features: int
) -> jax.Array:
    """A Linear adapter's branch ``x @ ΔWᵀ`` for ``x (..., in)`` without forming ΔW -> ``(..., out)``."""
    tokens = math.prod(x.shape[:-1])
    y = _LINEAR[peft_type][0](functional.reshape(x, (tokens, x.shape[-1])), factors, scale)
    return functional.reshape(y, (*x.shape[:-1], out_features))


def factored_conv(
    peft_type: str,
    conv: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    factors: Mapping[str, jax.Array],
    scale: Any,
    weight_shape: tuple[int, ...],
) -> jax.Array:
    """A conv adapter's branch ``conv(x, ΔW)`` without forming ΔW (``lokr``/``loha.conv_forward``;
    ``conv(x, w)``: the layer's own convolution with the PyTorch-layout kernel ``w``, no bias)."""
    return _CONV[peft_type](conv, x, factors, scale, weight_shape)
