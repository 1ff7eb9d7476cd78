"""Measuring and asserting agreement: one rule, one helper.

Every comparison is ``max|ours - ref| <= (k · e_peft + floor) · max|ref|``, with ``k`` and ``floor``
from the tolerance row (``parity_tests.tolerances``). Against the float64 reference (PEFT's
arithmetic in float64), ``e_peft`` is PEFT's own relative error against it at the same step: ours
may be ``k`` times as far off as PEFT is, plus a floor. Against PEFT itself (or an exact value),
``e_peft`` is 0 by definition and the floor is the whole bound (0: bit-identical).

A :class:`Cell` (one case, front end and operation) holds one :class:`Check` per compared value and
column; it reports the worst relative error over them, with where it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from parity_tests.tolerances import tolerance

__all__ = [
    "Cell",
    "Check",
    "ParityError",
    "assert_cell",
    "assert_close",
    "assert_rounded",
    "check",
    "measure",
    "relative",
    "to_numpy",
]


def to_numpy(x: Any) -> np.ndarray:
    """torch tensors, jax arrays and numpy arrays -> float64 numpy (bf16 widened exactly)."""
    if hasattr(x, "detach"):
        x = x.detach().double().cpu().numpy()
    return np.asarray(np.asarray(x).astype(np.float64))


def dtype_name(x: Any) -> str:
    """``"bfloat16"``, ``"float32"``... for a torch tensor, jax or numpy array."""
    return str(x.dtype).removeprefix("torch.")


def relative(ours: Any, ref: Any, scale: float | None = None) -> tuple[float, float, tuple[int, ...]]:
    """``(max abs error, max abs error / scale, index of the largest error)``; ``scale`` defaults to
    ``max|ref|``. NaN or inf where the reference is finite is an infinite error; a zero reference
    gives a relative error of 0 (equal) or inf."""
    a, b = to_numpy(ours), to_numpy(ref)
    if a.shape != b.shape:
        return math.inf, math.inf, ()
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    max_abs = float(diff.max()) if diff.size else 0.0
    if scale is None:
        finite = np.abs(b[np.isfinite(b)])
        scale = float(finite.max()) if finite.size else 0.0
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    where = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape)) if diff.size else ()
    return max_abs, rel, where


@dataclass
class Check:
    """One compared value of one column: its error, PEFT's own error at the same step and the bound
    ``k · e_peft + floor``, where ``e_peft`` is PEFT's worst own error in the cell (``peft_scale``, set
    by :meth:`Cell.add`): one operation's values share one rounding scale."""

    label: str
    max_abs: float
    rel: float
    peft_rel: float | None
    k: float
    floor: float
    where: tuple[int, ...] = ()
    peft_scale: float = 0.0

    @property
    def allowed(self) -> float:
        return self.k * max(self.peft_scale, self.peft_rel or 0.0) + self.floor

    @property
    def passed(self) -> bool:
        return self.rel <= self.allowed


@dataclass
class Cell:
    """One (case, front end, operation) result. ``row`` is the tolerance table's dtype row."""

    case: str
    op: str
    row: str
    checks: list[Check] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    note: str = ""
    #: ``(substring, note)``: a known library bug makes the failures containing ``substring`` expected
    #: (``parity_tests.cases.EXPECTED_FAILURES``); the cell fails if they stop happening.
    xfail: tuple[str, str] | None = None

    def add(self, check: Check) -> Check:
        """Record ``check``; every check compared with PEFT's error scales with PEFT's worst in the cell."""
        self.checks.append(check)
        scale = max((c.peft_rel for c in self.checks if c.peft_rel is not None), default=0.0)
        for c in self.checks:
            if c.peft_rel is not None:
                c.peft_scale = scale
        return check

    def problems(self) -> list[str]:
        """Every failed check and recorded failure, except the expected ones; an expected failure that
        did not happen is a problem too (the entry must go)."""
        found = [_describe(c) for c in self.failed_checks()] + self.failures
        if self.xfail is None:
            return found
        what, note = self.xfail
        rest = [p for p in found if what not in p]
        if len(rest) == len(found):
            rest.append(f"expected to fail ({what}: {note}) but did not: remove the EXPECTED_FAILURES entry")
        return rest

    @property
    def passed(self) -> bool:
        return not self.problems()

    @property
    def expected_failure(self) -> bool:
        """Passed only because its failures are the expected ones."""
        return self.xfail is not None and self.passed

    def _worst(self) -> Check | None:
        return max(self.checks, key=lambda c: (c.rel, c.max_abs), default=None)

    @property
    def max_rel(self) -> float:
        """The worst relative error over every check of the cell."""
        worst = self._worst()
        return worst.rel if worst else 0.0

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.checks), default=0.0)

    @property
    def peft_rel(self) -> float | None:
        """PEFT's own error at the worst check (``None`` where that check has no PEFT column)."""
        worst = self._worst()
        return worst.peft_rel if worst else None

    @property
    def allowed(self) -> float | None:
        worst = self._worst()
        return worst.allowed if worst else None

    @property
    def where(self) -> str:
        worst = self._worst()
        return f"{worst.label} at {worst.where}" if worst else ""

    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def as_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "op": self.op,
            "row": self.row,
            "passed": self.passed,
            "max_rel": self.max_rel,
            "max_abs": self.max_abs,
            "peft_rel": self.peft_rel,
            "allowed": self.allowed,
            "where": self.where,
            "failures": self.failures,
            "expected_failure": self.xfail[1] if self.expected_failure else None,
            "note": self.note.strip(),
            "checks": [
                {
                    "label": c.label,
                    "rel": c.rel,
                    "peft_rel": c.peft_rel,
                    "peft_scale": c.peft_scale,
                    "allowed": c.allowed,
                    "max_abs": c.max_abs,
                }
                for c in self.checks
            ],
        }


