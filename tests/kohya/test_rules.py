"""What a LyCORIS conversion refuses, and lycoris-lora's semantics we keep or document."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import lycoris_torch as lt
from lycoris_core import CheckpointError, kohya, resolve_rank_alpha
from lycoris_core.tensors import save_safetensors
from tests.kohya.models import CONV1D, network, run_torch, torch_model


def _save(net, path) -> str:
    net.save_weights(str(path), torch.float32, None)
    return str(path)


@pytest.mark.parametrize(
    ("algo", "kwargs", "what"),
    [("lokr", {"dora_wd": True}, "dora"), ("lora", {}, "LoRA"), ("full", {}, "full")],
    ids=["dora_scale", "lora", "full"],
)
def test_other_algorithms_and_dora_are_refused_naming_them(tmp_path, algo, kwargs, what):
    kw = {"linear_dim": 2, "linear_alpha": 1.0} | kwargs
    path = _save(network(torch_model(), algo, kw, CONV1D), tmp_path / "f.safetensors")
    model = torch_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=what):
        lt.LycorisTuner.from_lycoris(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, lt.LycorisLayer) for m in model.modules())


def test_conv1d_lokr_with_a_full_3d_w2_is_refused_both_ways(tmp_path):
    path = _save(network(torch_model(), "lokr", {"linear_dim": 4, "linear_alpha": 2.0}, []), tmp_path / "f.safetensors")
    with pytest.raises(ValueError, match=r"conv\.c1.*DEVIATIONS"):
        lt.LycorisTuner.from_lycoris(torch_model(), path)
    tuner = lt.LoKrModel(torch_model(), lt.LoKrConfig(r=4, target_modules=["c1"], init_weights=False))
    out = tmp_path / "ours.safetensors"
    with pytest.raises(ValueError, match=r"conv\.c1.*DEVIATIONS"):
        tuner.save_lycoris(out)
    assert not out.exists()


def test_both_full_lokr_ignores_alpha_as_lycoris_lora_does(tmp_path):
    kw = {"linear_dim": 4, "linear_alpha": 2.0, "full_matrix": True}
    path = _save(network(torch_model(), "lokr", kw, CONV1D), tmp_path / "f.safetensors")
    source = kohya.read_lycoris(path)
    assert all(m.full and m.scale == 1.0 for m in source.modules.values())
    config, _ = kohya.lycoris_to_peft(source, [n for n, _ in torch_model().named_modules()])
    assert all(r == alpha for r, alpha in (resolve_rank_alpha(config, m) for m in config.target_modules))
    # ours with alpha/r = 4 writes the scale into lokr_w1 (lycoris-lora would ignore alpha)
    tuner = lt.LoKrModel(torch_model(), lt.LoKrConfig(r=16, alpha=64, target_modules=["head"], init_weights=False))
    tuner.save_lycoris(tmp_path / "ours.safetensors")
    (module,) = kohya.read_lycoris(tmp_path / "ours.safetensors").modules.values()
    w1 = tuner.model.mlp.head.factors["default"]["lokr_w1"].detach().numpy()
    np.testing.assert_allclose(module.factors["lokr_w1"], 4 * w1, rtol=1e-7)


def test_lycoris_lora_merge_to_applies_alpha_over_r_twice(tmp_path):
    """Its ``merge_to`` merges ΔW scaled by (alpha/r)²; the forward (and ours, merged or not) by alpha/r."""
    kw = {"linear_dim": 2, "linear_alpha": 4.0}  # alpha / r = 2
    model = torch_model()
    net = network(model, "loha", kw, CONV1D)
    unmerged = run_torch(model)
    path = _save(net, tmp_path / "f.safetensors")
    ours = lt.LycorisTuner.from_lycoris(torch_model(), path).merge_and_unload()
    np.testing.assert_allclose(run_torch(ours), unmerged, rtol=0, atol=2e-6 * np.abs(unmerged).max())
    base = torch_model().mlp.head.weight.detach()
    net.merge_to(1.0)
    theirs = model.mlp.head.weight.detach()
    delta = ours.mlp.head.weight.detach() - base
    np.testing.assert_allclose((theirs - base).numpy(), 2 * delta.numpy(), rtol=1e-5, atol=1e-6)


def test_names_that_fit_no_module_or_several_are_refused():
    names = ["a_b.c", "a.b_c", "x.y"]
    with pytest.raises(ValueError, match=r"ambiguous.*a_b\.c.*a\.b_c"):
        kohya.resolve_names(["lycoris_a_b_c", "lycoris_x_y"], names, prefix="lycoris")
    with pytest.raises(ValueError, match="lycoris_q"):
        kohya.resolve_names(["lycoris_q", "lycoris_x_y"], names)
    assert kohya.resolve_names(["lora_unet_x_y"], names) == {"lora_unet_x_y": "x.y"}
    # several prefixes fit every name: refuse unless one is named
    with pytest.raises(ValueError, match="several prefixes"):
        kohya.resolve_names(["p_a_b"], ["a.b", "b"])
    assert kohya.resolve_names(["p_a_b"], ["a.b", "b"], prefix="p") == {"p_a_b": "a.b"}


def test_a_damaged_or_foreign_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "f.safetensors"
    save_safetensors(path, {"weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match="not '<module>.<factor>'"):
        kohya.read_lycoris(path)
    save_safetensors(path, {"m.hada_w1_a": np.zeros((2, 2), np.float32), "m.lokr_w1": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match="mix of LoHa and LoKr"):
        kohya.read_lycoris(path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="truncated"):
        kohya.read_lycoris(path)


def test_nonfinite_factors_are_refused_naming_the_file_unless_allowed(tmp_path):
    net = network(torch_model(), "lokr", {"linear_dim": 2, "linear_alpha": 1.0}, CONV1D)
    path = _save(net, tmp_path / "f.safetensors")
    source = kohya.read_lycoris(path)
    key = "lycoris_mlp_head.lokr_w1"
    tensors = {f"{n}.{k}": v for n, m in source.modules.items() for k, v in m.factors.items()}
    tensors |= {f"{n}.alpha": np.asarray(m.alpha, np.float32) for n, m in source.modules.items()}
    tensors[key] = tensors[key].copy()
    tensors[key].flat[0] = np.nan
    save_safetensors(path, tensors)
    match = rf"^{path}: non-finite values \(NaN or inf\) in \['{key}'\]"
    with pytest.raises(CheckpointError, match=match):
        kohya.read_lycoris(path)
    with pytest.raises(CheckpointError, match=match):  # the file itself, not a temporary PEFT directory
        lt.LycorisTuner.from_lycoris(torch_model(), path)
    assert np.isnan(kohya.read_lycoris(path, allow_nonfinite=True).modules["lycoris_mlp_head"].factors["lokr_w1"]).any()
    lt.LycorisTuner.from_lycoris(torch_model(), path, allow_nonfinite=True)
    names = [n for n, _ in torch_model().named_modules()]
    config, peft = kohya.lycoris_to_peft(kohya.read_lycoris(path, allow_nonfinite=True), names)
    kohya.write_peft(tmp_path / "peft", config, peft)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'peft'}/adapter_model.safetensors: non-finite"):
        kohya.read_peft(tmp_path / "peft")
    assert np.isnan(
        kohya.read_peft(tmp_path / "peft", allow_nonfinite=True)[1]["base_model.model.mlp.head.lokr_w1"]
    ).any()


@pytest.mark.parametrize(
    "tensors",
    [
        {"m.hada_w1_a": (4, 2), "m.hada_w2_a": (4, 2)},  # half a LoHa
        {"m.lokr_w1": (2, 2)},  # a LoKr without W2
        {"m.hada_w1_a": (4, 2), "m.hada_w1_b": (8,), "m.hada_w2_a": (4, 2), "m.hada_w2_b": (8,)},  # 1-D
        {"m.lokr_w1": (2, 2), "m.lokr_w2_a": (4, 2), "m.lokr_w2_b": (3, 4)},  # ranks 2 and 3
    ],
    ids=["half-loha", "lokr-without-w2", "one-dim", "ranks-disagree"],
)
def test_incomplete_or_inconsistent_factor_sets_are_refused_naming_the_module(tmp_path, tensors):
    path = tmp_path / "f.safetensors"
    save_safetensors(
        path, {k: np.ones(s, np.float32) for k, s in tensors.items()} | {"m.alpha": np.ones((), np.float32)}
    )
    with pytest.raises(CheckpointError, match="module 'm'"):
        kohya.read_lycoris(path)


def test_layers_that_lack_a_module_are_an_error_not_a_guess(tmp_path):
    tuner = lt.LoHaModel(torch_model(), lt.LoHaConfig(r=2, target_modules=["c1", "head"], use_effective_conv2d=True))
    tuner.save_pretrained(tmp_path)
    config, tensors = kohya.read_peft(tmp_path)
    layers = {"mlp.head": lt.layer.layer_shape_of(tuner.model.mlp.head.get_base_layer())}
    with pytest.raises(ValueError, match="no adaptable layer 'conv.c1'"):
        kohya.peft_to_lycoris(config, tensors, layers=layers)
    with pytest.raises(ValueError, match=r"conv\.c1\.hada_t1.*Conv1d or a Conv2d"):
        kohya.peft_to_lycoris(config, tensors)  # without layers a (r, r, 3, 1) core is ambiguous


def test_files_get_the_usual_mode_not_mkstemps(tmp_path):
    old = os.umask(0o022)
    try:
        save_safetensors(tmp_path / "f.safetensors", {"a.x": np.zeros(2, np.float32)})
    finally:
        os.umask(old)
    assert (tmp_path / "f.safetensors").stat().st_mode & 0o777 == 0o644
    (tmp_path / "f.safetensors").chmod(0o600)
    save_safetensors(tmp_path / "f.safetensors", {"a.x": np.ones(2, np.float32)})  # a replaced file keeps its mode
    assert (tmp_path / "f.safetensors").stat().st_mode & 0o777 == 0o600
