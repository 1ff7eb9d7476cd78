"""LyCORIS/kohya single files against the lycoris-lora package (4.1.3), both ways.

A file lycoris-lora's ``create_lycoris`` + ``save_weights`` made loads into lycoris_torch, NNX, the
pytree API and the Linen transform and reproduces lycoris-lora's forward; the files we write load
in lycoris-lora (``create_lycoris`` + ``load_weights``, no missing or unexpected keys) and
reproduce ours. fp32 tolerance: 2e-6 of the largest output (lycoris-lora adds ΔW to W and subtracts
W again before its delta conv/matmul: one rounding of W's magnitude).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lycoris_jax as lj
import lycoris_torch as lt
from lycoris_core import kohya
from lycoris_jax import linen, pytree
from tests.kohya.models import (
    CASES,
    lycoris,
    network,
    nnx_model,
    run_nnx,
    run_torch,
    torch_model,
)

RTOL = 2e-6
IDS = [c[0] for c in CASES]


def close(got: np.ndarray, expected: np.ndarray) -> float:
    err = float(np.abs(got - expected).max())
    assert err <= RTOL * float(np.abs(expected).max()), err
    return err


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def made(request, tmp_path_factory):
    """``(case, lycoris-lora's file, its forward)``."""
    case_id, algo, kwargs, exclude = request.param
    model = torch_model()
    net = network(model, algo, kwargs, exclude)
    path = str(tmp_path_factory.mktemp(case_id) / "lycoris.safetensors")
    net.save_weights(path, torch.float32, None)
    expected = run_torch(model)
    assert np.abs(expected - run_torch(torch_model())).max() > 1e-2  # the adapter does something
    return request.param, path, expected


def test_lycoris_lora_file_loads_in_torch_and_nnx_and_reproduces_its_forward(made):
    (_, algo, _, _), path, expected = made
    tuner = lt.LycorisTuner.from_lycoris(torch_model(), path)
    assert tuner.peft_config["default"].peft_type == algo.upper()
    close(run_torch(tuner), expected)
    close(run_nnx(lj.LycorisTuner.from_lycoris(nnx_model(), path)), expected)


def test_our_files_load_in_lycoris_lora_and_reproduce_ours(made, tmp_path):
    (_, algo, kwargs, exclude), path, _ = made
    for twin, (tuner, run) in {
        "torch": (lt.LycorisTuner.from_lycoris(torch_model(), path, is_trainable=True), run_torch),
        "nnx": (lj.LycorisTuner.from_lycoris(nnx_model(), path, is_trainable=True), run_nnx),
    }.items():
        ours = run(tuner)
        out = tmp_path / f"{twin}.safetensors"
        tuner.save_lycoris(out)
        model = torch_model()
        net = network(model, algo, kwargs, exclude, seed=7)  # other values, then theirs from our file
        assert net.load_weights(str(out)) == {}, "missing or unexpected keys"
        close(run_torch(model), ours)
        # and their own loader where lycoris-lora supports it (its LoKr conv loader misreads d·k)
        if algo == "loha":
            model = torch_model()
            loaded, _ = lycoris.create_lycoris_from_weights(1.0, str(out), model)
            loaded.apply_to()
            close(run_torch(model), ours)


def test_a_round_trip_keeps_every_tensor(made, tmp_path):
    _, path, _ = made
    tuner = lt.LycorisTuner.from_lycoris(torch_model(), path)
    tuner.save_lycoris(tmp_path / "again.safetensors")
    a, b = kohya.read_lycoris(path), kohya.read_lycoris(tmp_path / "again.safetensors")
    assert a.modules.keys() == b.modules.keys()
    for name, m in a.modules.items():
        n = b.modules[name]
        assert m.scale == pytest.approx(n.scale, rel=1e-7)
        for k, v in m.factors.items():
            w = n.factors[k] * (m.scale / n.scale if m.full and k == "lokr_w1" else 1)
            np.testing.assert_allclose(w, v, rtol=1e-6, atol=0)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_linen_and_pytree_load_a_lycoris_lora_file_made_on_transformers_llama(tmp_path, algo):
    from tests.jax.llama import build_llama, torch_logits
    from tests.jax.test_linen import run

    torch_model_, flax_model, params, logits = build_llama()
    model = torch_model_()
    net = network(model, algo, {"linear_dim": 4, "linear_alpha": 8.0}, ["lm_head"])
    expected = torch_logits(model)
    path = tmp_path / "llama.safetensors"
    net.save_weights(str(path), torch.float32, None)
    adapter = pytree.from_lycoris(path, params)
    got = np.asarray(logits(pytree.merge(params, adapter)))
    close(got, expected)
    adapted, collection = linen.from_lycoris(path, flax_model.module, params)
    close(np.asarray(run(adapted, params, collection)), expected)
    out = tmp_path / "back.safetensors"
    pytree.save_lycoris(adapter, out)
    linen.save_lycoris(adapted, collection, tmp_path / "linen.safetensors")
    assert (tmp_path / "linen.safetensors").read_bytes() == out.read_bytes()
    model = torch_model_()
    back = network(model, algo, {"linear_dim": 4, "linear_alpha": 8.0}, ["lm_head"], seed=9)
    assert back.load_weights(str(out)) == {}
    close(torch_logits(model), got)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_scanned_stacks_load_and_write_lycoris_files(tmp_path, algo):
    """A file made on a torch ``ModuleList`` (``lycoris_layers_<i>_attn_q``) on an NNX ``nnx.vmap``
    stack and a stacked params tree, and back."""
    from tests.jax.test_stacks import Scanned, X, nnx_forward, run_scan, stacked_params, torch_net, torch_out

    kwargs = {"linear_dim": 2, "linear_alpha": 4.0}
    model = torch_net()
    net = network(model, algo, kwargs, [])
    expected = torch_out(model)
    path = tmp_path / "f.safetensors"
    net.save_weights(str(path), torch.float32, None)
    tuner = lj.LycorisTuner.from_lycoris(Scanned(), path, stacks=["layers"])
    close(np.asarray(nnx_forward(tuner, X)), expected)
    params = stacked_params(torch_net())
    adapter = pytree.from_lycoris(path, params, stacks=["layers"])
    close(np.asarray(run_scan(pytree.merge(params, adapter), X)), expected)
    tuner.save_lycoris(tmp_path / "back.safetensors")
    model = torch_net()
    assert network(model, algo, kwargs, [], seed=3).load_weights(str(tmp_path / "back.safetensors")) == {}
    close(torch_out(model), expected)
