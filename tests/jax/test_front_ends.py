"""What every JAX front end must do alike: one target resolver, one adapted call.

- ``"all-linear"`` selects the same modules in the NNX tuner, the pytree API, the Linen transform and
  the torch twin, leaving out the output layer as PEFT does, and a saved config names the modules
  adapted, so PEFT loads every factor (it re-resolves ``"all-linear"`` on its own model otherwise);
- every forward path returns the base layer's own output dtype, at any token count, inside
  ``nn.scan`` too;
- a targeted layer a front end cannot adapt is an error naming it and its class (never a layer that
  silently runs without its adapter); ``kinds`` declares a torch-layout kernel (GPT-2's ``FlaxConv1D``);
- kernels a traced call never reads are left out, with a warning;
- an NNX model wrapping Linen modules says so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

import lycoris_jax as lj
import lycoris_torch as lt
from lycoris_jax import linen, pytree
from tests.jax.llama import IDS, LOGITS_ATOL, build_llama, torch_logits


@pytest.fixture(scope="module")
def llama():
    return build_llama()


def _linen_args(ids):
    ids = jnp.asarray(ids)
    return ids, jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)


# ---------------------------------------------------------------------------------------------- all-linear
def test_all_linear_selects_the_same_modules_in_every_front_end_and_in_peft(llama):
    torch_model, flax_model, params, _ = llama
    cfg = lj.LoKrConfig(r=2, target_modules="all-linear")
    theirs = peft.get_peft_model(torch_model(), peft.LoKrConfig(r=2, target_modules="all-linear"))
    peft_names = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lokr_w1")}
    assert "lm_head" not in peft_names
    twin = lt.LoKrModel(torch_model(), lt.LoKrConfig(r=2, target_modules="all-linear"))
    assert {n for n, _ in twin._lycoris_layers()} == peft_names
    assert set(pytree.init(params, cfg, key=jax.random.key(0)).plans) == peft_names
    adapted, _ = linen.adapt(flax_model.module, params, cfg, key=jax.random.key(0))
    assert {name for name, _ in adapted.targets} == peft_names

    class Head(nnx.Module):  # an NNX model with an output layer named as transformers names it
        def __init__(self, rngs):
            self.proj = nnx.Linear(8, 8, rngs=rngs)
            self.lm_head = nnx.Linear(8, 16, rngs=rngs)

        def __call__(self, x):
            return self.lm_head(self.proj(x))

    tuner = lj.LoKrModel(Head(nnx.Rngs(0)), cfg)
    assert {n for n, _ in tuner._lycoris_layers()} == {"proj"}
    state = nnx.state(Head(nnx.Rngs(0)), nnx.Param)
    assert set(pytree.init(state, cfg, key=jax.random.key(0)).plans) == {"proj"}


def test_saved_configs_name_the_adapted_modules_so_peft_loads_every_factor(llama, tmp_path):
    """With the output layer adapted too (``output_modules=()``), the saved config must not say
    ``"all-linear"``: PEFT would resolve it on its model without ``lm_head`` and drop its factors."""
    torch_model, flax_model, params, logits = llama
    cfg = lj.LoKrConfig(r=2, target_modules="all-linear", init_weights=False)
    adapter = pytree.init(params, cfg, key=jax.random.key(0), output_modules=())
    assert "lm_head" in adapter.plans
    expected = np.asarray(logits(pytree.merge(params, adapter)))
    pytree.save_pretrained(adapter, tmp_path / "pytree")
    saved = json.loads((tmp_path / "pytree" / "adapter_config.json").read_text())["target_modules"]
    assert saved != "all-linear" and "lm_head" in saved
    theirs = peft.PeftModel.from_pretrained(torch_model(), tmp_path / "pytree").eval()
    assert np.abs(torch_logits(theirs) - expected).max() <= LOGITS_ATOL
    adapted, collection = linen.adapt(flax_model.module, params, cfg, key=jax.random.key(0), output_modules=())
    linen.save_pretrained(adapted, collection, tmp_path / "linen")
    expected = np.asarray(adapted.apply({"params": params, "lycoris": collection}, *_linen_args(IDS)).logits)
    theirs = peft.PeftModel.from_pretrained(torch_model(), tmp_path / "linen").eval()
    assert np.abs(torch_logits(theirs) - expected).max() <= LOGITS_ATOL


# ---------------------------------------------------------------------------------------------- dtypes
TOKENS = (2, 1024)  # the cost rule picks "factored" at 2 tokens and "merged" at 1024 for this layer


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("path", ["auto", "merged", "factored", "peft"])
def test_every_path_returns_the_base_layers_dtype_in_every_front_end(path, dtype):
    kind = "lokr"
    cfg = lj.LoKrConfig(r=4, target_modules=["layers_0"], init_weights=False)
    module = nn.Sequential([nn.Dense(64, dtype=dtype, param_dtype=dtype)])
    params = module.init(jax.random.key(0), jnp.ones((1, 64), dtype))["params"]
    adapted, collection = linen.adapt(module, params, cfg, key=jax.random.key(1), forward_path=path)
    model = nnx.Sequential(nnx.Linear(64, 64, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    tuner = lj.LoKrModel(model, lj.LoKrConfig(r=4, target_modules=["layers.0"], init_weights=False), forward_path=path)
    seen = set()
    for tokens in TOKENS:
        x = jnp.ones((tokens, 64), dtype)
        base = module.apply({"params": params}, x)
        out = adapted.apply({"params": params, "lycoris": collection}, x)
        assert out.dtype == base.dtype == dtype, (kind, path, tokens)
        assert tuner(x).dtype == dtype, (path, tokens)
        merged = pytree.merge(params, linen.to_adapter(adapted, collection))
        assert module.apply({"params": merged}, x).dtype == dtype
        seen.add(tuner.model.layers[0]._forward_path("default", x))
    if path == "auto":
        assert seen == {"merged", "factored"}, "the token counts should flip the cost rule's choice"


def test_a_bf16_layer_in_nn_scan_keeps_its_carry_dtype():
    class Step(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return nn.Dense(32, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, name="dense")(h), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, h):
            scan = nn.scan(Step, variable_axes={"params": 0, "lycoris": 0}, split_rngs={"params": True}, length=3)
            return scan(name="layers")(h, None)[0]

    module, x = Stack(), jnp.ones((2, 32), jnp.bfloat16)
    params = module.init(jax.random.key(0), x)["params"]
    cfg = lj.LoHaConfig(r=2, target_modules="all-linear", init_weights=False)
    for path in ("merged", "auto", "peft"):
        adapted, lyc = linen.adapt(module, params, cfg, key=jax.random.key(1), stacks=["layers"], forward_path=path)
        assert adapted.apply({"params": params, "lycoris": lyc}, x).dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------------- layers we do not know
def _gpt2():
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return FlaxGPT2LMHeadModel(cfg, seed=0)


def test_gpt2_conv1d_is_an_error_not_a_silent_no_op_and_kinds_adapt_it():
    """transformers' ``FlaxConv1D`` holds its kernel in torch's ``(out, in)`` layout and is no
    ``nn.Dense``: it was planned but never run (logits unchanged, gradients 0) while ``merge`` of the
    same adapter moved them. Now targeting it is an error naming it and its class; ``kinds`` with
    ``((1,), (0,))`` declares the layout and both the transform and the pytree API adapt it."""
    model = _gpt2()
    params, ids = model.params, np.arange(12)[None] % 64
    args = _linen_args(ids)
    cfg = lj.LoKrConfig(r=2, target_modules=["c_attn"], init_weights=False)
    with pytest.raises(TypeError, match=r"transformer.h.0.attn.c_attn: target module of type FlaxConv1D"):
        linen.adapt(model.module, params, cfg, key=jax.random.key(0), example_args=args)
    adapted, lyc = linen.adapt(model.module, params, cfg, key=jax.random.key(0))  # nothing traced: found at apply
    with pytest.raises(TypeError, match=r"c_attn: target module of type FlaxConv1D .* kinds="):
        adapted.apply({"params": params, "lycoris": lyc}, *args)
    kinds = {r".*c_attn": ((1,), (0,))}
    adapted, lyc = linen.adapt(model.module, params, cfg, key=jax.random.key(0), kinds=kinds, example_args=args)
    adapter = linen.to_adapter(adapted, lyc)
    assert adapter.plans["transformer.h.0.attn.c_attn"].layer.weight_shape == (96, 32)  # torch's (out, in)
    base = np.asarray(model.module.apply({"params": params}, *args).logits)
    # the reference: each kernel (out, in) plus lycoris_torch's ΔW (out, in), no JAX layout code involved
    merged = jax.tree.map(lambda a: a, params)
    for name, factors in adapter.factors.items():
        node = merged
        for part in name.split("."):
            node = node[part]
        tf = {k: torch.from_numpy(np.asarray(v)) for k, v in factors.items()}
        plan = adapter.plans[name]
        delta = lt.lokr.delta_weight(tf, plan.scaling, plan.weight_shape).numpy()
        node["kernel"] = node["kernel"] + delta
    expected = np.asarray(model.module.apply({"params": merged}, *args).logits)
    assert np.abs(expected - base).max() > 1e-2
    for path in ("auto", "merged", "factored", "peft"):
        got = adapted.clone(forward_path=path).apply({"params": params, "lycoris": lyc}, *args).logits
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(model.module.apply({"params": pytree.merge(params, adapter)}, *args).logits), expected, atol=1e-5
    )
    grads = jax.grad(lambda c: adapted.apply({"params": params, "lycoris": c}, *args).logits.sum())(lyc)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_kernels_a_traced_call_never_reads_are_left_out_with_a_warning():
    """Converted checkpoints keep kernels a model never reads (tied embeddings in T5, BART, Whisper):
    ``"all-linear"`` gave them dead adapters. With ``example_args`` the transform sees the call."""
    module = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4)])
    x = jnp.ones((2, 6))
    params = dict(module.init(jax.random.key(0), x)["params"])
    params["unused"] = {"kernel": jnp.ones((4, 4))}
    cfg = lj.LoHaConfig(r=2, target_modules="all-linear")
    with pytest.warns(UserWarning, match=r"leaves out kernels the traced call never reads: \['unused'\]"):
        adapted, _ = linen.adapt(module, params, cfg, key=jax.random.key(0), example_args=(x,))
    assert {name for name, _ in adapted.targets} == {"layers_0", "layers_2"}
    with pytest.raises(ValueError, match=r"unused: the traced call never reads this kernel"):
        linen.adapt(
            module, params, lj.LoHaConfig(r=2, target_modules=["unused"]), key=jax.random.key(0), example_args=(x,)
        )


def test_an_nnx_model_wrapping_linen_modules_says_so():
    class Wrapped(nnx.Module):
        def __init__(self):
            self.dense = nnx.bridge.ToNNX(nn.Dense(8), rngs=nnx.Rngs(0))
            nnx.bridge.lazy_init(self.dense, jnp.ones((1, 4)))

        def __call__(self, x):
            return self.dense(x)

    with pytest.raises(TypeError, match=r"dense: an nnx.bridge.ToNNX wraps a Linen module.*lycoris_jax.pytree"):
        lj.LoHaModel(Wrapped(), lj.LoHaConfig(r=2, target_modules=["dense"]))
    with pytest.raises(lj.NoMatchingModuleError, match=r"nnx.bridge.ToNNX at \['dense'\].*lycoris_jax.pytree"):
        lj.LoHaModel(Wrapped(), lj.LoHaConfig(r=2, target_modules=["q_proj"]))


# ---------------------------------------------------------------------------------------------- the catalogue
def _file(tmp_path, tensors) -> str:
    from lycoris_core import kohya

    path = str(tmp_path / "f.safetensors")
    kohya.save_lycoris(path, {k: np.asarray(v, np.float32) for k, v in tensors.items()}, {})
    return path


def _torch_fc():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32)).eval()


def _own_factorization_file(tmp_path) -> str:
    """W1 (1, 8) and W2 (32, 2): 16 inputs as 8 x 2, which lycoris-lora's factor 8 gives and no PEFT
    config does for a (32, 16) Linear together with its 32 outputs as 1 x 32."""
    rng = np.random.default_rng(0)
    return _file(
        tmp_path,
        {
            "lycoris_0.lokr_w1": rng.standard_normal((1, 8)),
            "lycoris_0.lokr_w2": rng.standard_normal((32, 2)),
            "lycoris_0.alpha": 1.0,
        },
    )


def _linen_scan(tmp_path):
    from tests.jax.test_stacks import LinenScanned, config, stacked_params, torch_net

    cfg = config("lokr", alpha_pattern={"layers.2.mlp": 16})
    linen.adapt(LinenScanned(), stacked_params(torch_net()), cfg, key=jax.random.key(0), stacks=["layers"])


def _linen_unread(tmp_path):
    module, x = nn.Sequential([nn.Dense(8)]), jnp.ones((2, 6))
    params = {**module.init(jax.random.key(0), x)["params"], "unused": {"kernel": jnp.ones((4, 4))}}
    linen.adapt(module, params, lj.LoHaConfig(target_modules=["unused"]), key=jax.random.key(0), example_args=(x,))


def _gpt2_unknown(tmp_path):
    model = _gpt2()
    cfg = lj.LoKrConfig(r=2, target_modules=["c_fc"])
    linen.adapt(model.module, model.params, cfg, key=jax.random.key(0), example_args=_linen_args(np.arange(4)[None]))


def _tonnx(tmp_path):
    class Wrapped(nnx.Module):
        def __init__(self):
            self.dense = nnx.bridge.ToNNX(nn.Dense(8), rngs=nnx.Rngs(0))
            nnx.bridge.lazy_init(self.dense, jnp.ones((1, 4)))

    lj.LoHaModel(Wrapped(), lj.LoHaConfig(r=2, target_modules=["q_proj"]))


def _no_layer_fits(tmp_path):
    rng = np.random.default_rng(0)
    path = _file(
        tmp_path, {"lycoris_0.lokr_w1": rng.standard_normal((3, 3)), "lycoris_0.lokr_w2": rng.standard_normal((10, 5))}
    )
    lt.LycorisTuner.from_lycoris(_torch_fc(), path)


def _to_peft(tmp_path):
    from lycoris_core import kohya

    kohya.lycoris_to_peft(
        kohya.read_lycoris(_own_factorization_file(tmp_path)), {"0": lt.layer.layer_shape_of(_torch_fc()[0])}
    )


def _save_own(tmp_path):
    tuner = lt.LycorisTuner.from_lycoris(_torch_fc(), _own_factorization_file(tmp_path))
    tuner.save_pretrained(tmp_path / "peft")


FRONT_END_ERRORS = [
    ("linen-unknown-layer", _gpt2_unknown, TypeError, r"transformer.h.0.mlp.c_fc: target module of type FlaxConv1D"),
    ("linen-unread-kernel", _linen_unread, ValueError, r"unused: the traced call never reads this kernel"),
    ("linen-scan-one-scale", _linen_scan, ValueError, r"inside nn.scan every layer of a stack needs the same alpha"),
    ("nnx-tonnx", _tonnx, lj.NoMatchingModuleError, r"nnx.bridge.ToNNX at \['dense'\]"),
    ("lycoris-no-layer-fits", _no_layer_fits, lj.CheckpointError, r"f.safetensors: lycoris_0 \(0\): factors"),
    ("lycoris-to-peft-own-factorization", _to_peft, lj.CheckpointError, r"lycoris_0 \(0\): .*load the file itself"),
    ("save-own-factorization", _save_own, ValueError, r"^0: its factors .* save_lycoris"),
]


@pytest.mark.parametrize("case", FRONT_END_ERRORS, ids=[c[0] for c in FRONT_END_ERRORS])
def test_front_end_errors(case, tmp_path):
    _, call, exc, match = case
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(exc, match=match):
        call(tmp_path)
    assert not (tmp_path / "peft").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before + (
        ["f.safetensors"] if "f.safetensors" not in before and (tmp_path / "f.safetensors").exists() else []
    )


def test_front_end_catalogue_matches_the_docs():
    text = (Path(__file__).parents[2] / "docs" / "ERRORS.md").read_text()
    section = text.split("\n## Front ends and LyCORIS files\n", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^\| `([a-z0-9-]+)` \|", section, flags=re.M) == [c[0] for c in FRONT_END_ERRORS]


def test_peft_refuses_gpt2_conv1d_where_kinds_adapt_it():
    """PEFT's LoHa/LoKr refuse transformers' torch ``Conv1D`` (deviation p); the Flax front ends adapt
    ``FlaxConv1D`` when ``kinds`` declares its layout (above)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    with pytest.raises(TypeError, match=r"Conv1D'> not supported"):
        peft.get_peft_model(model, peft.LoKrConfig(r=2, target_modules=["c_attn"]))
