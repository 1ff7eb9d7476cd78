"""Real transformers architectures, both directions, beyond Llama (``tests/jax/test_pytree.py`` and
``test_linen.py``): BERT, ViT (its patch embedding is a Conv2d target) and Gemma (embeddings tied
to the output), with tiny configs and random weights copied torch -> Flax by transformers' own
``convert_pytorch_state_dict_to_flax``.

(a) An adapter made by real PEFT on the torch model loads through the pytree API (merged params)
and through the Linen transform (unmerged forward) with outputs equal to PEFT's; (b) one made by
the pytree API and trained a few optax steps under ``jax.jit`` loads in PEFT and in
``lycoris_torch`` with equal outputs. fp32, 1e-5 abs on
outputs of magnitude ~1-10.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers as tf
from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

import lycoris_jax as lj
import lycoris_torch as lt
from lycoris_jax import linen, pytree

ATOL = 1e-5
RNG = np.random.default_rng(0)
IDS = RNG.integers(0, 64, (2, 12))
PIXELS = RNG.standard_normal((2, 3, 16, 16)).astype(np.float32)


@dataclasses.dataclass
class Arch:
    name: str
    torch_cls: Any
    flax_cls: Any
    config: Any
    targets: list[str]
    torch_inputs: dict
    flax_call: Callable[[Any, Any], Any]  # (flax model, params) -> output
    module_args: Callable[[Any], tuple]  # config -> positional args of model.module
    output: Callable[[Any], Any]  # model output -> the array compared


ARCHS = {
    "bert": Arch(
        "bert",
        tf.BertModel,
        tf.FlaxBertModel,
        tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
        ["query", "value", "dense"],
        {"input_ids": torch.from_numpy(IDS)},
        lambda m, p: m(jnp.asarray(IDS), params=p),
        lambda c: (
            jnp.asarray(IDS),
            jnp.ones(IDS.shape, jnp.int32),
            jnp.zeros(IDS.shape, jnp.int32),
            jnp.broadcast_to(jnp.arange(IDS.shape[1]), IDS.shape),
            jnp.ones((c.num_hidden_layers, c.num_attention_heads), jnp.int32),
        ),
        lambda out: out.last_hidden_state,
    ),
    "vit": Arch(
        "vit",
        tf.ViTModel,
        tf.FlaxViTModel,
        tf.ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        ),
        ["projection", "query", "value"],
        {"pixel_values": torch.from_numpy(PIXELS)},
        lambda m, p: m(jnp.asarray(PIXELS), params=p),
        lambda c: (jnp.transpose(jnp.asarray(PIXELS), (0, 2, 3, 1)),),
        lambda out: out.last_hidden_state,
    ),
    "gemma": Arch(
        "gemma",
        tf.GemmaForCausalLM,
        tf.FlaxGemmaForCausalLM,
        tf.GemmaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
        ),
        ["q_proj", "v_proj", "gate_proj", "down_proj"],
        {"input_ids": torch.from_numpy(IDS)},
        lambda m, p: m(jnp.asarray(IDS), params=p),
        lambda c: (
            jnp.asarray(IDS),
            jnp.ones(IDS.shape, jnp.int32),
            jnp.broadcast_to(jnp.arange(IDS.shape[1]), IDS.shape),
        ),
        lambda out: out.logits,
    ),
}


@functools.cache
def build(name: str):
    """``(torch model factory, flax model, params, jitted flax output(params))`` with equal weights."""
    arch = ARCHS[name]
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in arch.torch_cls(arch.config).state_dict().items()}
    flax_model = arch.flax_cls(arch.config, seed=0)
    params = convert_pytorch_state_dict_to_flax({k: v.clone() for k, v in state.items()}, flax_model)

    def torch_model():
        model = arch.torch_cls(arch.config).eval()
        model.load_state_dict(state)
        return model

    run = jax.jit(lambda p: arch.output(arch.flax_call(flax_model, p)))
    return torch_model, flax_model, params, run


def torch_output(arch: Arch, model) -> np.ndarray:
    with torch.no_grad():
        return arch.output(model(**arch.torch_inputs)).numpy()


@pytest.mark.parametrize("name", list(ARCHS))
def test_the_twins_agree_before_any_adapter(name):
    torch_model, _, params, run = build(name)
    np.testing.assert_allclose(np.asarray(run(params)), torch_output(ARCHS[name], torch_model()), atol=2e-6)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_peft_adapter_loads_through_pytree_and_linen(tmp_path, name, kind):
    arch = ARCHS[name]
    torch_model, flax_model, params, run = build(name)
    cfg = (peft.LoKrConfig if kind == "lokr" else peft.LoHaConfig)(
        r=2, alpha=4, target_modules=arch.targets, init_weights=False
    )
    torch.manual_seed(1)
    theirs = peft.get_peft_model(torch_model(), cfg).eval()
    expected = torch_output(arch, theirs)
    theirs.save_pretrained(tmp_path)
    adapter = pytree.from_pretrained(tmp_path, params)
    assert np.abs(np.asarray(run(pytree.merge(params, adapter))) - expected).max() <= ATOL
    adapted, lycoris = linen.from_pretrained(tmp_path, flax_model.module, params)
    unmerged = arch.output(adapted.apply({"params": params, "lycoris": lycoris}, *arch.module_args(arch.config)))
    assert np.abs(np.asarray(unmerged) - expected).max() <= ATOL


@pytest.mark.parametrize("kind", ["lokr", "loha"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_pytree_adapter_loads_in_peft_and_lycoris_torch(tmp_path, name, kind):
    arch = ARCHS[name]
    torch_model, _, params, run = build(name)
    cfg = (lj.LoKrConfig if kind == "lokr" else lj.LoHaConfig)(
        r=2, alpha=4, target_modules=arch.targets, init_weights=False
    )
    adapter = pytree.init(params, cfg, key=jax.random.key(0))
    tx = optax.adam(1e-2)

    @jax.jit
    def step(a, state):  # a few optax steps under jax.jit, on a stand-in loss
        grads = jax.grad(lambda a: (run(pytree.merge(params, a)) ** 2).mean())(a)
        updates, state = tx.update(grads, state, a)
        return optax.apply_updates(a, updates), state

    state = tx.init(adapter)
    for _ in range(3):
        adapter, state = step(adapter, state)
    pytree.save_pretrained(adapter, tmp_path)
    expected = np.asarray(run(pytree.merge(params, adapter)))
    assert (
        np.abs(torch_output(arch, peft.PeftModel.from_pretrained(torch_model(), tmp_path).eval()) - expected).max()
        <= ATOL
    )
    assert np.abs(torch_output(arch, lt.LycorisTuner.from_pretrained(torch_model(), tmp_path)) - expected).max() <= ATOL


def test_vit_patch_embedding_is_a_conv2d_target():
    _, _, params, _ = build("vit")
    adapter = pytree.init(params, lj.LoKrConfig(r=2, target_modules=["projection"]), key=jax.random.key(0))
    assert adapter.plans["embeddings.patch_embeddings.projection"].layer.kind == "conv2d"
