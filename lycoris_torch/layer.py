"""Adapter layers: one wrapper for every LyCORIS method on ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``.

``LycorisLayer`` holds what every LyCORIS-style adapter shares (merge/unmerge, scale helpers,
rank and module dropout, several active adapters, input casting); a method's math is its record
(``lycoris_torch.methods``). State is a dict of structs: ``plans[name]`` is the frozen
``lycoris_core.AdapterPlan`` (r, alpha, dropouts, factor shapes), ``factors[name]`` the
``nn.ParameterDict`` of factors in PEFT's names and layouts, ``scaling[name]`` the live scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from lycoris_core import LOHA_FACTORS, LOKR_FACTORS, AdapterPlan, LayerShape, plan_adapter
from lycoris_core.bookkeeping import LayerBookkeeping
from lycoris_core.paths import check_forward_path, choose_path
from lycoris_torch import functional, paths
from lycoris_torch.methods import Method, method_for

__all__ = [
    "LAYER_CLASSES",
    "SUPPORTED_LAYERS",
    "LoHaLayer",
    "LoKrLayer",
    "LycorisLayer",
    "layer_shape_of",
    "put_module",
]

#: Base layer types the built-in adapters wrap, most specific first.
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Conv1d, nn.Linear)


def layer_shape_of(module: nn.Module, where: str = "") -> LayerShape:
    """The plan's view of a supported base layer; ``TypeError`` listing the supported types otherwise."""
    if isinstance(module, nn.Linear):
        return LayerShape("linear", module.out_features, module.in_features)
    if isinstance(module, nn.Conv2d):
        return LayerShape(
            "conv2d", module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size), module.groups
        )
    if isinstance(module, nn.Conv1d):
        return LayerShape(
            "conv1d", module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size), module.groups
        )
    raise TypeError(
        f"{where or 'target'}: target module of type {type(module).__name__} not supported, "
        f"currently only adapters for {', '.join(t.__name__ for t in SUPPORTED_LAYERS)} are supported"
    )


def put_module(container: nn.ModuleDict, key: str, module: nn.Module) -> None:
    """``container[key] = module`` for every valid adapter name, also those ``nn.ModuleDict``
    refuses because it has an attribute of that name (``keys``, ``eval``, ``cuda``...), so that both
    twins accept the same names (``lycoris_core.state.check_adapter_name``)."""
    container._modules[key] = module


def _adapter_dtype(weight: torch.Tensor, autocast: bool) -> torch.dtype:
    """PEFT's rule: adapters take the base dtype, and fp16/bf16 are autocast to float32."""
    if autocast and weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight.dtype if weight.dtype.is_floating_point else torch.float32


