"""LoKr math: ΔW from factors in PEFT's names and layouts (PyTorch twin of ``lycoris_jax.lokr``).

``out = a·b``, ``in = c·d`` (``lycoris_core.factorization``). ``W1 = lokr_w1 (a, c)`` or
``lokr_w1_a (a, r) @ lokr_w1_b (r, c)``. ``W2 = lokr_w2 (b, d[, *k])``, or the Tucker form
``lokr_t2 (r, r, kh, kw)``, ``lokr_w2_a (r, b)``, ``lokr_w2_b (r, d)``, or
``lokr_w2_a (b, r) @ lokr_w2_b (r, d·K)``. ``ΔW = kron(W1, W2) · scale``, reshaped C-order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from lycoris_core import factorization

__all__ = [
    "conv_forward",
    "delta_weight",
    "factorization",
    "linear_forward",
    "linear_grads",
    "make_kron",
    "make_weight_cp",
]


def make_weight_cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker ``W2[p, q, h, w] = Σ t[i, j, h, w] wa[i, p] wb[j, q]`` -> ``(b, d, kh, kw)``."""
    return torch.einsum("i j k l, i p, j r -> p r k l", t, wa, wb)


def make_kron(w1: torch.Tensor, w2: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``kron(W1, W2) * scale``; a 4-D ``W2`` gets ``W1`` expanded to ``(a, c, 1, 1)``.

    A 3-D ``W2`` (Conv1d, full ``lokr_w2 (b, d, k)``) is *not* expanded: ``torch.kron`` pads
    ``W1`` on the left to ``(1, a, c)``, giving PEFT's ``(b, a·d, c·k)`` layout, which we keep so
    that PEFT checkpoints load unchanged (docs/DEVIATIONS.md, "LoKr Conv1d full w2").
    """
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    # Normalise the strides of size-1 dims (a view when W2 is contiguous): ``torch.kron`` fails on
    # the odd strides an einsum can give them, e.g. the Tucker W2 of a Conv1d at r=1 (PEFT crashes).
    w2 = w2.contiguous().reshape(-1).reshape(w2.shape)
    return torch.kron(w1, w2) * scale


def delta_weight(factors: Mapping[str, torch.Tensor], scale: float, weight_shape: Sequence[int]) -> torch.Tensor:
    """ΔW in the base weight's PyTorch layout ``weight_shape``, from factors keyed by PEFT's names."""
    w1, w2 = _kron_factors(factors)
    return make_kron(w1, w2, scale).reshape(tuple(weight_shape))


def _kron_factors(factors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W1 (a, c), W2)``: ``W2`` full, Tucker ``(b, d, kh, kw)`` or low-rank ``(b, d·K)``."""
    f = factors
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_t2" in f:
        w2 = make_weight_cp(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
    return w1, w2


def linear_forward(x: torch.Tensor, factors: Mapping[str, torch.Tensor], scale: float) -> torch.Tensor:
    """``x @ (kron(W1, W2) * scale)ᵀ`` for ``x (N, c·d)`` without forming ΔW: ``x₃ (N, c, d)``
    contracted with ``W2 (b, d)`` then ``W1 (a, c)`` -> ``(N, a·b)`` (autograd stays factor-sized)."""
    w1, w2 = _kron_factors(factors)
    (a, c), (b, d) = w1.shape, w2.shape
    t = (x.reshape(-1, d) @ w2.T).reshape(-1, c, b)  # (N, c, b): one plain matmul
    # then W1 over c as one plain matmul too (the scale on W1, not on the output); explicit, since
    # torch.matmul's broadcast folds (or not) by requires_grad, and its rounding with it
    y = (t.transpose(1, 2).reshape(-1, c) @ (w1 * scale).T).reshape(-1, b, a)
    return y.transpose(1, 2).reshape(-1, a * b)


def linear_grads(
    x: torch.Tensor, dy: torch.Tensor, factors: Mapping[str, torch.Tensor], scale: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(dx, dfactors)`` of ``y = x @ (kron(W1, W2) * scale)ᵀ`` for ``x (N, c·d)``, ``dy (N, a·b)``,
    never forming ΔW (twin of ``lycoris_jax.lokr.linear_grads``)."""
    names = list(factors)
    with torch.enable_grad():
        leaves = {k: v.detach().requires_grad_(True) for k, v in factors.items()}
        w1, w2 = _kron_factors(leaves)
        (a, c), (b, d) = w1.shape, w2.shape
        x3, dy3 = x.reshape(-1, c, d), dy.reshape(-1, a, b)
        with torch.no_grad():
            t = torch.einsum("nab,bd->nad", dy3, w2)
            u = torch.einsum("ncd,ac->nad", x3, w1)
            dw1 = torch.einsum("nad,ncd->ac", t, x3) * scale
            dw2 = torch.einsum("nab,nad->bd", dy3, u) * scale
            dx = (torch.einsum("nad,ac->ncd", t, w1) * scale).reshape(x.shape)
        grads = torch.autograd.grad((w1, w2), [leaves[k] for k in names], (dw1, dw2), allow_unused=True)
    return dx, {k: g if g is not None else torch.zeros_like(factors[k]) for k, g in zip(names, grads, strict=True)}


def conv_forward(
    conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    factors: Mapping[str, torch.Tensor],
    scale: float,
    weight_shape: Sequence[int],
) -> torch.Tensor:
    """A conv's ``conv(x, ΔW) * scale`` without forming ΔW, for ``x (N, c·d, *S)`` and an ungrouped
    ``weight_shape (a·b, c·d, *k)``: the ``c`` input blocks are convolved with ``W2 (b, d, *k)`` as
    a batch, then mixed with ``W1 (a, c)`` (twin of ``lycoris_jax.lokr.conv_forward``)."""
    w1, w2 = _kron_factors(factors)
    (a, c), (out, cin, *k) = w1.shape, tuple(weight_shape)
    b, d = out // a, cin // c
    n, spatial = x.shape[0], x.shape[2:]
    z = conv(x.reshape(n * c, d, *spatial), w2.reshape(b, d, *k))  # (N·c, b, *S')
    # one (a, c) @ (c, b·S') product per sample: W1's gradient then sums each sample's positions
    # first and the samples after, as ΔW's weight gradient does (one long sum lost ~1e-6 in fp32)
    y = torch.bmm(w1.expand(n, a, c), z.reshape(n, c, -1))
    return y.reshape(n, a * b, *z.shape[2:]) * scale
