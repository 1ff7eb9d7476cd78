"""``nnx.LinearGeneral`` (``nnx.MultiHeadAttention``'s q/k/v/out) and ``nnx.Einsum`` in the NNX tuner,
both ways against real PEFT on a torch twin built from ``nn.Linear``.

The file contract: such a kernel is the ``nn.Linear`` it equals, its input axes and its output axes
each flattened in C order (query ``(in, H, Dh)`` is ``nn.Linear(in, H*Dh)``, out ``(H, Dh, out)`` is
``nn.Linear(H*Dh, out)``, the Einsum kernel ``"ndh"`` of ``"btd,ndh->btnh"`` is ``nn.Linear(d, n*h)``).
The torch twin's base weights are set through that contract, and the two base models agree before
any adapter, which checks the contract independently of the adapters.
"""

from __future__ import annotations

import math
import warnings

import jax
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from torch import nn

import lycoris_jax as lj
import lycoris_torch as lt
from lycoris_jax.layer import kernel_layout_of

D, H, DH, N, HH = 16, 2, 4, 3, 2
TARGETS = ["attn.query", "attn.key", "attn.value", "attn.out", "einsum"]
X = np.random.default_rng(0).standard_normal((2, 5, D)).astype(np.float32)
ATOL = 1e-5


class NnxAttn(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.attn = nnx.MultiHeadAttention(H, D, qkv_features=H * DH, out_features=D, decode=False, rngs=rngs)
        self.einsum = nnx.Einsum("btd,ndh->btnh", (N, D, HH), (N, HH), rngs=rngs)

    def __call__(self, x):
        e = self.einsum(x)
        return jax.numpy.concatenate([self.attn(x), e.reshape(*e.shape[:2], -1)], -1)  # every output feature


class TorchAttn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attn, name, nn.Linear(D, H * DH))
        self.attn.out = nn.Linear(H * DH, D)
        self.einsum = nn.Linear(D, N * HH)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (getattr(self.attn, n)(x).view(b, t, H, DH) for n in ("query", "key", "value"))
        weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q / math.sqrt(DH), k), dim=-1)
        out = self.attn.out(torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, H * DH))
        return torch.cat([out, self.einsum(x)], -1)


def pair(seed: int = 0):
    """``(torch twin, nnx model)`` with the same base weights, set through the file contract."""
    torch.manual_seed(seed)
    t = TorchAttn()
    n = NnxAttn(nnx.Rngs(seed))
    for name in TARGETS:
        tm = t.get_submodule(name)
        nm = n.attn if name.startswith("attn") else n
        nm = getattr(nm, name.split(".")[-1])
        nm.kernel[...] = kernel_layout_of(nm).to_kernel(jax.numpy.asarray(tm.weight.detach().numpy()))
        nm.bias[...] = jax.numpy.asarray(tm.bias.detach().numpy()).reshape(nm.bias.shape)
    return t, n


def t_out(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(X)).numpy()


def test_the_twins_agree_before_any_adapter():
    t, n = pair()
    np.testing.assert_allclose(np.asarray(n(X)), t_out(t), atol=1e-6)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_peft_adapter_on_the_linear_twin_loads_onto_linear_general_and_einsum(tmp_path, kind):
    t, n = pair()
    cfg = (peft.LoKrConfig if kind == "lokr" else peft.LoHaConfig)(
        r=2, alpha=4, target_modules=TARGETS, init_weights=False
    )
    torch.manual_seed(1)
    theirs = peft.get_peft_model(t, cfg).eval()
    expected = t_out(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lj.LycorisTuner.from_pretrained(n, tmp_path)
    assert {type(ours.model.attn.query).__name__, type(ours.model.einsum).__name__} == {
        f"{kind[:2].title()}{kind[2:].title()}Layer"
    }
    assert np.abs(np.asarray(ours(X)) - expected).max() <= ATOL
    ours.merge_adapter()
    assert np.abs(np.asarray(ours(X)) - expected).max() <= ATOL


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_nnx_adapter_loads_in_peft_and_lycoris_torch(tmp_path, kind):
    t, n = pair()
    cfg = (lj.LoKrConfig if kind == "lokr" else lj.LoHaConfig)(r=2, alpha=4, target_modules=TARGETS, init_weights=False)
    ours = (lj.LoKrModel if kind == "lokr" else lj.LoHaModel)(n, cfg, rngs=nnx.Rngs(3))
    expected = np.asarray(ours(X))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(t, tmp_path).eval()
    assert np.abs(t_out(theirs) - expected).max() <= ATOL
    twin = lt.LycorisTuner.from_pretrained(pair()[0], tmp_path)
    assert np.abs(t_out(twin) - expected).max() <= ATOL


class Odd(nnx.Module):
    """Linear-looking layers we cannot adapt: a batched LinearGeneral and a custom module with a kernel."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.dense = nnx.Linear(4, 4, rngs=rngs)
        self.batched = nnx.LinearGeneral((4,), (2,), axis=-1, batch_axis={0: 3}, rngs=rngs)

        class Custom(nnx.Module):
            def __init__(self) -> None:
                self.kernel = nnx.Param(jax.numpy.ones((4, 4)))

        self.custom = Custom()


def test_all_linear_includes_them_and_warns_about_what_it_cannot_adapt():
    _, n = pair()
    tuner = lj.LoHaModel(n, lj.LoHaConfig(r=2, target_modules="all-linear"))
    assert sorted(name for name, _ in tuner._lycoris_layers()) == sorted(TARGETS)
    with pytest.warns(
        UserWarning,
        match=r"all-linear' leaves out: batched: batch_axis \{0: 3\} is not supported; custom: a Custom holds a kernel",
    ):
        odd = lj.LoKrModel(Odd(nnx.Rngs(0)), lj.LoKrConfig(r=2, target_modules="all-linear"))
    assert [name for name, _ in odd._lycoris_layers()] == ["dense"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lj.LoKrModel(Odd(nnx.Rngs(0)), lj.LoKrConfig(r=2, target_modules=["dense"]))  # no all-linear: no warning


def test_unsupported_einsum_and_linear_general_are_clear_errors():
    class Bad(nnx.Module):
        def __init__(self, rngs):
            self.shared = nnx.Einsum("bd,bdh->bh", (2, 4, 3), rngs=rngs)

    with pytest.raises(TypeError, match="shared: the kernel 'bdh' of 'bd,bdh->bh' is not a linear map"):
        lj.LoKrModel(Bad(nnx.Rngs(0)), lj.LoKrConfig(r=2, target_modules=["shared"]))
    with pytest.raises(TypeError, match=r"batched: batch_axis \{0: 3\} is not supported"):
        lj.LoKrModel(Odd(nnx.Rngs(0)), lj.LoKrConfig(r=2, target_modules=["batched"]))
