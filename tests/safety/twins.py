"""Both twins behind one small interface, for tests that must hold the same way in each.

Models are the MLP mirrors of ``tests/jax/mirrors.py`` (``layers.0`` 12->24, ``layers.1`` 24->16,
``head`` 16->8): same module paths, same base weights, so the same PEFT keys in both twins.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import torch
from flax import nnx

import lycoris_jax as lj
import lycoris_torch as lt
from tests.jax.mirrors import inputs, pair

TARGETS = ["layers.0", "layers.1", "head"]
X_TORCH, X_JAX = inputs("mlp")


def lokr_kw(**kw: Any) -> dict[str, Any]:
    return {"r": 2, "alpha": 4, "target_modules": TARGETS, "init_weights": False} | kw


@dataclass(frozen=True)
class Twin:
    name: str
    lib: Any
    model: Callable[[], Any]
    x: tuple
    run: Callable[[Any], np.ndarray]
    snapshot: Callable[[Any], Any]
    weight: Callable[[Any, str], np.ndarray]  # base weight of a module, torch layout

    def lokr(self, **kw: Any) -> Any:
        return self.lib.LoKrConfig(**lokr_kw(**kw))

    def loha(self, **kw: Any) -> Any:
        return self.lib.LoHaConfig(**lokr_kw(**kw))

    def tuner(self, model: Any = None, config: Any = None, adapter_name: str = "default", seed: int = 0) -> Any:
        """A tuner on ``model`` (default: a fresh one); ``seed`` draws the initial factors."""
        config = config if config is not None else self.lokr()
        cls = self.lib.LoKrModel if config.peft_type == "LOKR" else self.lib.LoHaModel
        model = model if model is not None else self.model()
        if self.name == "jax":
            return cls(model, config, adapter_name, rngs=nnx.Rngs(params=seed, dropout=1))
        torch.manual_seed(seed)
        return cls(model, config, adapter_name)

    def assert_unchanged(self, model: Any, snap: Any) -> None:
        now = self.snapshot(model)
        assert now[1] == snap[1], "module structure changed"
        assert now[0].keys() == snap[0].keys(), "state keys changed"
        for k in now[0]:
            np.testing.assert_array_equal(now[0][k], snap[0][k], err_msg=k)


def _torch_model() -> Any:
    return pair("mlp")[0]


def _jax_model() -> Any:
    return pair("mlp")[1]


def _torch_run(m: Any) -> np.ndarray:
    with torch.no_grad():
        return m(*X_TORCH).numpy()


def _jax_run(m: Any) -> np.ndarray:
    return np.asarray(m(*X_JAX))


def _torch_snapshot(m: Any) -> Any:
    return (
        {k: v.detach().float().numpy().copy() for k, v in m.state_dict().items()}
        | {f"{k}.requires_grad": np.asarray(p.requires_grad) for k, p in m.named_parameters()},
        {k: type(mod).__name__ for k, mod in m.named_modules()} | {"training": m.training},
    )


def _host(x: Any) -> np.ndarray:
    return np.asarray(jax.random.key_data(x) if jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key) else x).copy()


def _jax_snapshot(m: Any) -> Any:
    state = nnx.state(m)
    flat = {".".join(map(str, path)): _host(v) for path, v in jax.tree_util.tree_leaves_with_path(state)}
    modes = {
        ".".join(map(str, p)): getattr(mod, "deterministic", None)
        for p, mod in nnx.iter_modules(m)
        if hasattr(mod, "deterministic")
    }
    return flat, {".".join(map(str, p)): type(mod).__name__ for p, mod in nnx.iter_modules(m)} | modes


def _module(model: Any, path: str) -> Any:
    node = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def _torch_weight(model: Any, path: str) -> np.ndarray:
    m = _module(model, path)
    m = m.get_base_layer() if isinstance(m, lt.LycorisLayer) else m
    return m.weight.detach().numpy().copy()


def _jax_weight(model: Any, path: str) -> np.ndarray:
    m = _module(model, path)
    m = m.get_base_layer() if isinstance(m, lj.LycorisLayer) else m
    return np.asarray(lj.functional.to_torch_layout(m.kernel[...])).copy()


TORCH = Twin("torch", lt, _torch_model, X_TORCH, _torch_run, _torch_snapshot, _torch_weight)
JAX = Twin("jax", lj, _jax_model, X_JAX, _jax_run, _jax_snapshot, _jax_weight)
TWINS = [TORCH, JAX]


def tree_digest(path: str | os.PathLike) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``path`` (``{}`` if it does not exist)."""
    out = {}
    for root, _, files in os.walk(path, followlinks=True):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def two_adapters(twin: Twin, seed: int, alpha: float) -> Any:
    """A tuner holding ``default`` (alpha ``alpha``) and ``other`` (r=3), factors drawn from ``seed``."""
    tuner = twin.tuner(config=twin.lokr(alpha=alpha), seed=seed)
    tuner.add_adapter("other", twin.lokr(r=3, alpha=alpha + 1))
    return tuner
