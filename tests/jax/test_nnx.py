"""lycoris_jax on Flax NNX: the public contract, layer behaviour, training under nnx.jit, bad input."""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import lycoris_jax as lj
from lycoris_core import AdapterPlan
from parity_tests.compare import assert_rounded
from tests.jax.mirrors import NnxConv, NnxMLP, inputs

MLP_TARGETS = ["layers.0", "layers.1", "head"]
CONV_TARGETS = ["c1", "c1p", "c2", "c2g"]
_, XM = inputs("mlp")
_, XC = inputs("conv")


def mlp():
    return NnxMLP(nnx.Rngs(0))


def conv():
    return NnxConv(nnx.Rngs(0))


def lokr(**kw):
    return lj.LoKrConfig(**{"r": 2, "alpha": 4, "target_modules": MLP_TARGETS, "init_weights": False} | kw)


def loha(**kw):
    return lj.LoHaConfig(**{"r": 2, "alpha": 4, "target_modules": MLP_TARGETS, "init_weights": False} | kw)


def _host(x):
    return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x).copy()


def snapshot(model):
    state = nnx.state(model)
    return (
        [_host(x) for x in jax.tree.leaves(state)],
        jax.tree.structure(state),
        {path: type(m).__name__ for path, m in nnx.iter_modules(model)},
    )


def assert_unchanged(model, snap):
    leaves, structure, types = snapshot(model)
    assert types == snap[2]
    assert structure == snap[1]
    for a, b in zip(leaves, snap[0], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "make, cfg_fn, tuner_cls, x",
    [
        (mlp, lokr, lj.LoKrModel, XM),
        (conv, lambda: loha(target_modules=CONV_TARGETS, use_effective_conv2d=True), lj.LoHaModel, XC),
    ],
)
def test_public_contract_round_trip(tmp_path, make, cfg_fn, tuner_cls, x):
    model = make()
    base = model(*x)
    tuner = tuner_cls(model, cfg_fn(), adapter_name="default", rngs=nnx.Rngs(0))
    y = tuner(*x)
    np.testing.assert_array_equal(y, model(*x))  # surgery in place
    assert not np.allclose(y, base)
    tuner.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    t2 = lj.LycorisTuner.from_pretrained(make(), tmp_path)
    assert type(t2) is tuner_cls
    np.testing.assert_array_equal(t2(*x), y)
    merged = t2.merge_and_unload()
    assert not any(isinstance(m, lj.LycorisLayer) for _, m in nnx.iter_modules(merged))
    np.testing.assert_allclose(merged(*x), y, rtol=1e-5, atol=1e-5)


def test_param_type_selects_exactly_the_adapters_and_names_match_torch():
    model = mlp()
    tuner = lj.LoHaModel(model, loha())
    adapter_state = nnx.state(model, lj.LycorisParam)
    n_factors = len(jax.tree.leaves(adapter_state))
    assert n_factors == 3 * 4
    assert sorted(tuner.adapter_state_dict()) == sorted(
        f"base_model.model.{m}.hada_{f}" for m in MLP_TARGETS for f in ("w1_a", "w1_b", "w2_a", "w2_b")
    )


@pytest.mark.parametrize(
    "cfg, tuner_cls", [(lokr(init_weights=True), lj.LoKrModel), (loha(init_weights=True), lj.LoHaModel)]
)
def test_jitted_training_lowers_loss_keeps_base_bit_identical(cfg, tuner_cls):
    model = mlp()
    base_state = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    tuner = tuner_cls(model, cfg, rngs=nnx.Rngs(1))
    target = jnp.sin(jnp.arange(8.0))
    optimizer = nnx.Optimizer(tuner, optax.adam(1e-2), wrt=lj.LycorisParam)

    @nnx.jit
    def step(tuner, optimizer, x):
        def loss_fn(t):
            return ((t(x) - target) ** 2).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lj.LycorisParam))(tuner)
        optimizer.update(tuner, grads)
        return loss

    losses = [float(step(tuner, optimizer, XM[0])) for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0]
    base_leaves = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(base_state)}
    for path, value in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
        key = jax.tree_util.keystr(path)
        if "factors" in key:
            continue
        original = base_leaves[key.replace("['base_layer']", "")]
        np.testing.assert_array_equal(value, original)
    unmerged = tuner(*XM)
    np.testing.assert_allclose(tuner.merge_and_unload()(*XM), unmerged, rtol=1e-5, atol=1e-5)


