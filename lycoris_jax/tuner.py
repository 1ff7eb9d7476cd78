"""Model surgery on Flax NNX graphs (JAX twin of ``lycoris_torch.tuner``).

The operations themselves (target resolution in ``lycoris_core.resolve``, validate-then-inject,
checkpoint checks, set/delete/merge/scale, PEFT files) live in ``lycoris_core``, shared with the
PyTorch twin; this module builds the resolver's table from the NNX graph and does the surgery.
Module names are the dotted graph paths (attribute names, list indices and dict keys joined by
"."), so an NNX model whose attributes mirror a torch model's gets the same names and keys.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lycoris_core import LoHaConfig, LoKrConfig, LycorisConfig, NoMatchingModuleError
from lycoris_core.bookkeeping import TunerBookkeeping
from lycoris_core.paths import check_forward_path
from lycoris_core.plan import AdapterPlan
from lycoris_core.resolve import Layer
from lycoris_jax.layer import (
    LAYER_CLASSES,
    LINEAR_LAYERS,
    SUPPORTED_LAYERS,
    LycorisLayer,
    LycorisParam,
    check_branch_dtype,
    kernel_layout_of,
    layer_shape_of,
    require_dropout_stream,
)
from lycoris_jax.methods import method_for

__all__ = ["LoHaModel", "LoKrModel", "LycorisTuner", "default_rngs"]

Path = tuple[Any, ...]


def _name(path: Path) -> str:
    return ".".join(str(p) for p in path)


def _child(node: Any, key: Any) -> Any:
    if isinstance(node, (list, tuple, dict, nnx.List, nnx.Dict)):
        return node[key]
    return getattr(node, key)


def _set_child(node: Any, key: Any, value: Any) -> None:
    if isinstance(node, (list, dict, nnx.List, nnx.Dict)):
        node[key] = value
    else:
        setattr(node, key, value)


def default_rngs() -> nnx.Rngs:
    """The documented default when no ``rngs`` is given: ``nnx.Rngs(params=0, dropout=1)``."""
    return nnx.Rngs(params=0, dropout=1)


class LycorisTuner(TunerBookkeeping, nnx.Module):
    """Base tuner: wraps an ``nnx.Module`` in place and manages named adapters on it.

    Subclasses set ``prefix`` and ``config_cls`` (whose ``peft_type`` names a registered method,
    ``lycoris_jax.methods``); they are registered for :meth:`from_pretrained`. The tuner is itself an
    ``nnx.Module`` (``tuner.model`` is the adapted model), so ``nnx.jit``, ``nnx.grad`` and
    ``nnx.Optimizer(tuner, tx, wrt=lycoris_jax.LycorisParam)`` work on either.
    """

    _registry: ClassVar[dict[str, type]] = {}
    _front_end = "the Flax twin"
    _kind_names: ClassVar[dict[str, str]] = {"linear": "Linear", "conv1d": "Conv", "conv2d": "Conv"}
    _table_keys = ("stacks", "output_modules")

    def __init__(
        self,
        model: nnx.Module,
        config: LycorisConfig,
        adapter_name: str = "default",
        *,
        rngs: nnx.Rngs | None = None,
        autocast_adapter_dtype: bool = True,
        state_dict: Mapping[str, Any] | None = None,
        stacks: Sequence[str] = (),
        branch_dtype: str = "adapter",
        forward_path: str = "auto",
        output_modules: Sequence[str] = ("lm_head",),
        plans: Mapping[str, AdapterPlan] | None = None,
    ) -> None:
        """Inject ``adapter_name`` into ``model`` (in place) and make it active.

        ``rngs`` provides ``params`` keys for initialisation and ``dropout`` keys for rank and
        module dropout; default :func:`default_rngs`. ``state_dict`` optionally gives the factors'
        values under PEFT checkpoint keys, checked against the planned shapes first. ``stacks`` names
        the module paths of scanned layer stacks (built with ``nnx.vmap``, applied with ``nnx.scan``):
        below ``"layers"``, the module ``layers.attn.q`` is the PEFT modules ``layers.<i>.attn.q``,
        one per layer, for every config field and checkpoint key; its adapter is one layer whose
        factors and scales carry the stack's leading layer axis. ``branch_dtype="base"`` runs the
        adapter branch in the base layer's compute ``dtype`` (e.g. bfloat16 on TPU) from float32
        factors; the default ``"adapter"`` is PEFT's arithmetic. ``forward_path`` says how the forward
        pass computes the adapters (``lycoris_core.paths``): ``"auto"`` (the cheaper of ``"merged"``
        and ``"factored"`` per call), one of those, or ``"peft"`` (PEFT's two-branch arithmetic).
        ``output_modules``: the model's output layers (names, or dot-suffixes of names), which
        ``target_modules="all-linear"`` leaves out as PEFT leaves out a transformers model's output
        embedding; a model's own ``get_output_embeddings()`` counts too. ``plans``: modules' own plans
        in place of the config's (:meth:`from_lycoris` passes a LyCORIS file's factorization).
        """
        self.stacks = tuple(stacks)
        self.output_modules = tuple(output_modules)
        self.forward_path = check_forward_path(forward_path)
        self.branch_dtype = check_branch_dtype(branch_dtype)
        self.model = model
        self.rngs = rngs if rngs is not None else default_rngs()
        self.peft_config: dict[str, LycorisConfig] = {}
        self.active_adapter: list[str] = [adapter_name]
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self._add(adapter_name, config, state_dict, plans)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # ------------------------------------------------------------------ walking the graph
    @staticmethod
    def _walk(model: nnx.Module) -> tuple[dict[str, tuple[Path, nnx.Module]], dict[int, list[str]]]:
        """Pre-order walk (siblings in NNX's sorted order), not entering adapter layers:
        ``({name: (path, module)} for first visits, {id(module): [every name]})``."""
        found: dict[str, tuple[Path, nnx.Module]] = {}
        aliases: dict[int, list[str]] = {}

        def walk(path: Path, module: nnx.Module) -> None:
            name = _name(path)
            aliases.setdefault(id(module), []).append(name)
            if len(aliases[id(module)]) > 1:
                return
            found[name] = (path, module)
            if isinstance(module, LycorisLayer):
                return
            for key, child in nnx.iter_children(module):
                if isinstance(child, nnx.Module):
                    walk((*path, key), child)

        walk((), model)
        return found, aliases

    @property
    def _table_options(self) -> dict[str, Any]:
        return {"stacks": self.stacks, "output_modules": self.output_modules}

    @classmethod
    def _table_of(
        cls, model: nnx.Module, stacks: Sequence[str] = (), output_modules: Sequence[str] = ("lm_head",)
    ) -> dict[str, Layer]:
        """The resolver's table: every module by its PEFT name (a module in a stack once per layer,
        ``stack.<i>.rest``), with its shape when it can be adapted and why not otherwise."""
        found, aliases = cls._walk(model)
        sizes = {stack: _stack_size(stack, found) for stack in stacks}
        get_out = getattr(model, "get_output_embeddings", None)
        output = get_out() if callable(get_out) else None
        table: dict[str, Layer] = {}
        for name, (_, module) in found.items():
            base = module.get_base_layer() if isinstance(module, LycorisLayer) else module
            stack = _stack_of(name, stacks)
            names = _layer_names(name, stack, sizes)
            shared = tuple(aliases[id(module)]) if len(aliases[id(module)]) > 1 else ()
            is_output = module is output or any(name == m or name.endswith(f".{m}") for m in output_modules)
            held = (
                module.plans[next(iter(module.plans))].peft_type
                if isinstance(module, LycorisLayer) and module.plans
                else None
            )
            for layer_name in names:
                shape, error, skip = None, None, ""
                if isinstance(base, nnx.bridge.ToNNX):
                    error = TypeError(f"{layer_name}: {_BRIDGED}")
                elif not isinstance(base, SUPPORTED_LAYERS):
                    supported = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
                    error = TypeError(
                        f"{layer_name}: target module of type {type(base).__name__} not supported, "
                        f"currently only adapters for {supported} are supported"
                    )
                try:
                    shape = layer_shape_of(base, layer_name, stacked=stack is not None)
                    kernel_layout_of(base, layer_name, stacked=stack is not None)
                except TypeError as err:
                    shape, error = None, error or err
                    if isinstance(base, LINEAR_LAYERS):
                        skip = str(err)
                    elif not isinstance(base, nnx.Conv) and getattr(getattr(base, "kernel", None), "ndim", 0) >= 2:
                        skip = f"{layer_name}: a {type(base).__name__} holds a kernel but is not a supported layer type"
                table[layer_name] = Layer(
                    shape,
                    error,
                    linear=isinstance(base, LINEAR_LAYERS),
                    skip=skip,
                    output=is_output,
                    stack=name if stack is not None else None,
                    shared=shared,
                    held=held,
                    type_name=type(base).__name__,
                )
        return table

    def _resolve_targets(self, config: LycorisConfig, table: Any = None, plans: Any = None) -> dict[str, AdapterPlan]:
        """As for every tuner; when nothing matches in a model that wraps Linen modules, say why."""
        try:
            return super()._resolve_targets(config, table, plans)
        except NoMatchingModuleError as err:
            bridged = [name for name, (_, m) in self._modules().items() if isinstance(m, nnx.bridge.ToNNX)]
            if not bridged:
                raise
            raise NoMatchingModuleError(f"{err} The model has nnx.bridge.ToNNX at {bridged}: {_BRIDGED}") from None

    def _modules(self) -> dict[str, tuple[Path, nnx.Module]]:
        return self._walk(self.model)[0]

    def _layer_index(self, name: str) -> tuple[str, int | None]:
        """``(module, layer)`` for a PEFT module name: ``layers.3.attn.q`` -> ``("layers.attn.q", 3)``."""
        for stack in self.stacks:
            head, _, tail = name.removeprefix(f"{stack}.").partition(".")
            if name.startswith(f"{stack}.") and head.isdigit():
                return ".".join(filter(None, (stack, tail))), int(head)
        return name, None

    def _lycoris_layers(self) -> Iterator[tuple[str, LycorisLayer]]:
        for name, (_, module) in self._modules().items():
            if isinstance(module, LycorisLayer):
                yield name, module

    def _node(self, path: Path) -> Any:
        node = self.model
        for key in path:
            node = _child(node, key)
        return node

    # ------------------------------------------------------------------ injection
    def _deterministic(self) -> bool:
        """The model's mode: eval iff it has modules with a mode and all are in eval mode
        (``deterministic`` / ``use_running_average`` True, as ``model.eval()`` leaves them)."""
        modes = [
            value
            for _, module in self._modules().values()
            for attr in ("deterministic", "use_running_average")
            if isinstance(value := getattr(module, attr, None), bool)
        ]
        return bool(modes) and all(modes)

    def _inject(
        self,
        adapter_name: str,
        config: LycorisConfig,
        plans: dict[str, AdapterPlan],
        values: Mapping[str, Mapping[str, Any]] | None,
        extra: Mapping[str, Any],
    ) -> None:
        """Wrap or extend the planned layers, then fill ``values`` (factors by module and name) or
        initialise; undo everything if any step fails. Everything is checked before the graph changes."""
        for bare, value in sorted(extra.items()):
            raise ValueError(
                f"checkpoint key {bare!r} {tuple(np.shape(value))}: fits no adapter factor "
                "(modules_to_save weights are not supported by the Flax twin)"
            )
        method_for(config.peft_type)  # a registered method, before anything changes
        if any(p.rank_dropout or p.module_dropout for p in plans.values()):
            require_dropout_stream(self.rngs, type(self).__name__)
        grouped: dict[str, dict[int | None, AdapterPlan]] = {}
        for name, plan in plans.items():
            module, index = self._layer_index(name)
            grouped.setdefault(module, {})[index] = plan
        modules = self._modules()
        sizes = {stack: _stack_size(stack, modules) for stack in self.stacks}
        replaced: list[tuple[Any, Any, nnx.Module]] = []
        updated: list[LycorisLayer] = []
        layer_cls = LAYER_CLASSES.get(config.peft_type, LycorisLayer)
        try:
            for module, by_index in grouped.items():
                path, target = modules[module]
                stack = _stack_of(module, self.stacks)
                plan = by_index[None] if stack is None else tuple(by_index.get(i) for i in range(sizes[stack[0]]))
                if isinstance(target, LycorisLayer):
                    updated.append(target)  # before the call: a half-updated layer is rolled back too
                    layer = target
                else:
                    layer = layer_cls(
                        target,
                        rngs=self.rngs,
                        module_path=module,
                        deterministic=self._deterministic(),  # new layers join in the model's mode
                        branch_dtype=self.branch_dtype,
                        forward_path=self.forward_path,
                        stack_size=sizes[stack[0]] if stack is not None else 0,
                    )
                    replaced.append((self._node(path[:-1]), path[-1], target))
                    _set_child(replaced[-1][0], path[-1], layer)
                layer.update_layer(
                    adapter_name, plan, autocast_adapter_dtype=self.autocast_adapter_dtype, initialize=values is None
                )
            if values is not None:
                self._fill(adapter_name, values)
        except BaseException:
            for layer in updated:
                layer.delete_adapter(adapter_name)
            for parent, key, original in reversed(replaced):
                _set_child(parent, key, original)
            raise
        self.peft_config = {**self.peft_config, adapter_name: config}

    def _fill(self, adapter_name: str, values: Mapping[str, Mapping[str, Any]]) -> None:
        modules = self._modules()
        for name, factors in values.items():
            module, index = self._layer_index(name)
            params = modules[module][1].factors[adapter_name]
            for factor, value in factors.items():
                value = jnp.asarray(value, params[factor].dtype)
                params[factor][...] = value if index is None else params[factor][...].at[index].set(value)

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> jax.Array | None:
        """Merge adapters into every layer's kernel (PEFT's ``merge_adapter``).

        ``safe_merge`` outside ``jax.jit`` raises on NaN/±inf before any kernel changes. Under ``jax.jit``
        (kernels traced) there is nothing to raise on: the check becomes a returned flag with the same
        all-or-nothing rule: every kernel changes if all merged kernels are finite, none otherwise, and
        ``unmerge_adapter`` then subtracts only what was added. Returns that flag (``None`` otherwise).
        """
        traced = any(isinstance(layer.kernel[...], jax.core.Tracer) for _, layer in self._lycoris_layers())
        if not safe_merge or not traced:
            return super().merge_adapter(adapter_names, safe_merge)
        staged = []
        for _, layer in self._lycoris_layers():
            if names := layer._merge_names(adapter_names):
                staged.append((layer, names, layer._merged_weight(names)))
        ok = jnp.array(True)
        for *_, weight in staged:
            ok = ok & jnp.isfinite(weight).all()
        for layer, names, weight in staged:
            layer._set_base_weight(jnp.where(ok, weight, layer.kernel[...]))
            layer.merged_adapters = [*layer.merged_adapters, *names]
            layer._merge_ok = nnx.data({**layer._merge_ok, **{n: nnx.Variable(ok) for n in names}})
        return ok

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts: trainable are :meth:`trainable_filter`'s factors;
        total every ``nnx.Param`` (base and adapters). Shapes suffice (an ``nnx.eval_shape`` tuner)."""
        count = lambda state: sum(math.prod(x.shape) for x in jax.tree.leaves(state))  # noqa: E731
        # a stack holds zero factors for the layers its config leaves out: PEFT has no such parameters
        padding = {name: 0 for name in self.peft_config}
        for _, layer in self._lycoris_layers():
            for name, layers in layer.layer_plans.items():
                unused = sum(plan is None for plan in layers)
                padding[name] += unused * sum(math.prod(v.shape[1:]) for v in layer.factors[name].values())
        trainable = sum(padding[n] for n in self.active_adapters if not self.peft_config[n].inference_mode)
        all_padding = sum(padding.values())
        return (
            count(nnx.state(self, self.trainable_filter())) - trainable,
            count(nnx.state(self, nnx.Param)) - all_padding,
        )

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: trainable parameters, all parameters and the trainable percentage."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def trainable_filter(self) -> nnx.filterlib.Filter:
        """An NNX filter for the factors that should train: active adapters not in inference mode.

        JAX has no ``requires_grad``: pass this as ``wrt`` to ``nnx.Optimizer`` and ``nnx.DiffState``
        to get PEFT's rule (``wrt=LycorisParam`` trains every adapter's factors).
        """
        trainable = frozenset(n for n in self.active_adapters if not self.peft_config[n].inference_mode)

        def is_trainable(path: tuple[Any, ...], _: Any) -> bool:
            return any(a == "factors" and b in trainable for a, b in itertools.pairwise(path))

        return nnx.All(LycorisParam, is_trainable)

    # ------------------------------------------------------------------ framework hooks
    def _unload_layers(self) -> None:
        for _, (path, module) in self._modules().items():
            if isinstance(module, LycorisLayer):
                _set_child(self._node(path[:-1]), path[-1], module.get_base_layer())

    def _layer_state(self, key: str, layer: LycorisLayer, adapter_name: str) -> dict[str, dict[str, Any]]:
        """``{module: {factor: array}}`` of one layer; a stack saves one module per targeted layer
        (``layers.<i>.attn.q``), as PEFT names them."""
        tensors = {name: param.get_value() for name, param in layer.factors[adapter_name].items()}
        layers = layer.layer_plans.get(adapter_name)
        if layers is None:
            return {key: tensors}
        stack = _stack_of(key, self.stacks)
        names = _layer_names(key, stack, {stack[0]: len(layers)})
        return {
            names[i]: {f: _row(v, i) for f, v in tensors.items()} for i, plan in enumerate(layers) if plan is not None
        }

    @staticmethod
    def _numpy(array: Any) -> np.ndarray:
        return np.asarray(jax.device_get(array))


