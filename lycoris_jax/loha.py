"""LoHa math: ΔW from factors in PEFT's names and layouts (JAX twin of ``lycoris_torch.loha``).

Plain form: ``hada_w1_a (out, r)``, ``hada_w1_b (r, in·K)``, same for ``w2``;
``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · scale``.
CP form (effective conv): ``hada_w{1,2}_a (r, out)``, ``hada_w{1,2}_b (r, in)``,
``hada_t{1,2} (r, r, kh, kw)`` (Conv1d: ``(r, r, k, 1)``).

Pure ``jax.numpy``: jit-, grad- and vmap-friendly; gradients are exact for both forms.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lycoris_jax.functional import einsum, like, reshape, scaled

__all__ = [
    "conv_forward",
    "delta_grads",
    "delta_weight",
    "linear_forward",
    "linear_grads",
    "make_weight",
    "make_weight_cp",
    "matmul_weight",
]


def make_weight(w1_a: jax.Array, w1_b: jax.Array, w2_a: jax.Array, w2_b: jax.Array, scale: Any) -> jax.Array:
    """``((w1_a @ w1_b) * (w2_a @ w2_b)) * scale``: ``(out, r) x (r, in')`` pairs -> ``(out, in')``."""
    return scaled((w1_a @ w1_b) * (w2_a @ w2_b), scale)


def make_weight_cp(
    t1: jax.Array, w1_a: jax.Array, w1_b: jax.Array, t2: jax.Array, w2_a: jax.Array, w2_b: jax.Array, scale: Any
) -> jax.Array:
    """CP/Tucker form: ``W_i[p, q, h, w] = Σ t_i[a, b, h, w] w_i_a[a, p] w_i_b[b, q]``; returns
    ``W_1 ⊙ W_2 · scale`` of shape ``(out, in, kh, kw)``."""
    rebuild1 = jnp.einsum("ijkl,jr,ip->prkl", t1, w1_b, w1_a)
    rebuild2 = jnp.einsum("ijkl,jr,ip->prkl", t2, w2_b, w2_a)
    return scaled(rebuild1 * rebuild2, scale)


def delta_weight(factors: Mapping[str, jax.Array], scale: Any, weight_shape: Sequence[int]) -> jax.Array:
    """ΔW in the base weight's PyTorch layout ``weight_shape`` (C-order reshape), from factors
    keyed by PEFT's names (``hada_w1_a``, ..., optionally ``hada_t1``/``hada_t2``)."""
    f = factors
    if "hada_t1" in f:
        weight = make_weight_cp(
            f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"], f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"], scale
        )
    else:
        weight = make_weight(f["hada_w1_a"], f["hada_w1_b"], f["hada_w2_a"], f["hada_w2_b"], scale)
    return reshape(weight, tuple(weight_shape))


def matmul_weight(factors: Mapping[str, jax.Array], scale: Any, weight_shape: Sequence[int]) -> jax.Array:
    """:func:`delta_weight` as one matmul ``R Qᵀ · scale`` of width ``r·r`` (:func:`_pair_products`), in
    the base weight's PyTorch layout: more multiply-adds than PEFT's two rank-r products and their
    Hadamard product, one kernel-sized pass instead of three (a TPU's choice). The CP form: ``delta_weight``."""
    if "hada_t1" in factors:
        return delta_weight(factors, scale, weight_shape)
    r, q = _pair_products(factors)
    return reshape(scaled(einsum("ok,ik->oi", r, q), scale), tuple(weight_shape))


