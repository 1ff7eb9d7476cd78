"""Scanned layer stacks: per-layer adapters stacked on the kernels' layer axis.

The same 4-block model three ways: a torch ``ModuleList`` (PEFT's view: ``layers.<i>.attn.q``), an
unrolled params tree (``layers.<i>...``) and a stacked one (``layers`` kernels ``(4, in, out)``,
applied with ``jax.lax.scan``). Stacked adapters must equal the unrolled ones factor for factor, the
scan must equal the loop, and PEFT's files must move between the stacked model and torch both ways.
fp32 tolerance: 1e-5 abs on outputs of magnitude ~1.
"""

from __future__ import annotations

import flax.linen as linen_nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from flax import nnx

import lycoris_jax as lj
import lycoris_torch as lt
from lycoris_jax import linen, pytree

L, D = 4, 16
ATOL = 1e-5
X = np.random.default_rng(0).standard_normal((3, D)).astype(np.float32)


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.Module()
        self.attn.q = torch.nn.Linear(D, D)
        self.mlp = torch.nn.Linear(D, D)

    def forward(self, x):
        x = x + torch.tanh(self.attn.q(x))
        return x + self.mlp(x)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([Block() for _ in range(L)])

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def torch_net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def unrolled_params(net: Net) -> dict:
    def linear(m):
        return {"kernel": jnp.asarray(m.weight.detach().numpy().T), "bias": jnp.asarray(m.bias.detach().numpy())}

    return {
        "layers": {str(i): {"attn": {"q": linear(b.attn.q)}, "mlp": linear(b.mlp)} for i, b in enumerate(net.layers)}
    }


def stacked_params(net: Net) -> dict:
    per = [unrolled_params(net)["layers"][str(i)] for i in range(L)]
    return {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *per)}


def block(p, x):
    x = x + jnp.tanh(x @ p["attn"]["q"]["kernel"] + p["attn"]["q"]["bias"])
    return x + x @ p["mlp"]["kernel"] + p["mlp"]["bias"]


@jax.jit
def run_scan(params, x):
    return jax.lax.scan(lambda h, p: (block(p, h), None), x, params["layers"])[0]


@jax.jit
def run_loop(params, x):
    for i in range(L):
        x = block(params["layers"][str(i)], x)
    return x


def torch_out(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(X)).numpy()


def peft_adapter(kind: str, directory):
    """Real PEFT's adapter on the unscanned torch model (``config(kind)``), saved to ``directory``."""
    peft_config = (peft.LoKrConfig if kind == "lokr" else peft.LoHaConfig)(
        **config(kind).to_dict() | {"peft_type": None}
    )
    torch.manual_seed(1)
    theirs = peft.get_peft_model(torch_net(), peft_config).eval()
    theirs.save_pretrained(directory)
    return theirs


def config(kind: str, **kw):
    return (lj.LoKrConfig if kind == "lokr" else lj.LoHaConfig)(
        r=2, alpha=4, target_modules=["q", "mlp"], init_weights=False, **kw
    )


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_stacked_adapters_equal_the_unrolled_ones(kind):
    net = torch_net()
    cfg = config(kind, layers_to_transform=[0, 2, 3], layers_pattern="layers", alpha_pattern={"layers.2.mlp": 16})
    stacked = pytree.init(stacked_params(net), cfg, key=jax.random.key(0), stacks=["layers"])
    unrolled = pytree.init(unrolled_params(net), cfg, key=jax.random.key(0))
    assert stacked.plans.keys() == unrolled.plans.keys()  # PEFT's names: layers.<i>.attn.q, ...
    assert "layers.1.mlp" not in stacked.plans
    assert sorted(stacked.factors) == ["layers.*.attn.q", "layers.*.mlp"]
    for name, value in unrolled.state_dict().items():  # same values under the same keys
        np.testing.assert_array_equal(stacked.state_dict()[name], value)
    assert stacked.state_dict().keys() == unrolled.state_dict().keys()
    scan = run_scan(pytree.merge(stacked_params(net), stacked), X)
    loop = run_loop(pytree.merge(unrolled_params(net), unrolled), X)
    np.testing.assert_allclose(scan, loop, atol=ATOL)
    # the untargeted layer's kernel is untouched; the stacked ΔW is zero there
    merged = pytree.merge(stacked_params(net), stacked)["layers"]["mlp"]["kernel"]
    np.testing.assert_array_equal(merged[1], stacked_params(net)["layers"]["mlp"]["kernel"][1])
    grads = jax.grad(lambda a: run_scan(pytree.merge(stacked_params(net), a), X).sum())(stacked)
    assert not np.any(grads.factors["layers.*.mlp"]["lokr_w1" if kind == "lokr" else "hada_w1_a"][1])


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_peft_files_move_between_the_stacked_model_and_torch(tmp_path, kind):
    net = torch_net()
    params = stacked_params(net)
    theirs = peft_adapter(kind, tmp_path / "peft")
    loaded = pytree.from_pretrained(tmp_path / "peft", params, stacks=["layers"])
    np.testing.assert_allclose(run_scan(pytree.merge(params, loaded), X), torch_out(theirs), atol=ATOL)

    ours = pytree.init(
        params,
        config(kind, layers_to_transform=[1, 3], layers_pattern="layers"),
        key=jax.random.key(2),
        stacks=["layers"],
    )
    pytree.save_pretrained(ours, tmp_path / "ours")
    mine = np.asarray(run_scan(pytree.merge(params, ours), X))
    np.testing.assert_allclose(
        torch_out(peft.PeftModel.from_pretrained(torch_net(), tmp_path / "ours")), mine, atol=ATOL
    )
    np.testing.assert_allclose(
        torch_out(lt.LycorisTuner.from_pretrained(torch_net(), tmp_path / "ours")), mine, atol=ATOL
    )
    again = pytree.from_pretrained(tmp_path / "ours", params, stacks=["layers"])
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_stack_errors_name_the_pattern_and_the_layers():
    params = stacked_params(torch_net())
    with pytest.raises(
        ValueError,
        match=r"layers\.\*\.mlp: the layers of one stack need one factor shape, but "
        r"layers\.0\.mlp \(r=2.*layers\.2\.mlp \(r=4",
    ):
        pytree.init(params, config("loha", rank_pattern={"layers.2.mlp": 4}), key=jax.random.key(0), stacks=["layers"])
    # LoKr here keeps full factors for r=2 and r=4 alike: one shape, so a rank pattern is fine
    pytree.init(params, config("lokr", rank_pattern={"layers.2.mlp": 4}), key=jax.random.key(0), stacks=["layers"])
    with pytest.raises(ValueError, match=r"stacks: \['blocks'\] hold no kernel"):
        pytree.init(params, config("lokr"), key=jax.random.key(0), stacks=["blocks"])
    ragged = jax.tree.map(lambda x: x, params)
    ragged["layers"]["mlp"]["kernel"] = ragged["layers"]["mlp"]["kernel"][:3]
    with pytest.raises(
        ValueError, match=r"stack 'layers': its kernels must share the leading layer axis, got 4 .* and 3"
    ):
        pytree.init(ragged, config("lokr"), key=jax.random.key(0), stacks=["layers"])
    with pytest.raises(ValueError, match="could be a Conv1d, a DenseGeneral or a stack of layers"):
        pytree.init(params, config("lokr"), key=jax.random.key(0))  # a stack is never guessed