def _conv_model(**conv_kw):
    class M(nnx.Module):
        def __init__(self):
            self.conv = nnx.Conv(4, 6, **conv_kw, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.conv(x)

    return M()


@pytest.mark.parametrize(
    "conv_kw, shape",
    [
        (dict(kernel_size=(3, 3), padding="CIRCULAR"), (2, 7, 7, 4)),
        (dict(kernel_size=(3, 3), padding="REFLECT"), (2, 7, 7, 4)),
        (dict(kernel_size=(3,), padding="CAUSAL"), (2, 9, 4)),
        (dict(kernel_size=(3, 3), padding="SAME", strides=2), (2, 8, 8, 4)),
        (dict(kernel_size=(3, 2), padding="VALID", kernel_dilation=2), (2, 9, 9, 4)),
        (dict(kernel_size=(3, 3), padding=1, input_dilation=2), (2, 5, 5, 4)),
        (dict(kernel_size=(3, 3), padding="SAME", feature_group_count=2), (2, 6, 6, 4)),
        (dict(kernel_size=(3,), padding="REFLECT", feature_group_count=2, strides=2), (2, 9, 4)),
    ],
)
@pytest.mark.parametrize(
    "cfg", [loha(target_modules=["conv"], use_effective_conv2d=True), lokr(target_modules=["conv"], r=1)]
)
def test_unmerged_equals_merged_for_every_conv_variant(conv_kw, shape, cfg):
    model = _conv_model(**conv_kw)
    x = jax.random.normal(jax.random.key(0), shape)
    tuner = (lj.LoHaModel if isinstance(cfg, lj.LoHaConfig) else lj.LoKrModel)(model, cfg)
    unmerged = tuner(x)
    tuner.merge_adapter()
    np.testing.assert_allclose(tuner(x), unmerged, rtol=1e-5, atol=1e-5)
    tuner.unmerge_adapter()
    np.testing.assert_allclose(model.conv(x, out_sharding=None), unmerged, atol=1e-5)  # kwargs pass through


def test_merge_unmerge_safe_merge_and_scale_ops():
    model = mlp()
    tuner = lj.LoKrModel(model, lokr())
    layer = model.layers[0]
    k0 = np.asarray(layer.kernel[...]).copy()
    out = tuner(*XM)
    tuner.merge_adapter()
    assert layer.merged_adapters == ["default"]
    np.testing.assert_allclose(tuner(*XM), out, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="All adapters are already merged"):
        layer.merge()
    tuner.unmerge_adapter()
    np.testing.assert_allclose(layer.kernel[...], k0, atol=1e-6)
    with pytest.warns(UserWarning, match="Already unmerged"):
        layer.unmerge()
    seq = []
    for op, arg in (
        ("set_scale", ("default", 2)),
        ("scale_layer", (3,)),
        ("unscale_layer", (3,)),
        ("unscale_layer", ()),
    ):
        getattr(tuner, op)(*arg)
        seq.append(layer.scaling["default"])
    assert seq == [4.0, 12.0, 4.0, 2.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_is_atomic(bad):
    model = mlp()
    tuner = lj.LoHaModel(model, loha())
    factor = model.head.factors["default"]["hada_w1_a"]
    factor[...] = factor[...].at[0, 0].set(bad)
    snap = snapshot(model)
    with pytest.raises(
        ValueError, match="head: NaNs detected in the merged weights. The adapter default seems to be broken"
    ):
        tuner.merge_adapter(safe_merge=True)
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="NaNs detected"):
        tuner.merge_and_unload(safe_merge=True)
    assert_unchanged(model, snap)


def test_multiple_adapters_disable_delete():
    model = mlp()
    lin = model.layers[0]
    x = XM[0]
    base_lin = lin(x)
    tuner = lj.LoHaModel(model, loha(), adapter_name="a")
    tuner.add_adapter("b", loha(r=3))
    assert tuner.active_adapters == ["a"]
    a = model.layers[0](x)
    tuner.set_adapter("b")
    b = model.layers[0](x)
    tuner.set_adapter(["a", "b"])
    both = model.layers[0](x)
    np.testing.assert_allclose(both - base_lin, (a - base_lin) + (b - base_lin), rtol=1e-5, atol=1e-6)
    with tuner.disable_adapter():
        np.testing.assert_array_equal(model.layers[0](x), base_lin)
    tuner.merge_adapter(["a"])
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['a'\] while they are merged"):
        tuner.delete_adapter("a")
    tuner.unmerge_adapter()
    tuner.delete_adapter("a")
    assert tuner.active_adapters == ["b"]
    np.testing.assert_allclose(model.layers[0](x), b, atol=1e-6)
    with pytest.raises(ValueError, match="Adapter a does not exist"):
        tuner.delete_adapter("a")


def test_dropout_only_in_training_and_never_nan():
    model = mlp()
    tuner = lj.LoKrModel(model, lokr(rank_dropout=1.0, rank_dropout_scale=True))
    with_adapter = tuner(*XM)  # train mode by default (like torch): every row dropped -> base output
    with tuner.disable_adapter():
        base = tuner(*XM)
    np.testing.assert_allclose(with_adapter, base, atol=1e-6)
    model.eval()
    assert not np.allclose(tuner(*XM), base)
    model2 = mlp()
    tuner2 = lj.LoHaModel(model2, loha(module_dropout=1.0))
    np.testing.assert_allclose(tuner2(*XM), base, atol=1e-6)
    model2.eval()
    assert not np.allclose(tuner2(*XM), base)


def test_rank_dropout_mask_keeps_rows_divided_by_the_kept_fraction():
    model = mlp()
    lj.LoHaModel(model, loha(rank_dropout=0.5))
    layer = model.layers[0]
    keep = np.arange(24) % 3 != 0
    ours = layer.get_delta_weight("default", rank_dropout_mask=jnp.asarray(keep))
    # PEFT's rule in float64 numpy: ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) · alpha / r, kept rows / mean(keep), others 0
    f = {k: np.asarray(v[...], np.float64) for k, v in layer.factors["default"].items()}
    full = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * 4 / 2
    expected = full * (keep / keep.mean())[:, None]
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    assert np.all(np.asarray(ours)[~keep] == 0)


def test_training_dropout_under_jit_uses_rng_stream():
    model = mlp()
    tuner = lj.LoHaModel(model, loha(rank_dropout=0.5, module_dropout=0.2), rngs=nnx.Rngs(params=0, dropout=7))
    f = nnx.jit(lambda t, x: t(x))
    a, b = f(tuner, XM[0]), f(tuner, XM[0])
    assert not np.allclose(a, b)  # the stream advances between calls
    model.eval()  # no dropout: the jitted call gives the merged model's output
    np.testing.assert_allclose(f(tuner, XM[0]), nnx.clone(tuner).merge_and_unload()(XM[0]), rtol=1e-5, atol=1e-6)


def test_abstract_initialisation_with_eval_shape():
    abstract = nnx.eval_shape(lambda: lj.LoKrModel(mlp(), lokr(r=4), rngs=nnx.Rngs(0)))
    factors = jax.tree.leaves(nnx.state(abstract, lj.LycorisParam))
    assert factors and all(isinstance(f, jax.ShapeDtypeStruct) for f in factors)
    shapes = {
        jax.tree_util.keystr(p): v.shape
        for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(abstract, lj.LycorisParam))
    }
    assert any("lokr_w1" in k for k in shapes)


