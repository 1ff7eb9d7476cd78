"""LoHa math: ΔW from factors in PEFT's names and layouts (PyTorch twin of ``lycoris_jax.loha``).

Plain form: ``hada_w1_a (out, r)``, ``hada_w1_b (r, in·K)``, same for ``w2``;
``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · scale``.
CP form (effective conv): ``hada_w{1,2}_a (r, out)``, ``hada_w{1,2}_b (r, in)``,
``hada_t{1,2} (r, r, kh, kw)`` (Conv1d: ``(r, r, k, 1)``).

Gradients come from autograd, so they are exact for both forms (PEFT's hand-written CP backward
is wrong for ``hada_w1_a``/``hada_w2_a``; docs/DEVIATIONS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = ["conv_forward", "delta_weight", "linear_forward", "linear_grads", "make_weight", "make_weight_cp"]


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


def _pair_products(factors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``R (out, r·r)`` and ``Q (in, r·r)`` with ``ΔW = R Qᵀ · scale`` (twin of ``lycoris_jax.loha``)."""
    f = factors
    r = torch.einsum("op,oq->opq", f["hada_w1_a"], f["hada_w2_a"])
    q = torch.einsum("pi,qi->ipq", f["hada_w1_b"], f["hada_w2_b"])
    return r.reshape(r.shape[0], -1), q.reshape(q.shape[0], -1)


def linear_forward(x: torch.Tensor, factors: Mapping[str, torch.Tensor], scale: float) -> torch.Tensor:
    """``x @ ΔWᵀ`` for ``x (N, in)`` without forming ΔW: ``(x Q) Rᵀ · scale`` through width ``r·r``."""
    r, q = _pair_products(factors)
    return ((x @ q) @ r.T) * scale


def linear_grads(
    x: torch.Tensor, dy: torch.Tensor, factors: Mapping[str, torch.Tensor], scale: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(dx, dfactors)`` of ``y = x @ ΔWᵀ`` for ``x (N, in)``, ``dy (N, out)`` without forming ΔW or a
    ΔW-sized gradient: with ``Y = dy R``, ``Z = x Q``: ``dx = Y Qᵀ``, ``dR = dyᵀ Z``, ``dQ = xᵀ Y``."""
    names = list(factors)
    with torch.enable_grad():
        leaves = {k: v.detach().requires_grad_(True) for k, v in factors.items()}
        r, q = _pair_products(leaves)
        with torch.no_grad():
            y, z = dy @ r, x @ q
            dr, dq, dx = (dy.T @ z) * scale, (x.T @ y) * scale, (y @ q.T) * scale
        grads = torch.autograd.grad((r, q), [leaves[k] for k in names], (dr, dq))
    return dx, dict(zip(names, grads, strict=True))


def conv_forward(
    conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    factors: Mapping[str, torch.Tensor],
    scale: float,
    weight_shape: Sequence[int],
) -> torch.Tensor:
    """A conv's ``conv(x, ΔW) * scale`` without forming ΔW (plain form, ungrouped): ``x`` convolved
    with ``Q``'s ``r·r`` output channels, then mixed with ``R (out, r·r)``."""
    r, q = _pair_products(factors)
    z = conv(x, q.T.reshape(q.shape[1], *tuple(weight_shape)[1:]))  # (N, r·r, *S')
    return torch.einsum("nk...,ok->no...", z, r) * scale
