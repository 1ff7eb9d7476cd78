"""lycoris-lora's own LoKr options, file by file, in every front end (against lycoris-lora 4.1.3).

lycoris-lora's ``factorization(dim, factor)`` puts the smaller factor first; PEFT's returns
``(factor, dim // factor)`` unsorted; ``unbalanced_factorization`` swaps the output pair, and
``full_matrix`` keeps ``W2`` full at any rank. So one file can hold a factorization that no PEFT
``LoKrConfig`` gives. The Kronecker product is the same math either way: every front end loads
such a file with the file's own plan (``lycoris_core.kohya.file_plan``), computes lycoris-lora's
forward, and writes the file back; a PEFT directory cannot hold it, and converting refuses, naming
the module. fp32 tolerance: 2e-6 of the largest output (as ``test_lycoris_files.py``).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import lycoris_jax as lj
import lycoris_torch as lt
from lycoris_core import CheckpointError, kohya
from lycoris_jax import linen, pytree
from parity_tests.layouts import channels_last, torch_to_flax_kernel
from tests.kohya.models import network

RTOL = 2e-6


class TorchNet(torch.nn.Module):
    """Two Linear layers and a Conv2d whose dims (16, 32, 24; 8 -> 16) factor many ways."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 24)
        self.conv = torch.nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x, img):
        return torch.cat([self.fc2(torch.tanh(self.fc1(x))), self.conv(img).sum((2, 3))], -1)


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.fc1, self.fc2 = nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 24, rngs=rngs)
        self.conv = nnx.Conv(8, 16, (3, 3), padding=1, rngs=rngs)

    def __call__(self, x, img):
        return jnp.concatenate([self.fc2(jnp.tanh(self.fc1(x))), self.conv(img).sum((1, 2))], -1)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, img):
        h = nn.Dense(24, name="fc2")(jnp.tanh(nn.Dense(32, name="fc1")(x)))
        return jnp.concatenate([h, nn.Conv(16, (3, 3), padding=1, name="conv")(img).sum((1, 2))], -1)


_rng = np.random.default_rng(0)
X, IMG = _rng.standard_normal((3, 16)).astype(np.float32), _rng.standard_normal((3, 8, 5, 5)).astype(np.float32)
JX, JIMG = jnp.asarray(X), jnp.asarray(channels_last(IMG))


def torch_net() -> TorchNet:
    torch.manual_seed(0)
    return TorchNet().eval()


def flax_params() -> dict:
    state = torch_net().state_dict()
    return {
        name: {
            "kernel": jnp.asarray(torch_to_flax_kernel(state[f"{name}.weight"].numpy())),
            "bias": jnp.asarray(state[f"{name}.bias"].numpy()),
        }
        for name in ("fc1", "fc2", "conv")
    }


def nnx_net() -> NnxNet:
    model = NnxNet(nnx.Rngs(0))
    for name, values in flax_params().items():
        getattr(model, name).kernel[...] = values["kernel"]
        getattr(model, name).bias[...] = values["bias"]
    return model


def run_torch(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(X), torch.from_numpy(IMG)).numpy()


def close(got, expected) -> None:
    got, expected = np.asarray(got), np.asarray(expected)
    err = float(np.abs(got - expected).max())
    assert err <= RTOL * float(np.abs(expected).max()), err


#: (id, create_lycoris kwargs): lycoris-lora's LoKr options on Linear and Conv2d layers.
OPTIONS = [(f"factor{f}", {"factor": f}) for f in (2, 4, 8, 16)]
OPTIONS += [
    ("factor4-decompose_both", {"factor": 4, "decompose_both": True, "linear_dim": 1, "conv_dim": 1}),
    ("factor4-tucker", {"factor": 4, "use_tucker": True, "conv_dim": 1}),
    ("factor4-full_matrix", {"factor": 4, "full_matrix": True}),
    ("factor8-use_scalar", {"factor": 8, "use_scalar": True}),
    ("factor4-unbalanced", {"factor": 4, "unbalanced_factorization": True}),
    ("unbalanced", {"unbalanced_factorization": True}),
    ("factor4-rescaled", {"factor": 4, "rescaled": True}),
]