def delta_grads(
    g: jax.Array, factors: Mapping[str, jax.Array], scale: Any, weight_shape: Sequence[int]
) -> tuple[dict[str, jax.Array], jax.Array]:
    """``(dfactors, dscale)`` of ``<g, delta_weight(factors, scale, weight_shape)>`` for a cotangent ``g``
    of ΔW (PyTorch layout), without forming ΔW: ``ΔW = R Qᵀ · scale`` (:func:`_pair_products`), so
    ``dR = g Q · scale``, ``dQ = gᵀ R · scale``, ``dscale = <g Q, R>``. The CP form goes through ΔW."""
    if "hada_t1" in factors:
        _, vjp = jax.vjp(lambda f, s: delta_weight(f, s, weight_shape), dict(factors), scale)
        return vjp(g)
    (r, q), to_factors = jax.vjp(_pair_products, dict(factors))
    g2 = reshape(g, (r.shape[0], q.shape[0]))
    y = einsum("oi,ik->ok", g2, q)
    s = jnp.asarray(scale, y.dtype)
    (dfactors,) = to_factors((like(y * s, r), like(einsum("oi,ok->ik", g2, r) * s, q)))
    return dfactors, einsum("ok,ok->", y, r).astype(jnp.result_type(scale))


def _pair_products(factors: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """``R (out, r·r)``: ``R[o, (p, q)] = w1_a[o, p] w2_a[o, q]``; ``Q (in, r·r)`` likewise from the
    ``_b`` factors. ``ΔW = R Qᵀ · scale``: the Hadamard product of two rank-r products."""
    f = factors
    r = einsum("op,oq->opq", f["hada_w1_a"], f["hada_w2_a"])
    q = einsum("pi,qi->ipq", f["hada_w1_b"], f["hada_w2_b"])
    return reshape(r, (r.shape[0], r.shape[1] * r.shape[2])), reshape(q, (q.shape[0], q.shape[1] * q.shape[2]))


def linear_forward(x: jax.Array, factors: Mapping[str, jax.Array], scale: Any) -> jax.Array:
    """``x @ (((w1_a w1_b) ⊙ (w2_a w2_b)) * scale)ᵀ`` for ``x (N, in)`` without forming ΔW:
    ``(x Q) Rᵀ`` through width ``r·r`` (:func:`_pair_products`)."""
    r, q = _pair_products(factors)
    return scaled(einsum("nk,ok->no", einsum("ni,ik->nk", x, q), r), scale)


def linear_grads(
    x: jax.Array, dy: jax.Array, factors: Mapping[str, jax.Array], scale: Any
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """Gradients of ``y = x @ (((w1_a w1_b) ⊙ (w2_a w2_b)) * scale)ᵀ`` for ``x (N, in)``, ``dy (N, out)``
    without forming ΔW or a ΔW-sized gradient: ``(dx, dfactors, dscale)``.

    ``ΔW = R Qᵀ`` (:func:`_pair_products`, ``r·r`` columns), so with ``Y = dy R`` and ``Z = x Q``
    (both ``(N, r·r)``): ``dx = Y Qᵀ``, ``dR = dyᵀ Z``, ``dQ = xᵀ Y``, ``dscale = <Y, Z>``; every
    intermediate is at most ``max(N, in, out) · r²``.
    """
    (r, q), to_factors = jax.vjp(_pair_products, dict(factors))
    y, z = einsum("no,ok->nk", dy, r), einsum("ni,ik->nk", x, q)
    s = jnp.asarray(scale, y.dtype)
    (dfactors,) = to_factors((like(einsum("no,nk->ok", dy, z) * s, r), like(einsum("ni,nk->ik", x, y) * s, q)))
    dx = like(einsum("nk,ik->ni", y, q) * s, x)
    return dx, dfactors, einsum("nk,nk->", y, z).astype(jnp.result_type(scale))


def conv_forward(
    conv: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    factors: Mapping[str, jax.Array],
    scale: Any,
    weight_shape: Sequence[int],
) -> jax.Array:
    """A conv's ``conv(x, ΔW) * scale`` without forming ΔW (plain form, ungrouped), for ``x (N, *S,
    in)`` channels last: ``x`` convolved with ``Q``'s ``r·r`` output channels (``Qᵀ`` as a ``(r·r,
    in, *k)`` kernel), then mixed with ``R (out, r·r)``. ``conv(x, w)`` is the layer's own
    convolution with the PyTorch-layout kernel ``w`` (no bias)."""
    r, q = _pair_products(factors)
    kernel = q.T.reshape(q.shape[1], *tuple(weight_shape)[1:])
    return scaled(jnp.einsum("...k,ok->...o", conv(x, kernel), r), scale)
