"""Small torch models and their Flax NNX mirrors (same attribute paths, so same PEFT keys)."""

from __future__ import annotations

import jax
import numpy as np
import torch
from flax import nnx
from torch import nn

from parity_tests.layouts import channels_last, load_torch_state_into_nnx


class TorchMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(12, 24), nn.Linear(24, 16, bias=False)])
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([nnx.Linear(12, 24, rngs=rngs), nnx.Linear(24, 16, use_bias=False, rngs=rngs)])
        self.head = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = jax.numpy.tanh(layer(x))
        return self.head(x)


class TorchConv(nn.Module):
    """``c1`` Conv1d k=3 (pad 1), ``c1p`` Conv1d k=1, ``c2`` Conv2d 3x3, ``c2g`` grouped 3x5 (groups=3);
    returns per-channel sums ``(N, 6 + 24)``, so a permutation of output channels is visible."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(6, 12, 3, padding=1)
        self.c1p = nn.Conv1d(12, 6, 1)
        self.c2 = nn.Conv2d(6, 12, 3, padding=1)
        self.c2g = nn.Conv2d(12, 24, (3, 5), padding=(1, 2), groups=3)

    def forward(self, seq, img):
        a = self.c1p(torch.relu(self.c1(seq)))
        b = self.c2g(torch.relu(self.c2(img)))
        return torch.cat([a.sum(2), b.sum((2, 3))], 1)


class NnxConv(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.c1 = nnx.Conv(6, 12, (3,), padding=((1, 1),), rngs=rngs)
        self.c1p = nnx.Conv(12, 6, (1,), padding="VALID", rngs=rngs)
        self.c2 = nnx.Conv(6, 12, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.c2g = nnx.Conv(12, 24, (3, 5), padding=((1, 1), (2, 2)), feature_group_count=3, rngs=rngs)

    def __call__(self, seq, img):
        a = self.c1p(jax.nn.relu(self.c1(seq)))
        b = self.c2g(jax.nn.relu(self.c2(img)))
        return jax.numpy.concatenate([a.sum(1), b.sum((1, 2))], -1)


def pair(kind: str, seed: int = 0):
    """``(torch_model, nnx_model)`` with identical base weights."""
    torch.manual_seed(seed)
    t = TorchMLP() if kind == "mlp" else TorchConv()
    n = NnxMLP(nnx.Rngs(seed)) if kind == "mlp" else NnxConv(nnx.Rngs(seed))
    load_torch_state_into_nnx(n, t.state_dict())
    return t, n


def inputs(kind: str, seed: int = 0, dtype=np.float32):
    """``(torch inputs, jax inputs)`` drawn once in numpy."""
    rng = np.random.default_rng(seed)
    if kind == "mlp":
        xs = (rng.standard_normal((4, 12)).astype(dtype),)
    else:
        xs = (rng.standard_normal((2, 6, 9)).astype(dtype), rng.standard_normal((2, 6, 7, 8)).astype(dtype))
    return tuple(torch.from_numpy(x) for x in xs), tuple(jax.numpy.asarray(channels_last(x)) for x in xs)


# Wider mirrors for the PEFT oracle: channels large enough that LoKr at r=2 really decomposes w2 (and,
# with decompose_both, w1), and forwards that return every conv activation instead of their means.
class TorchMLPWide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(24, 48), nn.Linear(48, 36, bias=False)])
        self.head = nn.Linear(36, 8)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


class NnxMLPWide(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([nnx.Linear(24, 48, rngs=rngs), nnx.Linear(48, 36, use_bias=False, rngs=rngs)])
        self.head = nnx.Linear(36, 8, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = jax.numpy.tanh(layer(x))
        return self.head(x)


class TorchConvWide(nn.Module):
    """As :class:`TorchConv` with 24/48/96 channels; returns ``(c1p(...), c2g(...))`` (NC...)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(24, 48, 3, padding=1)
        self.c1p = nn.Conv1d(48, 24, 1)
        self.c2 = nn.Conv2d(24, 48, 3, padding=1)
        self.c2g = nn.Conv2d(48, 96, (3, 5), padding=(1, 2), groups=3)

    def forward(self, seq, img):
        return self.c1p(torch.relu(self.c1(seq))), self.c2g(torch.relu(self.c2(img)))


class NnxConvWide(nnx.Module):
    """Mirror of :class:`TorchConvWide` (channels-last activations)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.c1 = nnx.Conv(24, 48, (3,), padding=((1, 1),), rngs=rngs)
        self.c1p = nnx.Conv(48, 24, (1,), padding="VALID", rngs=rngs)
        self.c2 = nnx.Conv(24, 48, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.c2g = nnx.Conv(48, 96, (3, 5), padding=((1, 1), (2, 2)), feature_group_count=3, rngs=rngs)

    def __call__(self, seq, img):
        return self.c1p(jax.nn.relu(self.c1(seq))), self.c2g(jax.nn.relu(self.c2(img)))
