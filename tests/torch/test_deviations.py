"""Each deliberate deviation from PEFT 0.21.2: PEFT's behaviour and ours, side by side.

docs/DEVIATIONS.md explains each one; the test names here are cited there.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from peft.tuners.loha.layer import HadaWeightCP
from safetensors.torch import load_file, save_file
from torch import nn

import lycoris_torch as lt
from parity_tests.compare import Cell, assert_cell, measure
from tests.torch.models import assert_unchanged, snapshot


def _cp_factors(dtype=torch.float64, r=3, out=5, inp=4, k=(3, 2)):
    g = torch.Generator().manual_seed(0)
    shapes = [(r, r, *k), (r, out), (r, inp), (r, r, *k), (r, out), (r, inp)]
    return [torch.randn(s, generator=g, dtype=dtype, requires_grad=True) for s in shapes]


def test_a_loha_cp_gradients_pass_gradcheck_where_peft_fails():
    t1, w1a, w1b, t2, w2a, w2b = _cp_factors()
    ours = lambda *f: lt.loha.make_weight_cp(*f, scale=0.7)  # noqa: E731
    assert torch.autograd.gradcheck(ours, (t1, w1a, w1b, t2, w2a, w2b))
    theirs = lambda *f: HadaWeightCP.apply(*f, torch.tensor(0.7, dtype=torch.float64))  # noqa: E731
    assert not torch.autograd.gradcheck(theirs, (t1, w1a, w1b, t2, w2a, w2b), raise_exception=False)
    # Forward values agree; only PEFT's hand-written gradients for w1_a / w2_a are wrong.
    torch.testing.assert_close(ours(t1, w1a, w1b, t2, w2a, w2b), theirs(t1, w1a, w1b, t2, w2a, w2b))
    g_ours = torch.autograd.grad(ours(t1, w1a, w1b, t2, w2a, w2b).sum(), (w1a, w1b))
    g_theirs = torch.autograd.grad(theirs(t1, w1a, w1b, t2, w2a, w2b).sum(), (w1a, w1b))
    torch.testing.assert_close(g_ours[1], g_theirs[1])  # w1_b: PEFT is right
    assert (g_ours[0] - g_theirs[0]).abs().max() > 0.1 * g_ours[0].abs().max()  # w1_a: PEFT is wrong


class ConvNet(nn.Module):
    def __init__(self, padding_mode: str, dims: int) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        self.conv = conv(4, 6, 3, padding=1, padding_mode=padding_mode)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_b_padding_mode_unmerged_equals_merged(padding_mode, dims):
    torch.manual_seed(0)
    base = ConvNet(padding_mode, dims)
    x = torch.randn(2, 4, *([7] * dims))
    cfg = dict(r=2, target_modules=["conv"], init_weights=False)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(**cfg)).eval()
    torch.manual_seed(1)
    ours = lt.LoHaModel(copy.deepcopy(base), lt.LoHaConfig(**cfg)).eval()

    peft_unmerged = theirs(x)
    ours_unmerged = ours(x)
    theirs.merge_adapter()
    ours.merge_adapter()
    peft_merged, ours_merged = theirs(x), ours(x)
    torch.testing.assert_close(ours_merged, peft_merged)  # merged weights are identical
    torch.testing.assert_close(ours_unmerged, ours_merged, rtol=1e-5, atol=1e-5)  # ours: consistent
    assert (peft_unmerged - peft_merged).abs().max() > 1e-2  # PEFT: zero-pads the delta conv


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential() for _ in range(2)])
        for block in self.layers:
            block.q = nn.Linear(8, 8)

    def forward(self, x):
        for block in self.layers:
            x = block.q(x)
        return x


def two_layer() -> TwoLayer:
    torch.manual_seed(0)
    return TwoLayer()


def test_c_rank_pattern_order_survives_save_and_load(tmp_path):
    # "q" first: every q gets r=2. Sorted (PEFT's save) puts "layers.0.q" first: layers.0.q gets r=3.
    kw = dict(r=4, target_modules=["q"], rank_pattern={"q": 2, "layers.0.q": 3}, init_weights=False)
    theirs = peft.get_peft_model(two_layer(), peft.LoHaConfig(**kw))
    assert theirs.base_model.model.layers[0].q.r["default"] == 2
    theirs.save_pretrained(tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert list(saved["rank_pattern"]) == ["layers.0.q", "q"]  # PEFT sorted the patterns
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft.PeftModel.from_pretrained(two_layer(), str(tmp_path / "peft"))  # r=3 planned, r=2 saved

    ours = lt.LoHaModel(two_layer(), lt.LoHaConfig(**kw))
    ours.save_pretrained(tmp_path / "ours")
    again = lt.LycorisTuner.from_pretrained(two_layer(), tmp_path / "ours")
    assert again.model.layers[0].q.plans["default"].r == 2
    x = torch.randn(2, 8)
    torch.testing.assert_close(again(x), ours(x))
    # PEFT reads our file in our order, so it loads our adapter correctly too.
    torch.testing.assert_close(peft.PeftModel.from_pretrained(two_layer(), str(tmp_path / "ours"))(x), ours(x))


def test_d_lokr_conv1d_full_w2_keeps_peft_layout():
    torch.manual_seed(0)
    base = nn.Sequential()
    base.conv = nn.Conv1d(12, 20, 3)
    kw = dict(r=8, target_modules=["conv"], init_weights=False)  # r >= max(b, d)/2: w2 is full (b, d, k)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoKrConfig(**kw))
    torch.manual_seed(1)
    ours = lt.LoKrModel(copy.deepcopy(base), lt.LoKrConfig(**kw))
    layer = ours.model.conv
    factors = layer.factors["default"]
    assert tuple(factors["lokr_w2"].shape) == (5, 4, 3)
    delta = layer.get_delta_weight("default")
    torch.testing.assert_close(delta, theirs.base_model.model.conv.get_delta_weight("default"), rtol=0, atol=0)
    # The structured channel-Kronecker product (LyCORIS upstream) is a different weight.
    structured = torch.kron(factors["lokr_w1"][:, :, None], factors["lokr_w2"]) * layer.scaling["default"]
    assert (structured - delta).abs().max() > 0.1 * delta.abs().max()


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_e_rank_dropout_dropping_every_row_gives_zero_delta_not_nan(kind):
    torch.manual_seed(0)
    base = nn.Sequential()
    base.q = nn.Linear(8, 8)
    kw = dict(r=2, target_modules=["q"], init_weights=False, rank_dropout=1.0)  # rand > 1.0 drops every row
    if kind == "lokr":
        kw["rank_dropout_scale"] = True
    x = torch.randn(3, 8)
    peft_cfg = peft.LoHaConfig(**kw) if kind == "loha" else peft.LoKrConfig(**kw)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_cfg).train()
    assert torch.isnan(theirs(x)).all()
    ours = (lt.LoHaModel if kind == "loha" else lt.LoKrModel)(
        copy.deepcopy(base), lt.LoHaConfig(**kw) if kind == "loha" else lt.LoKrConfig(**kw)
    ).train()
    torch.testing.assert_close(ours(x), base(x))  # every row dropped: the adapter adds nothing


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x):
        return self.b(self.a(x))


def test_f_model_level_safe_merge_is_all_or_nothing():
    torch.manual_seed(0)
    base = Pair()
    kw = dict(r=2, target_modules=["a", "b"], init_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoKrConfig(**kw))
    ours = lt.LoKrModel(copy.deepcopy(base), lt.LoKrConfig(**kw))
    with torch.no_grad():
        theirs.base_model.model.b.lokr_w1["default"].fill_(float("inf"))
        ours.model.b.factors["default"]["lokr_w1"].fill_(float("inf"))
    with pytest.raises(ValueError, match="NaNs detected"):
        theirs.merge_adapter(safe_merge=True)
    assert theirs.base_model.model.a.merged  # PEFT: layer "a" stays merged
    snap = snapshot(ours.model)
    with pytest.raises(ValueError, match="b: NaNs detected"):
        ours.merge_adapter(safe_merge=True)
    assert not ours.model.a.merged
    assert_unchanged(ours.model, snap)


def test_f_layer_level_safe_merge_of_several_adapters_is_all_or_nothing():
    torch.manual_seed(0)
    ours = lt.LoKrModel(Pair(), lt.LoKrConfig(r=2, target_modules=["a"], init_weights=False), adapter_name="x")
    ours.add_adapter("y", lt.LoKrConfig(r=2, target_modules=["a"], init_weights=False))
    with torch.no_grad():
        ours.model.a.factors["y"]["lokr_w1"].fill_(float("nan"))
    w = ours.model.a.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match="The adapter y seems to be broken"):
        ours.model.a.merge(safe_merge=True, adapter_names=["x", "y"])
    assert ours.model.a.merged_adapters == []  # PEFT would keep "x" merged
    assert torch.equal(ours.model.a.get_base_layer().weight, w)


def test_g_loha_scale_is_not_rounded_through_float32_for_float64():
    torch.manual_seed(0)
    base = nn.Sequential()
    base.q = nn.Linear(8, 8)
    base = base.double()
    kw = dict(r=3, alpha=8, target_modules=["q"], init_weights=False)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(**kw))
    torch.manual_seed(1)
    ours = lt.LoHaModel(copy.deepcopy(base), lt.LoHaConfig(**kw))
    f = ours.model.q.factors["default"]
    exact = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * (8 / 3)
    ours_delta = ours.model.q.get_delta_weight("default")
    peft_delta = theirs.base_model.model.q.get_delta_weight("default")
    assert torch.equal(ours_delta, exact)
    rel = ((peft_delta - exact).abs().max() / exact.abs().max()).item()
    assert 1e-9 < rel < 1e-7  # PEFT: float32(8/3)


def test_h_bf16_reload_in_inference_mode_stays_frozen(tmp_path):
    torch.manual_seed(0)
    base = Pair()
    lt.LoKrModel(copy.deepcopy(base), lt.LoKrConfig(r=2, target_modules=["a"])).save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base).to(torch.bfloat16), str(tmp_path))
    assert any(p.requires_grad for n, p in theirs.named_parameters() if "lokr_" in n)  # PEFT: trainable
    ours = lt.LycorisTuner.from_pretrained(copy.deepcopy(base).to(torch.bfloat16), tmp_path)
    assert not any(p.requires_grad for p in ours.parameters())
    assert ours.model.a.factors["default"]["lokr_w1"].dtype == torch.float32


def test_i_lokr_conv1d_tucker_at_rank_1_works_where_peft_crashes():
    torch.manual_seed(0)
    base = nn.Sequential()
    base.layer = nn.Conv1d(12, 20, 3, padding=1)
    kw = dict(r=1, target_modules=["layer"], use_effective_conv2d=True, init_weights=False)
    x = torch.randn(2, 12, 9)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoKrConfig(**kw))
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        theirs(x)  # torch.kron on the einsum's degenerate strides
    torch.manual_seed(1)
    ours = lt.LoKrModel(copy.deepcopy(base), lt.LoKrConfig(**kw))
    f = ours.model.layer.factors["default"]
    w2 = torch.einsum("ijkl,ip,jr->prkl", f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"]).clone(
        memory_format=torch.contiguous_format
    )
    expected = (torch.kron(f["lokr_w1"][:, :, None, None], w2) * ours.model.layer.scaling["default"]).reshape(20, 12, 3)
    torch.testing.assert_close(ours.model.layer.get_delta_weight("default"), expected)
    assert ours(x).shape == (2, 20, 9)


def test_m_an_adapter_name_cannot_write_outside_the_save_directory(tmp_path):
    outside = tmp_path / "outside"
    kw = dict(r=2, target_modules=["a"], init_weights=False)
    theirs = peft.get_peft_model(Pair(), peft.LoKrConfig(**kw))
    theirs.add_adapter(str(outside), peft.LoKrConfig(**kw))
    theirs.save_pretrained(str(tmp_path / "save"))
    assert (outside / "adapter_model.safetensors").exists()  # PEFT: os.path.join(save_dir, "/abs") == "/abs"
    ours = lt.LoKrModel(Pair(), lt.LoKrConfig(**kw))
    with pytest.raises(ValueError, match="adapter name '/.*': expected 1 to 64 ASCII letters"):
        ours.add_adapter(str(tmp_path / "outside2"), lt.LoKrConfig(**kw))
    with pytest.raises(KeyError, match="attribute 'keys' already exists"):  # PEFT refuses this one, by accident
        peft.get_peft_model(Pair(), peft.LoKrConfig(**kw)).add_adapter("keys", peft.LoKrConfig(**kw))
    ours.add_adapter("keys", lt.LoKrConfig(**kw))  # ours: any name of the rule, in both twins


def test_n_non_finite_factors_are_refused_on_load_unless_asked_for(tmp_path):
    kw = dict(r=2, target_modules=["a"], init_weights=False)
    lt.LoKrModel(Pair(), lt.LoKrConfig(**kw)).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.a.lokr_w1"][0, 0] = float("nan")
    save_file(tensors, path, {"format": "pt"})
    theirs = peft.PeftModel.from_pretrained(Pair(), str(tmp_path))
    assert torch.isnan(theirs(torch.randn(2, 6))).any()  # PEFT: loads silently, every output NaN
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) in \['base_model.model.a.lokr_w1'\]"):
        lt.LycorisTuner.from_pretrained(Pair(), tmp_path)
    ours = lt.LycorisTuner.from_pretrained(Pair(), tmp_path, allow_nonfinite=True)
    assert torch.isnan(ours(torch.randn(2, 6))).any()


class _PathModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(24, 36)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), self.conv(img)


@pytest.mark.parametrize("inputs", ["normal", "arange"])
@pytest.mark.parametrize("kind", ["lokr", "loha"])
@pytest.mark.parametrize("path", ["peft", "merged", "factored", "auto"])
def test_o_forward_paths_agree_with_peft_within_rounding(kind, path, inputs):
    """Training mode with rank and module dropout (PEFT's global-RNG draws, same seed): outputs and
    factor gradients of every path against PEFT's arithmetic in float64, within the parity table's
    rows (ours <= k x PEFT's own fp32 error + floor), for random-normal and arange inputs (values up
    to 100); ``"peft"`` bit-identical to PEFT."""
    torch.manual_seed(0)
    base = _PathModel()
    kw = dict(r=4, alpha=6, target_modules=["lin", "conv"], init_weights=False, rank_dropout=0.3, module_dropout=0.2)
    peft_cfg = (peft.LoKrConfig if kind == "lokr" else peft.LoHaConfig)(**kw)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_cfg)
    reference = peft.get_peft_model(copy.deepcopy(base).double(), peft_cfg)  # PEFT's arithmetic in float64
    ours = (lt.LoKrModel if kind == "lokr" else lt.LoHaModel)(
        copy.deepcopy(base), (lt.LoKrConfig if kind == "lokr" else lt.LoHaConfig)(**kw), forward_path=path
    )
    with torch.no_grad():  # same factors everywhere
        for name, layer in (("lin", ours.model.lin), ("conv", ours.model.conv)):
            for factor, param in layer.factors["default"].items():
                value = getattr(getattr(theirs.base_model.model, name), factor)["default"]
                param.copy_(value)
                getattr(getattr(reference.base_model.model, name), factor)["default"].copy_(value)
    if inputs == "arange":  # PEFT's test style: large terms, long sums
        x, img = torch.arange(5 * 24.0).view(5, 24) % 101, torch.arange(2 * 4 * 36.0).view(2, 4, 6, 6) % 101
    else:
        x, img = torch.randn(5, 24), torch.randn(2, 4, 6, 6)
    results = {}
    for key, model, inp in ((0, theirs, (x, img)), (1, ours, (x, img)), (2, reference, (x.double(), img.double()))):
        model.train()
        torch.manual_seed(7)  # the dropout draws
        outs = model(*inp)
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in outs).backward()
        grads = {}
        for name, param in model.named_parameters():
            if param.grad is not None:  # PEFT: ...lin.lokr_w1.default; ours: ...lin.factors.default.lokr_w1
                parts = name.split(".")
                module = parts[-4] if model is ours else parts[-3]
                grads[module, parts[-1] if model is ours else parts[-2]] = param.grad
        results[key] = (outs, grads)
    (p_outs, p_grads), (o_outs, o_grads), (r_outs, r_grads) = results[0], results[1], results[2]
    row = "fp32" if path == "auto" else f"fp32+{path}"
    for op, pairs in (
        ("forward", list(zip(o_outs, p_outs, r_outs, strict=True))),
        ("grad", [(o_grads[k], p_grads[k], r_grads[k]) for k in sorted(p_grads)]),
    ):
        assert pairs and sorted(o_grads) == sorted(p_grads) == sorted(r_grads)
        cell = Cell(f"{kind}-{path}-{inputs}", op, row)
        for i, (mine, theirs_value, ref) in enumerate(pairs):
            measure(cell, f"{op} {i}", mine, ref, peft=theirs_value)
            if path == "peft":
                measure(cell, f"{op} {i} = PEFT", mine, theirs_value, against="peft")
        assert_cell(cell)
