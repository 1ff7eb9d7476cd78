"""Model surgery and model-level operations: ``LycorisTuner``, ``LoHaModel``, ``LoKrModel``.

The operations themselves (target resolution in ``lycoris_core.resolve``, validate-then-inject,
checkpoint checks, set/delete/merge/scale, PEFT files) live in ``lycoris_core``, shared with the
JAX twin; this module builds the resolver's table from ``named_modules()``, does the torch surgery,
and holds PEFT's ``modules_to_save``. Module names are the dotted paths of ``model.named_modules()``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import ml_dtypes
import numpy as np
import torch
from torch import nn

from lycoris_core import LoHaConfig, LoKrConfig, LycorisConfig, checkpoint_key
from lycoris_core.bookkeeping import TunerBookkeeping
from lycoris_core.paths import check_forward_path
from lycoris_core.plan import AdapterPlan
from lycoris_core.resolve import Layer
from lycoris_core.state import modules_to_save_key
from lycoris_torch.layer import LAYER_CLASSES, SUPPORTED_LAYERS, LoHaLayer, LoKrLayer, LycorisLayer, put_module
from lycoris_torch.layer import layer_shape_of as _layer_shape_of

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
        """Hold a trainable copy of the original module for ``adapter_name`` (PEFT's ``modules_to_save``)."""
        put_module(self.modules_to_save, adapter_name, copy.deepcopy(self.original_module))
        self.modules_to_save[adapter_name].requires_grad_(True)
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def set_adapter(self, adapter_names: Sequence[str]) -> None:
        """Use the copy of the (single) active adapter this wrapper holds; the tuner checks first."""
        names = [n for n in adapter_names if n in self.modules_to_save]
        self.active_adapter = names[0] if names else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The active adapter's copy of the module, or the original one when disabled or none is active."""
        if self.disabled or self.active_adapter is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)


