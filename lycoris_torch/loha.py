"""LoHa math: ΔW from factors in PEFT's names and layouts (PyTorch twin of ``lycoris_jax.loha``).

Plain form: ``hada_w1_a (out, r)``, ``hada_w1_b (r, in·K)``, same for ``w2``;
``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · scale``.
CP form (effective conv): ``hada_w{1,2}_a (r, out)``, ``hada_w{1,2}_b (r, in)``,
``hada_t{1,2} (r, r, kh, kw)`` (Conv1d: ``(r, r, k, 1)``).

Gradients come from autograd, so they are exact for both forms (PEFT's hand-written CP backward
is wrong for ``hada_w1_a``/``hada_w2_a``; docs/DEVIATIONS.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["delta_weight", "make_weight", "make_weight_cp"]


def make_weight(
    w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``((w1_a @ w1_b) * (w2_a @ w2_b)) * scale``: ``(out, r) x (r, in')`` pairs -> ``(out, in')``."""
    return ((w1_a @ w1_b) * (w2_a @ w2_b)) * scale


def make_weight_cp(
    t1: torch.Tensor,
    w1_a: torch.Tensor,
    w1_b: torch.Tensor,
    t2: torch.Tensor,
    w2_a: torch.Tensor,
    w2_b: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """CP/Tucker form: ``W_i[p, q, h, w] = Σ t_i[a, b, h, w] w_i_a[a, p] w_i_b[b, q]``; returns
    ``W_1 ⊙ W_2 · scale`` of shape ``(out, in, kh, kw)``."""
    rebuild1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1_b, w1_a)
    rebuild2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2_b, w2_a)
    return rebuild1 * rebuild2 * scale


def delta_weight(factors: Mapping[str, torch.Tensor], scale: float, weight_shape: Sequence[int]) -> torch.Tensor:
    """ΔW in the base weight's PyTorch layout ``weight_shape`` (C-order reshape), from factors
    keyed by PEFT's names (``hada_w1_a``, ..., optionally ``hada_t1``/``hada_t2``)."""
    f = factors
    if "hada_t1" in f:
        weight = make_weight_cp(
            f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"], f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"], scale
        )
    else:
        weight = make_weight(f["hada_w1_a"], f["hada_w1_b"], f["hada_w2_a"], f["hada_w2_b"], scale)
    return weight.reshape(tuple(weight_shape))