_BRIDGED = (
    "an nnx.bridge.ToNNX wraps a Linen module, whose layers are not NNX modules: adapt them with "
    "lycoris_jax.pytree on nnx.state(model, nnx.Param) (pytree.merge, then nnx.update), or with "
    "lycoris_jax.linen on the Linen module itself"
)


def _stack_of(name: str, stacks: Sequence[str]) -> tuple[str, str] | None:
    """``(stack, rest)`` for a module in one of ``stacks`` (``rest`` is empty for the stack itself)."""
    for stack in stacks:
        if name == stack or name.startswith(f"{stack}."):
            return stack, name[len(stack) + 1 :]
    return None


def _layer_names(name: str, stack: tuple[str, str] | None, sizes: Mapping[Any, int]) -> tuple[str, ...]:
    """The PEFT module names of the module ``name``: ``stack.<i>.rest`` per layer, or ``(name,)``."""
    if stack is None:
        return (name,)
    size = sizes[stack[0]]
    return tuple(".".join(filter(None, (stack[0], str(i), stack[1]))) for i in range(size))


def _stack_size(stack: str, modules: Mapping[str, tuple[Path, nnx.Module]]) -> int:
    """The leading axis every parameter below ``stack`` shares (``nnx.vmap``'s layer axis)."""
    node = modules.get(stack)
    if node is None:
        raise ValueError(f"stacks: the model has no module {stack!r}")
    sizes = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(nnx.state(node[1], nnx.Param))}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"stacks: the parameters below {stack!r} must share one leading layer axis (an nnx.vmap-built "
            f"stack), got leading sizes {sorted(sizes, key=str)}"
        )
    return sizes.pop()


def _row(value: Any, i: int) -> Any:
    """Layer ``i`` of a stacked factor (a shape for an ``nnx.eval_shape`` tuner)."""
    if isinstance(value, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
    return value[i]


class LoHaModel(LycorisTuner):
    """LoHa (low-rank Hadamard product) adapters on a Flax NNX model.

    >>> from flax import nnx
    >>> import jax.numpy as jnp, lycoris_jax as lj
    >>> model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)))
    >>> tuner = lj.LoHaModel(model, lj.LoHaConfig(r=2, target_modules=["layers.0"]))
    >>> tuner(jnp.zeros((1, 8))).shape
    (1, 8)
    """

    prefix = "hada_"
    config_cls = LoHaConfig


class LoKrModel(LycorisTuner):
    """LoKr (low-rank Kronecker product) adapters on a Flax NNX model."""

    prefix = "lokr_"
    config_cls = LoKrConfig
