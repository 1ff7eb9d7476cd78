"""LoKr math: ΔW from factors in PEFT's names and layouts (JAX twin of ``lycoris_torch.lokr``).

``out = a·b``, ``in = c·d`` (``lycoris_core.factorization``). ``W1 = lokr_w1 (a, c)`` or
``lokr_w1_a (a, r) @ lokr_w1_b (r, c)``. ``W2 = lokr_w2 (b, d[, *k])``, or the Tucker form
``lokr_t2 (r, r, kh, kw)``, ``lokr_w2_a (r, b)``, ``lokr_w2_b (r, d)``, or
``lokr_w2_a (b, r) @ lokr_w2_b (r, d·K)``. ``ΔW = kron(W1, W2) · scale``, reshaped C-order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lycoris_core import factorization
from lycoris_jax.functional import scaled

__all__ = ["delta_weight", "factorization", "make_kron", "make_weight_cp"]


def make_weight_cp(t: jax.Array, wa: jax.Array, wb: jax.Array) -> jax.Array:
    """Tucker ``W2[p, q, h, w] = Σ t[i, j, h, w] wa[i, p] wb[j, q]`` -> ``(b, d, kh, kw)``."""
    return jnp.einsum("ijkl,ip,jr->prkl", t, wa, wb)


def make_kron(w1: jax.Array, w2: jax.Array, scale: Any = 1.0) -> jax.Array:
    """``kron(W1, W2) * scale``; a 4-D ``W2`` gets ``W1`` expanded to ``(a, c, 1, 1)``.

    A 3-D ``W2`` (Conv1d, full ``lokr_w2 (b, d, k)``) is *not* expanded: ``jnp.kron`` pads
    ``W1`` on the left to ``(1, a, c)`` exactly like ``torch.kron``, giving PEFT's layout
    (docs/DEVIATIONS.md, "LoKr Conv1d full w2").
    """
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return scaled(jnp.kron(w1, w2), scale)


def delta_weight(factors: Mapping[str, jax.Array], scale: Any, weight_shape: Sequence[int]) -> jax.Array:
    """ΔW in the base weight's PyTorch layout ``weight_shape``, from factors keyed by PEFT's names."""
    f = factors
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif "lokr_t2" in f:
        w2 = make_weight_cp(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
    return make_kron(w1, w2, scale).reshape(tuple(weight_shape))
