"""Sharding-aware adapters on 8 simulated CPU devices (run in their own process by
``tests/test_multidevice.py``, with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``).

Factors take shardings derived from their kernel's (``lycoris_core.sharding``), ΔW is formed in
shards like the kernel, outputs and gradients equal the unsharded run, and the train step's
per-device temporaries stay a few kernel shards (``benchmarks/sharding_memory.py`` prints the table).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

import lycoris_jax as lj
import lycoris_torch as lt
from benchmarks import sharding_memory as bench

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

TP = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
X = np.random.default_rng(0).standard_normal((16, bench.D)).astype(np.float32)


def tuner(kind: str, sharded: bool, path: str = "auto"):
    _, up, down, _ = bench.LAYOUTS["tensor-parallel"]
    model = bench.MLP(up if sharded else None, down if sharded else None, nnx.Rngs(0))
    cfg = (lj.LoKrConfig if kind == "lokr" else lj.LoHaConfig)(r=8, target_modules=["up", "down"], init_weights=False)
    return (lj.LoKrModel if kind == "lokr" else lj.LoHaModel)(model, cfg, forward_path=path)


PATHS = ["factored", "merged", "peft"]


def test_factor_shardings_follow_the_kernel():
    with jax.set_mesh(TP):
        lokr, loha = tuner("lokr", True), tuner("loha", True)

    def spec(t, layer, factor):
        variable = getattr(t.model, layer).factors["default"][factor]
        specs = nnx.get_partition_spec(nnx.state(getattr(t.model, layer), lj.LycorisParam))  # what Flax flows see
        from_flax = specs["factors"]["default"][factor].get_value()
        assert from_flax == PartitionSpec(*variable.get_metadata()["out_sharding"])
        assert variable[...].sharding.spec == from_flax  # and where the array is
        return from_flax

    # column-parallel up (1024, 4096@model): out = 4096 = 64 x 64 -> W1 rows; LoHa *_a rows
    assert spec(lokr, "up", "lokr_w1") == PartitionSpec("model", None)
    assert spec(lokr, "up", "lokr_w2_a") == PartitionSpec(None, None)
    assert spec(loha, "up", "hada_w1_a") == PartitionSpec("model", None)
    assert spec(loha, "up", "hada_w1_b") == PartitionSpec(None, None)
    # row-parallel down (4096@model, 1024): in = 4096 -> W1 columns; LoHa *_b columns
    assert spec(lokr, "down", "lokr_w1") == PartitionSpec(None, "model")
    assert spec(loha, "down", "hada_w2_b") == PartitionSpec(None, "model")
    assert spec(loha, "down", "hada_w2_a") == PartitionSpec(None, None)
    w1 = lokr.model.up.factors["default"]["lokr_w1"][...]
    assert w1.sharding.spec == PartitionSpec("model", None)
    assert len(w1.addressable_shards) == 8 and w1.addressable_shards[0].data.shape == (16, 32)


EXPLICIT = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Explicit))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_explicit_mesh_step_equals_the_unsharded_one(kind, path):
    """Explicit axes: the row-parallel layer is called with its ``out_sharding`` (passed through)."""
    _, up, down, _ = bench.LAYOUTS["tensor-parallel"]
    cfg = (lj.LoKrConfig if kind == "lokr" else lj.LoHaConfig)(r=8, target_modules=["up", "down"], init_weights=False)

    def loss_and_grads(t, x):
        graphdef, factors, rest = nnx.split(t, lj.LycorisParam, ...)
        return jax.jit(jax.value_and_grad(lambda f: (nnx.merge(graphdef, f, rest)(x) ** 2).mean()))(factors)

    plain = loss_and_grads(tuner(kind, False, "peft"), jnp.asarray(X))
    with jax.set_mesh(EXPLICIT):
        outputs = (PartitionSpec("data", "model"), PartitionSpec("data", None))
        model = bench.MLP(up, down, nnx.Rngs(0), outputs)
        t = (lj.LoKrModel if kind == "lokr" else lj.LoHaModel)(model, cfg, forward_path=path)
        first = sorted(t.model.up.factors["default"])[0]
        assert jax.typeof(t.model.up.factors["default"][first][...]).sharding.mesh.are_all_axes_explicit
        sharded = loss_and_grads(t, jax.device_put(X, PartitionSpec("data", None)))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_sharded_step_equals_the_unsharded_one(kind, path):
    def loss_and_grads(t, x):
        graphdef, factors, rest = nnx.split(t, lj.LycorisParam, ...)
        loss = lambda f: (nnx.merge(graphdef, f, rest)(x) ** 2).mean()  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(factors)

    plain = loss_and_grads(tuner(kind, False, "peft"), jnp.asarray(X))
    with jax.set_mesh(TP):
        sharded = loss_and_grads(tuner(kind, True, path), jax.device_put(X, PartitionSpec("data", None)))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["auto", "explicit"])
def test_train_step_memory_meets_the_targets_on_the_default_path(mode):
    """The TPU-scale targets: at most 2 kernel shards of temporaries for LoKr and 4 for LoHa, and no
    all-gather of a kernel-sized array beyond the frozen step's. The default path (factored at this
    batch) forms no ΔW at all."""
    rows = bench.table(mode)
    for layout in ("data-parallel", "tensor-parallel"):
        assert rows[layout, "lokr"]["shards"] < 0.5, rows[layout, "lokr"]
        assert rows[layout, "loha"]["shards"] < 1.0, rows[layout, "loha"]
        assert rows[layout, "lokr"]["kernel_all_gathers"] == rows[layout, "loha"]["kernel_all_gathers"] == 0
    frozen = rows["fsdp", "frozen"]
    for kind in ("lokr", "loha"):
        assert rows["fsdp", kind]["kernel_all_gathers"] <= frozen["kernel_all_gathers"], rows["fsdp", kind]
        assert rows["fsdp", kind]["shards"] - frozen["shards"] < 2.0, (rows["fsdp", kind], frozen)


@pytest.mark.parametrize("path", ["merged", "peft"])
def test_train_step_memory_on_the_paths_that_form_delta_w(path):
    """Paths that form ΔW form it in shards (never replicated) and no ΔW-sized gradient; XLA's CPU
    scheduler forms the two layers' ΔW side by side (LoHa: with its two rank-r products)."""
    rows = bench.table("auto", path)
    limits = {"lokr": 2.1, "loha": 4.4 if path == "peft" else 5.4}
    for layout in ("data-parallel", "tensor-parallel"):
        for kind, limit in limits.items():
            assert rows[layout, kind]["shards"] < limit, (path, layout, rows[layout, kind])
            assert rows[layout, kind]["kernel_all_gathers"] == 0
    if path == "merged":  # one call with W + ΔW: FSDP gathers the folded kernel instead of W
        for kind in ("lokr", "loha"):
            assert rows["fsdp", kind]["kernel_all_gathers"] == rows["fsdp", "frozen"]["kernel_all_gathers"]


