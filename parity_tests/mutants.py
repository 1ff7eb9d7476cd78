"""Plausible bugs the parity matrix must catch, planted one at a time (``python -m parity_tests --mutants``).

Each mutant patches the functions or attributes named by its dotted ``targets`` in-process
(``unittest.mock.patch``, restored afterwards) with ``make(original)``. A mutant patches both twins
only for a bug both would share (they are written alike): then only the independent columns (PEFT,
and PEFT's arithmetic in float64) can see it. ``cells`` names quick cells (case id and operation)
that must catch it: ``tests/parity/test_mutants.py`` runs only those in CI; ``--mutants`` runs the
whole quick matrix under each mutant and reports every cell that caught it.
"""

from __future__ import annotations

import contextlib
import pkgutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from unittest import mock

__all__ = ["MUTANTS", "Mutant", "planted", "run_mutant"]


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
    return lambda pattern_keys, key: next((p for p in pattern_keys if key.endswith(p)), key)


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
        "rank/alpha patterns match any name suffix ('ayer' matches 'layer'), not a dotted one (both twins)",
        _suffix_match,
        (("loha-linear-fp32-patterns", "forward"),),
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


@contextlib.contextmanager
def planted(mutant: Mutant) -> Iterator[None]:
    """``mutant`` patched in (every target), restored on exit."""
    with contextlib.ExitStack() as stack:
        for target in mutant.targets:
            stack.enter_context(mock.patch(target, new=mutant.make(pkgutil.resolve_name(target))))
        yield


def run_mutant(mutant: Mutant, cases: Sequence[Any], ops: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """The ``"<cell id> / <op>"`` of every cell of ``cases`` that fails under ``mutant`` (``ops``: per
    case id, the operations to run; default all)."""
    from parity_tests.runner import run_case

    caught = []
    with planted(mutant):
        for case in cases:
            for cell in run_case(case, (ops or {}).get(case.id)):
                if not cell.passed:
                    caught.append(f"{cell.case} / {cell.op}")
    return caught
