"""A tiny diffusers ``FlaxUNet2DConditionModel`` and its torch twin (convolutions, attention, a
renamed module tree), both ways against real PEFT, through the pytree API and the Linen transform.

diffusers names Flax modules ``down_blocks_0`` where torch has ``down_blocks.0``; ``rename`` maps one
to the other (diffusers' own rule), so PEFT's keys land on the right kernels. The base models
already differ by ~6e-5 (XLA vs oneDNN convolutions), hence 2e-4 abs on outputs of magnitude ~1.
Slow-marked (diffusers' converter initialises the Flax UNet, ~30 s on 2 cores); it runs in CI.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import lycoris_jax as lj
import lycoris_torch as lt
from lycoris_jax import linen, pytree

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.slow

ATOL = 2e-4
CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
)
TARGETS = ["conv_in", "conv1", "to_q", "to_v"]
RNG = np.random.default_rng(0)
SAMPLE = RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)
STEPS = np.array([10])
CONTEXT = RNG.standard_normal((1, 3, 32)).astype(np.float32)


def flax_inputs():
    """The inputs as JAX arrays (diffusers wraps a NumPy timestep array in another axis)."""
    return jnp.asarray(SAMPLE), jnp.asarray(STEPS), jnp.asarray(CONTEXT)


def flax_name(torch_name: str) -> str:
    """diffusers' ``rename_key``: ``down_blocks.0`` -> ``down_blocks_0``."""
    for pattern in re.findall(r"\w+[.]\d+", torch_name):
        torch_name = torch_name.replace(pattern, "_".join(pattern.split(".")))
    return torch_name


@functools.cache
def build():
    from diffusers import FlaxUNet2DConditionModel, UNet2DConditionModel
    from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    torch.manual_seed(0)
    state = {k: v.clone() for k, v in UNet2DConditionModel(**CONFIG).state_dict().items()}
    flax_model = FlaxUNet2DConditionModel(**CONFIG)
    params = convert_pytorch_state_dict_to_flax({k: v.clone() for k, v in state.items()}, flax_model)

    def torch_model():
        model = UNet2DConditionModel(**CONFIG).eval()
        model.load_state_dict(state)
        return model

    rename = {flax_name(n): n for n, _ in torch_model().named_modules()}
    run = jax.jit(lambda p: flax_model.apply({"params": p}, *flax_inputs()).sample)
    return torch_model, flax_model, params, run, rename


def torch_out(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(SAMPLE), torch.from_numpy(STEPS), torch.from_numpy(CONTEXT)).sample.numpy()


def test_the_twins_agree_before_any_adapter():
    torch_model, _, params, run, _ = build()
    assert np.abs(np.asarray(run(params)) - torch_out(torch_model())).max() <= ATOL


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_unet_adapters_both_ways(tmp_path, kind):
    torch_model, flax_model, params, run, rename = build()
    cfg = dict(r=2, alpha=4, target_modules=TARGETS, init_weights=False)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(torch_model(), (peft.LoKrConfig if kind == "lokr" else peft.LoHaConfig)(**cfg)).eval()
    expected = torch_out(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    adapter = pytree.from_pretrained(tmp_path / "peft", params, rename=rename)
    assert any(t.plan.layer.kind == "conv2d" for _, t in adapter.targets)
    assert adapter.plans.keys() == {n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "base_layer")}
    assert np.abs(np.asarray(run(pytree.merge(params, adapter))) - expected).max() <= ATOL
    adapted, lycoris = linen.from_pretrained(tmp_path / "peft", flax_model, params, rename=rename)
    unmerged = adapted.apply({"params": params, "lycoris": lycoris}, *flax_inputs()).sample
    assert np.abs(np.asarray(unmerged) - expected).max() <= ATOL

    ours = pytree.init(
        params, (lj.LoKrConfig if kind == "lokr" else lj.LoHaConfig)(**cfg), key=jax.random.key(0), rename=rename
    )
    pytree.save_pretrained(ours, tmp_path / "ours")
    mine = np.asarray(run(pytree.merge(params, ours)))
    assert (
        np.abs(torch_out(peft.PeftModel.from_pretrained(torch_model(), tmp_path / "ours").eval()) - mine).max() <= ATOL
    )
    assert np.abs(torch_out(lt.LycorisTuner.from_pretrained(torch_model(), tmp_path / "ours")) - mine).max() <= ATOL
