"""Model surgery and model-level operations: ``LycorisTuner``, ``LoHaModel``, ``LoKrModel``.

The operations themselves (target resolution, validate-then-inject, checkpoint checks,
set/delete/merge/scale, PEFT files) live in ``lycoris_core.bookkeeping.TunerBookkeeping``,
shared with the JAX twin; this module supplies the torch surgery, tensors and file I/O, and
PEFT's ``modules_to_save``. Module names are the dotted paths of ``model.named_modules()``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from lycoris_core import SAFETENSORS_METADATA, LoHaConfig, LoKrConfig, LycorisConfig, checkpoint_key
from lycoris_core.bookkeeping import TunerBookkeeping
from lycoris_core.paths import check_forward_path
from lycoris_core.state import modules_to_save_key
from lycoris_torch.layer import LoHaLayer, LoKrLayer, LycorisLayer, layer_shape_of, put_module

__all__ = ["LoHaModel", "LoKrModel", "LycorisTuner", "ModulesToSaveWrapper"]


class ModulesToSaveWrapper(nn.Module):
    """A fully trainable copy of a module per adapter (PEFT's ``modules_to_save``)."""

    def __init__(self, original_module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.update(adapter_name)
        self.train(original_module.training)

    def update(self, adapter_name: str) -> None:
        put_module(self.modules_to_save, adapter_name, copy.deepcopy(self.original_module))
        self.modules_to_save[adapter_name].requires_grad_(True)
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def set_adapter(self, adapter_names: Sequence[str]) -> None:
        """Use the copy of the (single) active adapter this wrapper holds; the tuner checks first."""
        names = [n for n in adapter_names if n in self.modules_to_save]
        self.active_adapter = names[0] if names else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or self.active_adapter is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)


def _get_submodule_parent(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = key.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


class LycorisTuner(TunerBookkeeping, nn.Module):
    """Base tuner: wraps ``model`` in place and manages named adapters on it.

    Subclasses set ``prefix`` (factor-name prefix), ``config_cls`` and ``layers_mapping``
    (base layer type -> adapter layer class); they are registered for ``from_pretrained``.
    """

    _registry: ClassVar[dict[str, type]] = {}
    _layer_base = LycorisLayer
    _linear_type = nn.Linear
    _layer_shape_of = staticmethod(layer_shape_of)

    def __init__(
        self,
        model: nn.Module,
        config: LycorisConfig,
        adapter_name: str = "default",
        *,
        autocast_adapter_dtype: bool = True,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        forward_path: str = "auto",
    ) -> None:
        """Inject ``adapter_name`` into ``model`` (in place) and make it active.

        ``state_dict`` optionally gives the factors' values under PEFT checkpoint keys; it is
        checked against the planned shapes before the model is touched. ``forward_path`` says how
        the forward pass computes the adapters (``lycoris_core.paths``): ``"auto"`` (the cheaper of
        ``"merged"`` and ``"factored"`` per call), one of those, or ``"peft"`` (PEFT's arithmetic).
        """
        nn.Module.__init__(self)
        self.forward_path = check_forward_path(forward_path)
        self.model = model
        self.training = model.training  # the wrapper reports the mode of the model it wraps
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

    @classmethod
    def _model_module_names(cls, model: nn.Module, **kwargs: Any) -> list[str]:
        return [name for name, _ in model.named_modules()]

    def _module_table(self) -> dict[str, nn.Module]:
        """``{dotted name: module}`` minus anything inside adapter layers and modules_to_save copies."""
        table: dict[str, nn.Module] = {}
        inside: list[str] = []
        for name, module in self.model.named_modules():
            if any(name.startswith(p) for p in inside):
                continue
            table[name] = module
            if isinstance(module, (LycorisLayer, ModulesToSaveWrapper)):
                inside.append(name + ".")
        return table

    def _module_aliases(self) -> dict[int, list[str]]:
        aliases: dict[int, list[str]] = {}
        for name, module in self.model.named_modules(remove_duplicate=False):
            aliases.setdefault(id(module), []).append(name)
        return aliases

    def _output_embeddings(self) -> nn.Module | None:
        get_out = getattr(self.model, "get_output_embeddings", None)
        return get_out() if callable(get_out) else None

    @staticmethod
    def _replace_child(parent: nn.Module, name: str, module: nn.Module) -> None:
        setattr(parent, name, module)

    def _parents(self, key: str) -> Iterator[nn.Module]:
        parts = key.split(".")
        for i in range(1, len(parts)):
            yield self.model.get_submodule(".".join(parts[:i]))

    # ------------------------------------------------------------------ injection
    def _inject(
        self, adapter_name: str, config: LycorisConfig, plans: dict[str, Any], fill: Callable[[], None] | None
    ) -> None:
        """Mutate (then ``fill`` the new factors); undo everything if any step fails."""
        modules = dict(self.model.named_modules())
        replaced: list[tuple[nn.Module, str, nn.Module]] = []
        updated: list[LycorisLayer] = []
        saved_grad = {p: p.requires_grad for p in self.model.parameters()}
        try:
            for key in plans:
                target = modules[key]
                parent, attr = _get_submodule_parent(self.model, key)
                if isinstance(target, LycorisLayer):
                    updated.append(target)  # before the call: a half-updated layer is rolled back too
                else:
                    replaced.append((parent, attr, target))
                self._create_and_replace(config, adapter_name, target, attr, parent, key)
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
        self.peft_config = {**self.peft_config, adapter_name: config}
        for name, param in self.model.named_parameters():  # PEFT's _mark_only_adapters_as_trainable
            if self.prefix not in name and ".modules_to_save." not in name:
                param.requires_grad_(False)

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

    def _fill(
        self,
        adapter_name: str,
        config: LycorisConfig,
        by_module: dict[str, dict[str, str]],
        other: dict[str, str],
        tensors: Mapping[str, torch.Tensor],
    ) -> Callable[[], None]:
        """Check the non-factor keys against ``modules_to_save``; return the copy-in callback."""
        extra = self._match_modules_to_save_keys(config, {bare: tuple(tensors[k].shape) for bare, k in other.items()})

        def fill() -> None:
            modules = dict(self.model.named_modules())
            with torch.no_grad():
                for key, names in by_module.items():
                    params = modules[key].factors[adapter_name]
                    for name, ckpt_key in names.items():
                        _assign(params, name, tensors[ckpt_key])
                for bare, (module_key, sub) in extra.items():
                    copy_state = modules[module_key].modules_to_save[adapter_name].state_dict()
                    copy_state[sub].copy_(tensors[other[bare]])  # parameters and buffers share storage

        return fill

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
                    entries = module.state_dict()
                    if sub in entries and tuple(entries[sub].shape) == shape:
                        found[bare] = (module_key, sub)
                    break
            if bare not in found:
                raise ValueError(
                    f"checkpoint key {bare!r} {shape}: fits no adapter factor nor a `modules_to_save` parameter or buffer"
                )
        return found

    # ------------------------------------------------------------------ framework hooks
    def _wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for key, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield key, module

    def _check_set_adapter(self, names: list[str]) -> None:
        for key, wrapper in self._wrappers():
            held = [n for n in names if n in wrapper.modules_to_save]
            if len(held) > 1:
                raise ValueError(f"{key}: modules_to_save can only have one active adapter, got {held}")

    def _after_set_adapter(self, names: list[str]) -> None:
        """Only active, non-inference-mode adapters train: factors and modules_to_save copies."""

        def trainable(name: str) -> bool:
            return name in names and not self.peft_config[name].inference_mode

        for _, layer in self._lycoris_layers():
            for name in names:
                if name in layer.factors and not trainable(name):
                    layer.factors[name].requires_grad_(False)
        for _, wrapper in self._wrappers():
            wrapper.set_adapter(names)
            for name, copy_ in wrapper.modules_to_save.items():
                copy_.requires_grad_(trainable(name))

    def _after_delete_adapter(self, adapter_name: str) -> None:
        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                del module.modules_to_save[adapter_name]
                module.set_adapter(self.active_adapter)

    def _enable_adapters(self, enabled: bool) -> None:
        for _, wrapper in self._wrappers():
            wrapper.disabled = not enabled
        super()._enable_adapters(enabled)

    def _unload_layers(self) -> None:
        for key, module in list(self.model.named_modules()):
            if isinstance(module, LycorisLayer) and not any(isinstance(p, LycorisLayer) for p in self._parents(key)):
                parent, attr = _get_submodule_parent(self.model, key)
                setattr(parent, attr, module.get_base_layer())
            elif isinstance(module, ModulesToSaveWrapper):
                parent, attr = _get_submodule_parent(self.model, key)
                active = module.active_adapter
                setattr(parent, attr, module.modules_to_save[active] if active else module.original_module)

    def _factor_tensors(self, layer: LycorisLayer, adapter_name: str) -> dict[str, torch.Tensor]:
        return {name: param.detach() for name, param in layer.factors[adapter_name].items()}

    def _extra_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {
            checkpoint_key(key, name): tensor.detach()
            for key, module in self.model.named_modules()
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save
            for name, tensor in module.modules_to_save[adapter_name].state_dict().items()
        }

    @staticmethod
    def _read_state(path: str) -> dict[str, torch.Tensor]:
        with safe_open(path, framework="pt") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}

    @staticmethod
    def _serialize_state(tensors: Mapping[str, torch.Tensor]) -> bytes:
        return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, SAFETENSORS_METADATA)

    @staticmethod
    def _all_finite(tensor: torch.Tensor) -> bool:
        return bool(torch.isfinite(tensor).all())

    # ------------------------------------------------------------------ reporting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = list(self.model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )


def _assign(params: nn.ParameterDict, name: str, value: torch.Tensor) -> None:
    param = params[name]
    if param.is_meta:
        params[name] = nn.Parameter(value.to(dtype=torch.float32), requires_grad=param.requires_grad)
    else:
        param.copy_(value.to(param.dtype))


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
