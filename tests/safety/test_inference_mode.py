"""Inference mode as in PEFT: loading for inference means eval mode; new layers join in the model's mode.

With rank and module dropout configured, repeated identical calls give one distinct output in eval
mode and several in training mode; each test counts them for real PEFT and both twins.
"""

from __future__ import annotations

import numpy as np
import peft
import pytest
import torch
from flax import nnx

import lycoris_jax as lj
import lycoris_torch as lt
from tests.safety.twins import JAX, TORCH, TWINS, X_TORCH

DROPOUT = {"rank_dropout": 0.5, "module_dropout": 0.5}


def distinct(call, n: int = 8) -> int:
    return len({np.asarray(call()).tobytes() for _ in range(n)})


def peft_distinct(model) -> int:
    def call():
        with torch.no_grad():
            return model(*X_TORCH).numpy()

    return distinct(call)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A LoKr adapter with dropout in its config, saved by the torch twin (PEFT's files)."""
    path = tmp_path_factory.mktemp("dropout_adapter")
    TORCH.tuner(config=TORCH.lokr(**DROPOUT)).save_pretrained(path)
    return path


@pytest.mark.parametrize("is_trainable", [False, True])
def test_from_pretrained_mode_matches_peft(saved, is_trainable):
    torch.manual_seed(0)
    theirs = peft.PeftModel.from_pretrained(TORCH.model(), saved, is_trainable=is_trainable)
    ours = [twin.lib.LycorisTuner.from_pretrained(twin.model(), saved, is_trainable=is_trainable) for twin in TWINS]
    counts = [peft_distinct(theirs)] + [
        distinct(lambda t=t, twin=twin: twin.run(t)) for twin, t in zip(TWINS, ours, strict=True)
    ]
    if is_trainable:  # a fresh model is in training mode, and loading trainable keeps it so
        assert min(counts) > 1, counts
        assert ours[0].training and not ours[1].model.layers[0].deterministic
    else:
        assert counts == [1, 1, 1], counts
        assert not ours[0].training and ours[1].model.layers[0].deterministic


def test_load_adapter_for_inference_puts_the_model_in_eval_mode_like_peft(saved):
    torch.manual_seed(0)
    theirs = peft.PeftModel.from_pretrained(TORCH.model(), saved, is_trainable=True)
    theirs.load_adapter(saved, "other", is_trainable=False)
    ours = [twin.lib.LycorisTuner.from_pretrained(twin.model(), saved, is_trainable=True) for twin in TWINS]
    for t in ours:
        t.load_adapter(saved, "other", is_trainable=False)
    counts = [peft_distinct(theirs)] + [
        distinct(lambda t=t, twin=twin: twin.run(t)) for twin, t in zip(TWINS, ours, strict=True)
    ]
    assert counts == [1, 1, 1], counts


@pytest.mark.parametrize("twin", TWINS, ids=lambda t: t.name)
def test_inference_load_keeps_outputs_equal_to_the_merged_model(saved, twin):
    """Eval mode is not just deterministic: the output is the dropout-free adapter's."""
    loaded = twin.lib.LycorisTuner.from_pretrained(twin.model(), saved)
    out = twin.run(loaded)
    merged = loaded.merge_and_unload()
    np.testing.assert_allclose(out, twin.run(merged), rtol=1e-5, atol=1e-6)


def test_new_torch_layers_join_an_eval_model_in_eval_mode_peft_does_not():
    """Deviation l: PEFT's new adapter layers start in training mode on an eval-mode model."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(TORCH.model().eval(), peft.LoKrConfig(**TORCH.lokr(**DROPOUT).to_dict()))
    assert peft_distinct(theirs) > 1  # PEFT: dropout runs although the model was put in eval mode
    ours = lt.LoKrModel(TORCH.model().eval(), TORCH.lokr(**DROPOUT))
    assert distinct(lambda: TORCH.run(ours)) == 1
    assert not any(m.training for m in ours.modules())
    ours.train()
    assert distinct(lambda: TORCH.run(ours)) > 1
    trained = lt.LoKrModel(TORCH.model(), TORCH.lokr(**DROPOUT))  # a training-mode model stays so
    assert all(m.training for m in trained.modules())


class DropoutMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([nnx.Linear(12, 24, rngs=rngs), nnx.Linear(24, 16, use_bias=False, rngs=rngs)])
        self.head = nnx.Linear(16, 8, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.tanh(layer(x))
        return self.head(self.drop(x))


@pytest.mark.parametrize("eval_first", [True, False])
def test_new_jax_layers_join_in_the_model_mode(eval_first):
    model = DropoutMLP(nnx.Rngs(0))
    if eval_first:
        model.eval()
    tuner = lj.LoKrModel(model, JAX.lokr(**DROPOUT), rngs=nnx.Rngs(params=0, dropout=1))
    assert all(tuner.model.layers[i].deterministic is eval_first for i in range(2))
    assert (distinct(lambda: JAX.run(tuner)) == 1) is eval_first


def test_jax_adapter_added_later_follows_the_existing_layers_mode():
    tuner = JAX.tuner(config=JAX.lokr(**DROPOUT))
    tuner.eval()
    tuner.add_adapter("second", JAX.lokr(**DROPOUT, r=3))
    tuner.set_adapter("second")
    assert distinct(lambda: JAX.run(tuner)) == 1
    tuner.train()
    assert distinct(lambda: JAX.run(tuner)) > 1


def test_jax_dropout_without_a_dropout_stream_fails_at_construction():
    model = JAX.model()
    snap = JAX.snapshot(model)
    with pytest.raises(ValueError, match="'dropout' \\(or 'default'\\) stream, got streams \\['params'\\]"):
        lj.LoKrModel(model, JAX.lokr(**DROPOUT), rngs=nnx.Rngs(params=0))
    JAX.assert_unchanged(model, snap)
    lj.LoKrModel(model, JAX.lokr(), rngs=nnx.Rngs(params=0))  # no dropout configured: no stream needed
