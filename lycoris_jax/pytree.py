"""LyCORIS adapters over a params pytree: no module surgery, any Flax (Linen or NNX) or raw model.

>>> import jax, jax.numpy as jnp
>>> from lycoris_jax import pytree, LoKrConfig
>>> params = {"dense": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}}
>>> adapter = pytree.init(params, LoKrConfig(r=2, target_modules=["dense"]), key=jax.random.key(0))
>>> sorted(adapter.factors["dense"])
['lokr_w1', 'lokr_w2']
>>> merged = pytree.merge(params, adapter)  # kernel + ΔW, same tree structure
>>> jax.tree.structure(merged) == jax.tree.structure(params)
True

A *module* is the subtree holding a ``kernel`` leaf (Flax layout: ``(in, out)``, ``(*k, in/g, out)``)
or a ``weight`` leaf of 2 or more dims (PyTorch layout: ``(out, in)``, ``(out, in/g, *k)``). Its name
is the dotted path of that subtree (``model.layers.0.self_attn.q_proj`` in ``FlaxLlamaForCausalLM``),
which is the torch twin's module name, so ``target_modules``, ``exclude_modules``,
``layers_to_transform``, ``rank_pattern``/``alpha_pattern`` and the checkpoint keys mean what they
mean in PEFT. A 3-D Flax kernel can be a Conv1d, a ``DenseGeneral`` or a stack of layers: targeting
one needs ``kinds`` (never a silent guess); a ``DenseGeneral``/``Einsum`` kernel is the ``nn.Linear``
it equals, its input axes and output axes each flattened in C order.

The :class:`Adapter` is a pytree whose leaves are exactly the factor arrays (PEFT's names and
layouts), so ``jax.grad``, optax, orbax and ``jax.device_put`` take it as it is; its plans and
config are static. Files are PEFT's, in both directions, with the same checks and crash-safe
writes as the NNX tuner (``lycoris_core.files``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from safetensors.flax import load_file, save

from lycoris_core import (
    SAFETENSORS_METADATA,
    AdapterPlan,
    LayerShape,
    LycorisConfig,
    check_adapter_name,
    checkpoint_key,
    config_from_dict,
    match_targets,
    plan_adapter,
    resolve_rank_alpha,
)
from lycoris_core.errors import CheckpointError
from lycoris_core.files import read_adapter_files, read_checkpoint, save_adapters
from lycoris_core.plan import LOHA_FACTORS, LOKR_FACTORS
from lycoris_core.state import check_checkpoint, check_scale
from lycoris_core.targets import NoMatchingModuleError
from lycoris_jax import functional, loha, lokr

__all__ = [
    "Adapter",
    "KindSpec",
    "Rename",
    "Target",
    "delta_weight",
    "from_pretrained",
    "init",
    "merge",
    "read_config",
    "save_pretrained",
]

Kind = Literal["linear", "conv1d", "conv2d"]
_KINDS = ("linear", "conv1d", "conv2d")
_DELTA = {"LOHA": loha.delta_weight, "LOKR": lokr.delta_weight}


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted kernel: its leaf name (``"kernel"``: Flax layout, ``"weight"``: PyTorch layout),
    the adapter's plan (shapes in PyTorch layout, as in PEFT's files) and how a Flax kernel holds
    that layout (``functional.KernelLayout``: a ``DenseGeneral``/``Einsum`` kernel is the Linear it equals)."""

    leaf: Literal["kernel", "weight"]
    plan: AdapterPlan
    layout: functional.KernelLayout | None = None
    #: The module's path in the params tree (its name in PEFT's files may differ: ``rename``).
    path: tuple[str, ...] = ()


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["factors"], meta_fields=["targets", "config_json", "adapter_name"]
)
@dataclasses.dataclass(frozen=True)
class Adapter:
    """Factors ``{module: {factor: array}}`` (the only leaves) and static ``targets``
    (``((module, Target), ...)``), config (as JSON) and adapter name."""

    factors: dict[str, dict[str, jax.Array]]
    targets: tuple[tuple[str, Target], ...]
    config_json: str
    adapter_name: str = "default"

    @property
    def config(self) -> LycorisConfig:
        return config_from_dict(json.loads(self.config_json))

    @property
    def plans(self) -> dict[str, AdapterPlan]:
        return {module: target.plan for module, target in self.targets}

    def state_dict(self) -> dict[str, jax.Array]:
        """The factors under PEFT's checkpoint keys (``base_model.model.<module>.<factor>``)."""
        return {
            checkpoint_key(m, name): value for m, factors in self.factors.items() for name, value in factors.items()
        }


