"""The ``"merged"`` and ``"factored"`` forward paths (``lycoris_core.paths``; twin of ``lycoris_jax.paths``).

:func:`folded_forward` runs the layer once with ``W + Σ ΔW``. On an ``nn.Linear`` it is an
autograd function whose backward pass is the frozen layer's plus each adapter's factored
gradients (``lokr``/``loha.linear_grads``): neither ΔW nor its rank-r products are saved or formed
again. Convolutions form ΔW again in the backward pass (``torch.utils.checkpoint``).
:func:`factored_delta` is the ``"factored"`` branch of a Linear adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lycoris_torch import functional
from lycoris_torch.methods import method_for

__all__ = ["Fold", "factored_conv", "factored_delta", "folded_forward"]


@dataclass(frozen=True)
class Fold:
    """One adapter folded into the weight: ``factors`` (PEFT's names, an ordered mapping), ``scale``
    and the rank-dropout ``rows`` ``(out,)`` factors or ``None``."""

    names: tuple[str, ...]
    factors: tuple[torch.Tensor, ...]
    scale: float
    rows: torch.Tensor | None = None


def _fold_weight(
    weight: torch.Tensor,
    folds: Sequence[Fold],
    factors: Sequence[Sequence[torch.Tensor]],
    delta: Callable,
    dtype: torch.dtype,
) -> torch.Tensor:
    total = weight.to(dtype)
    for fold, values in zip(folds, factors, strict=True):
        d = delta(dict(zip(fold.names, values, strict=True)), fold.scale)
        if fold.rows is not None:
            d = (d * fold.rows.view(-1, *[1] * (d.dim() - 1))).to(d.dtype)
        total = total + d.to(dtype)
    return total


class _FoldedLinear(torch.autograd.Function):
    """``F.linear(x, W + Σ ΔW, b)`` with the frozen backward plus factored adapter gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, folds, peft_type, delta, dtype, *flat):  # type: ignore[no-untyped-def]
        factors = _split(folds, flat)
        with torch.no_grad():
            folded = _fold_weight(weight, folds, factors, delta, dtype)
            out = F.linear(x.to(dtype), folded, None if bias is None else bias.to(dtype))
        ctx.folds, ctx.peft_type, ctx.dtype, ctx.has_bias = folds, peft_type, dtype, bias is not None
        ctx.save_for_backward(x, weight, *flat)
        return out

    @staticmethod
    def backward(ctx, dy):  # type: ignore[no-untyped-def]
        x, weight, *flat = ctx.saved_tensors
        folds, grads_fn = ctx.folds, method_for(ctx.peft_type).linear_grads
        x2, dy2 = x.reshape(-1, x.shape[-1]).to(ctx.dtype), dy.reshape(-1, dy.shape[-1])
        dx = (dy2 @ weight.to(dy2.dtype)) if ctx.needs_input_grad[0] else None
        dweight = (dy2.T @ x2).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dflat: list[torch.Tensor | None] = []
        for fold, values in zip(folds, _split(folds, flat), strict=True):
            dyi = dy2 if fold.rows is None else (dy2 * fold.rows).to(dy2.dtype)
            dxi, dfactors = grads_fn(
                x2.to(values[0].dtype), dyi.to(values[0].dtype), dict(zip(fold.names, values, strict=True)), fold.scale
            )
            if dx is not None:
                dx = dx + dxi.to(dx.dtype)
            dflat += [dfactors[name] for name in fold.names]
        if dx is not None:
            dx = dx.reshape(x.shape).to(x.dtype)
        return (dx, dweight, dbias, None, None, None, None, *dflat)


def _split(folds: Sequence[Fold], flat: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    out, i = [], 0
    for fold in folds:
        out.append(tuple(flat[i : i + len(fold.names)]))
        i += len(fold.names)
    return out


def folded_forward(
    base_layer: nn.Module, x: torch.Tensor, folds: Sequence[Fold], delta: Callable, peft_type: str
) -> torch.Tensor:
    """``base_layer`` called once with ``W + Σ ΔW`` (``delta(factors, scale)`` in the weight's layout),
    in ``W``'s and the factors' promoted dtype, bias included."""
    weight, bias = base_layer.weight, base_layer.bias
    dtype = torch.promote_types(weight.dtype, folds[0].factors[0].dtype)
    flat = [t for fold in folds for t in fold.factors]
    if isinstance(base_layer, nn.Linear):
        return _FoldedLinear.apply(x, weight, bias, tuple(folds), peft_type, delta, dtype, *flat)

    def run(x: torch.Tensor, *flat: torch.Tensor) -> torch.Tensor:
        folded = _fold_weight(weight, folds, _split(folds, flat), delta, dtype)
        b = None if bias is None else bias.to(dtype)
        return functional.forward_with_weight(base_layer, x.to(dtype), folded, bias=b)

    if torch.is_grad_enabled() and any(t.requires_grad for t in flat):
        return checkpoint(run, x, *flat, use_reentrant=False)
    return run(x, *flat)


def factored_delta(
    peft_type: str, x: torch.Tensor, factors: dict[str, torch.Tensor], scale: float, out: int
) -> torch.Tensor:
    """A Linear adapter's branch ``x @ ΔWᵀ`` for ``x (..., in)`` without forming ΔW -> ``(..., out)``."""
    y = method_for(peft_type).linear_forward(x.reshape(-1, x.shape[-1]), factors, scale)
    return y.reshape(*x.shape[:-1], out)


def factored_conv(
    peft_type: str, base_layer: nn.Module, x: torch.Tensor, factors: dict[str, torch.Tensor], scale: float
) -> torch.Tensor:
    """A conv adapter's branch ``conv(x, ΔW)`` without forming ΔW, through the layer's own
    ``_conv_forward`` (padding mode, stride, dilation)."""
    conv = lambda x, w: base_layer._conv_forward(x, w, None)  # noqa: E731
    return method_for(peft_type).conv_forward(conv, x, factors, scale, tuple(base_layer.weight.shape))
