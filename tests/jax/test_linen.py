"""``lycoris_jax.linen``: the Linen module transform on transformers' ``FlaxLlamaForCausalLM.module``
(unmodified), both ways against real PEFT, and on Linen convolutions.

The wrapped model runs PEFT's *unmerged* forward (base output plus the adapter branch), so its
logits are compared with PEFT's unmerged logits directly (fp32, 1e-5 abs), and with the merged
params run by the plain module.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch

import lycoris_jax as lj
import lycoris_torch as lt
from lycoris_jax import linen, pytree
from tests.jax.llama import IDS, LOGITS_ATOL, TARGETS, build_llama, torch_logits
from tests.jax.test_nnx_attention import DH, HH, D, H, N, X, pair, t_out
from tests.jax.test_nnx_attention import TARGETS as ATTENTION_TARGETS

MASK = jnp.ones(IDS.shape, jnp.int32)
POSITIONS = jnp.broadcast_to(jnp.arange(IDS.shape[1])[None], IDS.shape)


@pytest.fixture(scope="module")
def llama():
    return build_llama()


def run(adapted, params, lycoris, ids=IDS, **kw):
    variables = {"params": params, "lycoris": lycoris}
    return adapted.apply(
        variables, jnp.asarray(ids), MASK[:, : ids.shape[1]], POSITIONS[:, : ids.shape[1]], **kw
    ).logits


def configs(kind: str, **kw):
    ours = (lj.LoKrConfig if kind == "lokr" else lj.LoHaConfig)(
        r=4, alpha=8, target_modules=TARGETS, init_weights=False, **kw
    )
    theirs = (peft.LoKrConfig if kind == "lokr" else peft.LoHaConfig)(**{**ours.to_dict(), "peft_type": None})
    return ours, theirs


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_peft_adapter_runs_unmerged_through_the_linen_transform(llama, tmp_path, kind):
    torch_model, flax_model, params, logits = llama
    torch.manual_seed(1)
    theirs = peft.get_peft_model(torch_model(), configs(kind)[1]).eval()
    expected = torch_logits(theirs)
    theirs.save_pretrained(tmp_path)
    adapted, lycoris = linen.from_pretrained(tmp_path, flax_model.module, params)
    unmerged = np.asarray(jax.jit(lambda p, lyc: run(adapted, p, lyc))(params, lycoris))
    assert np.abs(unmerged - expected).max() <= LOGITS_ATOL
    merged = linen.merge(adapted, params, lycoris)
    assert np.abs(np.asarray(logits(merged)) - unmerged).max() <= LOGITS_ATOL
    restored = linen.unmerge(adapted, merged, lycoris)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_linen_trained_adapter_loads_in_peft_and_lycoris_torch(llama, tmp_path, kind):
    torch_model, flax_model, params, _ = llama
    adapted, lycoris = linen.adapt(flax_model.module, params, configs(kind)[0], key=jax.random.key(0))
    ids = jnp.asarray(IDS)

    def loss(lyc):
        out = run(adapted, params, lyc, ids=IDS[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(out, ids[:, 1:]).mean()

    tx = optax.adam(1e-2)
    opt = tx.init(lycoris)

    @jax.jit
    def step(lyc, o):  # gradients with respect to the "lycoris" collection only
        value, grads = jax.value_and_grad(loss)(lyc)
        updates, o = tx.update(grads, o, lyc)
        return optax.apply_updates(lyc, updates), o, value

    losses = []
    for _ in range(5):
        lycoris, opt, value = step(lycoris, opt)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    linen.save_pretrained(adapted, lycoris, tmp_path)
    expected = np.asarray(run(adapted, params, lycoris))
    theirs = peft.PeftModel.from_pretrained(torch_model(), tmp_path).eval()
    assert np.abs(torch_logits(theirs) - expected).max() <= LOGITS_ATOL
    twin = lt.LycorisTuner.from_pretrained(torch_model(), tmp_path)
    assert np.abs(torch_logits(twin) - expected).max() <= LOGITS_ATOL


def test_the_collection_mirrors_params_and_scale_enabled_dropout(llama):
    _, flax_model, params, logits = llama
    cfg = configs("lokr", rank_dropout=0.5, module_dropout=0.2)[0]
    adapted, lycoris = linen.adapt(flax_model.module, params, cfg, key=jax.random.key(0))
    q = lycoris["model"]["layers"]["0"]["self_attn"]["q_proj"]
    plan = dict(adapted.targets)["model.layers.0.self_attn.q_proj"].plan
    assert {k: v.shape for k, v in q.items()} == plan.factor_shapes  # nested like params, PEFT's names
    base = np.asarray(logits(params))
    np.testing.assert_allclose(run(adapted.clone(enabled=False), params, lycoris), base, atol=1e-6)
    np.testing.assert_allclose(run(adapted.clone(scale=0.0), params, lycoris), base, atol=1e-6)
    doubled = pytree.merge(params, linen.to_adapter(adapted, lycoris), scale=2.0)
    np.testing.assert_allclose(run(adapted.clone(scale=2.0), params, lycoris), logits(doubled), atol=LOGITS_ATOL)
    training = adapted.clone(deterministic=False)
    a = run(training, params, lycoris, rngs={"dropout": jax.random.key(1)})
    b = run(training, params, lycoris, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)
    # deterministic (the default): a dropout rng changes nothing, the output is the merged params'
    merged = pytree.merge(params, linen.to_adapter(adapted, lycoris))
    np.testing.assert_allclose(
        run(adapted, params, lycoris, rngs={"dropout": jax.random.key(1)}), logits(merged), atol=LOGITS_ATOL
    )


class Convs(nn.Module):
    @nn.compact
    def __call__(self, img, seq):
        a = nn.Conv(12, (3, 3), padding="CIRCULAR", name="c2")(img)
        b = nn.Conv(24, (3, 5), feature_group_count=3, strides=2, name="c2g")(nn.relu(a))
        c = nn.Conv(8, (3,), padding="SAME", kernel_dilation=2, name="c1")(seq)
        return b.sum((1, 2)), c.sum(1)  # per-channel sums: a permutation of channels shows


@pytest.mark.parametrize(
    "cfg",
    [
        lj.LoHaConfig(r=2, target_modules=["c2", "c2g", "c1"], use_effective_conv2d=True, init_weights=False),
        lj.LoKrConfig(r=2, target_modules=["c2", "c2g", "c1"], decompose_both=True, init_weights=False),
    ],
    ids=["loha-cp", "lokr"],
)
def test_convolutions_unmerged_equal_merged(cfg):
    """The delta branch is the layer's own convolution (padding mode, strides, groups, dilation); on
    the factored path too (the grouped conv takes the merged path: the algebra needs one group)."""
    rng = np.random.default_rng(0)
    img, seq = (
        jnp.asarray(rng.standard_normal((2, 9, 9, 6)), jnp.float32),
        jnp.asarray(rng.standard_normal((2, 11, 4)), jnp.float32),
    )
    model = Convs()
    params = model.init(jax.random.key(0), img, seq)["params"]
    adapted, lycoris = linen.adapt(
        model, params, cfg, key=jax.random.key(1), kinds={"c1": "conv1d"}, forward_path="factored"
    )
    unmerged = adapted.apply({"params": params, "lycoris": lycoris}, img, seq)
    merged = model.apply({"params": linen.merge(adapted, params, lycoris)}, img, seq)
    base = model.apply({"params": params}, img, seq)
    for u, m, b in zip(unmerged, merged, base, strict=True):
        np.testing.assert_allclose(u, m, rtol=1e-5, atol=1e-5)
        assert not np.allclose(u, b)


def test_bad_use_is_a_clear_error(llama):
    _, flax_model, params, _ = llama
    adapted, lycoris = linen.adapt(flax_model.module, params, configs("loha")[0], key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: the 'lycoris' collection lacks"):
        adapted.apply({"params": params}, jnp.asarray(IDS), MASK, POSITIONS)
    partial = jax.tree.map(lambda x: x, lycoris)
    del partial["model"]["layers"]["1"]
    with pytest.raises(ValueError, match="the collection holds factors for"):
        linen.merge(adapted, params, partial)


class LinenAttn(nn.Module):
    """The Linen twin of ``tests/jax/test_nnx_attention.py``'s models: ``nn.MultiHeadDotProductAttention``
    (``DenseGeneral`` q/k/v/out) and an ``nn.Einsum``."""

    @nn.compact
    def __call__(self, x):

        a = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=H * DH, out_features=D, name="attn")(x)
        e = nn.Einsum((N, D, HH), "btd,ndh->btnh", name="einsum")(x)
        return jnp.concatenate([a, e.reshape(*e.shape[:2], -1)], -1)  # every einsum output feature shows


@pytest.fixture(scope="module")
def attention():
    """``(torch twin factory, linen model, params with the twin's weights, kinds found by tracing)``."""
    model = LinenAttn()
    params = jax.tree.map(lambda a: a, model.init(jax.random.key(0), X)["params"])
    kinds = linen.discover(model, params, X)
    twin = pair()[0]
    for name in ATTENTION_TARGETS:
        node = params
        for part in name.split("."):
            node = node[part]
        in_axes, out_axes = kinds[name]
        layout = lj.functional.KernelLayout(tuple(node["kernel"].shape), in_axes, out_axes)
        node["kernel"] = layout.to_kernel(jnp.asarray(twin.get_submodule(name).weight.detach().numpy()))
        node["bias"] = jnp.asarray(twin.get_submodule(name).bias.detach().numpy()).reshape(node["bias"].shape)
    return (lambda: pair()[0]), model, params, kinds


def test_dense_general_and_einsum_are_found_by_tracing(attention):
    _, _, _, kinds = attention
    assert kinds == {
        "attn.query": ((0,), (1, 2)),
        "attn.key": ((0,), (1, 2)),
        "attn.value": ((0,), (1, 2)),
        "attn.out": ((0, 1), (2,)),
        "einsum": ((1,), (0, 2)),
    }


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_dense_general_and_einsum_both_ways_against_peft(attention, tmp_path, kind):
    twin, model, params, _ = attention
    np.testing.assert_allclose(model.apply({"params": params}, X), t_out(twin()), atol=1e-6)  # the file contract
    cfg = (peft.LoKrConfig if kind == "lokr" else peft.LoHaConfig)(
        r=2, alpha=4, target_modules=ATTENTION_TARGETS, init_weights=False
    )
    torch.manual_seed(1)
    theirs = peft.get_peft_model(twin(), cfg).eval()
    theirs.save_pretrained(tmp_path / "peft")
    adapted, lycoris = linen.from_pretrained(tmp_path / "peft", model, params, example_args=(X,))
    unmerged = adapted.apply({"params": params, "lycoris": lycoris}, X)
    assert np.abs(np.asarray(unmerged) - t_out(theirs)).max() <= LOGITS_ATOL
    merged = model.apply({"params": linen.merge(adapted, params, lycoris)}, X)
    assert np.abs(np.asarray(merged) - t_out(theirs)).max() <= LOGITS_ATOL
    ours_cfg = (lj.LoKrConfig if kind == "lokr" else lj.LoHaConfig)(
        r=2, alpha=4, target_modules=ATTENTION_TARGETS, init_weights=False
    )
    adapted, lycoris = linen.adapt(model, params, ours_cfg, key=jax.random.key(2), example_args=(X,))
    linen.save_pretrained(adapted, lycoris, tmp_path / "ours")
    expected = np.asarray(adapted.apply({"params": params, "lycoris": lycoris}, X))
    assert (
        np.abs(t_out(peft.PeftModel.from_pretrained(twin(), tmp_path / "ours").eval()) - expected).max() <= LOGITS_ATOL
    )
    assert np.abs(t_out(lt.LycorisTuner.from_pretrained(twin(), tmp_path / "ours")) - expected).max() <= LOGITS_ATOL


def test_without_tracing_a_dense_general_kernel_needs_kinds(attention):
    _, model, params, _ = attention
    with pytest.raises(ValueError, match=r"attn.out: a 3-D kernel could be a Conv1d, a DenseGeneral .* example_args"):
        linen.adapt(model, params, lj.LoKrConfig(r=2, target_modules=["out"]), key=jax.random.key(0))
    adapter = pytree.init(
        params, lj.LoKrConfig(r=2, target_modules=["out"]), key=jax.random.key(0), kinds={r".*out": ((0, 1), (2,))}
    )
    assert adapter.plans["attn.out"].layer.in_features == 8


def test_the_layers_an_nn_sequential_is_built_with_are_adapted():
    """``nn.share_scope`` leaves ``module`` in the ``Module.path`` of the layers an ``nn.Sequential``
    was built with; targets are matched along the scope chain, where the params are (these layers
    were once skipped without a word)."""
    seq = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4)])
    x = jnp.ones((3, 6))
    params = seq.init(jax.random.key(0), x)["params"]
    cfg = lj.LoHaConfig(r=2, target_modules=["layers_0", "layers_2"], init_weights=False)
    adapted, lyc = linen.adapt(seq, params, cfg, key=jax.random.key(1))
    out, base = adapted.apply({"params": params, "lycoris": lyc}, x), seq.apply({"params": params}, x)
    merged = seq.apply({"params": linen.merge(adapted, params, lyc)}, x)
    assert np.abs(out - base).max() > 1e-2
    np.testing.assert_allclose(out, merged, rtol=1e-5, atol=1e-6)
