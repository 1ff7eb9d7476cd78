"""Adapter names, scales and merges: one rule in the core, the same behaviour in both twins."""

from __future__ import annotations

import inspect

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import lycoris_jax as lj
import lycoris_torch as lt
from lycoris_core.state import RESERVED_ADAPTER_NAMES, check_adapter_name
from tests.safety.twins import JAX, TORCH, TWINS

twins = pytest.mark.parametrize("twin", TWINS, ids=lambda t: t.name)

# Names that are attributes of torch's / flax's containers are fine: both twins key plain mappings.
VALID = ["keys", "eval", "cuda", "to", "items", "pop", "state_dict", "1", "x-1", "A_b", "a" * 64]
INVALID = [
    ("../x", ValueError, "expected 1 to 64 ASCII letters"),
    ("/tmp/abs", ValueError, "expected 1 to 64 ASCII letters"),
    ("a.b", ValueError, "expected 1 to 64 ASCII letters"),
    ("a/b", ValueError, "expected 1 to 64 ASCII letters"),
    ("a\\b", ValueError, "expected 1 to 64 ASCII letters"),
    ("", ValueError, "expected 1 to 64 ASCII letters"),
    ("has space", ValueError, "expected 1 to 64 ASCII letters"),
    ("_private", ValueError, "expected 1 to 64 ASCII letters"),
    ("-flag", ValueError, "expected 1 to 64 ASCII letters"),
    ("a" * 65, ValueError, "expected 1 to 64 ASCII letters"),
    ("ü", ValueError, "expected 1 to 64 ASCII letters"),
    ("factors", ValueError, "reserved"),
    ("base_layer", ValueError, "reserved"),
    ("training", ValueError, "reserved"),
    ("hada_w1_a", ValueError, "reserved"),
    (5, TypeError, "expected a string, got int 5"),
    (None, TypeError, "expected a string, got NoneType"),
]


@twins
@pytest.mark.parametrize("name", VALID)
def test_valid_names_work_everywhere_in_both_twins(twin, tmp_path, name):
    tuner = twin.tuner()
    tuner.add_adapter(name, twin.lokr(r=3))
    tuner.set_adapter(name)
    out = twin.run(tuner)
    tuner.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [name, "adapter_config.json", "adapter_model.safetensors"]
    )
    again = twin.tuner()
    again.load_adapter(tmp_path / name, name)
    again.set_adapter(name)
    np.testing.assert_allclose(twin.run(again), out, rtol=1e-6, atol=1e-6)
    again.delete_adapter(name)
    assert again.active_adapters == ["default"] and name not in again.peft_config


@pytest.mark.parametrize("name, exc, match", INVALID, ids=[repr(n)[:20] for n, _, _ in INVALID])
def test_invalid_names_are_refused_identically_untouched(tmp_path, name, exc, match):
    messages = []
    for twin in TWINS:
        model = twin.model()
        snap = twin.snapshot(model)
        with pytest.raises(exc, match=match) as constructor:
            twin.tuner(model, adapter_name=name)
        twin.assert_unchanged(model, snap)
        tuner = twin.tuner()
        snap = twin.snapshot(tuner)
        with pytest.raises(exc, match=match) as add:
            tuner.add_adapter(name, twin.lokr())
        twin.assert_unchanged(tuner, snap)
        tuner.save_pretrained(tmp_path / twin.name)
        with pytest.raises(exc, match=match):
            tuner.load_adapter(tmp_path / twin.name, name)
        twin.assert_unchanged(tuner, snap)
        assert str(constructor.value) == str(add.value)
        messages.append(str(add.value))
    assert messages[0] == messages[1]


def _own_attributes(obj) -> set[str]:
    """Public attribute names our code defines on an object: its class chain within lycoris_* and its instance."""
    names = set(vars(obj))
    for cls in type(obj).__mro__:
        if cls.__module__.startswith("lycoris_"):
            names |= set(vars(cls)) | set(getattr(cls, "__annotations__", {}))
    return {n for n in names if not n.startswith("_")}


def test_reserved_names_cover_every_attribute_of_our_layers_and_tuners():
    torch_tuner = lt.LoKrModel(TORCH.model(), TORCH.lokr(modules_to_save=None))
    saver = lt.LoHaModel(
        torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)),
        lt.LoHaConfig(target_modules=["0"], modules_to_save=["1"]),
    )
    jax_tuner = JAX.tuner()
    objects = [torch_tuner, torch_tuner.model.layers[0], saver.model[1], jax_tuner, jax_tuner.model.layers[0]]
    ours = set().union(*(_own_attributes(o) for o in objects))
    assert ours - RESERVED_ADAPTER_NAMES == set()
    for cls in (lt.LoHaLayer, lj.LoHaLayer, lt.LoKrModel, lj.LoKrModel):
        for name, _ in inspect.getmembers(cls):
            if not name.startswith("_") and any(
                name in vars(k) for k in cls.__mro__ if k.__module__.startswith("lycoris_")
            ):
                assert name in RESERVED_ADAPTER_NAMES, f"{cls.__name__}.{name}"


def test_the_rule_is_the_core_function():
    assert check_adapter_name("default") == "default"
    assert "default" not in RESERVED_ADAPTER_NAMES


