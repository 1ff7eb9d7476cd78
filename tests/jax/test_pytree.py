"""``lycoris_jax.pytree`` on a real transformers model, both ways against real PEFT.

``FlaxLlamaForCausalLM`` (Linen) holds the torch ``LlamaForCausalLM``'s weights (converted with
transformers' own ``convert_pytorch_state_dict_to_flax``); logits agree to ~1e-7 before any adapter.
(a) an adapter made by PEFT on the torch model loads through the pytree API and the merged Flax
model's logits equal PEFT's unmerged forward; (b) one made in JAX, trained a few optax steps under
``jax.jit``, loads in PEFT and in ``lycoris_torch`` with equal logits. fp32 tolerance: 1e-5 abs on
logits of magnitude ~1 (two frameworks' matmul orders).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from flax import nnx
from flax.core import freeze

import lycoris_jax as lj
import lycoris_torch as lt
from lycoris_core import CheckpointError, NoMatchingModuleError
from lycoris_jax import pytree
from tests.jax.llama import IDS, LOGITS_ATOL, TARGETS, build_llama, torch_logits


@pytest.fixture(scope="module")
def llama():
    return build_llama()


def configs(kind: str, **kw):
    """The same config for PEFT and for us."""
    ours = (lj.LoKrConfig if kind == "lokr" else lj.LoHaConfig)(
        r=4, alpha=8, target_modules=TARGETS, init_weights=False, **kw
    )
    theirs = (peft.LoKrConfig if kind == "lokr" else peft.LoHaConfig)(**{**ours.to_dict(), "peft_type": None} | kw)
    return ours, theirs


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_peft_adapter_loads_through_the_pytree_api_with_equal_logits(llama, tmp_path, kind):
    torch_model, _, params, logits = llama
    _, theirs = configs(kind)
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(torch_model(), theirs).eval()
    expected = torch_logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    adapter = pytree.from_pretrained(tmp_path, params)
    assert set(adapter.factors) == {
        n for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "base_layer")
    }
    got = np.asarray(logits(pytree.merge(params, adapter)))
    assert np.abs(got - expected).max() <= LOGITS_ATOL
    assert np.abs(got - np.asarray(logits(params))).max() > 1e-2  # the adapter does something


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_jax_trained_adapter_loads_in_peft_and_lycoris_torch(llama, tmp_path, kind):
    torch_model, flax_model, params, logits = llama
    ours, _ = configs(kind)
    adapter = pytree.init(params, ours, key=jax.random.key(0))
    ids = jnp.asarray(IDS)

    def loss(a):
        out = flax_model(ids[:, :-1], params=pytree.merge(params, a)).logits
        return optax.softmax_cross_entropy_with_integer_labels(out, ids[:, 1:]).mean()

    tx = optax.adam(1e-2)
    opt = tx.init(adapter)

    @jax.jit
    def step(a, o):
        value, grads = jax.value_and_grad(loss)(a)
        updates, o = tx.update(grads, o, a)
        return optax.apply_updates(a, updates), o, value

    losses = []
    for _ in range(5):
        adapter, opt, value = step(adapter, opt)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    pytree.save_pretrained(adapter, tmp_path)
    expected = np.asarray(logits(pytree.merge(params, adapter)))
    theirs = peft.PeftModel.from_pretrained(torch_model(), tmp_path).eval()
    assert np.abs(torch_logits(theirs) - expected).max() <= LOGITS_ATOL
    twin = lt.LycorisTuner.from_pretrained(torch_model(), tmp_path)
    assert np.abs(torch_logits(twin) - expected).max() <= LOGITS_ATOL


def test_the_adapter_is_a_pytree_of_factors_only(llama):
    _, _, params, logits = llama
    adapter = pytree.init(params, configs("lokr")[0], key=jax.random.key(0))
    leaves = jax.tree.leaves(adapter)
    assert len(leaves) == sum(len(f) for f in adapter.factors.values())
    assert {k: v.shape for k, v in adapter.state_dict().items()} == {
        f"base_model.model.{m}.{n}": p.factor_shapes[n] for m, p in adapter.plans.items() for n in p.factor_shapes
    }
    grads = jax.grad(lambda a: logits(pytree.merge(params, a)).sum())(adapter)
    assert jax.tree.structure(grads) == jax.tree.structure(adapter)
    moved = jax.device_put(adapter)
    assert moved.targets == adapter.targets


def test_config_fields_select_what_peft_selects(llama):
    torch_model, _, params, _ = llama
    kw = dict(
        target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
        layers_to_transform=[1],
        layers_pattern="layers",
        rank_pattern={"v_proj": 2},
        alpha_pattern={"up_proj": 3},
        exclude_modules=["k_proj"],
    )
    ours = lj.LoKrConfig(r=4, alpha=8, init_weights=False, **kw)
    theirs = peft.get_peft_model(torch_model(), peft.LoKrConfig(r=4, alpha=8, init_weights=False, **kw))
    adapter = pytree.init(params, ours, key=jax.random.key(0))
    expected = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert {k: tuple(v.shape) for k, v in adapter.state_dict().items()} == expected
    scalings = {
        n: m.scaling["default"]
        for n, m in theirs.base_model.model.named_modules()
        if isinstance(m, peft.tuners.lycoris_utils.LycorisLayer)
    }
    assert {m: p.scaling for m, p in adapter.plans.items()} == scalings


def test_all_linear_leaves_out_the_output_layer_and_warns_about_3d_kernels(llama):
    _, _, params, _ = llama
    adapter = pytree.init(params, lj.LoHaConfig(r=2, target_modules="all-linear"), key=jax.random.key(0))
    assert "lm_head" not in adapter.factors and len(adapter.factors) == 2 * 7
    general = {"attn": {"query": {"kernel": jnp.ones((8, 2, 4))}}, "mlp": {"kernel": jnp.ones((8, 8))}}
    with pytest.warns(
        UserWarning, match=r"leaves out 3-D kernels that may be DenseGeneral/Einsum layers: \['attn.query'\]"
    ):
        assert list(
            pytree.init(general, lj.LoHaConfig(r=2, target_modules="all-linear"), key=jax.random.key(0)).factors
        ) == ["mlp"]
    described = pytree.init(
        general,
        lj.LoHaConfig(r=2, target_modules="all-linear"),
        key=jax.random.key(0),
        kinds={"attn.query": ((0,), (1, 2))},
    )
    assert sorted(described.factors) == ["attn.query", "mlp"]


@pytest.mark.parametrize("init", [True, "lycoris"])
def test_regex_targets_and_init_modes_match_peft(llama, init):
    torch_model, _, params, _ = llama
    kw = dict(r=4, target_modules=r".*layers\.1\.(self_attn\.q_proj|mlp\.up_proj)", init_weights=init)
    theirs = peft.get_peft_model(torch_model(), peft.LoKrConfig(**kw))
    adapter = pytree.init(params, lj.LoKrConfig(**kw), key=jax.random.key(0))
    expected = peft.get_peft_model_state_dict(theirs)
    got = adapter.state_dict()
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    for k, v in expected.items():  # the same factors are zero (w1 for True, w2 for "lycoris")
        assert bool((v == 0).all()) == bool((np.asarray(got[k]) == 0).all()), k


def test_merge_is_jittable_with_a_traced_scale_and_dropout_from_a_key(llama):
    _, _, params, logits = llama
    adapter = pytree.init(params, configs("lokr", rank_dropout=0.5, module_dropout=0.3)[0], key=jax.random.key(0))
    merge = jax.jit(pytree.merge)
    half = merge(params, adapter, scale=jnp.float32(0.5))
    eager = pytree.merge(params, adapter, scale=0.5)
    for a, b in zip(jax.tree.leaves(half), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    zero = merge(params, adapter, scale=jnp.float32(0.0))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(zero), jax.tree.leaves(params), strict=True))
    a1 = merge(params, adapter, key=jax.random.key(1))
    a2 = merge(params, adapter, key=jax.random.key(2))
    assert not np.allclose(logits(a1), logits(a2))  # dropout draws differ
    eager_logits = logits(pytree.merge(params, adapter))  # no key, no dropout: jitted and eager agree
    np.testing.assert_allclose(logits(merge(params, adapter)), eager_logits, rtol=1e-5, atol=1e-5)


def test_frozendict_nnx_state_and_torch_style_weights():
    key = jax.random.key(0)
    params = {"enc": {"dense": {"kernel": jnp.ones((12, 8)), "bias": jnp.zeros(8)}}, "norm": {"weight": jnp.ones(8)}}
    cfg = lj.LoKrConfig(r=2, target_modules=["dense"], init_weights=False)
    plain = pytree.init(params, cfg, key=key)
    frozen = pytree.init(freeze(params), cfg, key=key)
    merged = pytree.merge(freeze(params), frozen)
    assert type(merged).__name__ == "FrozenDict"
    np.testing.assert_array_equal(
        merged["enc"]["dense"]["kernel"], pytree.merge(params, plain)["enc"]["dense"]["kernel"]
    )
    # nnx.State: the module name is the NNX graph path, the same as the NNX tuner's
    model = nnx.Sequential(nnx.Linear(12, 8, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    adapter = pytree.init(state, lj.LoKrConfig(r=2, target_modules=["layers.0"], init_weights=False), key=key)
    nnx.update(model, pytree.merge(state, adapter))
    assert list(adapter.factors) == ["layers.0"]
    # PyTorch layout (Equinox, raw pytrees): weight (out, in); a 1-D weight (a norm) is no layer
    w = {"fc": {"weight": np.random.default_rng(0).standard_normal((8, 12)).astype(np.float32)}}
    tw = pytree.init(w, cfg.__class__(r=2, target_modules=["fc"], init_weights=False), key=key)
    torch_layer = torch.nn.Linear(12, 8, bias=False)
    torch_layer.weight.data = torch.from_numpy(w["fc"]["weight"].copy())
    layer = lt.LoKrLayer(torch_layer, "default", lt.LoKrConfig(r=2, init_weights=False), 2, 8)
    for name, value in tw.factors["fc"].items():
        layer.factors["default"][name].data = torch.from_numpy(np.array(value))
    layer.merge()
    np.testing.assert_allclose(pytree.merge(w, tw)["fc"]["weight"], torch_layer.weight.detach().numpy(), atol=1e-6)


def test_ambiguous_and_bad_input_is_a_clear_error(llama, tmp_path):
    _, _, params, _ = llama
    conv = {"conv": {"kernel": jnp.ones((3, 4, 6))}}
    cfg = lj.LoKrConfig(r=2, target_modules=["conv"])
    with pytest.raises(
        ValueError,
        match=r"conv: a 3-D kernel could be a Conv1d, a DenseGeneral or a stack of layers; say which with kinds=\{'conv': 'conv1d'\}",
    ):
        pytree.init(conv, cfg, key=jax.random.key(0))
    adapter = pytree.init(conv, cfg, key=jax.random.key(0), kinds={"conv": "conv1d"})
    assert adapter.plans["conv"].layer.kind == "conv1d"
    with pytest.raises(ValueError, match="kinds says conv2d"):
        pytree.init(conv, cfg, key=jax.random.key(0), kinds={"conv": "conv2d"})
    with pytest.raises(NoMatchingModuleError, match="Target modules"):
        pytree.init(params, lj.LoKrConfig(target_modules=["nope"]), key=jax.random.key(0))
    with pytest.raises(TypeError, match="expected a LoHaConfig or LoKrConfig"):
        pytree.init(params, {"r": 2}, key=jax.random.key(0))
    with pytest.raises(ValueError, match="adapter name"):
        pytree.init(params, configs("lokr")[0], key=jax.random.key(0), adapter_name="../x")
    adapter = pytree.init(params, configs("lokr")[0], key=jax.random.key(0))
    with pytest.raises(ValueError, match="the adapter targets modules these params lack"):
        pytree.merge({"other": {"kernel": jnp.ones((2, 2))}}, adapter)
    pytree.save_pretrained(adapter, tmp_path)
    small = jax.tree.map(lambda x: x, params)
    small["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"] = jnp.ones((32, 16))
    with pytest.raises(
        CheckpointError,
        match=r"adapter_model.safetensors: model.layers.0.self_attn.q_proj.lokr_w2: checkpoint shape \(8, 8\)",
    ):
        pytree.from_pretrained(tmp_path, small)


def test_non_default_adapter_name_saves_in_a_subdirectory(llama, tmp_path):
    _, _, params, _ = llama
    adapter = pytree.init(params, configs("loha")[0], key=jax.random.key(0), adapter_name="style")
    pytree.save_pretrained(adapter, tmp_path)
    loaded = pytree.from_pretrained(tmp_path / "style", params, adapter_name="style")
    for a, b in zip(jax.tree.leaves(adapter), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(a, b)


def test_rename_maps_flax_paths_to_the_torch_names(tmp_path):
    params = {"down_blocks_0": {"proj": {"kernel": jnp.ones((6, 4))}}, "mid": {"kernel": jnp.ones((4, 4))}}
    cfg = lj.LoKrConfig(r=2, target_modules=["proj", "mid"], init_weights=False)
    to_torch = lambda name: name.replace("down_blocks_0", "down_blocks.0")  # noqa: E731
    adapter = pytree.init(params, cfg, key=jax.random.key(0), rename=to_torch)
    assert sorted(adapter.factors) == ["down_blocks.0.proj", "mid"]  # names PEFT's files use
    assert dict(adapter.targets)["down_blocks.0.proj"].path == ("down_blocks_0", "proj")
    merged = pytree.merge(params, adapter)  # found by path, not by name
    # ΔW (out, in) = kron(W1, W2) · alpha / r in float64 numpy; the Flax kernel (in, out) holds its transpose
    f = {k: np.asarray(v, np.float64) for k, v in adapter.factors["down_blocks.0.proj"].items()}
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
    delta = np.kron(w1, w2) * cfg.alpha / cfg.r
    assert delta.shape == (4, 6)
    np.testing.assert_allclose(merged["down_blocks_0"]["proj"]["kernel"] - 1, delta.T, rtol=0, atol=1e-6)
    pytree.save_pretrained(adapter, tmp_path)
    loaded = pytree.from_pretrained(tmp_path, params, rename={"down_blocks_0.proj": "down_blocks.0.proj"})
    np.testing.assert_array_equal(
        pytree.merge(params, loaded)["down_blocks_0"]["proj"]["kernel"], merged["down_blocks_0"]["proj"]["kernel"]
    )
    with pytest.raises(ValueError, match=r"m: two kernels have this name \(down_blocks_0.proj and mid\)"):
        pytree.init(params, cfg, key=jax.random.key(0), rename=lambda name: "m")
