"""lycoris_jax math equals lycoris_torch math (same names, same inputs), with and without jit."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl.testing import parameterized

import lycoris_jax as lj
import lycoris_torch as lt
from lycoris_core import LayerShape, LoHaConfig, LoKrConfig, plan_loha, plan_lokr

RTOL = 2e-6  # fp32: different einsum/matmul association orders between XLA and ATen.


def _factors(plan, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape, _ in plan.factors}


def _close(ours, theirs, rtol=RTOL):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    scale = max(np.abs(theirs).max(), 1e-30)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=rtol * scale)


LAYERS = {
    "linear": LayerShape("linear", 24, 36),
    "conv1d_k3": LayerShape("conv1d", 20, 12, (3,)),
    "conv2d_3x5": LayerShape("conv2d", 12, 8, (3, 5)),
    "conv2d_grouped": LayerShape("conv2d", 24, 4, (3, 3), groups=3),
}
CASES = []
for layer_name, layer in LAYERS.items():
    for effective in (False, True):
        CASES.append(
            (
                f"loha-{layer_name}-eff{int(effective)}",
                plan_loha(layer, 3, 5, LoHaConfig(use_effective_conv2d=effective)),
            )
        )
        for r, both in ((2, True), (16, False)):
            cfg = LoKrConfig(use_effective_conv2d=effective, decompose_both=both)
            CASES.append((f"lokr-{layer_name}-eff{int(effective)}-r{r}-both{int(both)}", plan_lokr(layer, r, 5, cfg)))


class DeltaWeightTest(chex.TestCase, parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES)
    def test_delta_weight_matches_torch(self, plan):
        factors = _factors(plan)
        jax_mod, torch_mod = (lj.loha, lt.loha) if plan.peft_type == "LOHA" else (lj.lokr, lt.lokr)
        fn = self.variant(lambda f: jax_mod.delta_weight(f, plan.scaling, plan.weight_shape))
        ours = fn({k: jnp.asarray(v) for k, v in factors.items()})
        theirs = torch_mod.delta_weight(
            {k: torch.from_numpy(v) for k, v in factors.items()}, plan.scaling, plan.weight_shape
        )
        chex.assert_shape(ours, plan.weight_shape)
        _close(ours, theirs.numpy())

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CASES[::3])
    def test_gradients_match_torch_autograd(self, plan):
        factors = _factors(plan, seed=1)
        jax_mod, torch_mod = (lj.loha, lt.loha) if plan.peft_type == "LOHA" else (lj.lokr, lt.lokr)
        probe = np.random.default_rng(2).standard_normal(plan.weight_shape).astype(np.float32)

        def loss(f):
            return (jax_mod.delta_weight(f, plan.scaling, plan.weight_shape) * probe).sum()

        grads = self.variant(jax.grad(loss))({k: jnp.asarray(v) for k, v in factors.items()})
        tf = {k: torch.from_numpy(v).requires_grad_() for k, v in factors.items()}
        (torch_mod.delta_weight(tf, plan.scaling, plan.weight_shape) * torch.from_numpy(probe)).sum().backward()
        for name in factors:
            _close(grads[name], tf[name].grad.numpy(), rtol=1e-5)


class PiecesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_make_kron_conv1d_full_w2_uses_peft_layout(self):
        w1 = np.arange(6, dtype=np.float32).reshape(2, 3)
        w2 = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
        ours = self.variant(lambda a, b: lj.lokr.make_kron(a, b, 0.5))(w1, w2)
        np.testing.assert_array_equal(ours, lt.lokr.make_kron(torch.from_numpy(w1), torch.from_numpy(w2), 0.5).numpy())
        chex.assert_shape(ours, (2, 6, 12))  # (b, a·d, c·k): torch.kron/jnp.kron left-pad W1

    @chex.variants(with_jit=True, without_jit=True)
    def test_rank_dropout_with_an_explicit_mask_matches_torch(self):
        w = np.random.default_rng(0).standard_normal((6, 4, 3)).astype(np.float32)
        keep = np.array([1, 0, 1, 1, 0, 1], bool)
        for rescale in (False, True):
            ours = self.variant(lambda a, k, rescale=rescale: lj.functional.apply_rank_dropout(a, k, rescale=rescale))(
                w, keep
            )
            theirs = lt.functional.apply_rank_dropout(torch.from_numpy(w), torch.from_numpy(keep), rescale=rescale)
            np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-7)
        zero = self.variant(lambda a, k: lj.functional.apply_rank_dropout(a, k, rescale=True))(w, np.zeros(6, bool))
        np.testing.assert_array_equal(zero, np.zeros_like(w))  # no NaN when every row is dropped

    def test_rank_dropout_keep_fraction(self):
        keep = lj.functional.rank_dropout_keep(jax.random.key(0), 20000, 0.3)
        self.assertAlmostEqual(float(keep.mean()), 0.7, delta=0.01)

    def test_kaiming_uniform_bounds_match_torch(self):
        shape = (5, 3, 2, 2)
        x = np.asarray(lj.functional.kaiming_uniform(jax.random.key(0), shape))
        bound = 1 / np.sqrt(3 * 2 * 2)
        self.assertLessEqual(np.abs(x).max(), bound)
        self.assertGreater(np.abs(x).max(), 0.9 * bound)

    def test_layout_round_trip(self):
        for shape in ((4, 3), (4, 3, 5), (4, 3, 5, 2)):
            w = np.random.default_rng(0).standard_normal(shape)
            np.testing.assert_array_equal(lj.functional.to_torch_layout(lj.functional.to_flax_kernel(w)), w)
        self.assertEqual(lj.functional.to_flax_kernel(np.zeros((4, 3, 5, 2))).shape, (5, 2, 3, 4))


# ---------------------------------------------------------------- factored Linear gradients
GRAD_CASES = [
    ("loha", LoHaConfig(), 24, 36, 4),
    ("lokr_full", LoKrConfig(), 24, 36, 4),
    ("lokr_low_w2", LoKrConfig(), 64, 48, 2),
    ("lokr_decompose_both", LoKrConfig(decompose_both=True), 64, 48, 2),
]


class LinearGradsTest(chex.TestCase, parameterized.TestCase):
    """``linear_grads`` (no ΔW formed) equals reverse-mode differentiation of PEFT's ``x @ ΔWᵀ``."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*GRAD_CASES)
    def test_factored_gradients_equal_autodiff(self, config, out_f, in_f, r):
        kind = "loha" if isinstance(config, LoHaConfig) else "lokr"
        plan = (plan_loha if kind == "loha" else plan_lokr)(LayerShape("linear", out_f, in_f), r, 2 * r, config)
        module = lj.loha if kind == "loha" else lj.lokr
        factors = {k: jnp.asarray(v) for k, v in _factors(plan, seed=3).items()}
        rng = np.random.default_rng(4)
        x = jnp.asarray(rng.standard_normal((5, in_f)), jnp.float32)
        dy = jnp.asarray(rng.standard_normal((5, out_f)), jnp.float32)
        scale = jnp.float32(0.75)

        def reference(x, factors, scale):
            return x @ module.delta_weight(factors, scale, (out_f, in_f)).T

        _, vjp = jax.vjp(reference, x, factors, scale)
        want_dx, want_df, want_ds = vjp(dy)
        dx, df, ds = self.variant(module.linear_grads)(x, dy, factors, scale)
        _close(dx, want_dx)
        _close(ds, want_ds)
        assert df.keys() == want_df.keys() == factors.keys()
        for name in factors:
            _close(df[name], want_df[name])
