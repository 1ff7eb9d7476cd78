"""jit ergonomics: a live scale that never recompiles, ``safe_merge`` under ``jax.jit`` (a returned flag,
all or nothing), and ``nnx.eval_shape`` tuners that answer every read-only query with shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import lycoris_jax as lj
import lycoris_torch as lt
from lycoris_jax import linen

X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8)), jnp.float32)


def make(kind: str = "lokr") -> lj.LycorisTuner:
    model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 8, rngs=nnx.Rngs(1)))
    cfg = (lj.LoKrConfig if kind == "lokr" else lj.LoHaConfig)(
        r=2, alpha=4, target_modules=["layers.0", "layers.1"], init_weights=False
    )
    return (lj.LoKrModel if kind == "lokr" else lj.LoHaModel)(model, cfg)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_a_new_scale_does_not_recompile(kind):
    tuner, traces = make(kind), []

    @nnx.jit
    def forward(t, x):
        traces.append(None)
        return t(x)

    before = forward(tuner, X)
    for scale in (0.5, 2.0, 0.0):
        tuner.set_scale("default", scale)
        np.testing.assert_allclose(forward(tuner, X), tuner(X), atol=1e-6)
    tuner.scale_layer(3.0)
    tuner.unscale_layer()
    np.testing.assert_allclose(forward(tuner, X), before, atol=1e-6)
    assert len(traces) == 1
    assert tuner.model.layers[0].scaling == {"default": 2.0}  # Python floats outside jit (alpha / r)


def test_set_scale_inside_jit_with_a_traced_value():
    tuner = make()

    @nnx.jit
    def rescale(t, s):
        t.set_scale("default", s)
        return t(X)

    out = rescale(tuner, jnp.float32(0.25))
    assert tuner.model.layers[1].scaling == {"default": 0.5}  # 0.25 * alpha / r
    np.testing.assert_allclose(out, tuner(X), atol=1e-6)
    with pytest.raises(ValueError, match="set_scale: scale: expected a finite number"):
        tuner.set_scale("default", float("nan"))  # concrete values are still checked


@pytest.mark.parametrize("finite", [True, False])
def test_safe_merge_under_jit_returns_a_flag_all_or_nothing(finite):
    tuner = make()
    kernels = [layer.kernel[...] for layer in tuner.model.layers]
    unmerged = tuner(X)
    if not finite:  # one broken factor in the second layer: neither kernel may change
        w1 = tuner.model.layers[1].factors["default"]["lokr_w1"]
        w1[...] = w1[...].at[0, 0].set(jnp.inf)

    ok = nnx.jit(lambda t: t.merge_adapter(safe_merge=True))(tuner)
    assert bool(ok) is finite
    assert [layer.merged_adapters for layer in tuner.model.layers] == [["default"]] * 2
    changed = [not np.array_equal(layer.kernel[...], k) for layer, k in zip(tuner.model.layers, kernels, strict=True)]
    assert changed == [finite, finite]
    if finite:
        np.testing.assert_allclose(tuner(X), unmerged, atol=1e-5)
    tuner.unmerge_adapter()  # subtracts exactly what the merge added
    for layer, k in zip(tuner.model.layers, kernels, strict=True):
        np.testing.assert_allclose(layer.kernel[...], k, atol=1e-6)
    assert not tuner.model.layers[0].merged
    if not finite:
        with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
            tuner.merge_adapter(safe_merge=True)  # outside jit: raises before any kernel changes


def test_eval_shape_tuner_answers_read_only_queries():
    abstract = nnx.eval_shape(make)
    concrete = make()
    shapes = {k: v.shape for k, v in abstract.adapter_state_dict().items()}
    assert shapes == {k: v.shape for k, v in concrete.adapter_state_dict().items()}
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in abstract.adapter_state_dict().values())
    torch_twin = lt.LoKrModel(
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)),
        lt.LoKrConfig(r=2, alpha=4, target_modules=["0", "1"], init_weights=False),
    )
    expected = torch_twin.get_nb_trainable_parameters()  # (48, 328): PEFT's counting
    assert abstract.get_nb_trainable_parameters() == concrete.get_nb_trainable_parameters() == expected
    assert abstract.active_adapters == ["default"]
    assert abstract.model.layers[0].scaling["default"].shape == ()  # abstract: a shape, not a float


def test_linen_and_pytree_take_a_traced_scale():
    import flax.linen as nn

    seq = nn.Sequential([nn.Dense(8)])
    params = seq.init(jax.random.key(0), X)["params"]
    adapted, lyc = linen.adapt(
        seq, params, lj.LoKrConfig(r=2, target_modules=["layers_0"], init_weights=False), key=jax.random.key(1)
    )
    traces = []

    @jax.jit
    def forward(lyc, s):
        traces.append(None)
        return adapted.clone(scale=s).apply({"params": params, "lycoris": lyc}, X)

    full, half = forward(lyc, 1.0), forward(lyc, 0.5)
    base = seq.apply({"params": params}, X)
    assert np.abs(full - base).max() > 1e-3  # the adapter is on
    np.testing.assert_allclose(half - base, (full - base) / 2, atol=1e-5)
    assert len(traces) == 1
