"""Operations shared by every LyCORIS layer: rank dropout, and running a base layer with a new weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["apply_rank_dropout", "forward_with_weight", "rank_dropout_keep"]


def rank_dropout_keep(num_rows: int, p: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean keep-mask over the ``num_rows`` output rows: ``rand(num_rows) > p``.

    With ``generator=None`` it draws from torch's global CPU generator, as PEFT does, so a seeded
    run reproduces PEFT's masks.
    """
    return torch.rand(num_rows, generator=generator) > p


def apply_rank_dropout(
    weight: torch.Tensor, keep: torch.Tensor, *, rescale: bool, mask_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Zero the dropped output rows of ``weight`` ``(out, ...)``; ``keep`` is ``(out,)`` bool or float.

    The mask is built in ``mask_dtype`` (default: ``weight``'s; PEFT's LoKr uses float32). With
    ``rescale`` the kept rows are divided by the kept fraction ``mean(keep)`` (PEFT's empirical
    rescale). When every row is dropped the result is all zeros: PEFT divides by zero there and
    returns NaN (docs/DEVIATIONS.md). The result keeps ``weight``'s dtype.
    """
    mask = keep.to(device=weight.device, dtype=mask_dtype or weight.dtype)
    if rescale:
        # An all-zero mask stays all zero instead of 0/0 = NaN.
        mask = mask / mask.mean().clamp_min(torch.finfo(mask.dtype).tiny)
    return (weight * mask.view(-1, *[1] * (weight.dim() - 1))).to(weight.dtype)


def forward_with_weight(
    base_layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The base layer's own operation with ``weight`` in place of its weight, and ``bias`` (default none).

    Convolutions go through the layer's ``_conv_forward``, so stride, padding (incl. string
    paddings), dilation, groups and ``padding_mode`` all match the base layer: the unmerged
    output equals the merged output for every padding mode.
    """
    if isinstance(base_layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(base_layer, (nn.Conv1d, nn.Conv2d)):
        return base_layer._conv_forward(x, weight, bias)
    raise TypeError(f"forward_with_weight: unsupported layer type {type(base_layer).__name__}")
