"""LoKr math: ΔW from factors in PEFT's names and layouts (JAX twin of ``lycoris_torch.lokr``).

``out = a·b``, ``in = c·d`` (``lycoris_core.factorization``). ``W1 = lokr_w1 (a, c)`` or
``lokr_w1_a (a, r) @ lokr_w1_b (r, c)``. ``W2 = lokr_w2 (b, d[, *k])``, or the Tucker form
``lokr_t2 (r, r, kh, kw)``, ``lokr_w2_a (r, b)``, ``lokr_w2_b (r, d)``, or
``lokr_w2_a (b, r) @ lokr_w2_b (r, d·K)``. ``ΔW = kron(W1, W2) · scale``, reshaped C-order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lycoris_core import factorization
from lycoris_jax.functional import einsum, like, reshape, scaled

__all__ = [
    "conv_forward",
    "delta_grads",
    "delta_weight",
    "factorization",
    "linear_forward",
    "linear_grads",
    "make_kron",
    "make_weight_cp",
]


def make_weight_cp(t: jax.Array, wa: jax.Array, wb: jax.Array) -> jax.Array:
    """Tucker ``W2[p, q, h, w] = Σ t[i, j, h, w] wa[i, p] wb[j, q]`` -> ``(b, d, kh, kw)``."""
    return jnp.einsum("ijkl,ip,jr->prkl", t, wa, wb)


def make_kron(w1: jax.Array, w2: jax.Array, scale: Any = 1.0) -> jax.Array:
    """``kron(W1, W2) * scale``; a 4-D ``W2`` pairs ``W1`` with its first two dims (``W1`` as ``(a, c, 1, 1)``).

    A 3-D ``W2`` (Conv1d, full ``lokr_w2 (b, d, k)``) is *not* expanded: ``jnp.kron`` pads
    ``W1`` on the left to ``(1, a, c)`` exactly like ``torch.kron``, giving PEFT's layout
    (docs/DEVIATIONS.md, "LoKr Conv1d full w2").
    """
    if w2.ndim == 3:
        return scaled(jnp.kron(w1, w2), scale)
    # the outer product as one einsum (values as jnp.kron: one product per element): its gradients
    # are two contractions, never a kernel-sized broadcast of the other factor
    a, c = w1.shape
    b, d, *k = w2.shape
    spatial = "hw"[: len(k)]
    product = reshape(einsum(f"ac,bd{spatial}->abcd{spatial}", w1, w2), (a * b, c * d, *k))
    return scaled(product, scale)


def delta_weight(factors: Mapping[str, jax.Array], scale: Any, weight_shape: Sequence[int]) -> jax.Array:
    """ΔW in the base weight's PyTorch layout ``weight_shape``, from factors keyed by PEFT's names."""
    w1, w2 = _kron_factors(factors)
    return reshape(make_kron(w1, w2, scale), tuple(weight_shape))


def delta_grads(
    g: jax.Array, factors: Mapping[str, jax.Array], scale: Any, weight_shape: Sequence[int]
) -> tuple[dict[str, jax.Array], jax.Array]:
    """``(dfactors, dscale)`` of ``<g, delta_weight(factors, scale, weight_shape)>`` for a cotangent ``g``
    of ΔW (PyTorch layout), without forming ΔW: with ``G = g`` as ``(a, b, c, D)`` (``D``: ``W2``'s
    trailing size), ``T = G·W2 (a, c)``, ``dW1 = T·scale``, ``dW2 = Gᵀ·W1·scale``, ``dscale = <T, W1>``."""
    (w1, w2), to_factors = jax.vjp(_kron_factors, dict(factors))
    if w2.ndim == 3:  # PEFT's Conv1d torch.kron layout (docs/DEVIATIONS.md d): through ΔW itself
        _, vjp = jax.vjp(lambda f, s: delta_weight(f, s, weight_shape), dict(factors), scale)
        return vjp(g)
    (a, c), b = w1.shape, w2.shape[0]
    depth = math.prod(w2.shape[1:])
    blocks = reshape(g, (a, b, c, depth))
    t = einsum("abcD,bD->ac", blocks, reshape(w2, (b, depth)))
    u = einsum("abcD,ac->bD", blocks, w1)
    s = jnp.asarray(scale, t.dtype)
    (dfactors,) = to_factors((like(t * s, w1), like(reshape(u * s, w2.shape), w2)))
    return dfactors, einsum("ac,ac->", t, w1).astype(jnp.result_type(scale))


def _kron_factors(factors: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """``(W1 (a, c), W2)``: ``W2`` full, Tucker ``(b, d, kh, kw)`` or low-rank ``(b, d·K)``."""
    f = factors
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_t2" in f:
        w2 = make_weight_cp(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
    return w1, w2


def linear_forward(x: jax.Array, factors: Mapping[str, jax.Array], scale: Any) -> jax.Array:
    """``x @ (kron(W1, W2) * scale)ᵀ`` for ``x (N, c·d)`` without forming ΔW: ``x₃ (N, c, d)``
    contracted with ``W2 (b, d)`` then ``W1 (a, c)`` -> ``(N, a·b)``. Autodiff gives gradients of
    the same sizes (no ΔW-sized array either way)."""
    w1, w2 = _kron_factors(factors)
    (a, c), (b, d) = w1.shape, w2.shape
    n = x.shape[0]
    t = einsum("ncd,bd->ncb", reshape(x, (n, c, d)), w2)
    return scaled(reshape(einsum("ncb,ac->nab", t, w1), (n, a * b)), scale)


def linear_grads(
    x: jax.Array, dy: jax.Array, factors: Mapping[str, jax.Array], scale: Any
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """Gradients of ``y = x @ (kron(W1, W2) * scale)ᵀ`` for ``x (N, c·d)`` and ``dy (N, a·b)``, by
    reshaping (never forming ΔW or a ΔW-sized gradient): ``(dx, dfactors, dscale)``.

    With ``x₃ (N, c, d)`` and ``dy₃ (N, a, b)``: ``T = dy₃·W2 (N, a, d)``, ``dW1 = Tᵀx₃``,
    ``dx = T·W1``; ``U = x₃·W1ᵀ (N, a, d)``, ``dW2 = dy₃ᵀU``; ``dscale = <T, U>``.
    """
    (w1, w2), to_factors = jax.vjp(_kron_factors, dict(factors))
    (a, c), (b, d) = w1.shape, w2.shape
    n = x.shape[0]
    x3, dy3 = reshape(x, (n, c, d)), reshape(dy, (n, a, b))
    t = einsum("nab,bd->nad", dy3, w2)
    u = einsum("ncd,ac->nad", x3, w1)
    s = jnp.asarray(scale, t.dtype)
    dw1 = einsum("nad,ncd->ac", t, x3) * s
    dw2 = einsum("nab,nad->bd", dy3, u) * s
    dx = like(reshape(einsum("nad,ac->ncd", t, w1) * s, x.shape), x)
    (dfactors,) = to_factors((like(dw1, w1), like(dw2, w2)))
    return dx, dfactors, einsum("nad,nad->", t, u).astype(jnp.result_type(scale))


def conv_forward(
    conv: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    factors: Mapping[str, jax.Array],
    scale: Any,
    weight_shape: Sequence[int],
) -> jax.Array:
    """A conv's ``conv(x, ΔW) * scale`` without forming ΔW, for ``x (N, *S, c·d)`` (channels last)
    and an ungrouped ``weight_shape (a·b, c·d, *k)``: the ``c`` input blocks of ``d`` channels are
    convolved with ``W2 (b, d, *k)`` as a batch, then mixed with ``W1 (a, c)``. ``conv(x, w)`` is
    the layer's own convolution with the PyTorch-layout kernel ``w`` (no bias)."""
    w1, w2 = _kron_factors(factors)
    (a, c), (out, cin, *k) = w1.shape, tuple(weight_shape)
    b, d = out // a, cin // c
    w2 = w2.reshape(b, d, *k)
    n, *spatial = x.shape[:-1]
    blocks = jnp.moveaxis(x.reshape(n, *spatial, c, d), -2, 1).reshape(n * c, *spatial, d)
    z = conv(blocks, w2)  # (N·c, *S', b)
    z = z.reshape(n, c, *z.shape[1:])
    y = jnp.einsum("nc...b,ac->n...ab", z, w1)
    return scaled(y.reshape(*y.shape[:-2], a * b), scale)