def test_sharded_factors_save_for_peft(tmp_path):
    with jax.set_mesh(TP):
        ours = tuner("loha", True)
        x = jax.device_put(X, PartitionSpec("data", None))
        expected = np.asarray(nnx.jit(lambda t, x: t(x))(ours, x))
        ours.save_pretrained(tmp_path)  # gathers the sharded factors (one process)

    def torch_model() -> torch.nn.Module:
        model = torch.nn.Module()
        model.up = torch.nn.Linear(bench.D, bench.F, bias=False)
        model.down = torch.nn.Linear(bench.F, bench.D, bias=False)
        model.forward = lambda x: model.down(torch.relu(model.up(x)))
        for name in ("up", "down"):
            kernel = np.asarray(getattr(ours.model, name).kernel[...])
            getattr(model, name).weight.data = torch.from_numpy(kernel.T.copy())
        return model

    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(torch_model(), tmp_path)(torch.from_numpy(X)).numpy()
        twin = lt.LycorisTuner.from_pretrained(torch_model(), tmp_path)(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(theirs, expected, atol=2e-5)
    np.testing.assert_allclose(twin, expected, atol=2e-5)  # the torch twin reads the same files


def test_pytree_adapter_sharded_then_gathered_and_saved_as_the_readme_says(tmp_path):
    """The multi-host recipe (docs/guide/tour.md) (``process_allgather``, then save from process 0) on factors
    sharded over 8 devices; the files equal those of the unsharded adapter."""
    from jax.experimental import multihost_utils

    from lycoris_jax import pytree

    params = {"up": {"kernel": jnp.asarray(np.random.default_rng(1).standard_normal((bench.D, bench.F)), jnp.float32)}}
    cfg = lj.LoHaConfig(r=8, target_modules=["up"], init_weights=False)
    adapter = pytree.init(params, cfg, key=jax.random.key(0))
    with jax.set_mesh(TP):
        sharded = jax.device_put(adapter, PartitionSpec())
        sharded = jax.tree.map(
            lambda v: jax.device_put(v, PartitionSpec("model", None)) if v.shape[0] == bench.F else v, sharded
        )
        assert any(
            len(v.sharding.device_set) == 8 and not v.sharding.is_fully_replicated for v in jax.tree.leaves(sharded)
        )
        gathered = multihost_utils.process_allgather(sharded, tiled=True)
    if jax.process_index() == 0:
        pytree.save_pretrained(gathered, tmp_path / "gathered")
    pytree.save_pretrained(adapter, tmp_path / "plain")
    a = pytree.from_pretrained(tmp_path / "gathered", params)
    b = pytree.from_pretrained(tmp_path / "plain", params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_pytree_factors_follow_kernels_placed_with_a_named_sharding():
    from lycoris_jax import pytree

    rng = np.random.default_rng(2)
    params = {
        "up": {"kernel": jnp.asarray(rng.standard_normal((bench.D, bench.F)), jnp.float32)},
        "down": {"kernel": jnp.asarray(rng.standard_normal((bench.F, bench.D)), jnp.float32)},
    }
    cfg = lj.LoKrConfig(r=8, target_modules=["up", "down"], init_weights=False)
    plain = pytree.init(params, cfg, key=jax.random.key(0))
    with jax.set_mesh(TP):
        placed = {
            "up": {"kernel": jax.device_put(params["up"]["kernel"], PartitionSpec(None, "model"))},
            "down": {"kernel": jax.device_put(params["down"]["kernel"], PartitionSpec("model", None))},
        }
        adapter = pytree.init(placed, cfg, key=jax.random.key(0))
        assert adapter.factors["up"]["lokr_w1"].sharding.spec == PartitionSpec("model", None)
        assert adapter.factors["down"]["lokr_w1"].sharding.spec == PartitionSpec(None, "model")
        merged = jax.jit(pytree.merge)(placed, adapter)
        assert merged["up"]["kernel"].sharding.spec == PartitionSpec(None, "model")
    for a, b in zip(jax.tree.leaves(pytree.merge(params, plain)), jax.tree.leaves(merged), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)


class _Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, sharded: bool) -> None:
        init = nnx.initializers.lecun_normal()
        kernel_init = nnx.with_partitioning(init, (None, "model")) if sharded else init
        self.up = nnx.Linear(64, 64, use_bias=False, kernel_init=kernel_init, rngs=rngs)

    def __call__(self, x):
        return x + jnp.tanh(self.up(x))


class _Stack(nnx.Module):
    """An ``nnx.vmap``-built, ``nnx.scan``-applied stack whose kernels are tensor-parallel."""

    def __init__(self, sharded: bool) -> None:
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
        def create(rngs):
            return _Block(rngs, sharded)

        self.layers = create(nnx.Rngs(0))

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(h, block):
            return block(h)

        return step(x, self.layers)


def test_a_scanned_stack_keeps_its_layer_axis_and_its_kernel_sharding():
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    cfg = lj.LoHaConfig(r=4, target_modules=["up"], init_weights=False)
    forward = nnx.jit(lambda t, x: t(x))
    want = forward(lj.LoHaModel(_Stack(False), cfg, stacks=["layers"]), jnp.asarray(x))
    with jax.set_mesh(TP):
        t = lj.LoHaModel(_Stack(True), cfg, stacks=["layers"])
        factors = t.model.layers.up.factors["default"]
        assert factors["hada_w1_a"][...].sharding.spec == PartitionSpec(None, "model", None)  # (layer, out, r)
        assert factors["hada_w1_b"][...].sharding.spec == PartitionSpec(None, None, None)
        got = forward(t, jax.device_put(x, PartitionSpec("data", None)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_the_cost_rule_sees_how_an_explicit_mesh_splits_a_call(monkeypatch):
    """Explicit axes show the split while tracing (``functional.split_of``). A 512x512 LoHa at 4096
    tokens forms ΔW on one device, but with the tokens split 8 ways and the kernel whole on every
    device (data parallel) the factored branch is cheaper; with the kernel split over the same axis
    (FSDP) the balance is the unsharded one. The NNX layer and the Linen transform agree."""
    from flax import linen as nn

    from lycoris_core.paths import Split
    from lycoris_jax import adapted, linen

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    cfg = lj.LoHaConfig(r=8, target_modules=["layers.0"])
    x = np.zeros((4096, 512), np.float32)

    def nnx_choice(kernel_axes=None):
        init = nnx.initializers.lecun_normal()
        init = init if kernel_axes is None else nnx.with_partitioning(init, kernel_axes)
        tuner = lj.LoHaModel(nnx.Sequential(nnx.Linear(512, 512, kernel_init=init, rngs=nnx.Rngs(0))), cfg)
        layer, seen = tuner.model.layers[0], []
        jax.make_jaxpr(lambda x: seen.append(layer._forward_path("default", x)))(x)
        return seen[0]

    assert nnx_choice() == "merged"  # no mesh: global sizes
    with jax.set_mesh(mesh):
        x = jax.device_put(x, PartitionSpec("data", None))
        assert nnx_choice((None, None)) == "factored"  # data parallel: 512 tokens per device
        assert nnx_choice(("data", None)) == "merged"  # FSDP

        splits = []
        choose = adapted.choose_path  # the one adapted call every front end shares
        monkeypatch.setattr(adapted, "choose_path", lambda *a, **kw: splits.append(kw["split"]) or choose(*a, **kw))
        model = nn.Sequential([nn.Dense(512)])
        params = jax.device_put(
            model.init(jax.random.key(0), np.zeros((1, 512), np.float32))["params"], PartitionSpec()
        )
        adapted, lycoris = linen.adapt(
            model, params, lj.LoHaConfig(r=8, target_modules=["layers_0"]), key=jax.random.key(1)
        )
        jax.make_jaxpr(lambda x: adapted.apply({"params": params, "lycoris": lycoris}, x))(x)
        assert splits == [Split(tokens=8, kernel=1, matmul=8)]