# ---------------------------------------------------------------- finding kernels
def _key_name(entry: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _leaf_names(path: Sequence[Any]) -> tuple[str, ...]:
    """A leaf's key path as names, without the ``.value`` of an ``nnx.Variable`` in an ``nnx.State``."""
    names = tuple(_key_name(e) for e in path)
    if len(names) > 1 and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        names = names[:-1]
    return names


#: ``rename``: a module's dotted path in the params tree -> its name in PEFT's files (the torch
#: twin's module name), as a function or a mapping (names it lacks stay as they are).
Rename = Callable[[str], str] | Mapping[str, str] | None


def _renamer(rename: Rename) -> Callable[[str], str]:
    """``rename`` as a function (shared with ``lycoris_jax.linen``)."""
    if rename is None:
        return lambda name: name
    if isinstance(rename, Mapping):
        return lambda name: rename.get(name, name)
    return rename


def _kernels(params: Any, rename: Rename = None) -> dict[str, tuple[str, Any, tuple[str, ...]]]:
    """``{module name: (leaf name, array, module path)}`` for every ``kernel`` leaf and every ``weight``
    of >= 2 dims; the name is ``rename`` of the dotted path."""
    to_name = _renamer(rename)
    found: dict[str, tuple[str, Any, tuple[str, ...]]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = _leaf_names(path)
        ndim = getattr(leaf, "ndim", 0)
        if not names or names[-1] not in ("kernel", "weight") or (names[-1] == "weight" and ndim < 2):
            continue
        module = to_name(".".join(names[:-1]))
        if module in found:
            raise ValueError(
                f"{module}: two kernels have this name ({'.'.join(found[module][2])} and {'.'.join(names[:-1])})"
            )
        found[module] = (names[-1], leaf, names[:-1])
    return found


#: A ``kinds`` entry: a layer kind, or ``(in_axes, out_axes)`` of a kernel that is the Linear it equals.
KindSpec = Kind | tuple[tuple[int, ...], tuple[int, ...]]


def _spec(module: str, kinds: Mapping[str, KindSpec]) -> KindSpec | None:
    return next((spec for pattern, spec in kinds.items() if re.fullmatch(pattern, module)), None)


def _layout(module: str, leaf: str, shape: tuple[int, ...], kinds: Mapping[str, KindSpec]) -> tuple[Kind, Any]:
    """``(kind, KernelLayout or None)`` of a kernel; a 3-D Flax kernel must be described in ``kinds``."""
    ndim, spec = len(shape), _spec(module, kinds)
    if isinstance(spec, tuple):
        in_axes, out_axes = (tuple(int(a) for a in axes) for axes in spec)
        if leaf != "kernel" or sorted((*in_axes, *out_axes)) != list(range(ndim)) or not in_axes or not out_axes:
            raise ValueError(f"{module}: kinds (in_axes, out_axes) {spec} must split the {ndim} axes of its kernel")
        return "linear", functional.KernelLayout(shape, in_axes, out_axes)
    if spec is not None:
        if spec not in _KINDS:
            raise ValueError(f"kinds for {module}: expected one of {list(_KINDS)} or (in_axes, out_axes), got {spec!r}")
        expected = {"linear": 2, "conv1d": 3, "conv2d": 4}[spec]
        if ndim != expected:
            raise ValueError(f"{module}: kinds says {spec} ({expected}-D kernel), but its {leaf} is {ndim}-D")
        kind = spec
    elif ndim == 2:
        kind = "linear"
    elif ndim == 4:
        kind = "conv2d"
    elif ndim == 3 and leaf == "weight":
        kind = "conv1d"
    else:
        raise ValueError(
            f"{module}: a {ndim}-D {leaf} could be a Conv1d, a DenseGeneral or a stack of layers; say which with "
            f"kinds={{{module!r}: 'conv1d'}} or kinds={{{module!r}: (in_axes, out_axes)}} (for a Linen module, "
            "lycoris_jax.linen.adapt(..., example_args=...) finds out)"
        )
    return kind, (functional.KernelLayout(shape) if leaf == "kernel" else None)  # type: ignore[return-value]


def _layer_shape(kind: Kind, leaf: str, shape: tuple[int, ...], layout: Any) -> LayerShape:
    if layout is not None and layout.in_axes is not None:
        return LayerShape("linear", *layout.linear_features)
    if leaf == "weight":  # PyTorch layout (out, in/g, *k)
        out, inp, *kernel = shape
    else:  # Flax layout (*k, in/g, out)
        *kernel, inp, out = shape
    return LayerShape(kind, out, inp, tuple(kernel))


def _targets(
    params: Any,
    config: LycorisConfig,
    kinds: Mapping[str, KindSpec] | None,
    output_modules: Sequence[str],
    rename: Rename = None,
) -> dict[str, Target]:
    """Match the config's targets against the modules of ``params`` and plan each (no arrays made)."""
    if not isinstance(config, LycorisConfig) or config.peft_type not in _DELTA:
        raise TypeError(f"config: expected a LoHaConfig or LoKrConfig, got {type(config).__name__}")
    if config.modules_to_save:
        raise ValueError(f"modules_to_save={config.modules_to_save}: not supported by the pytree API")
    kernels, kinds = _kernels(params, rename), kinds or {}
    linear = [m for m, (_, a, _) in kernels.items() if a.ndim == 2 or isinstance(_spec(m, kinds), tuple)]
    targets_all_linear = isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear"
    unknown = [m for m, (leaf, a, _) in kernels.items() if leaf == "kernel" and a.ndim == 3 and _spec(m, kinds) is None]
    if targets_all_linear and unknown:
        warnings.warn(
            f"target_modules='all-linear' leaves out 3-D kernels that may be DenseGeneral/Einsum layers: {unknown}; "
            "describe them with kinds={name: (in_axes, out_axes)} to include them",
            UserWarning,
            stacklevel=3,
        )
    match = match_targets(
        config, list(kernels), linear_names=linear, output_names=[m for m in kernels if m in output_modules]
    )
    targets = {}
    for module in match.targeted:
        leaf, array, path = kernels[module]
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise TypeError(f"{module}.{leaf}: expected a floating-point kernel, got {array.dtype}")
        kind, layout = _layout(module, leaf, tuple(array.shape), kinds)
        r, alpha = resolve_rank_alpha(config, module)
        plan = plan_adapter(_layer_shape(kind, leaf, tuple(array.shape), layout), r, alpha, config, where=module)
        targets[module] = Target(leaf, plan, layout, path)
    return targets


def _adapter(factors: dict, targets: dict[str, Target], config: LycorisConfig, adapter_name: str) -> Adapter:
    return Adapter(factors, tuple(sorted(targets.items())), config.to_json_string(), adapter_name)


# ---------------------------------------------------------------- the four functions
def init(
    params: Any,
    config: LycorisConfig,
    *,
    key: jax.Array,
    adapter_name: str = "default",
    kinds: Mapping[str, KindSpec] | None = None,
    output_modules: Sequence[str] = ("lm_head",),
    autocast_adapter_dtype: bool = True,
    rename: Rename = None,
) -> Adapter:
    """Plan and initialise adapters for the targeted kernels of ``params`` (PEFT's initialisation:
    zeros or PyTorch's Kaiming uniform, one key per module from ``key``).

    ``kinds`` maps module names (regexes, full match) to ``"linear"``/``"conv1d"``/``"conv2d"`` where
    the kernel's rank is ambiguous, or to ``(in_axes, out_axes)`` for a ``DenseGeneral``/``Einsum``
    kernel (the Linear it equals: input and output axes each flattened in C order); ``output_modules`` are left out of ``"all-linear"`` (PEFT's
    output embedding); ``rename`` maps module paths to the names PEFT's files use where they differ
    (diffusers' Flax ``down_blocks_0`` is torch's ``down_blocks.0``). Factors are float32 for a
    bf16/fp16 base (PEFT's autocast), else the base dtype.
    """
    check_adapter_name(adapter_name)
    targets = _targets(params, config, kinds, output_modules, rename)
    kernels = _kernels(params, rename)
    factors = {}
    for module, k in zip(sorted(targets), jax.random.split(key, len(targets)), strict=True):
        kernel_dtype = kernels[module][1].dtype
        keys = iter(jax.random.split(k, len(targets[module].plan.factors)))
        factors[module] = functional.init_factors(
            lambda keys=keys: next(keys),
            targets[module].plan,
            functional.adapter_dtype(kernel_dtype, autocast_adapter_dtype),
            kernel_dtype,
        )
    return _adapter(factors, targets, config, adapter_name)


def delta_weight(adapter: Adapter, module: str, *, scale: Any = 1.0, key: jax.Array | None = None) -> jax.Array:
    """ΔW of one module in its kernel's own layout, scaled by ``scale * alpha / r``; with ``key``,
    rank dropout (rows of ΔW) and module dropout (all of ΔW) as in PEFT's training forward."""
    target = dict(adapter.targets)[module]
    plan = target.plan
    delta = _DELTA[plan.peft_type](adapter.factors[module], scale * plan.scaling, plan.weight_shape)
    if key is not None and (plan.rank_dropout or plan.module_dropout):
        rank_key, module_key = jax.random.split(key)
        if plan.rank_dropout:
            keep = functional.rank_dropout_keep(rank_key, plan.weight_shape[0], plan.rank_dropout)
            mask_dtype = jnp.float32 if plan.fp32_dropout_mask else None
            delta = functional.apply_rank_dropout(delta, keep, rescale=plan.rank_dropout_scale, mask_dtype=mask_dtype)
        if plan.module_dropout:
            delta = jnp.where(jax.random.uniform(module_key) > plan.module_dropout, delta, jnp.zeros_like(delta))
    return target.layout.to_kernel(delta) if target.layout is not None else delta


def merge(params: Any, adapter: Adapter, *, scale: Any = 1.0, key: jax.Array | None = None) -> Any:
    """``params`` with every targeted kernel replaced by ``kernel + ΔW`` (in the kernel's layout and
    dtype, PEFT's merge arithmetic); same tree structure; differentiable in ``adapter`` and jittable.

    ``scale`` multiplies every module's ``alpha / r`` (``set_scale``; a traced value is fine).
    ``key`` applies rank and module dropout as in PEFT's training forward (one draw per module).
    """
    if isinstance(scale, (int, float)):
        check_scale("merge: scale", scale)
    by_path = {target.path: (module, target) for module, target in adapter.targets}
    keys = (
        dict(zip(sorted(dict(adapter.targets)), jax.random.split(key, len(by_path)), strict=True))
        if key is not None
        else {}
    )

    def replace(path: Any, leaf: Any) -> Any:
        names = _leaf_names(path)
        module, target = by_path.get(names[:-1], (None, None))
        if target is None or names[-1] != target.leaf:
            return leaf
        delta = delta_weight(adapter, module, scale=scale, key=keys.get(module))
        if tuple(delta.shape) != tuple(leaf.shape):
            raise ValueError(
                f"{module}.{target.leaf}: shape {tuple(leaf.shape)} does not fit the adapter's {delta.shape}"
            )
        return (leaf + delta).astype(leaf.dtype)

    present = {path for _, _, path in _kernels(params).values()}
    missing = sorted(module for module, target in adapter.targets if target.path not in present)
    if missing:
        raise ValueError(f"the adapter targets modules these params lack: {missing}")
    return jax.tree_util.tree_map_with_path(replace, params)


def save_pretrained(adapter: Adapter, directory: str | os.PathLike) -> None:
    """PEFT's files (``adapter_config.json`` + ``adapter_model.safetensors``; a non-default adapter
    name goes to ``directory/<name>/``), written crash-safely; ``PeftModel.from_pretrained`` on the
    torch twin of the model loads them."""
    tensors = {k: jax.device_get(v) for k, v in adapter.state_dict().items()}
    if not tensors:
        raise ValueError("nothing to save: the adapter holds no factors")
    save_adapters(directory, {adapter.adapter_name: (adapter.config, save(tensors, SAFETENSORS_METADATA))})


def read_config(directory: str | os.PathLike) -> LycorisConfig:
    """The adapter config of a PEFT directory (``lycoris_core``'s checks and errors)."""
    return read_adapter_files(directory).config


def from_pretrained(
    directory: str | os.PathLike,
    params: Any,
    *,
    adapter_name: str = "default",
    kinds: Mapping[str, KindSpec] | None = None,
    output_modules: Sequence[str] = ("lm_head",),
    autocast_adapter_dtype: bool = True,
    allow_nonfinite: bool = False,
    rename: Rename = None,
) -> Adapter:
    """Load a PEFT adapter directory for ``params`` (e.g. one PEFT saved for the torch twin).

    Every key, factor set, shape and dtype is checked against the plans for ``params`` before any
    array is made; errors name the file (:class:`lycoris_core.CheckpointError`). Values are cast to
    the adapter dtype (float32 for a bf16/fp16 base).
    """
    check_adapter_name(adapter_name)
    files = read_adapter_files(directory)
    config = files.config
    if config.peft_type not in _DELTA:
        raise CheckpointError(files.weights, f"the pytree API loads LOHA and LOKR adapters, got {config.peft_type!r}")
    names = LOHA_FACTORS if config.peft_type == "LOHA" else LOKR_FACTORS
    tensors = read_checkpoint(files, names, load_file, lambda t: bool(jnp.isfinite(t).all()), allow_nonfinite)
    try:
        targets = _targets(params, config, kinds, output_modules, rename)
    except NoMatchingModuleError as err:
        raise NoMatchingModuleError(f"{os.fspath(directory)}: the adapter's config: {err}") from None
    kernels = _kernels(params, rename)
    try:
        by_module, other = check_checkpoint(
            {m: t.plan for m, t in targets.items()}, {k: tuple(v.shape) for k, v in tensors.items()}, names, kernels
        )
    except ValueError as err:
        raise CheckpointError(files.weights, str(err)) from None
    if other:
        raise CheckpointError(files.weights, f"keys that are no {config.peft_type} factors: {sorted(other.values())}")
    factors = {
        module: {
            name: jnp.asarray(tensors[key], functional.adapter_dtype(kernels[module][1].dtype, autocast_adapter_dtype))
            for name, key in by_module[module].items()
        }
        for module in targets
    }
    return _adapter(factors, targets, config, adapter_name)
