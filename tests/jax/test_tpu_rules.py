"""The merged path as a TPU compiles it (``lycoris_jax.compiling_for("tpu")``, the fold rules of
``lycoris_core.paths.fold_rule``), run on this CPU: the same arithmetic as the CPU rules, in another
order and with the kernel rounded where a TPU's matrix unit rounds it. Every layer and dtype against
PEFT: ``parity_tests``' ``merged_tpu`` column."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lycoris_jax as lj
from lycoris_core.paths import FoldRule, fold_rule
from lycoris_jax import functional, loha


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.proj = nnx.Linear(48, 40, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


X = jax.random.normal(jax.random.key(1), (6, 48), jnp.bfloat16)
PROBE = jax.random.normal(jax.random.key(2), (6, 40), jnp.float32)


def _tuner(kind: str):
    config = (lj.LoKrConfig if kind == "lokr" else lj.LoHaConfig)(
        r=4, alpha=4, target_modules=["proj"], init_weights=False
    )
    return (lj.LoKrModel if kind == "lokr" else lj.LoHaModel)(Net(nnx.Rngs(0)), config, forward_path="merged")


def _run(tuner, platform: str):
    """Output, factor gradients and input gradient of ``sum(y * PROBE)``, traced for ``platform``."""
    graphdef, factors, rest = nnx.split(tuner, lj.LycorisParam, ...)

    def loss(factors, x):
        y = nnx.merge(graphdef, factors, rest)(x)
        return jnp.sum(y.astype(jnp.float32) * PROBE), y

    with lj.compiling_for(platform):
        (_, y), (dfactors, dx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(factors, X)
    return y, dfactors, dx


def _reference(tuner):
    """float64: ``x (W + ΔW)`` and ``dx = PROBE (W + ΔW)ᵀ``, ΔW from the layer's own ``get_delta_weight``."""
    layer = tuner.model.proj
    w = (
        np.asarray(layer.base_layer.kernel[...], np.float64)
        + np.asarray(layer.get_delta_weight("default"), np.float64).T
    )
    return np.asarray(X, np.float64) @ w, np.asarray(PROBE, np.float64) @ w.T


def test_fold_rules_by_platform():
    assert fold_rule("LOKR", "cpu") == FoldRule() == fold_rule("LOHA", "gpu")
    for kind in ("LOKR", "LOHA"):
        rule = fold_rule(kind, "tpu")
        assert rule.layer_dtype and rule.matmul_form and rule.dx_through_fold
    assert not fold_rule("LOKR", "tpu", default_precision=False).layer_dtype  # "highest": the fold stays fp32


def test_compiling_for_sets_the_platform_for_its_block_only():
    assert functional.target_platform() == "cpu"
    with lj.compiling_for("tpu"):
        assert functional.target_platform() == "tpu"
        with lj.compiling_for("gpu"):
            assert functional.target_platform() == "gpu"
        assert functional.target_platform() == "tpu"
    assert functional.target_platform() == "cpu"
    with pytest.raises(ValueError, match="platform must be 'cpu', 'gpu' or 'tpu', got 'TPU v5'"):
        with lj.compiling_for("TPU v5"):
            pass


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_tpu_fold_rules_compute_the_same_step(kind):
    tuner = _tuner(kind)
    y_cpu, g_cpu, dx_cpu = _run(tuner, "cpu")
    y_tpu, g_tpu, dx_tpu = _run(tuner, "tpu")
    ref_y, ref_dx = _reference(tuner)
    ulp = 2.0**-7 * np.abs(ref_y).max()
    # the CPU rules fold in fp32 (one bf16 rounding: the output); the TPU rules round W + ΔW to bf16 first,
    # exactly as a TPU's matrix unit reads an fp32 kernel at default precision: one more rounding
    assert y_cpu.dtype == y_tpu.dtype == jnp.bfloat16
    assert np.abs(np.asarray(y_cpu, np.float64) - ref_y).max() <= ulp
    assert np.abs(np.asarray(y_tpu, np.float64) - ref_y).max() <= 2 * ulp
    # the factor gradients take the same factored backward on both (fp32, from x and dy)
    leaves_cpu, leaves_tpu = jax.tree.leaves(g_cpu), jax.tree.leaves(g_tpu)
    assert len(leaves_cpu) == len(leaves_tpu) >= 2
    for g, h in zip(leaves_cpu, leaves_tpu, strict=True):
        np.testing.assert_allclose(np.asarray(h), np.asarray(g), rtol=1e-6, atol=1e-6)
    # dx: dy Wᵀ plus the branch's dx (CPU) or through W + ΔW (TPU), within one bf16 rounding of float64
    for dx in (dx_cpu, dx_tpu):
        assert np.abs(np.asarray(dx, np.float64) - ref_dx).max() <= 2.0**-7 * np.abs(ref_dx).max()


def test_loha_matmul_weight_is_delta_weight():
    keys = jax.random.split(jax.random.key(0), 4)
    factors = {
        "hada_w1_a": jax.random.normal(keys[0], (40, 4)),
        "hada_w1_b": jax.random.normal(keys[1], (4, 48)),
        "hada_w2_a": jax.random.normal(keys[2], (40, 4)),
        "hada_w2_b": jax.random.normal(keys[3], (4, 48)),
    }
    ref = loha.delta_weight(factors, 0.5, (40, 48))
    np.testing.assert_allclose(loha.matmul_weight(factors, 0.5, (40, 48)), ref, rtol=1e-5, atol=1e-5)
