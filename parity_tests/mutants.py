"""Plausible bugs the parity matrix must catch, planted one at a time (``python -m parity_tests --mutants``).

Each mutant patches the functions or attributes named by its dotted ``targets`` in-process
(``unittest.mock.patch``, restored afterwards) with ``make(original)``. A module-level function is
patched under every name the packages bind it to (:func:`bindings`): a module that imported it by
name (``from lycoris_jax.adapted import adapted_call`` in ``lycoris_jax.layer``) calls its own
binding, and a patch of the home module alone would change nothing that runs. Each target counts
its calls: a target nobody calls is a patch that tests nothing, and ``--mutants`` and
``tests/parity/test_mutants.py`` report it as missed. A mutant patches
both twins only for a bug both would share (they are written alike): then only the independent
columns (PEFT, and PEFT's arithmetic in float64) can see it. ``cells`` names quick cells (case id and
operation) that must catch it: the test runs only those in CI; ``--mutants`` runs the whole quick
matrix under each mutant and reports every cell that caught it. A cell catches a mutant by a value
or dtype that disagrees, not by raising (an exception may be the patch's own fault, e.g. a wrong
signature, and would hide a bug the matrix cannot see).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import pkgutil
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from unittest import mock

__all__ = ["LIBRARY", "MUTANTS", "Mutant", "bindings", "caught_by_value", "planted", "run_mutant"]

#: The packages whose functions mutants patch.
LIBRARY = ("lycoris_core", "lycoris_jax", "lycoris_torch")


@dataclass(frozen=True)
class Mutant:
    name: str
    targets: tuple[str, ...]
    what: str
    make: Callable[[Any], Any]
    #: ``((quick case id, operation), ...)`` that must fail under this mutant.
    cells: tuple[tuple[str, str], ...]


def _scaling_squared(original: Any) -> Any:
    return property(lambda plan: (plan.alpha / plan.r) ** 2)


def _scaling_inverted(original: Any) -> Any:
    return property(lambda plan: plan.r / plan.alpha)


def _unscale_resets_squared(original: Any) -> Any:
    def unscale_layer(scaling: Any, plans: Any, active: Any, scale: Any) -> dict:
        new = original(scaling, plans, active, scale)
        if scale is None:
            new.update({n: (plans[n].alpha / plans[n].r) ** 2 for n in active if n in new})
        return new

    return unscale_layer


def _kron_swapped(original: Any) -> Any:
    def kron_factors(factors: Any) -> Any:
        w1, w2 = original(factors)
        return (w2, w1) if tuple(w1.shape) == tuple(w2.shape) else (w1, w2)

    return kron_factors


def _w1_transposed(original: Any) -> Any:
    def kron_factors(factors: Any) -> Any:
        w1, w2 = original(factors)
        return (w1.T if w1.shape[0] == w1.shape[1] else w1), w2

    return kron_factors


def _tucker_axes(original: Any) -> Any:
    return lambda t1, a1, b1, t2, a2, b2, scale: original(t1.swapaxes(0, 1), a1, b1, t2.swapaxes(0, 1), a2, b2, scale)


def _kernel_spatial_swapped(original: Any) -> Any:
    return lambda weight: weight.transpose((*reversed(range(2, weight.ndim)), 1, 0))


def _no_rescale(original: Any) -> Any:
    return lambda keep, *, rescale, dtype: original(keep, rescale=False, dtype=dtype)


def _delta_rounded(original: Any) -> Any:
    def forward_with_weight(base_layer: Any, x: Any, weight: Any, bias: Any = None) -> Any:
        return original(base_layer, x, weight.to(base_layer.weight.dtype).to(weight.dtype), bias)

    return forward_with_weight


def _merge_sign(original: Any) -> Any:
    return lambda layer, names, *, sign=1, **kwargs: original(layer, names, sign=-sign, **kwargs)


def _bias_dropped(original: Any) -> Any:
    return lambda base_layer, x, kernel, bias=None, dtype=None, **kwargs: original(
        base_layer, x, kernel, None, dtype, **kwargs
    )


def _suffix_match(original: Any) -> Any:
    # PEFT's regex without its dot: r"(.*)(pattern)$" instead of r"(.*\.)?(pattern)$" ("lay.r" still
    # matches "layer" as a regex, so the rank stays right and only the alpha goes wrong)
    return lambda pattern_keys, key: next((p for p in pattern_keys if re.match(rf"(.*)({p})$", key)), key)


def _float32_out(original: Any) -> Any:
    import jax.numpy as jnp

    return lambda *args, **kwargs: _to_float32(original(*args, **kwargs), jnp)


def _float32_tree(original: Any) -> Any:
    import jax
    import jax.numpy as jnp

    return lambda *args, **kwargs: jax.tree.map(lambda v: v.astype(jnp.float32), original(*args, **kwargs))


def _to_float32(value: Any, jnp: Any) -> Any:
    return value.astype(jnp.float32) if hasattr(value, "astype") else value


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "scale_squared",
        ("lycoris_core.plan.AdapterPlan.scaling",),
        "an adapter starts with scaling (alpha / r)^2 (both twins: the plan is shared)",
        _scaling_squared,
        (("lokr-linear-fp32-r1", "forward"),),
    ),
    Mutant(
        "scale_inverted",
        ("lycoris_core.plan.AdapterPlan.scaling",),
        "an adapter starts with scaling r / alpha (both twins)",
        _scaling_inverted,
        (("loha-linear-fp32-plain", "forward"),),
    ),
    Mutant(
        "unscale_resets_squared",
        ("lycoris_core.state.unscale_layer",),
        "unscale_layer() resets to (alpha / r)^2; every later operation runs at the wrong scale (both twins)",
        _unscale_resets_squared,
        (("lokr-linear-fp32-r1", "scale_ops"),),
    ),
    Mutant(
        "kron_order",
        ("lycoris_jax.lokr._kron_factors", "lycoris_torch.lokr._kron_factors"),
        "kron(W2, W1) where W1 and W2 have equal shapes (both twins, written alike)",
        _kron_swapped,
        (("lokr-linear_eq-fp32-r16", "delta_weight"),),
    ),
    Mutant(
        "w1_transposed",
        ("lycoris_torch.lokr._kron_factors",),
        "a square W1 (a == c) read transposed (torch twin)",
        _w1_transposed,
        (("lokr-linear_eq-fp32-r16", "forward"),),
    ),
    Mutant(
        "tucker_axes",
        ("lycoris_jax.loha.make_weight_cp",),
        "the CP/Tucker cores hada_t1/t2 contracted with their first two axes swapped (JAX twin)",
        _tucker_axes,
        (("loha-conv2d_3x5-fp32-effconv", "delta_weight"),),
    ),
    Mutant(
        "conv_kernel_layout",
        ("lycoris_jax.functional.to_flax_kernel",),
        "PyTorch -> Flax kernel layout with the spatial axes swapped, (kw, kh, in, out) (JAX)",
        _kernel_spatial_swapped,
        (("loha-conv2d_3x3-bf16-plain-merged", "forward"),),
    ),
    Mutant(
        "rank_dropout_rescale",
        ("lycoris_jax.functional.rank_dropout_rows",),
        "rank dropout keeps rows without dividing by the kept fraction (JAX twin)",
        _no_rescale,
        (("lokr-linear-fp32-r1", "rank_dropout_mask"),),
    ),
    Mutant(
        "delta_in_base_dtype",
        ("lycoris_torch.functional.forward_with_weight",),
        "the delta branch's ΔW rounded to the base layer's dtype (bf16/fp16) before the call (torch twin)",
        _delta_rounded,
        (("lokr-linear-bf16-r1-peft", "forward"),),
    ),
    Mutant(
        "merge_sign",
        ("lycoris_jax.layer.LycorisLayer._merged_weight",),
        "merge subtracts ΔW and unmerge adds it (NNX layer)",
        _merge_sign,
        (("lokr-linear-fp32-r1", "merge"),),
    ),
    Mutant(
        "bias_dropped",
        ("lycoris_jax.functional.call_with_kernel",),
        "the base layer called with a new kernel loses its bias (NNX merged path)",
        _bias_dropped,
        (("loha-linear-fp32-plain-merged", "forward"),),
    ),
    Mutant(
        "alpha_pattern_suffix",
        ("lycoris_core.targets.get_pattern_key",),
        "rank/alpha patterns match any name suffix ('ayer' matches 'layer'), not a dot-aligned one (both twins)",
        _suffix_match,
        (("loha-linear-fp32-patterns", "forward"),),
    ),
    Mutant(
        "adapted_call_output_dtype",
        ("lycoris_jax.adapted.adapted_call",),
        "the adapted call every NNX and Linen layer makes returns float32 for a bf16/fp16 input",
        _float32_out,
        (("loha-conv1d_k3-bf16-plain", "forward"), ("loha-conv1d_k3-bf16-plain-linen", "forward")),
    ),
    Mutant(
        "merge_kernel_output_dtype",
        ("lycoris_jax.adapted.merge_kernel",),
        "the merged kernel pytree.merge builds is float32 for a bf16/fp16 kernel",
        _float32_out,
        (("loha-conv1d_k3-bf16-plain-pytree", "forward"),),
    ),
    Mutant(
        "nnx_output_dtype",
        ("lycoris_jax.layer.LycorisLayer.__call__",),
        "an NNX adapter layer returns float32 for a bf16/fp16 input",
        _float32_out,
        (("loha-conv1d_k3-bf16-plain", "forward"),),
    ),
    Mutant(
        "linen_output_dtype",
        ("lycoris_jax.linen.LycorisModule._intercept",),
        "a Linen layer with an adapter returns float32 for a bf16/fp16 input",
        _float32_out,
        (("loha-conv1d_k3-bf16-plain-linen", "forward"),),
    ),
    Mutant(
        "pytree_output_dtype",
        ("lycoris_jax.pytree.merge",),
        "pytree.merge returns float32 kernels for a bf16/fp16 model",
        _float32_tree,
        (("loha-conv1d_k3-bf16-plain-pytree", "forward"),),
    ),
)


def _counted(value: Any, calls: Counter, target: str) -> Any:
    """``value`` (a function or a property) counting its calls in ``calls[target]``."""
    if isinstance(value, property):
        return property(_counted(value.fget, calls, target), value.fset, value.fdel, value.__doc__)

    @functools.wraps(value)
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[target] += 1
        return value(*args, **kwargs)

    return counted


@functools.cache
def _library_modules() -> tuple[str, ...]:
    """Every module of :data:`LIBRARY`, imported (a module first imported while a patch is in would
    keep the mutant bound for good)."""
    names = []
    for package in LIBRARY:
        names.append(package)
        path = importlib.import_module(package).__path__
        names += [info.name for info in pkgutil.walk_packages(path, f"{package}.")]
    for name in names:
        importlib.import_module(name)
    return tuple(names)


def bindings(target: str) -> tuple[str, ...]:
    """The dotted names the packages bind ``target``'s object to (``target`` itself first); a class
    attribute is its one name."""
    owner_name, _, attr = target.rpartition(".")
    owner = pkgutil.resolve_name(owner_name)
    if not inspect.ismodule(owner):
        return (target,)
    obj = getattr(owner, attr)
    found = [
        f"{name}.{key}"
        for name in _library_modules()
        for key, value in vars(sys.modules[name]).items()
        if value is obj and f"{name}.{key}" != target
    ]
    return (target, *found)


@contextlib.contextmanager
def planted(mutant: Mutant) -> Iterator[Counter]:
    """``mutant`` patched in (every target, under every name the packages bind it to), restored on
    exit; yields the number of calls of each target so far (a target never called tests nothing)."""
    calls: Counter = Counter({target: 0 for target in mutant.targets})
    with contextlib.ExitStack() as stack:
        for target in mutant.targets:
            new = _counted(mutant.make(pkgutil.resolve_name(target)), calls, target)
            for name in bindings(target):
                stack.enter_context(mock.patch(name, new=new))
        yield calls


def caught_by_value(cell: Any) -> bool:
    """``cell`` failed on a value or dtype (not only by raising: a crash may be the patch's own fault)."""
    return any(not problem.startswith(("raised ", "setup raised ")) for problem in cell.problems())


def run_mutant(
    mutant: Mutant, cases: Sequence[Any], ops: dict[str, tuple[str, ...]] | None = None
) -> tuple[list[str], list[str], Counter]:
    """``(caught, crashed, calls)``: the ``"<cell id> / <op>"`` of every cell of ``cases`` that fails
    under ``mutant`` on a value, of those that only raised, and the calls of each target (``ops``: per
    case id, the operations to run; default all)."""
    from parity_tests.runner import run_case

    caught, crashed = [], []
    with planted(mutant) as calls:
        for case in cases:
            for cell in run_case(case, (ops or {}).get(case.id)):
                if not cell.passed:
                    (caught if caught_by_value(cell) else crashed).append(f"{cell.case} / {cell.op}")
    return caught, crashed, calls