def test_bf16_base_with_fp32_adapters_follows_peft_arithmetic():
    model = NnxMLP(nnx.Rngs(0))
    for _, m in nnx.iter_modules(model):
        if isinstance(m, nnx.Linear):
            m.kernel.set_value(m.kernel[...].astype(jnp.bfloat16))
            if m.bias is not None:
                m.bias.set_value(m.bias[...].astype(jnp.bfloat16))
    lj.LoKrModel(model, lokr(target_modules=["layers.0"]))
    layer = model.layers[0]
    assert all(p.dtype == jnp.float32 for p in layer.factors["default"].values())
    x = XM[0].astype(jnp.bfloat16)
    y = layer(x)
    assert y.dtype == jnp.bfloat16
    # PEFT's bf16(float32(base(x)) + x_fp32 @ ΔWᵀ) is the exact sum rounded once to bf16; ΔW from the
    # factors in float64 numpy (not the layer's own get_delta_weight)
    f = {k: np.asarray(v[...], np.float64) for k, v in layer.factors["default"].items()}
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
    delta = np.kron(w1, w2) * 4 / 2  # alpha / r
    exact = np.asarray(layer.base_layer(x), np.float64) + np.asarray(x, np.float64) @ delta.T
    assert_rounded(y, exact, "bf16 LoKr layer")


