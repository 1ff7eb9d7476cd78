"""Forward paths (``lycoris_core.paths``) in the JAX front ends: every path computes PEFT's output and
gradients (fp32: within 1e-6 of the largest value), with dropout, several adapters and stacks; the
factored path forms no ΔW-sized array. The PyTorch twin: ``tests/torch/test_deviations.py`` (o);
real PEFT on every layer and dtype: ``parity_tests``' path columns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax import nnx

import lycoris_jax as lj
from lycoris_jax import linen

PATHS = ("peft", "merged", "factored", "auto")


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.lin = nnx.Linear(24, 36, rngs=rngs)
        self.conv = nnx.Conv(4, 8, (3, 3), rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, 12, qkv_features=8, out_features=12, decode=False, rngs=rngs)
        self.einsum = nnx.Einsum("btd,ndh->btnh", (2, 12, 3), (2, 3), rngs=rngs)

    def __call__(self, x, img, seq):
        return self.lin(x), self.conv(img), self.attn(seq), self.einsum(seq)


X = jax.random.normal(jax.random.key(1), (5, 24))
IMG = jax.random.normal(jax.random.key(2), (2, 6, 6, 4))
SEQ = jax.random.normal(jax.random.key(3), (2, 4, 12))
TARGETS = ["lin", "conv", "attn.query", "attn.out", "einsum"]


def build(kind: str, path: str, **config):
    cfg = (lj.LoKrConfig if kind == "lokr" else lj.LoHaConfig)(
        r=4, alpha=6, target_modules=TARGETS, init_weights=False, **config
    )
    tuner = (lj.LoKrModel if kind == "lokr" else lj.LoHaModel)(
        Model(nnx.Rngs(0)), cfg, rngs=nnx.Rngs(params=1, dropout=2), forward_path=path
    )
    for _, layer in tuner._lycoris_layers():  # same non-zero factors on every path
        for name, param in layer.factors["default"].items():
            param[...] = jax.random.normal(jax.random.key(len(name) + param.size), param.shape) * 0.2
    return tuner


@nnx.jit
def outputs_and_grads(tuner):
    """Outputs and factor gradients of one training call (one set of dropout draws)."""

    def loss(t):
        outs = t(X, IMG, SEQ)
        return sum((y * jnp.linspace(-1, 1, y.size).reshape(y.shape)).sum() for y in outs), outs

    (_, outs), grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, lj.LycorisParam), has_aux=True)(tuner)
    return outs, nnx.state(grads)


def relative(a, b) -> float:
    return float(jnp.abs(a - b).max() / jnp.maximum(jnp.abs(b).max(), 1e-30))


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_every_path_matches_the_peft_path_with_dropout(kind):
    """Training mode: rank and module dropout draw the same keys in the same order on every path."""
    results = {}
    for path in PATHS[:3]:  # "auto" takes one of the others per layer
        tuner = build(kind, path, rank_dropout=0.3, module_dropout=0.2)
        tuner.train()
        results[path] = outputs_and_grads(tuner)
    ref_out, ref_grads = results["peft"]
    for path in PATHS[1:3]:
        out, grads = results[path]
        for a, b in zip(out, ref_out, strict=True):
            assert relative(a, b) <= 1e-6, path
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            assert relative(a, b) <= 1e-6, path


def test_two_active_adapters_and_a_traced_scale_on_every_path():
    ref = None
    for path in PATHS:
        tuner = build("lokr", path)
        tuner.add_adapter("b", lj.LoKrConfig(r=2, target_modules=["lin", "conv"], init_weights=False))
        for name in ("lin", "conv"):
            for param in getattr(tuner.model, name).factors["b"].values():
                param[...] = jnp.full(param.shape, 0.1)
        tuner.set_adapter(["default", "b"])
        tuner.eval()
        out = nnx.jit(lambda t, s: (t.set_scale("default", s), t(X, IMG, SEQ))[1])(tuner, jnp.asarray(1.5))
        if ref is None:
            ref = out
        for a, b in zip(out, ref, strict=True):
            assert relative(a, b) <= 1e-6, path


def test_factored_path_forms_no_delta_w():
    """LoKr and LoHa on a 256x512 Linear: no array with the kernel's element count anywhere in the
    jitted forward + backward (the merged path forms ``W + ΔW`` once, in the forward only)."""
    model = nnx.Sequential(nnx.Linear(256, 512, use_bias=False, rngs=nnx.Rngs(0)))
    x = jnp.ones((4, 256))
    for cfg, cls in ((lj.LoKrConfig(r=4, decompose_both=True), lj.LoKrModel), (lj.LoHaConfig(r=4), lj.LoHaModel)):
        counts = {}
        for path in ("factored", "merged"):
            tuner = cls(
                nnx.clone(model), cfg.__class__(**{**cfg.to_dict(), "target_modules": ["layers.0"]}), forward_path=path
            )
            graphdef, factors, rest = nnx.split(tuner, lj.LycorisParam, ...)

            def step(f, r, graphdef=graphdef):
                return jax.grad(lambda f: (nnx.merge(graphdef, f, r)(x) ** 2).sum())(f)

            jaxpr = str(jax.make_jaxpr(step)(factors, rest))
            counts[path] = jaxpr.count("f32[256,512]") + jaxpr.count("f32[512,256]")
        assert counts["factored"] <= 1, counts  # the frozen kernel itself, read by the base call
        assert counts["merged"] > counts["factored"], counts


def test_factored_conv_forms_no_delta_w():
    """An ungrouped 3x3 conv (64 -> 128): LoKr convolves each input block with W2, LoHa convolves
    with r² channels; no kernel-sized array (9·64·128 elements) besides the frozen kernel."""
    model = nnx.Sequential(nnx.Conv(64, 128, (3, 3), use_bias=False, rngs=nnx.Rngs(0)))
    x = jnp.ones((2, 6, 6, 64))
    for cfg, cls in ((lj.LoKrConfig(r=4, decompose_both=True), lj.LoKrModel), (lj.LoHaConfig(r=4), lj.LoHaModel)):
        tuner = cls(
            nnx.clone(model),
            cfg.__class__(**{**cfg.to_dict(), "target_modules": ["layers.0"]}),
            forward_path="factored",
        )
        graphdef, factors, rest = nnx.split(tuner, lj.LycorisParam, ...)

        def step(f, r, graphdef=graphdef):
            return jax.grad(lambda f: (nnx.merge(graphdef, f, r)(x) ** 2).sum())(f)

        jaxpr = str(jax.make_jaxpr(step)(factors, rest))
        assert jaxpr.count("f32[3,3,64,128]") <= 1 and "f32[128,64,3,3]" not in jaxpr, cls


@pytest.mark.parametrize("path", ["merged", "factored"])
def test_scanned_stack_on_each_path_equals_the_peft_path(path):
    """An ``nnx.scan``-applied stack (per-layer scales, a layer left out) on each path."""
    from tests.jax.test_stacks import Scanned, config
    from tests.jax.test_stacks import X as SX

    cfg = config("loha", layers_to_transform=[0, 2, 3], layers_pattern="layers", alpha_pattern={"layers.2.mlp": 16})
    outs = []
    for p in ("peft", path):
        tuner = lj.LoHaModel(Scanned(), cfg, stacks=["layers"], forward_path=p)
        for _, layer in tuner._lycoris_layers():
            for param in layer.factors["default"].values():
                param[...] = jax.random.normal(jax.random.key(param.size), param.shape) * 0.1
        outs.append(nnx.jit(lambda t, x: t(x))(tuner, SX))
    assert relative(outs[1], outs[0]) <= 1e-6


def test_linen_paths_match_the_peft_path():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, img):
            return nn.Dense(36, name="lin")(x), nn.Conv(8, (3, 3), name="conv")(img)

    params = Net().init(jax.random.key(0), X, IMG)["params"]
    cfg = lj.LoHaConfig(r=4, target_modules=["lin", "conv"], init_weights=False, rank_dropout=0.3)
    results = {}
    for path in PATHS:
        adapted, lyc = linen.adapt(Net(), params, cfg, key=jax.random.key(1), forward_path=path, deterministic=False)
        lyc = jax.tree.map(lambda v: jax.random.normal(jax.random.key(v.size), v.shape) * 0.2, lyc)

        def loss(lyc, adapted=adapted):
            outs = adapted.apply({"params": params, "lycoris": lyc}, X, IMG, rngs={"dropout": jax.random.key(5)})
            return sum(jnp.sum(o * jnp.linspace(-1, 1, o.size).reshape(o.shape)) for o in outs)

        results[path] = jax.value_and_grad(loss)(lyc)
    for path in PATHS[1:]:
        assert abs(float(results[path][0] - results["peft"][0])) <= 1e-5 * abs(float(results["peft"][0])) + 1e-5
        for a, b in zip(jax.tree.leaves(results[path][1]), jax.tree.leaves(results["peft"][1]), strict=True):
            assert relative(a, b) <= 1e-6, path
    with pytest.raises(ValueError, match="forward_path"):
        linen.adapt(Net(), params, cfg, key=jax.random.key(1), forward_path="fast")[0].apply(
            {"params": params, "lycoris": lyc}, X, IMG
        )
