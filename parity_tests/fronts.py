"""The Linen transform and the pytree API as parity columns, through their public API only.

The case's layer is an ``nn.Dense``/``nn.Conv`` named ``layer`` with the case's weights; the factors
come from the PEFT directory PEFT wrote for the case (``linen.from_pretrained``,
``pytree.from_pretrained``). Both APIs are functional: a side keeps the state an NNX tuner would
keep (the params, possibly with an unmerge's rounding left in them, the merged params, the scale as
a multiple of ``alpha / r``) and every operation continues from it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lycoris_jax import linen, pytree
from parity_tests.cases import Case, LayerSpec
from parity_tests.layouts import channels_last, flax_to_torch_kernel, torch_to_flax_kernel

__all__ = ["LinenSide", "PytreeSide", "linen_module", "linen_params", "scale_multiple"]


class _Layer(nn.Module):
    """A model whose one layer, ``layer``, is the case's ``nn.Dense`` or ``nn.Conv``."""

    spec: LayerSpec
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.spec
        if s.kind == "linear":
            return nn.Dense(s.out_ch, dtype=self.dtype, name="layer")(x)
        return nn.Conv(
            s.out_ch,
            s.kernel,
            strides=s.stride,
            padding=[(p, p) for p in s.padding],
            kernel_dilation=s.dilation,
            feature_group_count=s.groups,
            dtype=self.dtype,
            name="layer",
        )(x)


def linen_module(spec: LayerSpec, dtype: Any = None) -> nn.Module:
    """The case's layer as a Linen model; ``dtype`` its compute dtype (``None``: the operands')."""
    return _Layer(spec, dtype)


def linen_params(spec: LayerSpec, weight: np.ndarray, bias: np.ndarray, dtype: Any) -> dict:
    """The Linen params holding PyTorch's ``weight`` (out, in/g, *k) and ``bias`` in ``dtype``."""
    return {"layer": {"kernel": jnp.asarray(torch_to_flax_kernel(weight), dtype), "bias": jnp.asarray(bias, dtype)}}


def _kinds(spec: LayerSpec) -> dict[str, str] | None:
    """A 3-D Flax kernel is ambiguous (Conv1d or DenseGeneral): the APIs take ``kinds`` for it."""
    return {"layer": "conv1d"} if spec.kind == "conv1d" else None


def scale_multiple(m: float, method: str, args: tuple[Any, ...]) -> float:
    """PEFT's scale helpers as a multiple of ``alpha / r``: ``set_scale(name, s)`` -> ``s``,
    ``scale_layer(s)`` -> ``m · s``, ``unscale_layer(s)`` -> ``m / s``, ``unscale_layer()`` -> 1."""
    if method == "set_scale":
        return float(args[1])
    if method == "scale_layer":
        return m * args[0]
    return m / args[0] if args else 1.0


class _Side:
    """What both APIs share: params, merged params, the scale multiple."""

    def __init__(self, case: Case, module: nn.Module, params: dict, directory: str) -> None:
        self.case, self.module, self.params, self.kinds = case, module, params, _kinds(case.layer)
        self.m = 1.0
        self.merged: dict | None = None
        self.load(directory)

    def load(self, directory: str) -> None:
        raise NotImplementedError

    def loaded(self, directory: str) -> _Side:
        """The same API loading another directory, at this side's scale."""
        other = type(self)(self.case, self.module, self.params, directory)
        other.m = self.m
        return other

    def scale(self, method: str, args: tuple[Any, ...]) -> None:
        self.m = scale_multiple(self.m, method, args)

    def weight(self) -> np.ndarray:
        params = self.merged if self.merged is not None else self.params
        return flax_to_torch_kernel(np.asarray(params["layer"]["kernel"]))

    def _loss(self, probe: np.ndarray) -> Any:
        probe_last = jnp.asarray(channels_last(probe))
        return lambda y: (y.astype(jnp.float32) * probe_last).sum()