@pytest.fixture(scope="module", params=OPTIONS, ids=[o[0] for o in OPTIONS])
def made(request, tmp_path_factory):
    """``(kwargs, lycoris-lora's file, its forward)``."""
    case_id, options = request.param
    kwargs = {"linear_dim": 2, "linear_alpha": 3.0, "conv_dim": 2, "conv_alpha": 1.0, **options}
    model = torch_net()
    net = network(model, "lokr", kwargs, [])
    path = str(tmp_path_factory.mktemp(case_id) / "lokr.safetensors")
    net.save_weights(path, torch.float32, None)
    expected = run_torch(model)
    assert np.abs(expected - run_torch(torch_net())).max() > 1e-2  # the adapter does something
    return kwargs, path, expected


def test_every_front_end_loads_the_file_exactly(made):
    _, path, expected = made
    close(run_torch(lt.LycorisTuner.from_lycoris(torch_net(), path)), expected)
    close(lj.LycorisTuner.from_lycoris(nnx_net(), path)(JX, JIMG), expected)
    params = flax_params()
    adapter = pytree.from_lycoris(path, params)
    close(LinenNet().apply({"params": pytree.merge(params, adapter)}, JX, JIMG), expected)
    adapted, collection = linen.from_lycoris(path, LinenNet(), params)
    close(adapted.apply({"params": params, "lycoris": collection}, JX, JIMG), expected)


def test_the_file_is_written_back_and_lycoris_lora_reads_it(made, tmp_path):
    kwargs, path, expected = made
    tuner = lt.LycorisTuner.from_lycoris(torch_net(), path)
    adapter = pytree.from_lycoris(path, flax_params())
    for i, save in enumerate(
        (
            tuner.save_lycoris,
            lj.LycorisTuner.from_lycoris(nnx_net(), path).save_lycoris,
            lambda p: pytree.save_lycoris(adapter, p),
        )
    ):
        out = str(tmp_path / f"{i}.safetensors")
        save(out)
        model = torch_net()
        net = network(model, "lokr", {k: v for k, v in kwargs.items() if k != "use_scalar"}, [], seed=5)
        assert net.load_weights(out) == {}, "missing or unexpected keys"
        close(run_torch(model), expected)


