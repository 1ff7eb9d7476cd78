"""Adapter layers: one wrapper per algorithm serving ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``.

``LycorisLayer`` holds what every LyCORIS-style adapter shares (merge/unmerge, scale helpers,
rank and module dropout, several active adapters, input casting). Subclasses say how factors are
created and turned into a delta weight. State is a dict of structs: ``plans[name]`` is the frozen
``lycoris_core.AdapterPlan`` (r, alpha, dropouts, factor shapes), ``factors[name]`` the
``nn.ParameterDict`` of factors in PEFT's names and layouts, ``scaling[name]`` the live scale.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from lycoris_core import LOHA_FACTORS, LOKR_FACTORS, AdapterPlan, LayerShape, plan_loha, plan_lokr
from lycoris_core.bookkeeping import LayerBookkeeping
from lycoris_core.paths import check_forward_path, choose_path
from lycoris_torch import functional, loha, lokr, paths

__all__ = ["SUPPORTED_LAYERS", "LoHaLayer", "LoKrLayer", "LycorisLayer", "layer_shape_of", "put_module"]

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


class LycorisLayer(LayerBookkeeping, nn.Module, ABC):
    """Base of every adapter layer; wraps ``base_layer`` and adds ``Σ_active f(x; ΔW_name)``.

    Subclasses implement ``_available_adapters``, ``create_adapter_parameters``,
    ``reset_adapter_parameters``, ``update_layer``, ``get_delta_weight`` and
    ``_get_delta_activations``; they register each adapter with :meth:`_register_adapter`.
    Names, plans, scales, merge order and the forward's control flow come from
    ``lycoris_core.bookkeeping.LayerBookkeeping`` (shared with the JAX twin).
    """

    #: Names of the factor parameters this layer type may hold (PEFT's ``adapter_layer_names``).
    adapter_layer_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.factors = nn.ModuleDict()
        self._init_bookkeeping()
        #: Generator for rank/module dropout; ``None`` uses torch's global one, as PEFT does.
        self.generator: torch.Generator | None = None
        self.train(base_layer.training)  # join the model in its mode (eval stays eval)

    # ------------------------------------------------------------------ interface
    @property
    @abstractmethod
    def _available_adapters(self) -> set[str]:
        """Names of the adapters that hold parameters in this layer."""

    @abstractmethod
    def create_adapter_parameters(self, adapter_name: str, r: int, **kwargs: Any) -> None:
        """Create (uninitialised) factor parameters for ``adapter_name``."""

    @abstractmethod
    def reset_adapter_parameters(self, adapter_name: str) -> None:
        """Initialise the factors of ``adapter_name``."""

    @abstractmethod
    def update_layer(self, adapter_name: str, r: int, alpha: float, **kwargs: Any) -> None:
        """Add adapter ``adapter_name`` with rank ``r`` and ``alpha`` to this layer."""

    @abstractmethod
    def get_delta_weight(
        self, adapter_name: str, *, apply_rank_dropout: bool = False, rank_dropout_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ΔW in the base weight's layout, optionally with rank dropout over its output rows."""

    @abstractmethod
    def _get_delta_activations(self, adapter_name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The adapter's contribution added to the base layer's output."""

    # ------------------------------------------------------------------ state
    def get_base_layer(self) -> nn.Module:
        base = self.base_layer
        while isinstance(base, LycorisLayer):
            base = base.base_layer
        return base

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    def _create_factors(self, adapter_name: str, plan: AdapterPlan, device: torch.device | str = "cpu") -> None:
        """Uninitialised float32 factors with the plan's shapes (PEFT creates them on CPU, then moves)."""
        params = nn.ParameterDict(
            {name: nn.Parameter(torch.empty(shape, device=device)) for name, shape, _ in plan.factors}
        )
        put_module(self.factors, adapter_name, params.train(self.training))

    def _init_factors(self, adapter_name: str) -> None:
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

    # ------------------------------------------------------------------ merge
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
    @staticmethod
    def _astype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(dtype=dtype)

    _where = staticmethod(torch.where)

    def _module_dropout_keep(self, adapter_name: str) -> bool:
        # PEFT draws one number per active adapter in training even when module_dropout == 0;
        # we keep that so that seeded runs consume the global RNG identically.
        if not self.training:
            return True
        return bool(torch.rand(1, generator=self.generator) > self.plans[adapter_name].module_dropout)

    def _rank_dropout(
        self, adapter_name: str, weight: torch.Tensor, apply: bool, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Rank dropout over ΔW's output rows: an explicit ``mask`` (out,), or a draw when ``apply``."""
        plan = self.plans[adapter_name]
        if mask is None and not apply:
            return weight
        if mask is None:
            mask = functional.rank_dropout_keep(weight.shape[0], plan.rank_dropout, generator=self.generator)
        mask_dtype = torch.float32 if plan.fp32_dropout_mask else None
        return functional.apply_rank_dropout(weight, mask, rescale=plan.rank_dropout_scale, mask_dtype=mask_dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._adapted_forward(x, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"adapters={sorted(self.plans)}, active={self.active_adapters}, merged={self.merged_adapters}"


class _FactorizedLayer(LycorisLayer):
    """Adapters whose factors follow a ``lycoris_core`` plan and whose ΔW is a pure function of them."""

    plan_fn: ClassVar[Callable[..., AdapterPlan]]
    delta_fn: ClassVar[Callable[..., torch.Tensor]]
    peft_type: ClassVar[str]

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: Any,
        r: int,
        alpha: float,
        *,
        autocast_adapter_dtype: bool = True,
        module_path: str = "",
        device: torch.device | str | None = None,
        forward_path: str = "auto",
    ) -> None:
        super().__init__(base_layer)
        #: How the forward pass computes the adapters (``lycoris_core.paths``): ``"auto"`` picks
        #: ``"merged"`` or ``"factored"`` per call by cost; ``"peft"`` is PEFT's arithmetic.
        self.forward_path = check_forward_path(forward_path)
        self.layer_shape = layer_shape_of(self.get_base_layer(), module_path)
        self.module_path = module_path
        #: ``"meta"`` creates factors without storage (``_init_empty_weights``, huge models).
        self.factor_device = device
        self._active_adapter = [adapter_name]
        self.update_layer(adapter_name, r, alpha, config=config, autocast_adapter_dtype=autocast_adapter_dtype)

    @property
    def _available_adapters(self) -> set[str]:
        return set(self.factors)

    def plan(self, r: int, alpha: float, config: Any) -> AdapterPlan:
        """This layer's factor plan for one adapter (pure; raises on bad rank)."""
        return type(self).plan_fn(self.layer_shape, r, alpha, config, where=self.module_path)

    def create_adapter_parameters(self, adapter_name: str, r: int, *, plan: AdapterPlan, **kwargs: Any) -> None:
        meta = self.factor_device == "meta" or self.get_base_layer().weight.is_meta
        self._create_factors(adapter_name, plan, "meta" if meta else "cpu")

    def reset_adapter_parameters(self, adapter_name: str) -> None:
        self._init_factors(adapter_name)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        alpha: float,
        *,
        config: Any,
        autocast_adapter_dtype: bool = True,
        **kwargs: Any,
    ) -> None:
        plan = self.plan(r, alpha, config)
        self.create_adapter_parameters(adapter_name, r, plan=plan)
        self._register_adapter(adapter_name, plan)
        self.reset_adapter_parameters(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name, autocast_adapter_dtype)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(
        self, adapter_name: str, *, apply_rank_dropout: bool = False, rank_dropout_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        weight = type(self).delta_fn(
            dict(self.factors[adapter_name]), self.scaling[adapter_name], self.get_base_layer().weight.shape
        )
        return self._rank_dropout(adapter_name, weight, apply_rank_dropout, rank_dropout_mask)

    def _get_delta_activations(self, adapter_name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        apply = self.training and bool(self.plans[adapter_name].rank_dropout)
        delta = self.get_delta_weight(adapter_name, apply_rank_dropout=apply)
        x = self._cast_input_dtype(x, delta.dtype)
        return functional.forward_with_weight(self.get_base_layer(), x, delta)

    # ------------------------------------------------------------------ forward paths
    def _forward_path(self, adapter_name: str, x: torch.Tensor) -> str:
        """``lycoris_core.paths.choose_path`` for this call (tokens: ``x``'s leading dims; a conv's
        batch times positions; the weight's dtype); the training cost counts in training mode."""
        base = self.get_base_layer()
        tokens = x.numel() // x.shape[-1] if isinstance(base, nn.Linear) else x.numel() // max(x.shape[1], 1)
        return choose_path(
            self.forward_path,
            self.plans[adapter_name],
            tokens,
            training=self.training,
            supported=True,  # every wrapped torch layer; the plan says what the algebra allows
            itemsize=base.weight.element_size(),
        )

    def _rows(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """This call's rank-dropout row factors ``(out,)`` (drawn as PEFT draws them), or ``None``."""
        plan = self.plans[adapter_name]
        if not (self.training and plan.rank_dropout):
            return None
        keep = functional.rank_dropout_keep(self.layer_shape.out_features, plan.rank_dropout, generator=self.generator)
        ones = torch.ones(self.layer_shape.out_features, 1, dtype=dtype)
        mask_dtype = torch.float32 if plan.fp32_dropout_mask else None
        return functional.apply_rank_dropout(ones, keep, rescale=plan.rank_dropout_scale, mask_dtype=mask_dtype)[:, 0]

    def _fold(self, adapter_name: str, keep: bool) -> paths.Fold:
        params = self.factors[adapter_name]
        names = tuple(params)
        dtype = params[names[0]].dtype
        return paths.Fold(
            names, tuple(params[n] for n in names), self.scaling[adapter_name], self._rows(adapter_name, dtype)
        )

    def _folded_forward(self, folds: list[paths.Fold], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The ``"merged"`` path: the base layer called once with ``W + Σ ΔW``."""
        shape, delta_fn = self.get_base_layer().weight.shape, type(self).delta_fn
        delta = lambda factors, scale: delta_fn(factors, scale, shape)  # noqa: E731
        return paths.folded_forward(self.get_base_layer(), x, folds, delta, type(self).peft_type)

    def _factored_activations(self, adapter_name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The ``"factored"`` branch of an ``nn.Linear`` or conv adapter: no ΔW, forward or backward;
        rank dropout scales the output channels."""
        params = dict(self.factors[adapter_name])
        dtype = next(iter(params.values())).dtype
        rows = self._rows(adapter_name, dtype)
        x = self._cast_input_dtype(x, dtype)
        base, scale, kind = self.get_base_layer(), self.scaling[adapter_name], type(self).peft_type
        if isinstance(base, nn.Linear):
            y = paths.factored_delta(kind, x, params, scale, self.layer_shape.out_features)
            return y if rows is None else (y * rows).to(y.dtype)
        y = paths.factored_conv(kind, base, x, params, scale)
        return y if rows is None else (y * rows.view(-1, *[1] * (y.dim() - 2))).to(y.dtype)


class LoHaLayer(_FactorizedLayer):
    """LoHa adapter on a Linear, Conv1d or Conv2d layer (factors ``hada_*``)."""

    adapter_layer_names = LOHA_FACTORS
    peft_type = "LOHA"
    plan_fn = staticmethod(plan_loha)
    delta_fn = staticmethod(loha.delta_weight)


class LoKrLayer(_FactorizedLayer):
    """LoKr adapter on a Linear, Conv1d or Conv2d layer (factors ``lokr_*``)."""

    adapter_layer_names = LOKR_FACTORS
    peft_type = "LOKR"
    plan_fn = staticmethod(plan_lokr)
    delta_fn = staticmethod(lokr.delta_weight)