class LinenSide(_Side):
    """``linen.from_pretrained`` / ``apply`` / ``merge`` / ``unmerge`` / ``save_pretrained``; the scale
    is ``LycorisModule.clone(scale=...)``."""

    def load(self, directory: str) -> None:
        options = dict(self.case.jax_kwargs)
        self.adapted, self.collection = linen.from_pretrained(
            directory, self.module, self.params, kinds=self.kinds, **options
        )
        self.enabled = True

    def _at(self) -> linen.LycorisModule:
        return self.adapted.clone(scale=self.m, enabled=self.enabled)

    def forward(self, x: jax.Array) -> jax.Array:
        if self.merged is not None:
            return self.module.apply({"params": self.merged}, x)
        return self._at().apply({"params": self.params, "lycoris": self.collection}, x)

    def merge(self, safe: bool = False) -> None:
        self.merged = linen.merge(self._at(), self.params, self.collection)

    def unmerge(self) -> None:
        self.params, self.merged = linen.unmerge(self._at(), self.merged, self.collection), None

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def grads(self, x: jax.Array, probe: np.ndarray, names: list[str]) -> dict[str, jax.Array]:
        loss, adapted = self._loss(probe), self._at()
        grads = jax.grad(lambda c: loss(adapted.apply({"params": self.params, "lycoris": c}, x)))(self.collection)
        return {name: grads["layer"][name] for name in names}

    def save(self, directory: str) -> None:
        linen.save_pretrained(self.adapted, self.collection, directory)

    def init_shapes(self, config: Any) -> dict[str, tuple[int, ...]]:
        _, collection = linen.adapt(self.module, self.params, config, key=jax.random.key(0), kinds=self.kinds)
        return {k: tuple(v.shape) for k, v in collection["layer"].items()}

    def init_delta(self, config: Any) -> np.ndarray:
        """What merging a freshly initialised adapter adds to the kernel (exactly zero for zero ΔW)."""
        adapted, collection = linen.adapt(self.module, self.params, config, key=jax.random.key(0), kinds=self.kinds)
        merged = linen.merge(adapted, self.params, collection)["layer"]["kernel"]
        return flax_to_torch_kernel(
            np.asarray(merged, np.float64) - np.asarray(self.params["layer"]["kernel"], np.float64)
        )


class PytreeSide(_Side):
    """``pytree.from_pretrained`` / ``merge(params, adapter, scale=)`` / ``delta_weight`` /
    ``save_pretrained``; the forward is the plain model on merged params (the merged path)."""

    def load(self, directory: str) -> None:
        self.adapter = pytree.from_pretrained(directory, self.params, kinds=self.kinds)
        self.second: pytree.Adapter | None = None

    def _now(self) -> dict:
        if self.merged is not None:
            return self.merged
        params = pytree.merge(self.params, self.adapter, scale=self.m)
        return params if self.second is None else pytree.merge(params, self.second)

    def forward(self, x: jax.Array) -> jax.Array:
        return self.module.apply({"params": self._now()}, x)

    def delta(self) -> np.ndarray:
        return flax_to_torch_kernel(np.asarray(pytree.delta_weight(self.adapter, "layer", scale=self.m)))

    def merge(self, safe: bool = False) -> None:
        self.merged = pytree.merge(self.params, self.adapter, scale=self.m)

    def unmerge(self) -> None:
        self.params, self.merged = pytree.merge(self.merged, self.adapter, scale=-self.m), None

    def add_b(self, directory: str) -> None:
        self.second = pytree.from_pretrained(directory, self.params, kinds=self.kinds)

    def remove_b(self) -> None:
        self.second = None

    def grads(self, x: jax.Array, probe: np.ndarray, names: list[str]) -> dict[str, jax.Array]:
        loss = self._loss(probe)
        apply = lambda a: loss(self.module.apply({"params": pytree.merge(self.params, a, scale=self.m)}, x))  # noqa: E731
        factors = jax.grad(apply)(self.adapter).factors["layer"]
        return {name: factors[name] for name in names}

    def save(self, directory: str) -> None:
        pytree.save_pretrained(self.adapter, directory)

    def init_shapes(self, config: Any) -> dict[str, tuple[int, ...]]:
        adapter = pytree.init(self.params, config, key=jax.random.key(0), kinds=self.kinds)
        return {k: tuple(v.shape) for k, v in adapter.factors["layer"].items()}

    def init_delta(self, config: Any) -> np.ndarray:
        adapter = pytree.init(self.params, config, key=jax.random.key(0), kinds=self.kinds)
        return flax_to_torch_kernel(np.asarray(pytree.delta_weight(adapter, "layer")))