def test_a_peft_directory_holds_the_file_exactly_or_conversion_refuses_naming_the_module(made, tmp_path):
    import peft

    kwargs, path, expected = made
    source = kohya.read_lycoris(path)
    layers = {n: lt.layer.layer_shape_of(m, n) for n, m in torch_net().named_modules() if n}
    _, _, plans = kohya.lycoris_adapter(source, layers)
    if kwargs.get("factor") in (8, 16):
        # factor 8: fc1's 16 inputs (2, 8), its 32 outputs (4, 8), fc2's 24 outputs (3, 8); PEFT's
        # factorization(dim, f) is (f, dim // f), and no one decompose_factor gives all of them
        assert plans, "a factorization no PEFT config gives went unnoticed"
    if not plans:
        config, tensors = kohya.lycoris_to_peft(source, layers)
        kohya.write_peft(tmp_path / "peft", config, tensors)
        with torch.no_grad():
            close(
                peft.PeftModel.from_pretrained(torch_net(), tmp_path / "peft")(*map(torch.from_numpy, (X, IMG))),
                expected,
            )
        return
    with pytest.raises(CheckpointError, match=r"in a way no PEFT LoKrConfig gives .* load the file itself"):
        kohya.lycoris_to_peft(source, layers)
    tuner = lt.LycorisTuner.from_lycoris(torch_net(), path)
    with pytest.raises(ValueError, match=r"a PEFT directory cannot hold them; save_lycoris"):
        tuner.save_pretrained(tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_dora_files_are_refused_naming_the_option(tmp_path):
    model = torch_net()
    net = network(model, "lokr", {"linear_dim": 2, "factor": 4, "dora_wd": True}, [])
    path = str(tmp_path / "dora.safetensors")
    net.save_weights(path, torch.float32, None)
    for load in (
        lambda: lt.LycorisTuner.from_lycoris(torch_net(), path),
        lambda: lj.LycorisTuner.from_lycoris(nnx_net(), path),
        lambda: pytree.from_lycoris(path, flax_params()),
    ):
        with pytest.raises(CheckpointError, match=r"dora_wd"):
            load()


def test_the_config_of_a_converted_file_selects_exactly_its_modules(tmp_path):
    """A file adapting ``fc`` but not ``block.fc``, alphas per module: PEFT's dot-suffix matching of
    ``target_modules`` and ``alpha_pattern`` must not reach ``block.fc`` (it did: the file was refused,
    or ``block.fc`` took ``fc``'s alpha)."""
    import peft

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc, self.block, self.out = torch.nn.Linear(8, 8), Block(), torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.out(self.block.fc(torch.tanh(self.fc(x))))

    x = torch.from_numpy(_rng.standard_normal((4, 8)).astype(np.float32))
    rng = np.random.default_rng(3)
    for targets in (["fc", "out"], ["fc", "block.fc"]):
        tensors, model = {}, Net().eval()
        for i, name in enumerate(targets):  # W1 (2, 2) full, W2 (4, 4) low-rank r=1, alpha 1 then 4
            w1, w2a, w2b, alpha = (
                rng.standard_normal((2, 2)),
                rng.standard_normal((4, 1)),
                rng.standard_normal((1, 4)),
                1.0 + 3 * i,
            )
            key = kohya.lycoris_name(name)
            tensors |= {
                f"{key}.lokr_w1": w1,
                f"{key}.lokr_w2_a": w2a,
                f"{key}.lokr_w2_b": w2b,
                f"{key}.alpha": np.asarray(alpha),
            }
            with torch.no_grad():  # what lycoris-lora computes: W + kron(W1, W2a W2b) alpha / r
                model.get_submodule(name).weight.add_(torch.from_numpy(np.kron(w1, w2a @ w2b) * alpha).float())
        with torch.no_grad():
            expected = model(x).numpy()
        path = str(tmp_path / "f.safetensors")
        kohya.save_lycoris(path, {k: np.asarray(v, np.float32) for k, v in tensors.items()}, {})
        with torch.no_grad():
            close(lt.LycorisTuner.from_lycoris(Net().eval(), path)(x).numpy(), expected)
        config, peft_tensors = kohya.lycoris_to_peft(kohya.read_lycoris(path), [n for n, _ in Net().named_modules()])
        kohya.write_peft(tmp_path / "peft", config, peft_tensors)
        theirs = peft.PeftModel.from_pretrained(Net().eval(), tmp_path / "peft")
        with torch.no_grad():
            close(theirs(x).numpy(), expected)
        adapted = {n for n, m in theirs.named_modules() if hasattr(m, "lokr_w1") and "default" in m.lokr_w1}
        assert adapted == {f"base_model.model.{t}" for t in targets}


def test_errors_name_the_users_file_and_its_lycoris_module(tmp_path):
    """Loading went through a temporary PEFT directory: errors named that (deleted) directory and PEFT's
    keys (``base_model.model.fc1.lokr_w1``). They name the file and its LyCORIS module now."""
    rng = np.random.default_rng(0)
    path = str(tmp_path / "bad.safetensors")
    tensors = {  # W1 (3, 3): 32 outputs and 16 inputs are no multiples of 3
        "lycoris_fc1.lokr_w1": rng.standard_normal((3, 3)),
        "lycoris_fc1.lokr_w2": rng.standard_normal((10, 5)),
        "lycoris_fc1.alpha": np.asarray(1.0),
    }
    kohya.save_lycoris(path, {k: np.asarray(v, np.float32) for k, v in tensors.items()}, {})
    for load in (
        lambda: lt.LycorisTuner.from_lycoris(torch_net(), path),
        lambda: lj.LycorisTuner.from_lycoris(nnx_net(), path),
        lambda: pytree.from_lycoris(path, flax_params()),
        lambda: linen.from_lycoris(path, LinenNet(), flax_params()),
    ):
        with pytest.raises(CheckpointError) as info:
            load()
        message = str(info.value)
        assert message.startswith(path) and "lycoris_fc1 (fc1)" in message, message
        assert "base_model.model" not in message and message.count(str(tmp_path)) == 1, message