# ---------------------------------------------------------------- scales
@twins
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_scales_are_refused_untouched(twin, value):
    tuner = twin.tuner()
    snap, scaling = twin.snapshot(tuner), tuner.model.head.scaling
    for call in (
        lambda: tuner.set_scale("default", value),
        lambda: tuner.scale_layer(value),
        lambda: tuner.unscale_layer(value),
    ):
        with pytest.raises(ValueError, match=r"scale: expected a finite number, got (nan|inf|-inf)"):
            call()
        with pytest.raises(ValueError, match="expected a finite number"):
            tuner.model.head.set_scale("default", value)
    assert tuner.model.head.scaling == scaling
    twin.assert_unchanged(tuner, snap)
    tuner.merge_adapter()  # a merge after the refusals writes finite weights
    assert np.isfinite(twin.weight(tuner.model, "head")).all()


@twins
def test_scale_type_and_zero_unscale_errors(twin):
    tuner = twin.tuner()
    with pytest.raises(TypeError, match="set_scale: scale: expected a real number, got bool True"):
        tuner.set_scale("default", True)
    with pytest.raises(TypeError, match="expected a real number, got str '2'"):
        tuner.scale_layer("2")
    with pytest.raises(ValueError, match=r"cannot divide the scaling by 0 \(use unscale_layer\(\) to reset"):
        tuner.unscale_layer(0)
    with pytest.raises(ValueError, match="cannot divide the scaling by 0"):
        tuner.model.head.unscale_layer(0.0)
    with pytest.raises(ValueError, match=r"Adapter 'nope' does not exist; available: \['default'\]"):
        tuner.set_scale("nope", 2.0)
    tuner.set_scale("default", np.float32(0.5))  # numpy and 0-d framework scalars are numbers, kept as floats
    assert tuner.model.head.scaling["default"] == pytest.approx(0.5 * 4 / 2)
    tuner.set_scale("default", torch.tensor(0.25) if twin.name == "torch" else jnp.asarray(0.25))
    assert type(tuner.model.head.scaling["default"]) is float and tuner.model.head.scaling["default"] == 0.5


@twins
@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_non_finite_alpha_is_refused_in_configs(twin, alpha):
    with pytest.raises(ValueError, match=r"LoKrConfig.alpha: expected a finite number"):
        twin.lokr(alpha=alpha)
    with pytest.raises(ValueError, match=r"alpha_pattern\['head'\]: expected a finite number"):
        twin.lokr(alpha_pattern={"head": alpha})


@twins
@pytest.mark.parametrize(
    "op",
    [
        lambda t: t.set_scale("default", 0.0),
        lambda t: t.scale_layer(3.0),
        lambda t: t.unscale_layer(),
        lambda t: t.unscale_layer(2.0),
        lambda t: t.model.head.set_scale("default", 0.0),
    ],
    ids=["set_scale", "scale_layer", "unscale_layer-reset", "unscale_layer", "layer-set_scale"],
)
def test_scale_ops_on_a_merged_adapter_are_refused_and_unmerge_restores_the_base(twin, op):
    """Deviation k: PEFT rescales a merged adapter and unmerge then leaves a residue in the weight."""
    tuner = twin.tuner()
    before = {k: twin.weight(tuner.model, k) for k in ("layers.0", "layers.1", "head")}
    tuner.merge_adapter()
    snap = twin.snapshot(tuner)
    with pytest.raises(
        ValueError,
        match=r"cannot \w+ adapter\(s\) \['default'\] while merged into the base weight; call unmerge_adapter\(\) first",
    ):
        op(tuner)
    twin.assert_unchanged(tuner, snap)
    tuner.unmerge_adapter()
    for k, w in before.items():
        np.testing.assert_allclose(twin.weight(tuner.model, k), w, rtol=0, atol=1e-6)
    op(tuner)  # allowed once unmerged


def test_peft_leaves_a_residue_when_a_merged_adapter_is_rescaled():
    """PEFT's side of deviation k: merge, set_scale(0), unmerge does not give the base weight back."""
    torch.manual_seed(0)
    base = TORCH.model()
    before = base.head.weight.detach().clone()
    model = peft.get_peft_model(base, peft.LoKrConfig(**TORCH.lokr().to_dict()))
    model.base_model.merge_adapter()
    for module in model.modules():
        if isinstance(module, peft.tuners.lokr.LoKrLayer):
            module.set_scale("default", 0.0)
    model.base_model.unmerge_adapter()
    residue = float((model.base_model.model.head.get_base_layer().weight - before).abs().max())
    assert residue > 0.01  # ours refuses the set_scale instead (test above)


# ---------------------------------------------------------------- state after unload / delete
@twins
@pytest.mark.parametrize("how", ["merge_and_unload", "unload", "delete"])
def test_state_after_removing_every_adapter_is_consistent(twin, tmp_path, how):
    tuner = twin.tuner()
    if how == "delete":
        tuner.delete_adapter("default")
    else:
        getattr(tuner, how)()
    assert tuner.active_adapters == [] and tuner.active_adapter == [] and tuner.peft_config == {}
    with pytest.raises(ValueError, match="nothing to save: the model holds no adapters"):
        tuner.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="Adapter default does not exist"):
        tuner.adapter_state_dict("default")
    tuner.add_adapter("again", twin.lokr())  # the tuner is usable again
    assert tuner.active_adapters == ["again"]
