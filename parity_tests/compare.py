"""Measuring and asserting agreement: one helper, whose failure message names case, operation,
columns, max abs/rel error and where."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from parity_tests.tolerances import tolerance

__all__ = ["Cell", "ParityError", "assert_cell", "measure", "to_numpy"]


def to_numpy(x: Any) -> np.ndarray:
    """torch tensors, jax arrays and numpy arrays -> float64 numpy."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


@dataclass
class Cell:
    """One (case, operation) result: the worst error over its column pairs."""

    case: str
    op: str
    dtype: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    where: str = ""
    passed: bool = True
    note: str = ""
    pairs: dict[str, tuple[float, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(cell: Cell, pair: str, ours: Any, ref: Any) -> None:
    """Compare ``ours`` with ``ref`` (column pair ``pair``, e.g. ``"jax-torch"``) into ``cell``."""
    a, b = to_numpy(ours), to_numpy(ref)
    if a.shape != b.shape:
        cell.passed = False
        cell.note += f" {pair}: shape {a.shape} != {b.shape};"
        cell.max_abs = cell.max_rel = float("inf")
        return
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, np.abs(a - b))
    scale = float(np.nanmax(np.abs(b))) if b.size and not np.all(np.isnan(b)) else 0.0
    max_abs = float(np.nanmax(diff)) if diff.size else 0.0
    if np.isnan(diff).any():
        max_abs = float("inf")
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    tol = tolerance(cell.dtype, cell.op)
    ok = max_abs <= tol.atol + tol.rtol * scale
    cell.pairs[pair] = (max_abs, max_rel)
    if max_abs >= cell.max_abs:
        cell.max_abs, cell.max_rel = max_abs, max_rel
        index = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape)) if diff.size else ()
        cell.where = f"{pair} at {index}"
    cell.passed &= bool(ok)


def check(cell: Cell, pair: str, condition: bool, what: str) -> None:
    """A boolean agreement (e.g. both twins raised): recorded as pass/fail with a note."""
    if not condition:
        cell.passed = False
        cell.note += f" {pair}: {what};"


class ParityError(AssertionError):
    pass


def assert_cell(cell: Cell) -> None:
    """Raise with case, operation, errors and location unless ``cell`` passed."""
    if not cell.passed:
        tol = tolerance(cell.dtype, cell.op)
        raise ParityError(
            f"{cell.case} / {cell.op}: max abs err {cell.max_abs:.3e}, max rel err {cell.max_rel:.3e} "
            f"({cell.where}); allowed atol {tol.atol:g} + rtol {tol.rtol:g}·max|ref|. {cell.note.strip()}"
        )
