"""The one tolerance table, keyed by ``(row, operation, against)``, each row with a reason.

``row`` is a dtype (``"fp32"``), a dtype with a mode (``"bf16+branch_base"``, ``"fp32+factored"``)
or an oracle dtype; ``against`` says what the value is compared with:

- ``"f64"``: PEFT's arithmetic in float64. The bound is ``k · e_peft + floor`` where ``e_peft`` is
  PEFT's own error against the same float64 value (fp32/bf16/fp16 rounding), all relative to the
  largest reference magnitude. It holds for any input scale: long sums of large terms make PEFT's
  own error large, and ours is allowed a fixed multiple of it, not a fixed number.
- ``"peft"``: PEFT itself in the case's dtype, where bit-identical arithmetic is claimed (the
  ``"peft"`` forward path; ``check`` compares each module's ΔW with PEFT's); ``"exact"``: an exact
  value (zero ΔW, a weight a refused merge left alone).
- ``"oracle"`` / ``"oracle_jax"``: the PEFT oracle tests' direct comparisons with PEFT
  (``max|ours - PEFT| <= floor · max|PEFT|``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MATRIX_OPS", "TOLERANCES", "Tolerance", "tolerance"]


@dataclass(frozen=True)
class Tolerance:
    """``|ours - ref| <= (k · e_peft + floor) · max|ref|``."""

    k: float
    floor: float
    why: str

    def allowed(self, peft_error: float = 0.0) -> float:
        return self.k * peft_error + self.floor


MATRIX_OPS = (
    "init",
    "delta_weight",
    "forward",
    "scale_ops",
    "merge",
    "unmerge",
    "safe_merge_nan",
    "safe_merge_inf",
    "multi_adapter",
    "disabled",
    "rank_dropout_mask",
    "grad",
    "save_load",
)
_EXACT = Tolerance(0.0, 0.0, "Exact: zero-initialised factors give ΔW = 0; a refused merge leaves W bit-identical.")
_BIT_IDENTICAL = Tolerance(
    0.0, 0.0, "forward_path='peft' is PEFT's arithmetic, op for op: bit-identical to PEFT in every dtype."
)

TOLERANCES: dict[tuple[str, str, str], Tolerance] = {}

# ------------------------------------------------------------------------------- the matrix, against float64
# ``e_peft`` is PEFT's worst own error in the cell (one operation: e.g. every factor gradient of one
# backward pass), relative to the largest reference magnitude. Rows go by what the arithmetic is, so
# every forward path shares its dtype's rows; k is the smallest the full matrix allowed (random-normal
# and arange inputs, two thread settings), the floor a whole number of units in the last place (ulp:
# 2^-23 fp32, 2^-7 bf16, 2^-10 fp16) at least 1.4x the largest measured excess over k x PEFT's, room
# for another machine's summation order. docs/guide/tour.md's parity section lists the numbers.
_DELTA = Tolerance(
    1.0,
    2**-22,
    "ΔW (every dtype: factors and ΔW are fp32): the same products and r-term sums as PEFT's, some associated "
    "differently (einsum vs matmul); 2 ulp.",
)
_FP32_OUT = Tolerance(
    1.0,
    2**-20,
    "fp32 outputs and weights: base plus branch, W + ΔW rounded once, or ΔW's product re-associated "
    "(merged/factored); the same sums as PEFT's in another order: 8 ulp of the largest value (measured: 3.3e-7).",
)
_FP32_GRAD = Tolerance(
    4.0,
    2**-20,
    "fp32 factor gradients: sums over batch x positions x the other factor, ordered by each path (a factored "
    "LoKr conv per sample, XLA's and ATen's reductions); long sums of large terms (arange inputs) make PEFT's own "
    "error large and ours stays within 3.8x it, plus 8 ulp where PEFT's is small by luck (measured: 2.4e-7).",
)
_ULP = {"bf16": 2**-7, "fp16": 2**-10}
for _dtype, _ulp in _ULP.items():
    _LOW_OUT = Tolerance(
        1.0,
        _ulp,
        f"{_dtype} outputs and merged weights: the same roundings to {_dtype} as PEFT's (base output, sum, merged "
        f"weight), but a different fp32 sum before one of them may land on the neighbour: 1 {_dtype} ulp.",
    )
    _LOW_GRAD = Tolerance(
        1.5,
        2**-21,
        f"{_dtype} base, factor gradients: fp32 adapter arithmetic from a {_dtype} cotangent, as PEFT's; 1.5x "
        "PEFT's own error (different fp32 sum orders) plus 4 fp32 ulp.",
    )
    _BASE_OUT = Tolerance(
        1.0,
        4 * _ulp,
        f"{_dtype} branch (branch_dtype='base'): ΔW, the branch's sum and its output are rounded to {_dtype} too, "
        f"roundings PEFT's fp32 branch does not make: 4 {_dtype} ulp (measured: 1.2 bf16 / 2.0 fp16 ulp).",
    )
    _PYTREE_OUT = Tolerance(
        1.0,
        2 * _ulp,
        f"{_dtype} pytree outputs: pytree.merge rounds W + ΔW to {_dtype} (PEFT's merge does, its unmerged forward "
        f"does not), one more rounding before the model's: 2 {_dtype} ulp (measured: 0.8 bf16 / 1.0 fp16 ulp).",
    )
    _BASE_GRAD = Tolerance(
        1.0,
        4 * _ulp,
        f"{_dtype} branch (branch_dtype='base') gradients: the branch's transposed matmuls take {_dtype} operands "
        f"and round their sums to {_dtype}: 4 {_dtype} ulp of the largest factor gradient.",
    )
    _PYTREE_GRAD = Tolerance(
        1.0,
        2**-7,
        f"{_dtype} pytree gradients: the model differentiates the kernel merged in {_dtype} (pytree.merge rounds "
        f"W + ΔW to the kernel dtype), so dW = xᵀdy is rounded to {_dtype} before it reaches the factors: 2^-7.",
    )
    _TPU_OUT = Tolerance(
        1.0,
        2 * _ulp,
        f"{_dtype} merged path with a TPU's fold rules (lycoris_jax.compiling_for('tpu')): W + ΔW is rounded to "
        f"{_dtype} before the layer's matmul, as a TPU's matrix unit rounds a float32 operand at default precision; "
        f"one more rounding than PEFT's: 2 {_dtype} ulp.",
    )
    for _op in MATRIX_OPS:
        _out = {"delta_weight": _DELTA, "rank_dropout_mask": _DELTA, "grad": _LOW_GRAD}.get(_op, _LOW_OUT)
        TOLERANCES[(f"{_dtype}+merged_tpu", _op, "f64")] = {"grad": _LOW_GRAD}.get(
            _op, _out if _out is _DELTA else _TPU_OUT
        )
        for _mode in ("", "+peft", "+merged", "+factored"):
            TOLERANCES[(f"{_dtype}{_mode}", _op, "f64")] = _out
        TOLERANCES[(f"{_dtype}+branch_base", _op, "f64")] = {"grad": _BASE_GRAD}.get(
            _op, _out if _out is _DELTA else _BASE_OUT
        )
        TOLERANCES[(f"{_dtype}+pytree", _op, "f64")] = {"grad": _PYTREE_GRAD}.get(
            _op, _out if _out is _DELTA else _PYTREE_OUT
        )
for _op in MATRIX_OPS:
    _out = {"delta_weight": _DELTA, "rank_dropout_mask": _DELTA, "grad": _FP32_GRAD}.get(_op, _FP32_OUT)
    for _mode in ("", "+peft", "+merged", "+factored", "+pytree", "+merged_tpu"):
        TOLERANCES[(f"fp32{_mode}", _op, "f64")] = _out
# Operations compared exactly (zero ΔW after init, a refused merge) have no float64 comparison.
for (_row, _op, _against), _tol in list(TOLERANCES.items()):
    if _op in ("init", "safe_merge_nan", "safe_merge_inf"):
        TOLERANCES[(_row, _op, "f64")] = _EXACT

# ------------------------------------------------------------------------------- the matrix, exact values
for _row in {key[0] for key in TOLERANCES}:
    for _op in ("init", "safe_merge_nan", "safe_merge_inf"):
        TOLERANCES[(_row, _op, "exact")] = _EXACT
    if _row.endswith("+peft"):
        for _op in MATRIX_OPS:
            TOLERANCES[(_row, _op, "peft")] = _BIT_IDENTICAL

# ------------------------------------------------------------------------------- ``python -m parity_tests check``
TOLERANCES[("fp32", "check", "peft")] = Tolerance(
    0.0,
    2e-6,
    "check DIR: each module's ΔW rebuilt by lycoris_torch, lycoris_jax and PEFT from the same fp32 factors, "
    "relative to max|ΔW|: the same products, r-term sums in different orders.",
)

# ------------------------------------------------------------------------------- the torch oracle, against PEFT
# ``tests/torch/test_peft_oracle.py``: lycoris_torch on forward_path="peft" against PEFT 0.21.2, one layer.
for _op, _tol, _why in (
    ("init", 0.0, "same RNG draws in the same order: bit-identical"),
    ("delta", 1e-6, "same formulas; allows a different matmul/einsum summation order"),
    ("forward", 1e-6, "base(x) + x @ ΔWᵀ, same ops as PEFT"),
    ("merge_weight", 1e-6, "W + ΔW, one rounding per element"),
    ("merge_forward", 1e-6, "forward through the merged weight"),
    ("unmerge_weight", 1e-6, "W + ΔW - ΔW, compared with PEFT's unmerged weight"),
    ("unmerge_vs_orig", 1e-6, "(W + ΔW) - ΔW vs W, relative to max|W + ΔW|: two fp32 roundings"),
    ("scale_forward", 1e-6, "forward after each scale op (scaling is a Python float on both sides)"),
    ("load_forward", 1e-6, "forward after a checkpoint round trip (values are copied exactly)"),
    ("checkpoint", 0.0, "saved tensors are the parameters themselves"),
):
    TOLERANCES[("fp32", _op, "oracle")] = Tolerance(0.0, _tol, f"fp32 {_op}: {_why}.")
for _op, _tol, _why in (
    ("init", 0.0, "PEFT's factors are bf16-rounded (module docstring): equal after rounding ours"),
    ("delta", 1e-6, "adapters are fp32 (autocast), so ΔW is fp32 arithmetic"),
    ("forward", 2**-8, "bf16(fp32(base(x)) + x_fp32 @ ΔWᵀ) on both sides: ≤ 1 ulp of the largest output"),
    ("merge_weight", 2**-8, "bf16(fp32(W) + ΔW), rounded once: ≤ 1 ulp"),
    ("merge_forward", 2**-8, "bf16 conv/matmul with identical bf16 weights"),
    ("unmerge_weight", 2**-8, "bf16(fp32(W') - ΔW), compared with PEFT's: ≤ 1 ulp"),
    ("unmerge_vs_orig", 2**-7, "as fp32: two bf16 roundings, each ≤ half an ulp (2^-8) of max|W + ΔW|"),
    ("scale_forward", 2**-8, "as forward"),
    ("load_forward", 2**-8, "as forward"),
    ("checkpoint", 0.0, "saved tensors are fp32 parameters"),
):
    TOLERANCES[("bf16", _op, "oracle")] = Tolerance(0.0, _tol, f"bf16 {_op}: {_why}.")
TOLERANCES[("fp64", "init", "oracle")] = Tolerance(
    0.0, 0.0, "fp64 init: same RNG draws, float64 factors on both sides."
)
TOLERANCES[("fp64", "grad", "oracle")] = Tolerance(
    0.0, 1e-12, "fp64 gradients: autograd vs PEFT's hand-written backward, summation order only."
)

# ------------------------------------------------------------------------------- the JAX oracle, against PEFT
# ``tests/jax/test_peft_oracle_jax.py``: the NNX twin against PEFT through two-layer torch/NNX mirrors.
for _op, _tol, _why in (
    ("checkpoint", 0.0, "factors go through safetensors unchanged, both directions"),
    ("delta", 1e-6, "same ΔW formulas; matmul/einsum/kron summation order may differ"),
    ("base_forward", 2e-6, "base model alone, torch vs NNX mirror: the floor under 'forward'"),
    ("forward", 2e-6, "base + delta conv/matmul: XLA vs oneDNN accumulation order, through 2 layers"),
    ("merge_weight", 1e-6, "W + ΔW, one fp32 rounding per element on each side"),
    ("merge_forward", 2e-6, "forward through the merged kernels (accumulation order only)"),
    ("unmerge_weight", 1e-6, "W + ΔW - ΔW vs PEFT's unmerged weight: two roundings each side"),
    ("unmerge_vs_orig", 1e-6, "(W + ΔW) - ΔW vs W, relative to max|W + ΔW|: two fp32 roundings"),
    ("scale_forward", 2e-6, "forward after each scale op (scaling is a Python float on both sides)"),
    ("load_forward", 2e-6, "JAX-created adapter loaded by PEFT: forward as in 'forward'"),
    ("grad", 1e-5, "autodiff vs torch autograd: longer reduction chains (loss -> conv -> ΔW -> factor)"),
    ("jit", 1e-6, "nnx.jit vs eager: XLA may fuse/reorder the same fp32 ops"),
):
    TOLERANCES[("fp32", _op, "oracle_jax")] = Tolerance(0.0, _tol, f"fp32 {_op}: {_why}.")
for _op, _tol, _why in (
    ("checkpoint", 0.0, "adapters are fp32 on both sides (autocast): saved unchanged"),
    ("delta", 1e-6, "fp32 factors, so ΔW is fp32 arithmetic as in fp32 cases"),
    ("base_forward", 2**-6, "bf16 base alone: oneDNN and XLA bf16 conv/matmul differ by ≤ 1 ulp per layer"),
    ("forward", 2**-6, "bf16 outputs of a 2-layer bf16 net: 1-ulp flips in layer 1 propagate (≤ 4 ulp)"),
    ("merge_weight", 2**-8, "bf16(fp32(W) + ΔW), rounded once on each side: ≤ 1 ulp of max|W'|"),
    ("merge_forward", 2**-6, "bf16 net with identical bf16 weights: as 'forward'"),
    ("unmerge_weight", 2**-8, "bf16(fp32(W') - ΔW) vs PEFT's: ≤ 1 ulp"),
    ("unmerge_vs_orig", 2**-7, "two bf16 roundings, each ≤ half an ulp (2^-8) of max|W + ΔW|"),
    ("scale_forward", 2**-6, "as 'forward'"),
    ("load_forward", 2**-6, "as 'forward'"),
):
    TOLERANCES[("bf16", _op, "oracle_jax")] = Tolerance(0.0, _tol, f"bf16 {_op}: {_why}.")


def tolerance(row: str, op: str, against: str = "f64") -> Tolerance:
    """The row ``(row, op, against)``; a ``KeyError`` names a missing one."""
    try:
        return TOLERANCES[(row, op, against)]
    except KeyError:
        raise KeyError(f"no tolerance row ({row!r}, {op!r}, {against!r})") from None