# ---------------------------------------------------------------------------------------------- custom variant
class CustomLycorisConfig(lj.LycorisConfig):
    PEFT_TYPE = "CUSTOM_LYCORIS_LORA_JAX"


def plan_custom(layer, r, alpha, config, *, where=""):
    """LoRA-like: ``lora_A (r, in)`` (Kaiming), ``lora_B (out, r)`` (zeros), PyTorch layout."""
    factors = (("lora_A", (r, layer.in_features), "kaiming"), ("lora_B", (layer.out_features, r), "zeros"))
    return AdapterPlan(
        "CUSTOM_LYCORIS_LORA_JAX",
        layer,
        r,
        alpha,
        factors,
        rank_dropout=config.rank_dropout,
        module_dropout=config.module_dropout,
    )


# A new method is its plan and one record: ``ΔW = lora_B (out, r) @ lora_A (r, in) * alpha / r``.
lj.methods.register(
    lj.methods.Method(
        "CUSTOM_LYCORIS_LORA_JAX",
        ("lora_A", "lora_B"),
        plan_custom,
        lambda f, scale, shape: (f["lora_B"] @ f["lora_A"] * scale).reshape(shape),
        kinds=frozenset({"linear"}),
    )
)


class CustomLycorisTuner(lj.LycorisTuner):
    prefix = "lora_"
    config_cls = CustomLycorisConfig