# ---------------------------------------------------------------- NNX: nnx.vmap-built, nnx.scan-applied
class Attn(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.q = nnx.Linear(D, D, rngs=rngs)


class NNXBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.attn = Attn(rngs)
        self.mlp = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        x = x + jnp.tanh(self.attn.q(x))
        return x + self.mlp(x)


class Scanned(nnx.Module):
    """NNX's documented scan-over-layers pattern, holding ``torch_net()``'s weights."""

    def __init__(self) -> None:
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return NNXBlock(rngs)

        self.layers = create(nnx.Rngs(0))
        params = stacked_params(torch_net())["layers"]
        for layer, p in ((self.layers.attn.q, params["attn"]["q"]), (self.layers.mlp, params["mlp"])):
            layer.kernel[...], layer.bias[...] = p["kernel"], p["bias"]

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(h, block):
            return block(h)

        return step(x, self.layers)


@nnx.jit
def nnx_forward(model, x):
    return model(x)


def test_nnx_scanned_model_holds_the_torch_weights():
    np.testing.assert_allclose(nnx_forward(Scanned(), X), torch_out(torch_net()), atol=ATOL)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_nnx_scanned_stack_both_ways_against_peft(tmp_path, kind):
    theirs = peft_adapter(kind, tmp_path / "peft")
    loaded = lj.LycorisTuner.from_pretrained(Scanned(), tmp_path / "peft", stacks=["layers"])
    assert (
        loaded.model.layers.mlp.factors["default"][next(iter(loaded.model.layers.mlp.factors["default"]))].shape[0] == L
    )
    np.testing.assert_allclose(nnx_forward(loaded, X), torch_out(theirs), atol=ATOL)

    cfg = config(kind, layers_to_transform=[0, 2, 3], layers_pattern="layers", alpha_pattern={"layers.2.mlp": 16})
    tuner = (lj.LoKrModel if kind == "lokr" else lj.LoHaModel)(Scanned(), cfg, stacks=["layers"])
    optimizer = nnx.Optimizer(tuner, optax.adam(1e-2), wrt=lj.LycorisParam)

    @nnx.jit
    def step(t, opt):
        loss, grads = nnx.value_and_grad(lambda t: (t(X) ** 2).mean(), argnums=nnx.DiffState(0, lj.LycorisParam))(t)
        opt.update(t, grads)
        return loss

    for _ in range(3):
        step(tuner, optimizer)
    assert not np.any(
        tuner.model.layers.mlp.factors["default"][next(iter(tuner.model.layers.mlp.factors["default"]))][1]
    )
    tuner.save_pretrained(tmp_path / "ours")
    assert all(".layers.1." not in k for k in tuner.adapter_state_dict())
    mine = np.asarray(nnx_forward(tuner, X))
    np.testing.assert_allclose(
        torch_out(peft.PeftModel.from_pretrained(torch_net(), tmp_path / "ours")), mine, atol=ATOL
    )
    np.testing.assert_allclose(
        torch_out(lt.LycorisTuner.from_pretrained(torch_net(), tmp_path / "ours")), mine, atol=ATOL
    )

    # merge/unmerge/scale on the stack
    kernel = tuner.model.layers.mlp.kernel[...]
    tuner.merge_adapter()
    np.testing.assert_allclose(nnx_forward(tuner, X), mine, atol=ATOL)
    tuner.unmerge_adapter()
    np.testing.assert_allclose(tuner.model.layers.mlp.kernel[...], kernel, atol=1e-6)
    tuner.set_scale("default", 0.5)
    np.testing.assert_allclose(tuner.model.layers.mlp.scaling["default"], [1.0, 0.0, 4.0, 1.0])  # 0.5 * alpha / r
    tuner.unscale_layer()
    np.testing.assert_allclose(nnx_forward(tuner, X), mine, atol=ATOL)


def test_nnx_stack_errors():
    with pytest.raises(
        ValueError, match=r"layers\.mlp: the layers of one stack need one factor shape, but layers\.0\.mlp"
    ):
        lj.LoHaModel(Scanned(), config("loha", rank_pattern={"layers.2.mlp": 4}), stacks=["layers"])
    with pytest.raises(ValueError, match=r"stacks: the model has no module 'blocks'"):
        lj.LoHaModel(Scanned(), config("loha"), stacks=["blocks"])


# ---------------------------------------------------------------- Linen: nn.scan
class LinenAttn(linen_nn.Module):
    @linen_nn.compact
    def __call__(self, x):
        return linen_nn.Dense(D, name="q")(x)


class LinenBlock(linen_nn.Module):
    @linen_nn.compact
    def __call__(self, x, _):
        x = x + jnp.tanh(LinenAttn(name="attn")(x))
        return x + linen_nn.Dense(D, name="mlp")(x), None


class LinenScanned(linen_nn.Module):
    """A scanned Linen stack; the adapter collection is scanned with the params (``variable_axes``)."""

    @linen_nn.compact
    def __call__(self, x):
        stack = linen_nn.scan(
            LinenBlock, variable_axes={"params": 0, "lycoris": 0}, split_rngs={"params": True}, length=L
        )
        return stack(name="layers")(x, None)[0]


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_linen_scan_both_ways_against_peft(tmp_path, kind):
    params, module = stacked_params(torch_net()), LinenScanned()
    np.testing.assert_allclose(module.apply({"params": params}, X), torch_out(torch_net()), atol=ATOL)
    theirs = peft_adapter(kind, tmp_path / "peft")
    adapted, lycoris = linen.from_pretrained(tmp_path / "peft", module, params, stacks=["layers"])
    run = jax.jit(lambda lyc: adapted.apply({"params": params, "lycoris": lyc}, X))
    np.testing.assert_allclose(run(lycoris), torch_out(theirs), atol=ATOL)

    adapted, lycoris = linen.adapt(module, params, config(kind), key=jax.random.key(3), stacks=["layers"])
    grad = jax.jit(jax.grad(lambda lyc: (adapted.apply({"params": params, "lycoris": lyc}, X) ** 2).mean()))
    for _ in range(2):
        lycoris = jax.tree.map(lambda p, g: p - 0.1 * g, lycoris, grad(lycoris))
    mine = np.asarray(jax.jit(lambda lyc: adapted.apply({"params": params, "lycoris": lyc}, X))(lycoris))
    linen.save_pretrained(adapted, lycoris, tmp_path / "ours")
    np.testing.assert_allclose(
        torch_out(peft.PeftModel.from_pretrained(torch_net(), tmp_path / "ours")), mine, atol=ATOL
    )
    merged = linen.merge(adapted, params, lycoris)
    np.testing.assert_allclose(module.apply({"params": merged}, X), mine, atol=ATOL)


def test_linen_scan_needs_one_scale_per_stack():
    cfg = config("lokr", alpha_pattern={"layers.2.mlp": 16})
    with pytest.raises(
        ValueError, match=r"layers\.\*\.mlp: inside nn.scan every layer of a stack needs the same alpha / r"
    ):  # at adapt time, not at the first apply inside the scan trace
        linen.adapt(LinenScanned(), stacked_params(torch_net()), cfg, key=jax.random.key(0), stacks=["layers"])


def test_nnx_stack_parameter_counts_are_peft_counts():
    """A stack's zero factors for layers the config leaves out are no parameters PEFT would have."""
    cfg = config("loha", layers_to_transform=[0, 2], layers_pattern="layers")
    abstract = nnx.eval_shape(lambda: lj.LoHaModel(Scanned(), cfg, stacks=["layers"]))
    theirs = peft.get_peft_model(torch_net(), peft.LoHaConfig(**cfg.to_dict() | {"peft_type": None}))
    assert abstract.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters() == (512, 2688)
    shapes = {k: v.shape for k, v in abstract.adapter_state_dict().items()}
    assert len(shapes) == 16 and shapes["base_model.model.layers.2.mlp.hada_w1_a"] == (D, 2)
