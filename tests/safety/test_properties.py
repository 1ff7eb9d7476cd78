"""Hypothesis properties: ``factorization`` laws, twin agreement over random plans, and round trips
(merge -> unmerge, save -> load) on both twins."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lycoris_jax as lj
import lycoris_torch as lt
from lycoris_core import LayerShape, LoHaConfig, LoKrConfig, factorization, plan_adapter, plan_from_factors
from tests.safety.twins import TWINS, lokr_kw

SLOW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 5000), st.one_of(st.just(-1), st.integers(1, 80)))
def test_factorization_laws(dimension, factor):
    m, n = factorization(dimension, factor)
    assert m * n == dimension
    if factor > 0 and dimension % factor == 0:
        assert (m, n) == (factor, dimension // factor)  # a dividing factor is taken as it is, unsorted
        return
    assert m <= n
    # otherwise the most square split whose smaller side does not exceed the factor
    bound = math.isqrt(dimension) if factor == -1 else min(factor, math.isqrt(dimension))
    assert m == max(k for k in range(1, bound + 1) if dimension % k == 0)


@st.composite
def plans(draw):
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d"]))
    kernel = {
        "linear": (),
        "conv1d": (draw(st.integers(1, 3)),),
        "conv2d": tuple(draw(st.lists(st.integers(1, 3), min_size=2, max_size=2))),
    }[kind]
    layer = LayerShape(kind, draw(st.integers(1, 24)), draw(st.integers(1, 24)), kernel)
    options = {
        "r": draw(st.integers(1, 8)),
        "alpha": draw(st.floats(0.5, 16)),
        "use_effective_conv2d": draw(st.booleans()),
    }
    if draw(st.booleans()):
        config = LoKrConfig(
            **options, decompose_both=draw(st.booleans()), decompose_factor=draw(st.sampled_from([-1, 2, 3, 4]))
        )
    else:
        config = LoHaConfig(**options)
    return plan_adapter(layer, config.r, config.alpha, config), config, draw(st.integers(0, 2**31 - 1))


@SLOW
@given(plans())
def test_twins_agree_on_delta_weight_and_plans_are_recoverable_from_factors(case):
    plan, config, seed = case
    rng = np.random.default_rng(seed)
    factors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape, _ in plan.factors}
    t_mod, j_mod = (lt.loha, lj.loha) if plan.peft_type == "LOHA" else (lt.lokr, lj.lokr)
    dt = t_mod.delta_weight({k: torch.from_numpy(v) for k, v in factors.items()}, plan.scaling, plan.weight_shape)
    dj = j_mod.delta_weight({k: jnp.asarray(v) for k, v in factors.items()}, plan.scaling, plan.weight_shape)
    dt, dj = dt.numpy(), np.asarray(dj)
    assert dt.shape == dj.shape == plan.weight_shape
    np.testing.assert_allclose(dj, dt, rtol=0, atol=2e-6 * max(1.0, float(np.abs(dt).max())))
    # the checkpoint alone determines a plan with exactly these factors (what ``check`` relies on)
    recovered = plan_from_factors(plan.peft_type, plan.factor_shapes, config.r, config.alpha, config)
    assert recovered.factor_shapes == plan.factor_shapes


@st.composite
def adapters(draw):
    peft_type = draw(st.sampled_from(["LOHA", "LOKR"]))
    kw = lokr_kw(r=draw(st.integers(1, 6)), alpha=draw(st.floats(0.5, 16)))
    if peft_type == "LOKR":
        kw |= {"decompose_both": draw(st.booleans()), "decompose_factor": draw(st.sampled_from([-1, 2, 4]))}
    return peft_type, kw, draw(st.floats(-3, 3).filter(lambda s: abs(s) > 1e-3)), draw(st.integers(0, 1000))


@SLOW
@given(adapters())
def test_merge_unmerge_and_save_load_round_trips_on_both_twins(tmp_path_factory, case):
    peft_type, kw, scale, seed = case
    outs = []
    for twin in TWINS:
        config = (twin.lib.LoKrConfig if peft_type == "LOKR" else twin.lib.LoHaConfig)(**kw)
        tuner = twin.tuner(config=config, seed=seed)
        tuner.set_scale("default", scale)
        before = {k: twin.weight(tuner.model, k) for k in ("layers.0", "layers.1", "head")}
        unmerged = twin.run(tuner)
        tuner.merge_adapter()
        np.testing.assert_allclose(twin.run(tuner), unmerged, rtol=1e-4, atol=1e-5)
        tuner.unmerge_adapter()
        for k, w in before.items():
            np.testing.assert_allclose(twin.weight(tuner.model, k), w, rtol=0, atol=1e-5 * max(1.0, abs(scale)))
        d = tmp_path_factory.mktemp(twin.name)
        tuner.save_pretrained(d)
        loaded = twin.lib.LycorisTuner.from_pretrained(twin.model(), d)
        loaded.set_scale("default", scale)
        np.testing.assert_allclose(twin.run(loaded), unmerged, rtol=1e-5, atol=1e-6)
        outs.append(unmerged)
    # both twins hold adapters of the same plan; their factors come from different RNGs, so only
    # shapes are compared here (values: the parity matrix, with shared inputs)
    assert outs[0].shape == outs[1].shape
