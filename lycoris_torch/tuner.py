"""Model surgery and model-level operations: ``LycorisTuner``, ``LoHaModel``, ``LoKrModel``.

Injection resolves every target first (names, layer types, rank/alpha, factor shapes), then
replaces modules; if anything fails, replaced modules are put back, so the model is untouched.
Files are PEFT's: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.<factor>``.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lycoris_core import (
    SAFETENSORS_METADATA,
    SAFETENSORS_NAME,
    LoHaConfig,
    LoKrConfig,
    LycorisConfig,
    checkpoint_key,
    config_class_for,
    match_targets,
    resolve_rank_alpha,
)
from lycoris_core._io import atomic_write
from lycoris_core.state import check_checkpoint, modules_to_save_key
from lycoris_torch.layer import LoHaLayer, LoKrLayer, LycorisLayer, _FactorizedLayer, layer_shape_of

__all__ = ["LoHaModel", "LoKrModel", "LycorisTuner", "ModulesToSaveWrapper"]

_TUNERS: dict[str, type[LycorisTuner]] = {}


class ModulesToSaveWrapper(nn.Module):
    """A fully trainable copy of a module per adapter (PEFT's ``modules_to_save``)."""

    def __init__(self, original_module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.update(adapter_name)

    def update(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.modules_to_save[adapter_name].requires_grad_(True)
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def set_adapter(self, adapter_names: Sequence[str]) -> None:
        names = [n for n in adapter_names if n in self.modules_to_save]
        if len(names) > 1:
            raise ValueError(f"modules_to_save can only have one active adapter, got {names}")
        self.active_adapter = names[0] if names else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or self.active_adapter is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)


def _get_submodule_parent(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = key.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


class LycorisTuner(nn.Module):
    """Base tuner: wraps ``model`` in place and manages named adapters on it.

    Subclasses set ``prefix`` (factor-name prefix), ``config_cls`` and ``layers_mapping``
    (base layer type -> adapter layer class); they are registered for ``from_pretrained``.
    Module names are the dotted paths of ``model.named_modules()``.
    """

    prefix: ClassVar[str]
    config_cls: ClassVar[type[LycorisConfig]]
    layers_mapping: ClassVar[dict[type[nn.Module], type[LycorisLayer]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        config_cls = cls.__dict__.get("config_cls")
        if config_cls is not None and config_cls.PEFT_TYPE:
            _TUNERS[config_cls.PEFT_TYPE] = cls

    def __init__(
        self,
        model: nn.Module,
        config: LycorisConfig,
        adapter_name: str = "default",
        *,
        autocast_adapter_dtype: bool = True,
        state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Inject ``adapter_name`` into ``model`` (in place) and make it active.

        ``state_dict`` optionally gives the factors' values under PEFT checkpoint keys; it is
        checked against the planned shapes before the model is touched.
        """
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LycorisConfig] = {}
        self.active_adapter: list[str] = [adapter_name]
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self._add(adapter_name, config, state_dict)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ------------------------------------------------------------------ walking the model
    def _lycoris_layers(self) -> Iterator[tuple[str, LycorisLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, LycorisLayer):
                yield name, module

    def _module_names(self) -> list[str]:
        """Dotted names of the model's modules, minus anything inside existing adapter layers."""
        names: list[str] = []
        inside: list[str] = []
        for name, module in self.model.named_modules():
            if any(name.startswith(p) for p in inside):
                continue
            names.append(name)
            if isinstance(module, (LycorisLayer, ModulesToSaveWrapper)):
                inside.append(name + ".")
        return names

    @classmethod
    def _layer_class_for(cls, target: nn.Module, key: str) -> type[LycorisLayer]:
        base = target.get_base_layer() if isinstance(target, LycorisLayer) else target
        for subtype, layer_cls in cls.layers_mapping.items():
            if isinstance(base, subtype):
                return layer_cls
        supported = ", ".join(t.__name__ for t in cls.layers_mapping)
        raise TypeError(
            f"{key}: target module of type {type(base).__name__} not supported, "
            f"currently only adapters for {supported} are supported"
        )

    # ------------------------------------------------------------------ injection
    @classmethod
    def _create_new_module(
        cls, config: LycorisConfig, adapter_name: str, target: nn.Module, **kwargs: Any
    ) -> LycorisLayer:
        """A new adapter layer of the type ``layers_mapping`` gives for ``target``."""
        layer_cls = cls._layer_class_for(target, kwargs.get("module_path", "target"))
        return layer_cls(target, adapter_name, config, **kwargs)

    def _create_and_replace(
        self,
        config: LycorisConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        """Add ``adapter_name`` to an existing adapter layer, or replace ``target`` by a new one."""
        r, alpha = resolve_rank_alpha(config, current_key)
        if isinstance(target, LycorisLayer):
            target.update_layer(
                adapter_name, r, alpha, config=config, autocast_adapter_dtype=self.autocast_adapter_dtype
            )
        else:
            new_module = self._create_new_module(
                config,
                adapter_name,
                target,
                r=r,
                alpha=alpha,
                autocast_adapter_dtype=self.autocast_adapter_dtype,
                module_path=current_key,
            )
            setattr(parent, target_name, new_module)

    def _resolve_targets(self, config: LycorisConfig) -> dict[str, Any]:
        """Match targets and build every factor plan, without touching the model.

        Returns ``{module path: plan or None}`` (``None`` for layer types without a core plan).
        """
        model_config = getattr(self.model, "config", None)
        names = self._module_names()
        modules = dict(self.model.named_modules())
        match = match_targets(
            config,
            names,
            linear_names=[n for n in names if isinstance(modules[n], nn.Linear)],
            output_names=self._output_layer_names(),
            model_type=getattr(model_config, "model_type", None),
        )
        plans: dict[str, Any] = {}
        for key in match.targeted:
            target = modules[key]
            layer_cls = self._layer_class_for(target, key)
            if isinstance(target, LycorisLayer) and not isinstance(target, tuple(self.layers_mapping.values())):
                raise TypeError(
                    f"{key}: already holds a {type(target).__name__}; mixing adapter types in one model "
                    f"is not supported by {type(self).__name__}"
                )
            plans[key] = None
            if issubclass(layer_cls, _FactorizedLayer):
                base = target.get_base_layer() if isinstance(target, LycorisLayer) else target
                r, alpha = resolve_rank_alpha(config, key)
                plans[key] = layer_cls.plan_fn(layer_shape_of(base, key), r, alpha, config, where=key)
        return plans

    def _output_layer_names(self) -> list[str]:
        get_out = getattr(self.model, "get_output_embeddings", None)
        out = get_out() if callable(get_out) else None
        return [n for n, m in self.model.named_modules() if out is not None and m is out]

    def _check_new_adapter(self, adapter_name: str, config: LycorisConfig) -> None:
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name: expected a non-empty string, got {adapter_name!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; delete it first or pick another name")
        if not isinstance(config, self.config_cls):
            raise TypeError(
                f"{type(self).__name__}: expected a {self.config_cls.__name__}, got {type(config).__name__}"
            )

    def add_adapter(self, adapter_name: str, config: LycorisConfig) -> None:
        """Inject adapter ``adapter_name``; the first adapter becomes active, later ones do not."""
        self._add(adapter_name, config, None)

    def _inject(
        self, adapter_name: str, config: LycorisConfig, plans: dict[str, Any], fill: Callable[[], None] | None = None
    ) -> None:
        """Phase two of injection: mutate (then ``fill`` the new factors). Undo everything if any step fails."""
        modules = dict(self.model.named_modules())
        replaced: list[tuple[nn.Module, str, nn.Module]] = []
        updated: list[LycorisLayer] = []
        saved_grad = {p: p.requires_grad for p in self.model.parameters()}
        config = copy.deepcopy(config)
        try:
            for key in plans:
                target = modules[key]
                parent, attr = _get_submodule_parent(self.model, key)
                self._create_and_replace(config, adapter_name, target, attr, parent, key)
                if isinstance(target, LycorisLayer):
                    updated.append(target)
                else:
                    replaced.append((parent, attr, target))
            self._wrap_modules_to_save(adapter_name, config, replaced)
            if fill is not None:
                fill()
        except BaseException:
            for layer in updated:
                layer.delete_adapter(adapter_name)
            for parent, attr, original in reversed(replaced):
                setattr(parent, attr, original)
            for param, flag in saved_grad.items():
                param.requires_grad_(flag)
            raise
        self.peft_config[adapter_name] = config
        self._mark_only_adapters_as_trainable()

    def _wrap_modules_to_save(
        self, adapter_name: str, config: LycorisConfig, replaced: list[tuple[nn.Module, str, nn.Module]]
    ) -> None:
        if not config.modules_to_save:
            return
        for key, module in list(self.model.named_modules()):
            if not key or not modules_to_save_key(config, key):
                continue
            if isinstance(module, ModulesToSaveWrapper):
                module.update(adapter_name)
            elif not any(isinstance(p, ModulesToSaveWrapper) for p in self._parents(key)):
                parent, attr = _get_submodule_parent(self.model, key)
                setattr(parent, attr, ModulesToSaveWrapper(module, adapter_name))
                replaced.append((parent, attr, module))

    def _parents(self, key: str) -> Iterator[nn.Module]:
        parts = key.split(".")
        for i in range(1, len(parts)):
            yield self.model.get_submodule(".".join(parts[:i]))

    def _mark_only_adapters_as_trainable(self) -> None:
        for name, param in self.model.named_parameters():
            if self.prefix not in name and ".modules_to_save." not in name:
                param.requires_grad_(False)

    # ------------------------------------------------------------------ adapter management
    @property
    def active_adapters(self) -> list[str]:
        return list(self.active_adapter)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activate one adapter or a list of them (unmerging merged layers first, as PEFT does)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} do not exist; available: {sorted(self.peft_config)}")
        for _, layer in self._lycoris_layers():
            if layer.merged:
                warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
                layer.unmerge()
            layer.set_adapter(names)
            for name in names:
                if self.peft_config[name].inference_mode and name in layer.factors:
                    layer.factors[name].requires_grad_(False)
        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.set_adapter(names)
        self.active_adapter = names

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; it must exist and not be merged."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        merged = [key for key, layer in self._lycoris_layers() if adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(
                f"Cannot delete adapter(s) [{adapter_name!r}] while they are merged (in {merged}). "
                "Please unmerge them first."
            )
        del self.peft_config[adapter_name]
        for _, layer in self._lycoris_layers():
            layer.delete_adapter(adapter_name)
        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                del module.modules_to_save[adapter_name]
                module.set_adapter([n for n in self.active_adapter if n != adapter_name])
        remaining = [n for n in self.active_adapter if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [sorted(self.peft_config)[0]]
        self.active_adapter = remaining

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: run the base model (merged layers are unmerged, as in PEFT)."""
        self._enable_adapters(False)
        try:
            yield
        finally:
            self._enable_adapters(True)

    def _enable_adapters(self, enabled: bool) -> None:
        for _, layer in self._lycoris_layers():
            layer.enable_adapters(enabled)
        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.disabled = not enabled

    # ------------------------------------------------------------------ merging
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters into the base weights of every layer.

        With ``safe_merge`` every merged weight is checked (NaN and ±inf) before any layer changes:
        a failure raises a ``ValueError`` naming the module and adapter, and the model is untouched.
        """
        layers = list(self._lycoris_layers())
        if not safe_merge:
            for _, layer in layers:
                layer.merge(adapter_names=adapter_names)
            return
        staged = []
        for key, layer in layers:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                names = layer._merge_names(adapter_names)
            if names:
                staged.append((layer, names, layer._safe_merged_weight(names, where=key)))
        for layer, names, weight in staged:
            layer.get_base_layer().weight.data = weight
            layer.merged_adapters.extend(names)

    def unmerge_adapter(self) -> None:
        for _, layer in self._lycoris_layers():
            layer.unmerge()

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        for key, module in list(self.model.named_modules()):
            if isinstance(module, LycorisLayer) and not any(isinstance(p, LycorisLayer) for p in self._parents(key)):
                parent, attr = _get_submodule_parent(self.model, key)
                setattr(parent, attr, module.get_base_layer())
            elif isinstance(module, ModulesToSaveWrapper):
                parent, attr = _get_submodule_parent(self.model, key)
                keep = (
                    module.modules_to_save[module.active_adapter] if module.active_adapter else module.original_module
                )
                setattr(parent, attr, keep)
        self.peft_config = {}
        return self.model

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        """Merge, then return the plain model with every adapter layer replaced by its base layer."""
        return self._unload(True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Return the plain model without merging (adapters discarded)."""
        return self._unload(False)

    # ------------------------------------------------------------------ scaling
    def set_scale(self, adapter: str, scale: float) -> None:
        for _, layer in self._lycoris_layers():
            layer.set_scale(adapter, scale)

    def scale_layer(self, scale: float) -> None:
        for _, layer in self._lycoris_layers():
            layer.scale_layer(scale)

    def unscale_layer(self, scale: float | None = None) -> None:
        for _, layer in self._lycoris_layers():
            layer.unscale_layer(scale)

    # ------------------------------------------------------------------ files
    def adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """Checkpoint tensors of one adapter under PEFT's keys (``base_model.model.<path>.<factor>``)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        state: dict[str, torch.Tensor] = {}
        for key, module in self.model.named_modules():
            if isinstance(module, LycorisLayer) and adapter_name in module.factors:
                for name, param in module.factors[adapter_name].items():
                    state[checkpoint_key(key, name)] = param.detach()
            elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                for name, tensor in module.modules_to_save[adapter_name].state_dict().items():
                    state[checkpoint_key(key, name)] = tensor.detach()
        return state

    def save_pretrained(
        self, save_directory: str | os.PathLike, selected_adapters: Sequence[str] | None = None
    ) -> None:
        """PEFT layout: ``default`` in ``save_directory``, others in ``save_directory/<name>/``."""
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            state = {k: v.contiguous().cpu() for k, v in self.adapter_state_dict(name).items()}
            directory = os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name)
            os.makedirs(directory, exist_ok=True)
            atomic_write(
                os.path.join(directory, SAFETENSORS_NAME),
                lambda tmp, state=state: save_file(state, tmp, SAFETENSORS_METADATA),
            )
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            if config.auto_mapping is None and getattr(self.model, "config", None) is None:
                config.auto_mapping = {
                    "base_model_class": type(self.model).__name__,
                    "parent_library": type(self.model).__module__,
                }
            config.save_pretrained(directory)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        directory: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **kwargs: Any,
    ) -> LycorisTuner:
        """Wrap ``model`` and load a PEFT-format adapter directory; dispatches on ``peft_type``."""
        config = LycorisConfig.from_pretrained(directory)
        tuner_cls = cls._tuner_class_for(config.peft_type)
        config.inference_mode = not is_trainable
        return tuner_cls(model, config, adapter_name, state_dict=_read_safetensors(directory), **kwargs)

    @classmethod
    def _tuner_class_for(cls, peft_type: str) -> type[LycorisTuner]:
        config_class_for(peft_type)  # ValueError for an unknown type
        if cls is not LycorisTuner:
            if cls.config_cls.PEFT_TYPE != peft_type:
                raise ValueError(f"{cls.__name__} cannot load a checkpoint with peft_type {peft_type!r}")
            return cls
        if peft_type not in _TUNERS:
            raise ValueError(f"unknown peft_type {peft_type!r}; expected one of {sorted(_TUNERS)}")
        return _TUNERS[peft_type]

    def load_adapter(self, directory: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        """Add an adapter from a PEFT-format directory (not activated, as in PEFT)."""
        config = LycorisConfig.from_pretrained(directory)
        if config.peft_type != self.config_cls.PEFT_TYPE:
            raise ValueError(
                f"{type(self).__name__} cannot load adapter {adapter_name!r} with peft_type {config.peft_type!r}"
            )
        config.inference_mode = not is_trainable
        self._add(adapter_name, config, _read_safetensors(directory))

    def _add(self, adapter_name: str, config: LycorisConfig, state: Mapping[str, torch.Tensor] | None) -> None:
        """Validate (names, targets, plans, ``state`` if given), inject, copy values; all or nothing."""
        self._check_new_adapter(adapter_name, config)
        plans = self._resolve_targets(config)
        if state is None:
            self._inject(adapter_name, config, plans)
            self.set_adapter(self.active_adapter)
            return
        factor_names = {n for c in self.layers_mapping.values() for n in c.adapter_layer_names}
        by_module, other = check_checkpoint(plans, {k: tuple(v.shape) for k, v in state.items()}, factor_names)
        extra = self._match_modules_to_save_keys(config, {bare: tuple(state[k].shape) for bare, k in other.items()})

        def fill() -> None:
            modules = dict(self.model.named_modules())
            with torch.no_grad():
                for key, names in by_module.items():
                    params = modules[key].factors[adapter_name]
                    for name, ckpt_key in names.items():
                        _assign(params, name, state[ckpt_key], f"{key}.{name}")
                for bare, (module_key, sub) in extra.items():
                    modules[module_key].modules_to_save[adapter_name].get_parameter(sub).copy_(state[other[bare]])

        self._inject(adapter_name, config, plans, fill)
        if len(self.peft_config) == 1:
            self.set_adapter(adapter_name)
        else:
            self.set_adapter(self.active_adapter)

    def _match_modules_to_save_keys(
        self, config: LycorisConfig, shapes: dict[str, tuple[int, ...]]
    ) -> dict[str, tuple[str, str]]:
        """Map non-factor checkpoint keys onto ``modules_to_save`` parameters: ``{key: (module, param)}``."""
        found: dict[str, tuple[str, str]] = {}
        for bare, shape in shapes.items():
            parts = bare.split(".")
            for i in range(len(parts) - 1, 0, -1):
                module_key, sub = ".".join(parts[:i]), ".".join(parts[i:])
                if modules_to_save_key(config, module_key):
                    module = self.model.get_submodule(module_key)
                    if isinstance(module, ModulesToSaveWrapper):
                        module = module.original_module
                    params = dict(module.named_parameters())
                    if sub in params and tuple(params[sub].shape) == shape:
                        found[bare] = (module_key, sub)
                    break
            if bare not in found:
                raise ValueError(f"checkpoint key {bare!r} fits no adapter factor nor a `modules_to_save` parameter")
        return found

    # ------------------------------------------------------------------ reporting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = list(self.model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )


def _assign(params: nn.ParameterDict, name: str, value: torch.Tensor, where: str) -> None:
    param = params[name]
    if param.is_meta:
        params[name] = nn.Parameter(value.to(dtype=torch.float32), requires_grad=param.requires_grad)
    else:
        if tuple(param.shape) != tuple(value.shape):
            raise ValueError(f"{where}: checkpoint shape {tuple(value.shape)} does not fit {tuple(param.shape)}")
        param.copy_(value.to(param.dtype))


def _read_safetensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` (never pickle); ``ValueError`` if it is missing."""
    path = os.path.join(directory, SAFETENSORS_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{os.fspath(directory)!r}: no {SAFETENSORS_NAME} found (only safetensors files are read)")
    with safe_open(path, framework="pt") as fh:
        return {key: fh.get_tensor(key) for key in fh.keys()}


class LoHaModel(LycorisTuner):
    """LoHa (low-rank Hadamard product) adapters on a torch model.

    >>> import torch, lycoris_torch as lt
    >>> model = torch.nn.Sequential()
    >>> model.q = torch.nn.Linear(8, 8)
    >>> tuner = lt.LoHaModel(model, lt.LoHaConfig(r=2, target_modules=["q"]))
    >>> tuner(torch.zeros(1, 8)).shape
    torch.Size([1, 8])
    """

    prefix = "hada_"
    config_cls = LoHaConfig
    layers_mapping: ClassVar[dict[type[nn.Module], type[LycorisLayer]]] = {
        nn.Conv2d: LoHaLayer,
        nn.Conv1d: LoHaLayer,
        nn.Linear: LoHaLayer,
    }


class LoKrModel(LycorisTuner):
    """LoKr (low-rank Kronecker product) adapters on a torch model."""

    prefix = "lokr_"
    config_cls = LoKrConfig
    layers_mapping: ClassVar[dict[type[nn.Module], type[LycorisLayer]]] = {
        nn.Conv2d: LoKrLayer,
        nn.Conv1d: LoKrLayer,
        nn.Linear: LoKrLayer,
    }