def _get_submodule_parent(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = key.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


class LycorisTuner(TunerBookkeeping, nn.Module):
    """Base tuner: wraps ``model`` in place and manages named adapters on it.

    Subclasses set ``prefix`` (factor-name prefix) and ``config_cls`` (whose ``peft_type`` names a
    registered method, ``lycoris_torch.methods``); they are registered for ``from_pretrained``.
    ``layers_mapping`` (base layer type -> adapter layer class) may pick the layer class per type.
    """

    _registry: ClassVar[dict[str, type]] = {}
    _front_end = "the torch twin"
    _modules_to_save = True
    _kind_names: ClassVar[dict[str, str]] = {"linear": "Linear", "conv1d": "Conv1d", "conv2d": "Conv2d"}
    layers_mapping: ClassVar[dict[type[nn.Module], type[LycorisLayer]]] = {}

    def __init__(
        self,
        model: nn.Module,
        config: LycorisConfig,
        adapter_name: str = "default",
        *,
        autocast_adapter_dtype: bool = True,
        state_dict: Mapping[str, Any] | None = None,
        forward_path: str = "auto",
        plans: Mapping[str, AdapterPlan] | None = None,
    ) -> None:
        """Inject ``adapter_name`` into ``model`` (in place) and make it active.

        ``state_dict`` optionally gives the factors' values under PEFT checkpoint keys; it is
        checked against the planned shapes before the model is touched. ``forward_path`` says how
        the forward pass computes the adapters (``lycoris_core.paths``): ``"auto"`` (the cheaper of
        ``"merged"`` and ``"factored"`` per call), one of those, or ``"peft"`` (PEFT's arithmetic).
        ``plans``: modules' own plans in place of the config's (:meth:`from_lycoris` passes a LyCORIS
        file's factorization).
        """
        nn.Module.__init__(self)
        self.forward_path = check_forward_path(forward_path)
        self.model = model
        self.training = model.training  # the wrapper reports the mode of the model it wraps
        self.peft_config: dict[str, LycorisConfig] = {}
        self.active_adapter: list[str] = [adapter_name]
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self._add(adapter_name, config, state_dict, plans)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward, with its adapter layers in place."""
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
    def _table_of(cls, model: nn.Module) -> dict[str, Layer]:
        """The resolver's table: every module of ``named_modules()`` but those inside adapter layers and
        ``modules_to_save`` copies, with its shape when it can be adapted (PEFT's rules: the output
        embedding of a transformers model is left out of ``"all-linear"``)."""
        aliases: dict[int, list[str]] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            aliases.setdefault(id(module), []).append(name)
        get_out = getattr(model, "get_output_embeddings", None)
        output = get_out() if callable(get_out) else None
        table: dict[str, Layer] = {}
        inside: list[str] = []
        supported = ", ".join(t.__name__ for t in cls.layers_mapping or {t: None for t in reversed(SUPPORTED_LAYERS)})
        for name, module in model.named_modules():
            if any(name.startswith(p) for p in inside):
                continue
            if isinstance(module, (LycorisLayer, ModulesToSaveWrapper)):
                inside.append(name + ".")
            base = module.get_base_layer() if isinstance(module, LycorisLayer) else module
            shape, error = None, None
            mapping = cls.layers_mapping
            if mapping and not isinstance(base, tuple(mapping)):
                error = TypeError(
                    f"{name}: target module of type {type(base).__name__} not supported, "
                    f"currently only adapters for {supported} are supported"
                )
            else:
                try:
                    shape = _layer_shape_of(base, name)
                except TypeError as err:
                    error = err
            held = (
                next(iter(module.plans.values())).peft_type
                if isinstance(module, LycorisLayer) and module.plans
                else None
            )
            table[name] = Layer(
                shape,
                error,
                linear=isinstance(base, nn.Linear),
                output=output is not None and module is output,
                shared=tuple(aliases[id(module)]) if len(aliases[id(module)]) > 1 else (),
                held=held,
                type_name=type(base).__name__,
            )
        return table

    def _parents(self, key: str) -> Iterator[nn.Module]:
        parts = key.split(".")
        for i in range(1, len(parts)):
            yield self.model.get_submodule(".".join(parts[:i]))

    # ------------------------------------------------------------------ injection
    def _inject(
        self,
        adapter_name: str,
        config: LycorisConfig,
        plans: dict[str, AdapterPlan],
        values: Mapping[str, Mapping[str, Any]] | None,
        extra: Mapping[str, Any],
    ) -> None:
        """Wrap or extend the planned layers and the ``modules_to_save`` copies, then fill ``values``
        (and ``extra``: ``modules_to_save`` weights); undo everything if any step fails."""
        extra_keys = self._match_modules_to_save_keys(config, {bare: tuple(v.shape) for bare, v in extra.items()})
        modules = dict(self.model.named_modules())
        replaced: list[tuple[nn.Module, str, nn.Module]] = []
        updated: list[LycorisLayer] = []
        saved_grad = {p: p.requires_grad for p in self.model.parameters()}
        try:
            for key, plan in plans.items():
                target = modules[key]
                parent, attr = _get_submodule_parent(self.model, key)
                if isinstance(target, LycorisLayer):
                    updated.append(target)  # before the call: a half-updated layer is rolled back too
                    target.update_layer(
                        adapter_name, plan=plan, config=config, autocast_adapter_dtype=self.autocast_adapter_dtype
                    )
                    continue
                layer_cls = next(
                    (c for t, c in self.layers_mapping.items() if isinstance(target, t)),
                    LAYER_CLASSES.get(plan.peft_type, LycorisLayer),
                )
                layer = layer_cls(
                    target,
                    adapter_name,
                    config,
                    plan=plan,
                    autocast_adapter_dtype=self.autocast_adapter_dtype,
                    module_path=key,
                    forward_path=self.forward_path,
                )
                setattr(parent, attr, layer)
                replaced.append((parent, attr, target))
            self._wrap_modules_to_save(adapter_name, config, replaced)
            modules = dict(self.model.named_modules())
            with torch.no_grad():
                for key, factors in (values or {}).items():
                    params = modules[key].factors[adapter_name]
                    for name, value in factors.items():
                        _assign(params, name, value)
                for bare, (module_key, sub) in extra_keys.items():
                    copy_state = modules[module_key].modules_to_save[adapter_name].state_dict()
                    copy_state[sub].copy_(_tensor(extra[bare]))  # parameters and buffers share storage
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
            if ".factors." not in f".{name}" and ".modules_to_save." not in name:
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

    # ------------------------------------------------------------------ adapter management (modules_to_save)
    def _wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for key, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield key, module

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activate one adapter or a list of them; only active, non-inference-mode adapters train
        (factors and ``modules_to_save`` copies, of which a module may have one active)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for key, wrapper in self._wrappers():
            held = [n for n in names if n in wrapper.modules_to_save]
            if len(held) > 1:
                raise ValueError(f"{key}: modules_to_save can only have one active adapter, got {held}")
        super().set_adapter(names)
        self._freeze_inactive(names)

    def _freeze_inactive(self, names: list[str]) -> None:
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

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` from every layer and every ``modules_to_save`` wrapper."""
        super().delete_adapter(adapter_name)
        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                del module.modules_to_save[adapter_name]
                module.set_adapter(self.active_adapter)
        self._freeze_inactive(self.active_adapters)

    def _enable_adapters(self, enabled: bool) -> None:
        for _, wrapper in self._wrappers():
            wrapper.disabled = not enabled
        super()._enable_adapters(enabled)
        if enabled:
            self._freeze_inactive(self.active_adapters)  # keep inference-mode adapters frozen

    def _unload_layers(self) -> None:
        for key, module in list(self.model.named_modules()):
            if isinstance(module, LycorisLayer) and not any(isinstance(p, LycorisLayer) for p in self._parents(key)):
                parent, attr = _get_submodule_parent(self.model, key)
                setattr(parent, attr, module.get_base_layer())
            elif isinstance(module, ModulesToSaveWrapper):
                parent, attr = _get_submodule_parent(self.model, key)
                active = module.active_adapter
                setattr(parent, attr, module.modules_to_save[active] if active else module.original_module)

    # ------------------------------------------------------------------ files
    def _layer_state(self, key: str, layer: LycorisLayer, adapter_name: str) -> dict[str, dict[str, torch.Tensor]]:
        return {key: {name: param.detach() for name, param in layer.factors[adapter_name].items()}}

    def adapter_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """Checkpoint tensors of one adapter under PEFT's keys, its ``modules_to_save`` copies included."""
        tensors = super().adapter_state_dict(adapter_name)
        tensors.update(
            {
                checkpoint_key(key, name): tensor.detach()
                for key, module in self.model.named_modules()
                if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save
                for name, tensor in module.modules_to_save[adapter_name].state_dict().items()
            }
        )
        return tensors

    @staticmethod
    def _numpy(tensor: torch.Tensor) -> np.ndarray:
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            return tensor.float().numpy().astype(ml_dtypes.bfloat16)
        return tensor.numpy()

    # ------------------------------------------------------------------ reporting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts of the model, as PEFT's."""
        params = list(self.model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: trainable parameters, all parameters and the trainable percentage."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )


def _tensor(value: Any) -> torch.Tensor:
    """A tensor from a torch tensor or a numpy array (bf16 through float32, which holds it exactly)."""
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def _assign(params: nn.ParameterDict, name: str, value: Any) -> None:
    param, value = params[name], _tensor(value)
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
