"""The parity report: a table (cell -> our worst error against float64, PEFT's own, the bound,
pass/fail) as text, Markdown and JSON, and the largest errors per tolerance row."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from lycoris_core._io import atomic_write_text
from parity_tests.compare import Cell
from parity_tests.tolerances import tolerance

__all__ = ["summary_by_row_op", "text_table", "write_report"]


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def summary_by_row_op(cells: Sequence[Cell]) -> dict[str, dict[str, Any]]:
    """Per ``row/op``: the worst error of ours against float64 and of PEFT's own, the largest ratio
    ours / PEFT's (where PEFT's error is not zero), the largest excess over ``k · PEFT's``, the worst cell."""
    out: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"cells": 0, "max_rel": 0.0, "max_peft_rel": 0.0, "max_ratio": 0.0, "max_excess": 0.0, "worst": ""}
    )
    for c in cells:
        row = out[f"{c.row}/{c.op}"]
        row["cells"] += 1
        tol = tolerance(c.row, c.op, "f64")
        for chk in c.checks:
            if chk.peft_rel is None:
                continue
            if chk.rel > row["max_rel"]:
                row["max_rel"], row["worst"] = chk.rel, f"{c.case}: {chk.label}"
            row["max_peft_rel"] = max(row["max_peft_rel"], chk.peft_rel)
            if chk.peft_rel > 0 and math.isfinite(chk.rel):
                row["max_ratio"] = max(row["max_ratio"], chk.rel / chk.peft_rel)
            row["max_excess"] = max(row["max_excess"], chk.rel - tol.k * chk.peft_rel)
    return dict(sorted(out.items()))


def markdown(cells: Sequence[Cell], skipped: Sequence[tuple[str, str]]) -> str:
    failed = [c for c in cells if not c.passed]
    lines = [
        "# Parity report: lycoris_jax (NNX, Linen, pytree) and lycoris_torch vs PEFT",
        "",
        f"{len(cells)} cells, {len(cells) - len(failed)} passed, {len(failed)} failed. Each cell's error is the "
        "worst relative error (to the largest reference magnitude) over its checks against PEFT's arithmetic in "
        "float64; 'PEFT' is PEFT's own error at that check, 'allowed' its bound (k · PEFT's + floor).",
        "",
        "| case | operation | ours vs f64 | PEFT vs f64 | allowed | result | where / note |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        note = " ".join([c.where, *c.failures, c.note]).strip().replace("|", "\\|")
        lines.append(
            f"| {c.case} | {c.op} | {_fmt(c.max_rel)} | {_fmt(c.peft_rel)} | {_fmt(c.allowed)} | "
            f"{'pass' if c.passed else '**FAIL**'} | {note} |"
        )
    lines += [
        "",
        "## Largest errors per (row, operation)",
        "",
        "| row/op | cells | ours vs f64 | PEFT vs f64 | ours / PEFT | ours - k·PEFT | k | floor | why |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in summary_by_row_op(cells).items():
        dtype, op = key.split("/")
        tol = tolerance(dtype, op, "f64")
        lines.append(
            f"| {key} | {row['cells']} | {_fmt(row['max_rel'])} | {_fmt(row['max_peft_rel'])} | "
            f"{row['max_ratio']:.2f} | {_fmt(row['max_excess'])} | {tol.k:g} | {tol.floor:.2e} | {tol.why} |"
        )
    lines += ["", "## Combinations left out", "", "| case | reason |", "|---|---|"]
    lines += [f"| {cid} | {reason} |" for cid, reason in skipped]
    return "\n".join(lines) + "\n"


def text_table(cells: Sequence[Cell]) -> str:
    width = max((len(c.case) for c in cells), default=10)
    rows = [f"{'case':<{width}}  {'operation':<18} {'ours/f64':>9} {'PEFT/f64':>9} {'allowed':>9}  result"]
    for c in cells:
        result = (
            "pass"
            if c.passed
            else "FAIL " + "; ".join([*(f"{k.label} {k.rel:.2e}" for k in c.failed_checks()), *c.failures])
        )
        rows.append(
            f"{c.case:<{width}}  {c.op:<18} {_fmt(c.max_rel):>9} {_fmt(c.peft_rel):>9} {_fmt(c.allowed):>9}  {result}"
        )
    return "\n".join(rows)


def write_report(cells: Sequence[Cell], skipped: Sequence[tuple[str, str]], out_dir: str) -> tuple[str, str]:
    """Write ``parity_report.md`` and ``parity_report.json`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    md_path, json_path = os.path.join(out_dir, "parity_report.md"), os.path.join(out_dir, "parity_report.json")
    atomic_write_text(md_path, markdown(cells, skipped))
    payload = {
        "cells": [c.as_dict() for c in cells],
        "summary": summary_by_row_op(cells),
        "skipped": [{"case": cid, "reason": reason} for cid, reason in skipped],
        "passed": all(c.passed for c in cells),
    }
    atomic_write_text(json_path, json.dumps(payload, indent=2, default=float) + "\n")
    return md_path, json_path
