"""The one tolerance table, keyed by (dtype, operation); a JAX-only mode has dtype rows of its own
(``"bf16+branch_base"``). Errors are measured relative to the
largest magnitude of the reference (``atol + rtol * max|ref|``), so near-zero elements do not
inflate them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TOLERANCES", "Tolerance", "tolerance"]


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    why: str


_FP32_MATH = Tolerance(
    2e-6, 0.0, "fp32 ΔW: XLA and ATen associate the matmul/einsum/kron sums differently (a few ulp)."
)
_FP32_FWD = Tolerance(
    1e-5, 1e-6, "fp32 forward: base matmul/conv plus delta branch, each with its own summation order."
)
_LOW_FWD = {
    "bf16": Tolerance(
        1.6e-2, 0.0, "bf16 output: one rounding of the fp32 sum to bf16 (2^-7 relative) may land on either side."
    ),
    "fp16": Tolerance(
        2e-3, 0.0, "fp16 output: one rounding of the fp32 sum to fp16 (2^-10 relative) may land on either side."
    ),
}
_LOW_MERGE = {
    "bf16": Tolerance(
        8e-3, 0.0, "bf16 merged weight: bf16(W + ΔW) rounded once; an fp32 ulp of ΔW can flip one bf16 ulp."
    ),
    "fp16": Tolerance(
        1e-3, 0.0, "fp16 merged weight: fp16(W + ΔW) rounded once; an fp32 ulp of ΔW can flip one fp16 ulp."
    ),
}

TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("fp32", "delta_weight"): _FP32_MATH,
    ("fp32", "rank_dropout_mask"): _FP32_MATH,
    ("fp32", "forward"): _FP32_FWD,
    ("fp32", "scale_ops"): _FP32_FWD,
    ("fp32", "multi_adapter"): _FP32_FWD,
    ("fp32", "disabled"): Tolerance(
        1e-5, 1e-6, "Disabled adapters: the base output after a merge/unmerge round trip (W + ΔW - ΔW ≈ W)."
    ),
    ("fp32", "merge"): Tolerance(1e-6, 0.0, "fp32 merged weight W + ΔW: ΔW differs by a few ulp."),
    ("fp32", "unmerge"): Tolerance(1e-6, 0.0, "fp32 W + ΔW - ΔW' is not exactly W; both twins round alike."),
    ("fp32", "grad"): Tolerance(
        2e-5, 0.0, "fp32 gradients: reverse-mode sums over batch and spatial axes in different orders."
    ),
    ("fp32", "save_load"): _FP32_FWD,
    ("fp32", "init"): Tolerance(0.0, 0.0, "Zero-initialised factors give an exactly zero ΔW in every framework."),
    ("fp32", "safe_merge_nan"): Tolerance(0.0, 0.0, "A refused merge must leave the weights bit-identical."),
    ("fp32", "safe_merge_inf"): Tolerance(0.0, 0.0, "A refused merge must leave the weights bit-identical."),
}
for _dtype in ("bf16", "fp16"):
    for _op in ("forward", "scale_ops", "multi_adapter", "save_load"):
        TOLERANCES[(_dtype, _op)] = _LOW_FWD[_dtype]
    for _op in ("merge", "unmerge"):
        TOLERANCES[(_dtype, _op)] = _LOW_MERGE[_dtype]
    for _op in ("delta_weight", "rank_dropout_mask", "init", "safe_merge_nan", "safe_merge_inf"):
        TOLERANCES[(_dtype, _op)] = TOLERANCES[("fp32", _op)]  # adapters and ΔW stay fp32
    TOLERANCES[(_dtype, "grad")] = Tolerance(0.0, 0.0, "Not measured in low precision: gradients are compared in fp32.")
    TOLERANCES[(_dtype, "disabled")] = Tolerance(
        _LOW_FWD[_dtype].rtol,
        0.0,
        "Disabled adapters: the base layer alone after a low-precision merge/unmerge round trip.",
    )


# branch_dtype="base": ΔW (formed in fp32) and the branch input are rounded to the low dtype and the
# branch matmul runs there, so the forward holds two more roundings than PEFT's fp32 branch.
_BASE_FWD = {
    "bf16": Tolerance(
        3.2e-2, 0.0, "bf16 branch (branch_dtype='base'): ΔW, x and the branch rounded to bf16 too (4 ulps of 2^-7)."
    ),
    "fp16": Tolerance(
        4e-3, 0.0, "fp16 branch (branch_dtype='base'): ΔW, x and the branch rounded to fp16 too (4 ulps of 2^-10)."
    ),
}
for _dtype in ("bf16", "fp16"):
    for (_d, _op), _tol in list(TOLERANCES.items()):
        if _d == _dtype:
            TOLERANCES[(f"{_dtype}+branch_base", _op)] = _tol
    for _op in ("forward", "scale_ops", "multi_adapter"):
        TOLERANCES[(f"{_dtype}+branch_base", _op)] = _BASE_FWD[_dtype]

# Forward paths (lycoris_core.paths), both twins: "peft" is PEFT's arithmetic; "merged" adds ΔW to
# W before one call; "factored" never forms ΔW. In fp32 each agrees with PEFT to 1e-6 of the
# largest output / gradient; low precision keeps its rows (one output rounding dominates).
_PATH_FP32 = Tolerance(
    1e-6,
    0.0,
    "fp32 forward path: W + ΔW rounded once, or ΔW's product re-associated; a few ulp of the output. "
    "Gradients: a factored LoKr conv sums W1's gradient per sample, then over samples, as ΔW's weight "
    "gradient does (all paths: 9.0e-7 at most; one long sum over samples x positions measured 1.5e-6).",
)
for _path in ("peft", "merged", "factored"):
    for (_d, _op), _tol in list(TOLERANCES.items()):
        if _d in ("fp32", "bf16", "fp16"):
            TOLERANCES[(f"{_d}+{_path}", _op)] = _tol
    for _op in ("forward", "scale_ops", "multi_adapter", "save_load", "grad"):
        TOLERANCES[(f"fp32+{_path}", _op)] = _PATH_FP32


def tolerance(dtype: str, op: str) -> Tolerance:
    return TOLERANCES[(dtype, op)]