def measure(
    cell: Cell,
    label: str,
    ours: Any,
    ref: Any,
    *,
    peft: Any = None,
    against: str = "f64",
    scale: float | None = None,
) -> Check:
    """Compare ``ours`` with ``ref`` into ``cell`` under the row ``(cell.row, cell.op, against)``;
    ``peft``, PEFT's value of the same thing, gives PEFT's own error against ``ref``."""
    max_abs, rel, where = relative(ours, ref, scale)
    if to_numpy(ours).shape != to_numpy(ref).shape:
        cell.failures.append(f"{label}: shape {to_numpy(ours).shape} != {to_numpy(ref).shape}")
    peft_rel = relative(peft, ref, scale)[1] if peft is not None else None
    tol = tolerance(cell.row, cell.op, against)
    return cell.add(Check(label, max_abs, rel, peft_rel, tol.k, tol.floor, where))


def check(cell: Cell, label: str, condition: bool, what: str) -> None:
    """A boolean agreement (e.g. both twins raised, same dtype): a failure is recorded with ``what``."""
    if not condition:
        cell.failures.append(f"{label}: {what}")


class ParityError(AssertionError):
    pass


def _describe(check: Check) -> str:
    peft = (
        ""
        if check.peft_rel is None
        else f", PEFT's own {check.peft_rel:.3e} (worst in the cell {check.peft_scale:.3e})"
    )
    return f"{check.label}: rel err {check.rel:.3e} (abs {check.max_abs:.3e} at {check.where}{peft}; allowed {check.allowed:.3e})"


def assert_cell(cell: Cell) -> None:
    """Raise with case, operation, every failing check (errors, PEFT's own, bound, location) unless ``cell`` passed."""
    if cell.passed:
        return
    tol = tolerance(cell.row, cell.op, "f64")
    lines = cell.problems()
    raise ParityError(
        f"{cell.case} / {cell.op}: worst rel err {cell.max_rel:.3e} ({cell.where}); row {cell.row}: "
        f"ours <= {tol.k:g} x PEFT's own error + {tol.floor:g}. " + "; ".join(lines)
    )


def assert_close(
    case_id: str,
    row: str,
    op: str,
    against: str,
    actual: Any,
    expected: Any,
    ref_scale: float | None = None,
    record: Callable[[Check], None] | None = None,
) -> Check:
    """One comparison outside a matrix cell (the oracle tests): ``max|actual - expected| <= floor ·
    max|expected|`` (or ``· ref_scale``) for the row ``(row, op, against)``; the message names case,
    operation, errors and the worst index. ``record`` sees the :class:`Check` first (error tables)."""
    cell = Cell(case_id, op, row)
    a, e = to_numpy(actual), to_numpy(expected)
    if a.shape != e.shape:
        raise ParityError(f"{case_id} [{op}]: shape {a.shape}, reference {e.shape}")
    if not np.isfinite(e).all():
        raise ParityError(f"{case_id} [{op}]: the reference is not finite")
    result = measure(cell, op, a, e, against=against, scale=ref_scale)
    if record is not None:
        record(result)
    if not result.passed:
        idx = result.where
        raise ParityError(f"{case_id} [{op}]: {_describe(result)}: ours {a[idx]!r}, reference {e[idx]!r}")
    return result


def assert_rounded(actual: Any, exact: Any, what: str, tie: float = 1e-6) -> None:
    """``actual`` (bf16/fp16/fp32) is ``exact`` (a float64 reference computed independently) rounded once
    to ``actual``'s dtype: equal to ``round(exact)`` element for element, except within ``tie · max|exact|``
    of a rounding midpoint, where float32 arithmetic before the rounding may land on either neighbour."""
    import ml_dtypes

    names = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
    dtype = names[dtype_name(actual)]
    a, e = to_numpy(actual), to_numpy(exact)
    if a.shape != e.shape:
        raise ParityError(f"{what}: shape {a.shape}, reference {e.shape}")
    rounded = e.astype(dtype).astype(np.float64)
    other = np.where(
        rounded > e,
        np.nextafter(rounded.astype(dtype), dtype(-np.inf)),
        np.nextafter(rounded.astype(dtype), dtype(np.inf)),
    )
    midpoint = (rounded + other.astype(np.float64)) / 2
    near_tie = np.abs(e - midpoint) <= tie * np.abs(e).max()
    wrong = (a != rounded) & ~(near_tie & (a == other.astype(np.float64)))
    if wrong.any():
        idx = tuple(int(i) for i in np.argwhere(wrong)[0])
        raise ParityError(
            f"{what}: {int(wrong.sum())} of {a.size} elements are not the exact value rounded to {dtype_name(actual)}; "
            f"first at {idx}: got {a[idx]!r}, exact {e[idx]!r}, rounded {rounded[idx]!r}"
        )
