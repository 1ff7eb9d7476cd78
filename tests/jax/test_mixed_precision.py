"""Mixed precision: ``branch_dtype="base"`` runs the adapter branch in the base layer's compute dtype
(bfloat16) from float32 factors, as TPU training does; the default stays PEFT's arithmetic.

Tolerances: the default mode equals PEFT on the bf16 torch model as the parity matrix does (bf16
base outputs: 1 bf16 ulp of the output magnitude, 2**-7 relative); ``"base"`` rounds ΔW and the
branch input to bf16 once more, so it is held to 2**-6 relative to PEFT, and equals, bit for bit,
the branch written out by hand in bf16.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

import lycoris_jax as lj
from lycoris_jax import linen

IN, OUT = 64, 48
X = np.random.default_rng(0).standard_normal((4, IN)).astype(np.float32)
BF16_ULP = 2.0**-7


class TorchTwin(torch.nn.Module):
    """``layers.0``, as ``nnx.Sequential`` names its layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(torch.nn.Linear(IN, OUT))

    def forward(self, x):
        return self.layers(x)


def torch_layer() -> TorchTwin:
    return TorchTwin().to(torch.bfloat16).eval()


def nnx_layer() -> nnx.Sequential:
    t = torch_layer().layers[0]
    layer = nnx.Linear(IN, OUT, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.asarray(t.weight.detach().float().numpy().T, jnp.bfloat16)
    layer.bias[...] = jnp.asarray(t.bias.detach().float().numpy(), jnp.bfloat16)
    return nnx.Sequential(layer)


def config(kind: str, torch_side: bool = False):
    kw = dict(r=4, alpha=8, target_modules=["layers.0"], init_weights=False)
    return ((peft.LoKrConfig if kind == "lokr" else peft.LoHaConfig) if torch_side else
            (lj.LoKrConfig if kind == "lokr" else lj.LoHaConfig))(**kw)  # fmt: skip


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_base_compute_dtype_against_peft_and_by_hand(tmp_path, kind):
    theirs = peft.get_peft_model(torch_layer(), config(kind, torch_side=True)).eval()
    theirs.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(X).to(torch.bfloat16)).float().numpy()
    x = jnp.asarray(X, jnp.bfloat16)
    peft_mode = lj.LycorisTuner.from_pretrained(nnx_layer(), tmp_path)
    mixed = lj.LycorisTuner.from_pretrained(nnx_layer(), tmp_path, branch_dtype="base", forward_path="peft")
    layer = mixed.model.layers[0]
    assert {v.dtype for v in layer.factors["default"].values()} == {jnp.dtype(jnp.float32)}  # PEFT's autocast

    assert relative(peft_mode(x), expected) <= BF16_ULP
    assert relative(mixed(x), expected) <= 2 * BF16_ULP
    # by hand: base in bf16, plus x @ bf16(ΔW)ᵀ in bf16, with PEFT's ΔW (not the layer's own)
    peft_delta = theirs.base_model.model.layers[0].get_delta_weight("default").detach().numpy()
    delta = jnp.asarray(peft_delta).astype(jnp.bfloat16)
    by_hand = (layer.base_layer(x) + x @ delta.T).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(mixed(x), np.float32), np.asarray(by_hand, np.float32))
    # the branch matmul (activation-sized output) is bf16, like the base's; ΔW's factors are f32
    jaxpr = str(jax.make_jaxpr(lambda t, x: t(x))(mixed, x))
    outputs = [line.split("=")[0] for line in jaxpr.splitlines() if "dot_general" in line]
    activations = [o for o in outputs if f"[4,{OUT}]" in o]
    assert len(activations) == 2 and all("bf16[" in o for o in activations), outputs
    # factor gradients stay float32 and agree with the PEFT mode's
    grads = {}
    for name, tuner in (("peft", peft_mode), ("base", mixed)):
        _, grads[name] = nnx.value_and_grad(
            lambda t: t(x).astype(jnp.float32).sum(), argnums=nnx.DiffState(0, lj.LycorisParam)
        )(tuner)
    for a, b in zip(jax.tree.leaves(grads["peft"]), jax.tree.leaves(grads["base"]), strict=True):
        assert b.dtype == jnp.float32 and relative(b, a) <= 4 * BF16_ULP
    # the faster paths in bf16: same tolerance against PEFT, every activation-sized matmul in bf16
    for path in ("merged", "factored"):
        fast = lj.LycorisTuner.from_pretrained(nnx_layer(), tmp_path, branch_dtype="base", forward_path=path)
        assert relative(fast(x), expected) <= 2 * BF16_ULP, path
        jaxpr = str(jax.make_jaxpr(lambda t, x: t(x))(fast, x))
        outputs = [line.split("=")[0] for line in jaxpr.splitlines() if "dot_general" in line]
        assert all("bf16[" in o for o in outputs if f"[4,{OUT}]" in o), (path, outputs)


def test_linen_branch_dtype_base_and_bad_values():
    model = nn.Sequential([nn.Dense(OUT, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)])
    x = jnp.asarray(X, jnp.bfloat16)
    params = model.init(jax.random.key(0), x)["params"]
    cfg = lj.LoKrConfig(r=4, alpha=8, target_modules=["layers_0"], init_weights=False)
    adapted, lycoris = linen.adapt(model, params, cfg, key=jax.random.key(1))
    mixed = adapted.clone(branch_dtype="base")
    out = mixed.apply({"params": params, "lycoris": lycoris}, x)
    reference = adapted.apply({"params": params, "lycoris": lycoris}, x)
    assert out.dtype == jnp.bfloat16 and relative(out, reference) <= 2 * BF16_ULP
    with pytest.raises(ValueError, match=r"branch_dtype: expected one of \['adapter', 'base'\], got 'bf16'"):
        adapted.clone(branch_dtype="bf16").apply({"params": params, "lycoris": lycoris}, x)
    with pytest.raises(ValueError, match=r"branch_dtype: expected one of"):
        lj.LoKrModel(nnx_layer(), config("lokr"), branch_dtype="half")