def test_custom_variant_matches_the_torch_custom_variant(tmp_path):
    from tests.torch.test_torch_twin import CustomLycorisConfig as TorchConfig
    from tests.torch.test_torch_twin import CustomLycorisLinear as TorchLinear

    model = mlp()
    base = model(*XM)
    tuner = CustomLycorisTuner(model, CustomLycorisConfig(r=2, alpha=4, target_modules=["layers.0"]))
    np.testing.assert_array_equal(tuner(*XM), base)  # lora_B starts at zero
    layer = model.layers[0]
    layer.factors["default"]["lora_B"][...] = jax.random.normal(jax.random.key(3), (24, 2))
    out = tuner(*XM)
    assert not np.allclose(out, base)

    torch_linear = torch.nn.Linear(12, 24)
    twin = TorchLinear(torch_linear, "default", TorchConfig(r=2, alpha=4, target_modules=["x"]), r=2, alpha=4)
    with torch.no_grad():
        for name, param in layer.factors["default"].items():
            twin.factors["default"][name].copy_(torch.tensor(np.asarray(param[...])))
    np.testing.assert_allclose(
        layer.get_delta_weight("default"), twin.get_delta_weight("default").detach().numpy(), rtol=1e-6
    )
    f = {k: np.asarray(v[...], np.float64) for k, v in layer.factors["default"].items()}  # and the formula
    exact = f["lora_B"] @ f["lora_A"] * 4 / 2
    np.testing.assert_allclose(layer.get_delta_weight("default"), exact, rtol=0, atol=1e-6 * np.abs(exact).max())

    tuner.save_pretrained(tmp_path)
    again = lj.LycorisTuner.from_pretrained(mlp(), tmp_path)
    assert isinstance(again, CustomLycorisTuner)
    np.testing.assert_array_equal(again(*XM), out)
    np.testing.assert_allclose(again.merge_and_unload()(*XM), out, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- bad input
class WithEmbed(nnx.Module):
    def __init__(self):
        self.emb = nnx.Embed(10, 8, rngs=nnx.Rngs(0))
        self.conv3d = nnx.Conv(2, 2, (3, 3, 3), rngs=nnx.Rngs(0))
        self.q = nnx.Linear(8, 8, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "cfg, exc, match",
    [
        (
            lj.LoHaConfig(target_modules=["emb"]),
            TypeError,
            "emb: target module of type Embed not supported, currently only adapters for Linear, Conv, LinearGeneral, Einsum",
        ),
        (
            lj.LoHaConfig(target_modules=["conv3d"]),
            TypeError,
            "conv3d: target module of type Conv with 3 spatial dims not supported",
        ),
        (lj.LoHaConfig(target_modules=["q", "emb"]), TypeError, "emb: target module of type Embed"),
        (
            lj.LoHaConfig(target_modules=["nothing"]),
            lj.NoMatchingModuleError,
            r"Target modules \['nothing'\] not found",
        ),
        (
            lj.LoHaConfig(target_modules=["q"], modules_to_save=["emb"]),
            ValueError,
            "modules_to_save=.*not supported by the Flax twin",
        ),
    ],
)
def test_bad_targets_leave_model_untouched(cfg, exc, match):
    model = WithEmbed()
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        lj.LoHaModel(model, cfg)
    assert_unchanged(model, snap)


def test_bad_rank_duplicate_and_wrong_config_type():
    cfg = lokr()
    cfg.r = 0
    model = mlp()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"head: `r` should be a positive integer value but the value passed is 0"):
        lj.LoKrModel(model, cfg)
    assert_unchanged(model, snap)
    tuner = lj.LoKrModel(model, lokr())
    snap = snapshot(model)
    with pytest.raises(ValueError, match="Adapter 'default' already exists"):
        tuner.add_adapter("default", lokr())
    with pytest.raises(TypeError, match="LoKrModel: expected a LoKrConfig, got LoHaConfig"):
        tuner.add_adapter("x", loha())
    assert_unchanged(model, snap)


