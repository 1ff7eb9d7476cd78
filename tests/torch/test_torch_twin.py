"""lycoris_torch behaviour: the public contract, model-level operations, training, bad input."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import nn

import lycoris_torch as lt
from lycoris_core import AdapterPlan, LycorisConfig
from parity_tests.compare import assert_rounded
from tests.torch.models import Net, assert_unchanged, inputs, net, snapshot

X = inputs()


def loha_cfg(**kw):
    return lt.LoHaConfig(
        **{"r": 2, "alpha": 4, "target_modules": ["q", "v", "conv", "conv1"], "init_weights": False} | kw
    )


def lokr_cfg(**kw):
    return lt.LoKrConfig(
        **{"r": 2, "alpha": 4, "target_modules": ["q", "v", "conv", "conv1"], "init_weights": False} | kw
    )


@pytest.mark.parametrize("make_cfg, tuner_cls", [(loha_cfg, lt.LoHaModel), (lokr_cfg, lt.LoKrModel)])
def test_public_contract_round_trip(tmp_path, make_cfg, tuner_cls):
    model = net()
    base_out = model(*X)
    tuner = tuner_cls(model, make_cfg(), adapter_name="default")
    y = tuner(*X)
    assert torch.equal(y, model(*X))  # surgery is in place
    assert not torch.allclose(y, base_out)
    assert isinstance(model.layers[0].q, tuner_cls.layers_mapping[nn.Linear])
    tuner.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]

    t2 = lt.LycorisTuner.from_pretrained(net(), tmp_path, adapter_name="default")
    assert type(t2) is tuner_cls
    torch.testing.assert_close(t2(*X), y, rtol=0, atol=0)
    merged = t2.merge_and_unload()
    assert isinstance(merged, Net)
    assert not any(isinstance(m, lt.LycorisLayer) for m in merged.modules())
    torch.testing.assert_close(merged(*X), y, rtol=1e-5, atol=1e-5)


def test_only_adapter_factors_train_and_names_are_module_paths():
    model = net()
    tuner = lt.LoKrModel(model, lokr_cfg())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".factors.default.lokr_" in n for n in trainable)
    assert sorted({k.rsplit(".", 1)[0] for k in tuner.adapter_state_dict()}) == [
        "base_model.model.conv",
        "base_model.model.conv1",
        "base_model.model.layers.0.q",
        "base_model.model.layers.0.v",
        "base_model.model.layers.1.q",
        "base_model.model.layers.1.v",
    ]


@pytest.mark.parametrize("make_cfg, tuner_cls", [(loha_cfg, lt.LoHaModel), (lokr_cfg, lt.LoKrModel)])
def test_training_lowers_loss_keeps_base_and_merges_equal(make_cfg, tuner_cls):
    model = net()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    tuner = tuner_cls(model, make_cfg(init_weights=True))
    target = torch.randn(3, 18)  # every head output and conv channel
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = ((tuner(*X) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for k, v in base_state.items():
        key = k.replace("weight", "base_layer.weight").replace("bias", "base_layer.bias")
        state = model.state_dict()
        assert torch.equal(state.get(key, state.get(k)), v), k
    tuner.eval()
    unmerged = tuner(*X)
    torch.testing.assert_close(tuner.merge_and_unload()(*X), unmerged, rtol=1e-5, atol=1e-5)


def test_multiple_adapters_set_delete_disable():
    model = net()
    base, base_q = model(*X), model.layers[0].q(X[0])
    tuner = lt.LoHaModel(model, loha_cfg(), adapter_name="a")
    tuner.add_adapter("b", loha_cfg(r=3))
    assert tuner.active_adapters == ["a"]  # adding does not activate
    q = model.layers[0].q
    only_a_q = q(X[0])
    tuner.set_adapter("b")
    only_b, only_b_q = tuner(*X), q(X[0])
    tuner.set_adapter(["a", "b"])
    both, both_q = tuner(*X), q(X[0])
    torch.testing.assert_close(both_q - base_q, (only_a_q - base_q) + (only_b_q - base_q), rtol=1e-5, atol=1e-6)
    with tuner.disable_adapter():
        torch.testing.assert_close(tuner(*X), base, rtol=0, atol=0)
    torch.testing.assert_close(tuner(*X), both, rtol=0, atol=0)
    tuner.merge_adapter(["a"])
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['a'\] while they are merged"):
        tuner.delete_adapter("a")
    tuner.unmerge_adapter()
    tuner.delete_adapter("a")
    assert tuner.active_adapters == ["b"] and list(tuner.peft_config) == ["b"]
    torch.testing.assert_close(tuner(*X), only_b, rtol=1e-6, atol=1e-6)  # unmerge rounds in fp32
    with pytest.raises(ValueError, match="Adapter a does not exist"):
        tuner.delete_adapter("a")
    with pytest.raises(ValueError, match=r"Adapter\(s\) \['zz'\] do not exist"):
        tuner.set_adapter("zz")


def test_merge_unmerge_and_scale_ops():
    tuner = lt.LoKrModel(net(), lokr_cfg())
    layer = tuner.model.layers[0].q
    w0 = layer.get_base_layer().weight.detach().clone()
    out = tuner(*X)
    tuner.merge_adapter()
    assert layer.merged_adapters == ["default"]
    torch.testing.assert_close(tuner(*X), out, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="All adapters are already merged"):
        layer.merge()
    tuner.unmerge_adapter()
    torch.testing.assert_close(layer.get_base_layer().weight, w0, rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match="Already unmerged"):
        layer.unmerge()
    with pytest.raises(TypeError, match="adapter_names should be a list of strings, got 'default'"):
        layer.merge(adapter_names="default")
    seq = []
    tuner.set_scale("default", 2)
    seq.append(layer.scaling["default"])
    tuner.scale_layer(3)
    seq.append(layer.scaling["default"])
    tuner.unscale_layer(3)
    seq.append(layer.scaling["default"])
    tuner.unscale_layer()
    seq.append(layer.scaling["default"])
    assert seq == [4.0, 12.0, 4.0, 2.0]
    layer.set_scale("absent", 5)  # no-op for an adapter the layer does not hold
    assert "absent" not in layer.scaling


def test_input_dtype_casting_and_bf16_base():
    model = net().to(torch.bfloat16)
    lt.LoHaModel(model, loha_cfg(target_modules=["q"]))
    layer = model.layers[0].q
    assert all(p.dtype == torch.float32 for p in layer.factors["default"].values())
    x = X[0].to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    # PEFT's bf16(float32(base(x)) + x_fp32 @ ΔWᵀ) is the exact sum rounded once to bf16; ΔW from the
    # factors in float64 (not the layer's own get_delta_weight)
    f = {k: v.detach().double() for k, v in layer.factors["default"].items()}
    delta = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * 4 / 2  # alpha / r
    with torch.no_grad():
        exact = layer.base_layer(x).double() + x.double() @ delta.T
    assert_rounded(y, exact, "bf16 LoHa layer")
    layer.cast_input_dtype_enabled = False
    with pytest.raises(RuntimeError):
        layer(x)


@pytest.mark.parametrize("path", ["peft", "auto"])
@pytest.mark.parametrize("make_cfg, peft_name", [(loha_cfg, "LoHaConfig"), (lokr_cfg, "LoKrConfig")])
def test_training_mode_dropout_matches_peft_under_same_seed(make_cfg, peft_name, path):
    """Same seeds, same dropout draws: on the "peft" path bit-identical outputs; on "auto" within fp32
    rounding of the largest output (a different association of the same sums)."""
    import peft

    kw = dict(rank_dropout=0.5, module_dropout=0.3)
    if peft_name == "LoKrConfig":
        kw["rank_dropout_scale"] = True
    base = net()
    torch.manual_seed(3)
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        getattr(peft, peft_name)(r=2, alpha=4, target_modules=["q", "v", "conv", "conv1"], init_weights=False, **kw),
    )
    torch.manual_seed(3)
    tuner = (lt.LoHaModel if peft_name == "LoHaConfig" else lt.LoKrModel)(
        copy.deepcopy(base), make_cfg(**kw), forward_path=path
    )

    def assert_same(ours: torch.Tensor, ref: torch.Tensor) -> None:
        if path == "peft":
            assert torch.equal(ours, ref)
        else:
            torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6 * float(ref.detach().abs().max()))

    theirs.train()
    tuner.train()
    for step in range(4):
        torch.manual_seed(100 + step)
        a = theirs(*X)
        torch.manual_seed(100 + step)
        b = tuner(*X)
        assert_same(b, a)
    tuner.eval()
    theirs.eval()
    assert_same(tuner(*X), theirs(*X))


def test_explicit_rank_dropout_mask():
    tuner = lt.LoHaModel(net(), loha_cfg(target_modules=["q"], rank_dropout=0.5))
    layer = tuner.model.layers[0].q
    f = {k: v.detach().double() for k, v in layer.factors["default"].items()}
    full = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * 4 / 2  # float64, alpha / r
    keep = torch.tensor([True, False] * 8)
    dropped = layer.get_delta_weight("default", rank_dropout_mask=keep)
    torch.testing.assert_close(dropped[::2].double(), full[::2] * 2, rtol=1e-6, atol=1e-7)  # kept rows / mean(keep)
    assert torch.all(dropped[1::2] == 0)


# ---------------------------------------------------------------------------------------------- bad input
class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.q = nn.Linear(16, 16)


@pytest.mark.parametrize(
    "model_fn, cfg, exc, match",
    [
        (
            Custom,
            lt.LoHaConfig(target_modules=["emb"]),
            TypeError,
            r"emb: target module of type Embedding not supported, currently only adapters for Conv2d, Conv1d, Linear",
        ),
        (
            net,
            lt.LoHaConfig(target_modules=["nothing"]),
            lt.NoMatchingModuleError,
            r"Target modules \['nothing'\] not found",
        ),
        (
            net,
            lt.LoKrConfig(target_modules=["q", "norm"]),
            TypeError,
            "norm: target module of type LayerNorm not supported",
        ),
    ],
)
def test_bad_targets_leave_model_untouched(model_fn, cfg, exc, match):
    model = model_fn()
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        (lt.LoHaModel if isinstance(cfg, lt.LoHaConfig) else lt.LoKrModel)(model, cfg)
    assert_unchanged(model, snap)


def test_invalid_regex_and_bad_rank_are_config_errors():
    with pytest.raises(ValueError, match="target_modules: invalid regular expression"):
        lt.LoHaConfig(target_modules="layers.(")
    with pytest.raises(ValueError, match="LoKrConfig.r: expected a positive integer rank, got 0"):
        lt.LoKrConfig(r=0, target_modules=["q"])
    cfg = lt.LoKrConfig(target_modules=["q"])
    cfg.r = -1  # mutated after validation: the plan rejects it, naming the module, and nothing changes
    model = net()
    snap = snapshot(model)
    with pytest.raises(
        ValueError, match=r"layers.0.q: `r` should be a positive integer value but the value passed is -1"
    ):
        lt.LoKrModel(model, cfg)
    assert_unchanged(model, snap)


def test_wrong_config_type_and_duplicate_adapter():
    model = net()
    tuner = lt.LoHaModel(model, loha_cfg())
    snap = snapshot(model)
    with pytest.raises(ValueError, match="Adapter 'default' already exists"):
        tuner.add_adapter("default", loha_cfg())
    with pytest.raises(TypeError, match="LoHaModel: expected a LoHaConfig, got LoKrConfig"):
        tuner.add_adapter("other", lokr_cfg())
    assert_unchanged(model, snap)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_safe_merge_is_atomic_across_layers(bad):
    model = net()
    tuner = lt.LoHaModel(model, loha_cfg())
    with torch.no_grad():
        model.conv1.factors["default"]["hada_w1_a"][0, 0] = bad  # a late layer is broken
    snap = snapshot(model)
    with pytest.raises(
        ValueError, match="conv1: NaNs detected in the merged weights. The adapter default seems to be broken"
    ):
        tuner.merge_adapter(safe_merge=True)
    assert_unchanged(model, snap)
    assert not any(layer.merged for _, layer in tuner._lycoris_layers())
    with pytest.raises(ValueError, match="NaNs detected"):
        tuner.merge_and_unload(safe_merge=True)
    assert_unchanged(model, snap)


def _save(tmp_path, cfg, tuner_cls=lt.LoKrModel):
    tuner = tuner_cls(net(), cfg)
    tuner.save_pretrained(tmp_path)
    return tuner


def test_checkpoint_that_does_not_fit_is_rejected_untouched(tmp_path):
    _save(tmp_path / "r2", lokr_cfg(r=2, decompose_both=True))
    from safetensors.torch import load_file, save_file

    model = net()
    snap = snapshot(model)
    # Same config, other shapes: rank 4 config over rank 2 tensors.
    cfg = lt.LycorisConfig.from_pretrained(tmp_path / "r2")
    cfg.rank_pattern = {"layers.0.q": 1}
    cfg.save_pretrained(tmp_path / "r2")
    with pytest.raises(ValueError, match=r"layers.0.q: checkpoint factors"):
        lt.LycorisTuner.from_pretrained(model, tmp_path / "r2")
    assert_unchanged(model, snap)

    _save(tmp_path / "ok", lokr_cfg())
    state = load_file(tmp_path / "ok" / "adapter_model.safetensors")
    state["base_model.model.layers.0.q.lokr_w1"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "ok" / "adapter_model.safetensors")
    with pytest.raises(
        ValueError, match=r"layers.0.q.lokr_w1: checkpoint shape \(3, 3\) does not fit the adapter, expected \(4, 4\)"
    ):
        lt.LycorisTuner.from_pretrained(model, tmp_path / "ok")
    assert_unchanged(model, snap)

    state["base_model.model.layers.0.q.lokr_w1"] = torch.zeros(4, 4)
    state["base_model.model.head.lokr_w1"] = torch.zeros(4, 4)
    save_file(state, tmp_path / "ok" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"modules the config does not target: \['head'\]"):
        lt.LycorisTuner.from_pretrained(model, tmp_path / "ok")
    assert_unchanged(model, snap)


def test_unknown_peft_type_and_pickle_never_read(tmp_path):
    _save(tmp_path, lokr_cfg())
    cfg_path = tmp_path / "adapter_config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"LOKR"', '"LORA"'))
    model = net()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="unknown peft_type 'LORA'"):
        lt.LycorisTuner.from_pretrained(model, tmp_path)
    cfg_path.write_text(cfg_path.read_text().replace('"LORA"', '"LOKR"'))
    with pytest.raises(ValueError, match="LoHaModel cannot load a checkpoint with peft_type 'LOKR'"):
        lt.LoHaModel.from_pretrained(model, tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle files are never loaded"):
        lt.LycorisTuner.from_pretrained(model, tmp_path)
    assert_unchanged(model, snap)


def test_load_adapter_adds_second_adapter_and_checks_type(tmp_path):
    first = _save(tmp_path / "b", lokr_cfg(r=3))
    tuner = lt.LoKrModel(net(), lokr_cfg(), adapter_name="a")
    tuner.load_adapter(tmp_path / "b", adapter_name="b")
    assert tuner.active_adapters == ["a"]
    tuner.set_adapter("b")
    torch.testing.assert_close(tuner(*X), first(*X), rtol=0, atol=0)
    assert not any(p.requires_grad for n, p in tuner.named_parameters() if ".b." in n)  # inference mode
    _save(tmp_path / "h", loha_cfg(), lt.LoHaModel)
    with pytest.raises(ValueError, match="LoKrModel cannot load adapter 'c' with peft_type 'LOHA'"):
        tuner.load_adapter(tmp_path / "h", adapter_name="c")


def test_save_is_atomic(tmp_path, monkeypatch):
    tuner = _save(tmp_path, lokr_cfg())
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        tuner.model.layers[0].q.factors["default"]["lokr_w1"].add_(1)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lycoris_core.bookkeeping.dump_safetensors", boom)
    with pytest.raises(OSError):
        tuner.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_modules_to_save_round_trip_with_peft(tmp_path):
    import peft

    tuner = lt.LoHaModel(net(), loha_cfg(target_modules=["q"], modules_to_save=["head"]))
    assert isinstance(tuner.model.head, lt.ModulesToSaveWrapper)
    with torch.no_grad():
        tuner.model.head.modules_to_save["default"].weight.add_(0.5)
    assert tuner.model.head.modules_to_save["default"].weight.requires_grad
    out = tuner(*X)
    tuner.save_pretrained(tmp_path)
    assert "base_model.model.head.weight" in tuner.adapter_state_dict()
    theirs = peft.PeftModel.from_pretrained(net(), str(tmp_path))
    torch.testing.assert_close(theirs(*X), out, rtol=1e-6, atol=1e-6)
    again = lt.LycorisTuner.from_pretrained(net(), tmp_path)
    torch.testing.assert_close(again(*X), out, rtol=0, atol=0)
    torch.testing.assert_close(again.merge_and_unload()(*X), out, rtol=1e-5, atol=1e-5)


def test_peft_saved_directory_with_inject_style_keys_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    tuner = _save(tmp_path, lokr_cfg())
    path = tmp_path / "adapter_model.safetensors"
    save_file({k.removeprefix("base_model.model."): v for k, v in load_file(path).items()}, path)
    torch.testing.assert_close(lt.LycorisTuner.from_pretrained(net(), tmp_path)(*X), tuner(*X), rtol=0, atol=0)


def test_meta_device_model_builds_without_memory_then_loads(tmp_path):
    saved = _save(tmp_path, lokr_cfg())
    with torch.device("meta"):
        model = Net()
    lt.LoKrModel(model, lokr_cfg())
    assert all(p.is_meta for p in model.parameters())
    loaded = lt.LycorisTuner.from_pretrained(_meta_net(), tmp_path)
    layer = loaded.model.layers[0].q
    assert not layer.factors["default"]["lokr_w1"].is_meta
    for name, value in saved.model.layers[0].q.factors["default"].items():  # the saved values, exactly
        assert torch.equal(layer.factors["default"][name], value), name


def _meta_net():
    with torch.device("meta"):
        return Net()


# ---------------------------------------------------------------------------------------------- custom variant
class CustomLycorisConfig(LycorisConfig):
    PEFT_TYPE = "CUSTOM_LYCORIS_LORA"


def plan_custom(layer, r, alpha, config, *, where=""):
    """A LoRA-like variant: ``lora_A (r, in)`` (Kaiming), ``lora_B (out, r)`` (zeros)."""
    factors = (("lora_A", (r, layer.in_features), "kaiming"), ("lora_B", (layer.out_features, r), "zeros"))
    return AdapterPlan(
        "CUSTOM_LYCORIS_LORA",
        layer,
        r,
        alpha,
        factors,
        rank_dropout=config.rank_dropout,
        module_dropout=config.module_dropout,
    )


# A new method is its plan and one record: ``ΔW = lora_B (out, r) @ lora_A (r, in) * alpha / r``.
lt.methods.register(
    lt.methods.Method(
        "CUSTOM_LYCORIS_LORA",
        ("lora_A", "lora_B"),
        plan_custom,
        lambda f, scale, shape: (f["lora_B"] @ f["lora_A"] * scale).reshape(shape),
        kinds=frozenset({"linear"}),
    )
)


class CustomLycorisLinear(lt.LycorisLayer):
    """A layer holding the custom variant (its math is the record's)."""

    adapter_layer_names = ("lora_A", "lora_B")


class CustomLycorisTuner(lt.LycorisTuner):
    prefix = "lora_"
    config_cls = CustomLycorisConfig
    layers_mapping = {nn.Linear: CustomLycorisLinear}  # noqa: RUF012


def test_custom_variant_works_through_the_shared_interface(tmp_path):
    model = net()
    base = model(*X)
    tuner = CustomLycorisTuner(model, CustomLycorisConfig(r=2, alpha=4, target_modules=["q"]))
    assert torch.equal(tuner(*X), base)  # lora_B starts at zero
    with torch.no_grad():
        for _, layer in tuner._lycoris_layers():
            layer.factors["default"]["lora_B"].normal_()
    out = tuner(*X)
    layer = model.layers[0].q
    f = layer.factors["default"]
    torch.testing.assert_close(layer.get_delta_weight("default"), f["lora_B"] @ f["lora_A"] * 2.0)
    tuner.save_pretrained(tmp_path)
    again = lt.LycorisTuner.from_pretrained(net(), tmp_path)  # dispatch on the custom peft_type
    assert isinstance(again, CustomLycorisTuner)
    torch.testing.assert_close(again(*X), out, rtol=0, atol=0)
    again.set_scale("default", 0.0)
    torch.testing.assert_close(again(*X), base, rtol=0, atol=0)
    again.unscale_layer()
    torch.testing.assert_close(again.merge_and_unload()(*X), out, rtol=1e-5, atol=1e-5)
    with pytest.raises(
        TypeError, match="conv: target module of type Conv2d not supported, currently only adapters for Linear"
    ):
        CustomLycorisTuner(net(), CustomLycorisConfig(target_modules=["conv"]))


def test_doc_warnings_are_quiet_on_normal_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lt.LoHaModel(net(), loha_cfg())(*X)
