"""A tiny transformers Llama in both frameworks with the same weights (shared by the pytree and Linen tests)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import FlaxLlamaForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

LOGITS_ATOL = 1e-5
CONFIG = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
IDS = np.random.default_rng(0).integers(0, 64, (2, 16))
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


@functools.cache
def build_llama():
    """``(torch model factory, flax model, flax params, jitted logits(params))`` with equal weights."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(CONFIG).eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    flax_model = FlaxLlamaForCausalLM(CONFIG, seed=0)
    params = convert_pytorch_state_dict_to_flax({k: v.clone() for k, v in state.items()}, flax_model)  # it mutates

    def torch_model():
        model = LlamaForCausalLM(CONFIG).eval()
        model.load_state_dict(state)
        return model

    logits = jax.jit(lambda p: flax_model(jnp.asarray(IDS), params=p).logits)
    np.testing.assert_allclose(np.asarray(logits(params)), torch_logits(torch_model()), atol=1e-6)
    return torch_model, flax_model, params, logits


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(IDS)).logits.numpy()