class LycorisLayer(LayerBookkeeping, nn.Module):
    """One adapter layer: wraps ``base_layer`` and adds ``Σ_active f(x; ΔW_name)`` (PEFT's forward).

    Built as PEFT builds its layers, ``LoKrLayer(base_layer, adapter_name, config, r, alpha)`` (the
    layer plans that first adapter itself), or by a tuner with the ``plan`` ``lycoris_core.resolve``
    made. Names, plans, scales, merge order and the scale helpers come from
    ``lycoris_core.bookkeeping.LayerBookkeeping`` (shared with the JAX twin).
    """

    #: PEFT's ``adapter_layer_names`` of the method a subclass holds (empty: any registered method).
    adapter_layer_names: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str | None = None,
        config: Any = None,
        r: int | None = None,
        alpha: float | None = None,
        *,
        plan: AdapterPlan | None = None,
        autocast_adapter_dtype: bool = True,
        module_path: str = "",
        device: torch.device | str | None = None,
        forward_path: str = "auto",
    ) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.factors = nn.ModuleDict()
        self._init_bookkeeping()
        #: Generator for rank/module dropout; ``None`` uses torch's global one, as PEFT does.
        self.generator: torch.Generator | None = None
        #: How the forward pass computes the adapters (``lycoris_core.paths``): ``"auto"`` picks
        #: ``"merged"`` or ``"factored"`` per call by cost; ``"peft"`` is PEFT's arithmetic.
        self.forward_path = check_forward_path(forward_path)
        self.layer_shape = layer_shape_of(self.get_base_layer(), module_path)
        self.module_path = module_path
        #: ``"meta"`` creates factors without storage (``_init_empty_weights``, huge models).
        self.factor_device = device
        self.train(base_layer.training)  # join the model in its mode (eval stays eval)
        if adapter_name is not None:
            self._active_adapter = [adapter_name]
            self.update_layer(
                adapter_name, r, alpha, config=config, plan=plan, autocast_adapter_dtype=autocast_adapter_dtype
            )

    # ------------------------------------------------------------------ state
    @property
    def _available_adapters(self) -> set[str]:
        return set(self.factors)

    def get_base_layer(self) -> nn.Module:
        """The wrapped layer (the one the adapters attach to), as PEFT's ``get_base_layer``."""
        base = self.base_layer
        while isinstance(base, LycorisLayer):
            base = base.base_layer
        return base

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    def method(self, adapter_name: str) -> Method:
        """The record of ``adapter_name``'s method (``lycoris_torch.methods``)."""
        return method_for(self.plans[adapter_name].peft_type)

    # ------------------------------------------------------------------ adding adapters
    def update_layer(
        self,
        adapter_name: str,
        r: int | None = None,
        alpha: float | None = None,
        *,
        config: Any = None,
        plan: AdapterPlan | None = None,
        autocast_adapter_dtype: bool = True,
        **kwargs: Any,
    ) -> None:
        """Add ``adapter_name`` with its ``plan`` (or, as in PEFT, planned here from ``r``, ``alpha`` and
        ``config``), create its factors on CPU, initialise them in PEFT's order and move them to the base
        layer's device and dtype (float32 for a bf16/fp16 base with ``autocast_adapter_dtype``)."""
        if plan is None:
            plan = plan_adapter(self.layer_shape, r, alpha, config, where=self.module_path)
        method_for(plan.peft_type)  # a registered method
        meta = self.factor_device == "meta" or self.get_base_layer().weight.is_meta
        params = nn.ParameterDict(
            {
                name: nn.Parameter(torch.empty(shape, device="meta" if meta else "cpu"))
                for name, shape, _ in plan.factors
            }
        )
        put_module(self.factors, adapter_name, params.train(self.training))
        self._register_adapter(adapter_name, plan)
        self.reset_adapter_parameters(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name, autocast_adapter_dtype)
        inference = config.inference_mode if config is not None else kwargs.get("inference_mode", False)
        self.set_adapter(self.active_adapters, inference_mode=inference)

    def reset_adapter_parameters(self, adapter_name: str) -> None:
        """Zeros or PyTorch's ``kaiming_uniform_(a=sqrt(5))`` per the plan, in PEFT's RNG order."""
        params = self.factors[adapter_name]
        with torch.no_grad():
            for name, _, init in self.plans[adapter_name].factors:
                if params[name].is_meta:
                    continue
                if init == "zeros":
                    nn.init.zeros_(params[name])
                else:
                    nn.init.kaiming_uniform_(params[name], a=math.sqrt(5), generator=self.generator)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        weight = self.get_base_layer().weight
        if weight.is_meta:
            return
        dtype = _adapter_dtype(weight, autocast_adapter_dtype)
        params = self.factors[adapter_name]
        for name, param in params.items():
            if param.is_meta:
                continue
            # PEFT moves new factors to the base dtype and only then autocasts them to float32,
            # so with a bf16/fp16 base the initial values are rounded through it: same here.
            value = param.detach().to(weight.device, weight.dtype if weight.dtype.is_floating_point else dtype)
            params[name] = nn.Parameter(value.to(dtype), requires_grad=param.requires_grad)

    def _init_empty_weights(self, cls: type, *args: Any, **kwargs: Any) -> None:
        """Run ``cls.__init__`` on the meta device, then allocate uninitialised storage on ``device``."""
        kwargs = kwargs.copy()
        final_device = kwargs.pop("device", "cpu")
        cls.__init__(self, *args, device="meta", **kwargs)
        self.to_empty(device=final_device)

    # ------------------------------------------------------------------ adapter management
    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Activate ``adapter_names``; only their factors require grad (none in inference mode)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for key, params in self.factors.items():
            for param in params.values():
                param.requires_grad_((key in names) and not inference_mode)
        self._active_adapter = names

    def enable_adapters(self, enabled: bool) -> None:
        """Turn every adapter of this layer on or off (off: the base layer's output alone)."""
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            for params in self.factors.values():
                for param in params.values():
                    param.requires_grad_(False)
            self._disable_adapters = True

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``; if it was the only active one, activate the first remaining."""
        if adapter_name in self.factors:
            del self.factors[adapter_name]
        self._forget_adapter(adapter_name)

    # ------------------------------------------------------------------ ΔW and merging
    def get_delta_weight(
        self, adapter_name: str, *, apply_rank_dropout: bool = False, rank_dropout_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ΔW in the base weight's layout, optionally with rank dropout over its output rows (an explicit
        ``rank_dropout_mask`` ``(out,)``, or a draw when ``apply_rank_dropout``)."""
        weight = self.method(adapter_name).delta_weight(
            dict(self.factors[adapter_name]), self.scaling[adapter_name], self.get_base_layer().weight.shape
        )
        plan = self.plans[adapter_name]
        if rank_dropout_mask is None and not apply_rank_dropout:
            return weight
        if rank_dropout_mask is None:
            rank_dropout_mask = functional.rank_dropout_keep(
                weight.shape[0], plan.rank_dropout, generator=self.generator
            )
        mask_dtype = torch.float32 if plan.fp32_dropout_mask else None
        return functional.apply_rank_dropout(
            weight, rank_dropout_mask, rescale=plan.rank_dropout_scale, mask_dtype=mask_dtype
        )

    def _merged_weight(
        self, names: Sequence[str], *, sign: int = 1, check: bool = False, where: str = ""
    ) -> torch.Tensor:
        """The base weight with ``sign * ΔW`` of each of ``names`` added, rounded to its dtype after
        each adapter (PEFT's in-place ``W += ΔW``); ``check`` raises on NaN or ±inf."""
        weight = self.get_base_layer().weight.data
        with torch.no_grad():
            for name in names:
                weight = (weight + sign * self.get_delta_weight(name)).to(weight.dtype)
                if check and not torch.isfinite(weight).all():
                    raise self._nonfinite_error(where, name)
        return weight

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        self.get_base_layer().weight.data = weight

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """PEFT's forward: the base output plus every active adapter's delta (module dropout in
        training), the merged/disabled shortcuts, the result cast back to ``x``'s dtype. Each adapter
        takes its forward path (``lycoris_core.paths``): ``"merged"`` adapters are folded into one base
        call, ``"factored"`` and ``"peft"`` ones add a branch. Dropout draws keep PEFT's order: module,
        then rank, per adapter."""
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs).to(previous_dtype)
        if self.merged:
            return self.base_layer(x, *args, **kwargs).to(previous_dtype)
        folds, branches = [], []
        for name in self.active_adapters:
            if name not in self._available_adapters:
                continue
            # PEFT draws one number per active adapter in training even when module_dropout == 0;
            # we keep that so that seeded runs consume the global RNG identically.
            if self.training and not torch.rand(1, generator=self.generator) > self.plans[name].module_dropout:
                continue
            path = self._forward_path(name, x)
            if path == "merged":
                folds.append(self._fold(name))
            elif path == "factored":
                branches.append(self._factored_activations(name, x))
            else:
                branches.append(self._peft_activations(name, x))
        result = self._folded_forward(folds, x) if folds else self.base_layer(x, *args, **kwargs)
        for delta in branches:
            result = result + delta
        return result.to(previous_dtype)

    def _cast_input_dtype(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if not self.cast_input_dtype_enabled or x.dtype == dtype:
            return x
        return x.to(dtype)

    def _forward_path(self, adapter_name: str, x: torch.Tensor) -> str:
        """``lycoris_core.paths.choose_path`` for this call (tokens: ``x``'s leading dims; a conv's
        batch times positions; the weight's dtype); the training cost counts in training mode."""
        base, method = self.get_base_layer(), self.method(adapter_name)
        tokens = x.numel() // x.shape[-1] if isinstance(base, nn.Linear) else x.numel() // max(x.shape[1], 1)
        supported = (
            method.linear_forward is not None if isinstance(base, nn.Linear) else method.conv_forward is not None
        )
        return choose_path(
            self.forward_path,
            self.plans[adapter_name],
            tokens,
            training=self.training,
            supported=supported,  # every wrapped torch layer; the plan says what the algebra allows
            itemsize=base.weight.element_size(),
        )

    def _peft_activations(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """PEFT's branch: the layer's own operation with ΔW (rank dropout drawn in training) as weight."""
        apply = self.training and bool(self.plans[adapter_name].rank_dropout)
        delta = self.get_delta_weight(adapter_name, apply_rank_dropout=apply)
        x = self._cast_input_dtype(x, delta.dtype)
        return functional.forward_with_weight(self.get_base_layer(), x, delta)

    def _rows(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """This call's rank-dropout row factors ``(out,)`` (drawn as PEFT draws them), or ``None``."""
        plan = self.plans[adapter_name]
        if not (self.training and plan.rank_dropout):
            return None
        keep = functional.rank_dropout_keep(self.layer_shape.out_features, plan.rank_dropout, generator=self.generator)
        ones = torch.ones(self.layer_shape.out_features, 1, dtype=dtype)
        mask_dtype = torch.float32 if plan.fp32_dropout_mask else None
        return functional.apply_rank_dropout(ones, keep, rescale=plan.rank_dropout_scale, mask_dtype=mask_dtype)[:, 0]

    def _fold(self, adapter_name: str) -> paths.Fold:
        params = self.factors[adapter_name]
        names = tuple(params)
        dtype = params[names[0]].dtype
        return paths.Fold(
            names, tuple(params[n] for n in names), self.scaling[adapter_name], self._rows(adapter_name, dtype)
        )

    def _folded_forward(self, folds: list[paths.Fold], x: torch.Tensor) -> torch.Tensor:
        """The ``"merged"`` path: the base layer called once with ``W + Σ ΔW``."""
        peft_type = next(iter(self.plans.values())).peft_type  # one method per layer (the tuner's)
        shape, method = self.get_base_layer().weight.shape, method_for(peft_type)
        delta = lambda factors, scale: method.delta_weight(factors, scale, shape)  # noqa: E731
        return paths.folded_forward(self.get_base_layer(), x, folds, delta, peft_type)

    def _factored_activations(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """The ``"factored"`` branch of an ``nn.Linear`` or conv adapter: no ΔW, forward or backward;
        rank dropout scales the output channels."""
        params = dict(self.factors[adapter_name])
        dtype = next(iter(params.values())).dtype
        rows = self._rows(adapter_name, dtype)
        x = self._cast_input_dtype(x, dtype)
        base, scale, kind = self.get_base_layer(), self.scaling[adapter_name], self.plans[adapter_name].peft_type
        if isinstance(base, nn.Linear):
            y = paths.factored_delta(kind, x, params, scale, self.layer_shape.out_features)
            return y if rows is None else (y * rows).to(y.dtype)
        y = paths.factored_conv(kind, base, x, params, scale)
        return y if rows is None else (y * rows.view(-1, *[1] * (y.dim() - 2))).to(y.dtype)

    def extra_repr(self) -> str:
        """The method, its adapters and their ranks, for ``repr``."""
        return f"adapters={sorted(self.plans)}, active={self.active_adapters}, merged={self.merged_adapters}"


class LoHaLayer(LycorisLayer):
    """A :class:`LycorisLayer` holding LoHa adapters (factors ``hada_*``)."""

    adapter_layer_names = LOHA_FACTORS


class LoKrLayer(LycorisLayer):
    """A :class:`LycorisLayer` holding LoKr adapters (factors ``lokr_*``)."""

    adapter_layer_names = LOKR_FACTORS


#: The layer class a tuner wraps a base layer in, per method (another method: :class:`LycorisLayer`).
LAYER_CLASSES: dict[str, type[LycorisLayer]] = {"LOHA": LoHaLayer, "LOKR": LoKrLayer}
