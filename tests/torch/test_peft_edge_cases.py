"""Edge cases found in review, each checked against real PEFT where PEFT has the behaviour:
modules_to_save with buffers and suffix matching, "all-linear", shared modules, inference-mode
freezing, adapter activation after deletion, rank-dropout mask precision, default targets."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import transformers
from torch import nn

import lycoris_core as lc
import lycoris_torch as lt
from tests.torch.models import assert_unchanged, snapshot


def _adapted(model: nn.Module, peft_model: bool = False) -> set[str]:
    if peft_model:
        from peft.tuners.lycoris_utils import LycorisLayer

        return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LycorisLayer)}
    return {n for n, m in model.named_modules() if isinstance(m, lt.LycorisLayer)}


class WithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.lm_head = nn.Linear(8, 4)

    def forward(self, x):
        return self.lm_head(self.bn(self.q(x)))


def with_norm() -> WithNorm:
    torch.manual_seed(0)
    return WithNorm()


def test_modules_to_save_with_buffers_and_suffix_rule_round_trip_with_peft(tmp_path):
    x = torch.randn(4, 8)
    kw = dict(r=2, target_modules=["q"], modules_to_save=["bn", "head"], init_weights=False)
    ours = lt.LoHaModel(with_norm(), lt.LoHaConfig(**kw))
    assert isinstance(ours.model.lm_head, lt.ModulesToSaveWrapper)  # PEFT's literal suffix rule: "head" -> lm_head
    ours.train()
    ours(x)  # updates the BatchNorm copy's running stats (buffers)
    ours.eval()
    out = ours(x)
    ours.save_pretrained(tmp_path / "ours")
    again = lt.LycorisTuner.from_pretrained(with_norm(), tmp_path / "ours").eval()
    torch.testing.assert_close(again(x), out, rtol=0, atol=0)
    theirs = peft.PeftModel.from_pretrained(with_norm(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(theirs(x), out, rtol=1e-6, atol=1e-6)
    theirs.save_pretrained(str(tmp_path / "peft"))
    from_peft = lt.LycorisTuner.from_pretrained(with_norm(), tmp_path / "peft").eval()
    torch.testing.assert_close(from_peft(x), out, rtol=1e-6, atol=1e-6)


def test_modules_to_save_copies_train_only_when_active_and_not_inference(tmp_path):
    kw = dict(r=2, target_modules=["q"], modules_to_save=["lm_head"])
    tuner = lt.LoKrModel(with_norm(), lt.LoKrConfig(**kw))
    tuner.add_adapter("b", lt.LoKrConfig(**kw))
    trainable = {n for n, p in tuner.named_parameters() if p.requires_grad}
    assert any("modules_to_save.default" in n for n in trainable)
    assert not any(".b." in n for n in trainable)  # inactive adapter "b": factors and copy frozen
    tuner.save_pretrained(tmp_path)
    loaded = lt.LycorisTuner.from_pretrained(with_norm(), tmp_path)  # inference mode
    assert not any(p.requires_grad for p in loaded.parameters())
    with loaded.disable_adapter():
        pass
    assert not any(p.requires_grad for p in loaded.parameters())  # re-enabling keeps it frozen


def test_set_adapter_that_cannot_apply_changes_nothing():
    kw = dict(r=2, target_modules=["q"], modules_to_save=["lm_head"])
    tuner = lt.LoKrModel(with_norm(), lt.LoKrConfig(**kw))
    tuner.add_adapter("b", lt.LoKrConfig(**kw))
    snap = snapshot(tuner.model)
    with pytest.raises(
        ValueError, match=r"lm_head: modules_to_save can only have one active adapter, got \['default', 'b'\]"
    ):
        tuner.set_adapter(["default", "b"])
    assert tuner.active_adapters == ["default"] and tuner.model.q.active_adapters == ["default"]
    assert_unchanged(tuner.model, snap)


def test_inference_mode_stays_frozen_after_delete(tmp_path):
    lt.LoKrModel(with_norm(), lt.LoKrConfig(r=2, target_modules=["q"])).save_pretrained(tmp_path)
    tuner = lt.LycorisTuner.from_pretrained(with_norm(), tmp_path)
    tuner.add_adapter("b", lt.LoKrConfig(r=2, target_modules=["q"]))
    tuner.set_adapter(["default", "b"])
    tuner.delete_adapter("b")
    assert tuner.active_adapters == ["default"]
    assert not any(p.requires_grad for p in tuner.parameters())


def test_after_deleting_the_active_adapter_every_layer_agrees():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 8)
            self.v = nn.Linear(8, 8)

    tuner = lt.LoHaModel(Two(), lt.LoHaConfig(r=2, target_modules=["q", "v"]), adapter_name="c")
    tuner.add_adapter("a", lt.LoHaConfig(r=2, target_modules=["q", "v"]))
    tuner.add_adapter("b", lt.LoHaConfig(r=2, target_modules=["v"]))
    tuner.delete_adapter("c")
    assert tuner.active_adapters == ["a"]
    assert tuner.model.q.active_adapters == ["a"] and tuner.model.v.active_adapters == ["a"]


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Sequential() for _ in range(2)])
        for block in self.model.layers:
            block.q = nn.Linear(8, 8)
            block.proj = nn.Linear(8, 8)
        self.emb = nn.Module()
        self.emb.proj = nn.Embedding(10, 8)  # same leaf name as a Linear
        self.out = nn.Linear(8, 8)


@pytest.mark.parametrize("extra", [{}, {"layers_to_transform": [0]}])
def test_all_linear_selects_full_names_like_peft(extra):
    kw = dict(r=2, target_modules="all-linear", **extra)
    ours = lt.LoHaModel(Blocks(), lt.LoHaConfig(**kw))
    theirs = peft.get_peft_model(Blocks(), peft.LoHaConfig(**kw))
    assert _adapted(ours.model) == _adapted(theirs, peft_model=True)
    assert "emb.proj" not in _adapted(ours.model)


def test_all_linear_skips_the_classifier_head_of_seq_cls_models():
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, num_labels=2
    )

    def bert():
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(cfg)

    kw = dict(r=2, target_modules="all-linear", task_type="SEQ_CLS")
    ours = lt.LoKrModel(bert(), lt.LoKrConfig(**kw))
    theirs = peft.get_peft_model(bert(), peft.LoKrConfig(**kw))
    assert "classifier" not in _adapted(ours.model)
    assert _adapted(ours.model) == _adapted(theirs, peft_model=True)


def test_shared_module_is_rejected_untouched():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Module()
            self.dec = nn.Module()
            self.enc.q = self.dec.q = nn.Linear(8, 8)

    model = Shared()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"enc.q: this module is shared, reachable as \['enc.q', 'dec.q'\]"):
        lt.LoHaModel(model, lt.LoHaConfig(target_modules=["q"]))
    assert_unchanged(model, snap)
    # PEFT adapts one path and silently bypasses the adapter on the other.
    theirs = peft.get_peft_model(Shared(), peft.LoHaConfig(target_modules=["q"], init_weights=False))
    inner = theirs.base_model.model
    x = torch.randn(2, 8)
    assert not torch.allclose(inner.enc.q(x), inner.dec.q(x))


def test_lokr_rank_dropout_mask_is_float32_like_peft_for_bf16_adapters():
    torch.manual_seed(0)
    base = nn.Sequential()
    base.q = nn.Linear(24, 20)
    base = base.to(torch.bfloat16)
    kw = dict(r=2, target_modules=["q"], init_weights=False, rank_dropout=0.5, rank_dropout_scale=True)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoKrConfig(**kw), autocast_adapter_dtype=False)
    torch.manual_seed(1)
    ours = lt.LoKrModel(copy.deepcopy(base), lt.LoKrConfig(**kw), autocast_adapter_dtype=False)
    assert ours.model.q.factors["default"]["lokr_w1"].dtype == torch.bfloat16
    for seed in range(10):
        torch.manual_seed(seed)
        a = theirs.base_model.model.q.get_delta_weight("default", apply_rank_dropout=True)
        torch.manual_seed(seed)
        b = ours.model.q.get_delta_weight("default", apply_rank_dropout=True)
        assert b.dtype == torch.bfloat16 and torch.equal(a, b), seed


def test_default_target_table_is_peft_s():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING as loha_table
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING as lokr_table

    assert lc.targets.DEFAULT_TARGET_MODULES == loha_table == lokr_table


@pytest.mark.parametrize("factor", [0, -2, 3])
def test_any_integer_decompose_factor_like_peft(factor):
    from peft.tuners.lokr.layer import factorization as peft_factorization

    lc.LoKrConfig(decompose_factor=factor)
    assert lc.factorization(48, factor) == peft_factorization(48, factor)


def test_init_empty_weights_builds_factors_without_initialising():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = lt.LoKrLayer.__new__(lt.LoKrLayer)
        base = nn.Linear(64, 96, device="meta")
        layer._init_empty_weights(lt.LoKrLayer, base, "default", lt.LoKrConfig(r=4), 4, 8, device="cpu")
    factors = layer.factors["default"]
    assert {k: tuple(v.shape) for k, v in factors.items()} == {
        "lokr_w1": (8, 8),
        "lokr_w2_a": (12, 4),
        "lokr_w2_b": (4, 8),
    }
    assert all(p.device.type == "cpu" for p in factors.values())
