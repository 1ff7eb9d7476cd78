"""A torch model with every layer type LyCORIS adapts (Linear, Conv1d k=3 and k=1, Conv2d, grouped
Conv2d), its NNX mirror with the same weights, and lycoris-lora networks made on it."""

from __future__ import annotations

import copy
import logging

import jax
import numpy as np
import torch
from flax import nnx

from parity_tests.layouts import channels_last, load_torch_state_into_nnx
from tests.jax.mirrors import NnxConv, NnxMLP, TorchConv, TorchMLP

lycoris = __import__("pytest").importorskip("lycoris", reason="lycoris-lora is a test dependency")
from lycoris import LycorisNetwork, create_lycoris  # noqa: E402
from lycoris.logging import logger  # noqa: E402

logger.setLevel(logging.ERROR)

#: (id, algo, create_lycoris kwargs, modules left out). lycoris-lora gives a Conv1d a full 3-D
#: lokr_w2 when r >= max(b, d)/2, which no PEFT LoKr reproduces (docs/DEVIATIONS.md, d).
CONV1D = ["conv.c1", "conv.c1p"]
CASES = [
    ("loha", "loha", {"linear_dim": 4, "linear_alpha": 2.0}, []),
    ("loha-tucker", "loha", {"linear_dim": 4, "linear_alpha": 2.0, "use_tucker": True}, []),
    ("lokr", "lokr", {"linear_dim": 4, "linear_alpha": 2.0}, CONV1D),
    ("lokr-r1", "lokr", {"linear_dim": 1, "linear_alpha": 2.0, "conv_dim": 1, "conv_alpha": 0.5}, []),
    ("lokr-both", "lokr", {"linear_dim": 2, "linear_alpha": 3.0, "decompose_both": True}, CONV1D),
    ("lokr-tucker", "lokr", {"linear_dim": 1, "linear_alpha": 2.0, "use_tucker": True}, []),
    ("lokr-full", "lokr", {"linear_dim": 4, "linear_alpha": 2.0, "full_matrix": True}, CONV1D),
    ("lokr-factor", "lokr", {"linear_dim": 1, "linear_alpha": 2.0, "factor": 2}, []),
]
LAYERS = {"mlp.layers.0": "Linear", "mlp.head": "Linear", "conv.c1": "Conv1d k=3", "conv.c1p": "Conv1d k=1"}
LAYERS |= {"conv.c2": "Conv2d 3x3", "conv.c2g": "Conv2d 3x5 groups=3", "mlp.layers.1": "Linear"}


class TorchModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp, self.conv = TorchMLP(), TorchConv()

    def forward(self, x, seq, img):
        return torch.cat([self.mlp(x), self.conv(seq, img)], -1)  # every head row and conv channel


class NnxModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.mlp, self.conv = NnxMLP(rngs), NnxConv(rngs)

    def __call__(self, x, seq, img):
        return jax.numpy.concatenate([self.mlp(x), self.conv(seq, img)], -1)


_rng = np.random.default_rng(0)
_X = (_rng.standard_normal((2, 12)), _rng.standard_normal((2, 6, 9)), _rng.standard_normal((2, 6, 7, 8)))
X_TORCH = tuple(torch.tensor(x, dtype=torch.float32) for x in _X)
X_JAX = tuple(jax.numpy.asarray(x if x.ndim == 2 else channels_last(x), jax.numpy.float32) for x in _X)


def torch_model() -> TorchModel:
    torch.manual_seed(0)
    return TorchModel().eval()


def nnx_model() -> NnxModel:
    model = NnxModel(nnx.Rngs(0))
    load_torch_state_into_nnx(model, torch_model().state_dict())
    return model


def run_torch(model) -> np.ndarray:
    with torch.no_grad():
        return model(*X_TORCH).numpy()


def run_nnx(model) -> np.ndarray:
    return np.asarray(model(*X_JAX))


def network(model, algo: str, kwargs: dict, exclude: list[str], seed: int = 1):
    """A lycoris-lora network on ``model`` (applied), every factor drawn N(0, 0.3²)."""
    previous = LycorisNetwork.TARGET_EXCLUDE_NAME
    LycorisNetwork.apply_preset({"exclude_name": list(exclude)})
    try:
        net = create_lycoris(model, 1.0, algo=algo, **copy.deepcopy(kwargs))
    finally:
        LycorisNetwork.TARGET_EXCLUDE_NAME = previous
    net.apply_to()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return net