def test_bad_checkpoints_leave_model_untouched(tmp_path):
    from safetensors.numpy import load_file, save_file

    lj.LoKrModel(mlp(), lokr()).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    good = load_file(path)
    model = mlp()
    snap = snapshot(model)
    bad = dict(good)
    bad["base_model.model.head.lokr_w1"] = np.zeros((3, 3), np.float32)
    save_file(bad, path)
    with pytest.raises(ValueError, match=r"head.lokr_w1: checkpoint shape \(3, 3\) does not fit the adapter, expected"):
        lj.LycorisTuner.from_pretrained(model, tmp_path)
    assert_unchanged(model, snap)
    save_file({k: v for k, v in good.items() if "head" not in k}, path)
    with pytest.raises(ValueError, match=r"head: checkpoint factors \[\] do not fit"):
        lj.LycorisTuner.from_pretrained(model, tmp_path)
    save_file(good | {"base_model.model.extra.weight": np.zeros(2, np.float32)}, path)
    with pytest.raises(ValueError, match="fits no adapter factor"):
        lj.LycorisTuner.from_pretrained(model, tmp_path)
    save_file(good, path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"LOKR"', '"IA3"'))
    with pytest.raises(ValueError, match="unknown peft_type 'IA3'"):
        lj.LycorisTuner.from_pretrained(model, tmp_path)
    cfg_path.write_text(cfg_path.read_text().replace('"IA3"', '"LOKR"'))
    path.rename(tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle files are never loaded"):
        lj.LycorisTuner.from_pretrained(model, tmp_path)
    assert_unchanged(model, snap)


def test_quiet_on_normal_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lj.LoHaModel(mlp(), loha())(*XM)


def test_trainable_filter_trains_only_active_non_inference_adapters(tmp_path):
    lj.LoKrModel(mlp(), lokr()).save_pretrained(tmp_path)
    tuner = lj.LycorisTuner.from_pretrained(mlp(), tmp_path, adapter_name="frozen")  # inference mode
    tuner.add_adapter("train", lokr())
    tuner.add_adapter("idle", lokr())
    tuner.set_adapter(["frozen", "train"])
    before = {k: np.asarray(v) for k, v in tuner.adapter_state_dict("frozen").items()}
    idle = {k: np.asarray(v) for k, v in tuner.adapter_state_dict("idle").items()}
    trained = {k: np.asarray(v) for k, v in tuner.adapter_state_dict("train").items()}
    wrt = tuner.trainable_filter()
    optimizer = nnx.Optimizer(tuner, optax.adamw(1e-2, weight_decay=0.1), wrt=wrt)
    grads = nnx.grad(lambda t: (t(*XM) ** 2).mean(), argnums=nnx.DiffState(0, wrt))(tuner)
    optimizer.update(tuner, grads)
    for name, ref in (("frozen", before), ("idle", idle)):
        for k, v in tuner.adapter_state_dict(name).items():
            np.testing.assert_array_equal(v, ref[k])
    assert any(not np.array_equal(v, trained[k]) for k, v in tuner.adapter_state_dict("train").items())


def test_failed_add_adapter_leaves_layers_consistent(tmp_path):
    lj.LoKrModel(mlp(), lokr()).save_pretrained(tmp_path)
    tuner = lj.LycorisTuner.from_pretrained(mlp(), tmp_path, rngs=nnx.Rngs(dropout=1))  # loading needs no params stream
    snap = snapshot(tuner.model)
    with pytest.raises(ValueError, match=r"head: initialising adapter factors needs an nnx.Rngs with a 'params'"):
        tuner.add_adapter("b", lokr())
    assert_unchanged(tuner.model, snap)
    for _, layer in tuner._lycoris_layers():
        assert set(layer.plans) == set(layer.factors) == {"default"}


def test_shared_module_is_rejected_untouched():
    class Shared(nnx.Module):
        def __init__(self):
            q = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
            self.enc = nnx.Dict({"q": q})
            self.dec = nnx.Dict({"q": q})

    model = Shared()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"dec.q: this module is shared, reachable as \['dec.q', 'enc.q'\]"):
        lj.LoHaModel(model, lj.LoHaConfig(target_modules=["q"]))
    assert_unchanged(model, snap)


def test_all_linear_on_nnx():
    tuner = lj.LoHaModel(conv_and_linear := _conv_linear(), lj.LoHaConfig(r=2, target_modules="all-linear"))
    assert sorted(n for n, _ in tuner._lycoris_layers()) == ["a", "b"]
    assert conv_and_linear is tuner.model


def _conv_linear():
    class M(nnx.Module):
        def __init__(self):
            self.a = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
            self.b = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
            self.conv = nnx.Conv(4, 4, (3,), rngs=nnx.Rngs(0))

    return M()
