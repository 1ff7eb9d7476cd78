"""Small torch models shared by the torch-twin tests."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.v(torch.relu(self.q(x))))


class Net(nn.Module):
    """``layers.{0,1}.{q,v}`` (Linear), ``conv`` (Conv2d 3x3), ``conv1`` (Conv1d k=3), ``head``; returns the
    head's outputs and each conv's per-channel sums ``(N, 4 + 8 + 6)``: every output row and channel shows."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(dim) for _ in range(2)])
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.conv1 = nn.Conv1d(4, 6, 3, padding=1)
        self.head = nn.Linear(dim, 4)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, img: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        y = self.head(self.norm(x))
        return torch.cat([y, self.conv(img).sum((2, 3)), self.conv1(seq).sum(2)], -1)


def inputs(seed: int = 0, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 16, generator=g),
        torch.randn(batch, 4, 6, 6, generator=g),
        torch.randn(batch, 4, 10, generator=g),
    )


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, bool]]:
    """Everything a failed operation must leave unchanged: tensors, module types, requires_grad."""
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {k: type(m).__name__ for k, m in model.named_modules()},
        {k: p.requires_grad for k, p in model.named_parameters()},
    )


def assert_unchanged(model: nn.Module, snap) -> None:
    tensors, types, grads = snapshot(model)
    assert types == snap[1]
    assert grads == snap[2]
    assert tensors.keys() == snap[0].keys()
    for k in tensors:
        assert torch.allclose(tensors[k], snap[0][k], rtol=0, atol=0, equal_nan=True), k
