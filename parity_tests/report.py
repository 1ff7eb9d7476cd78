"""The parity report: a table (case x operation -> max abs, max rel, pass/fail) as text, Markdown and JSON."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence

from lycoris_core._io import atomic_write_text
from parity_tests.compare import Cell
from parity_tests.tolerances import TOLERANCES

__all__ = ["summary_by_dtype_op", "write_report"]


def _fmt(x: float) -> str:
    return f"{x:.2e}"


def summary_by_dtype_op(cells: Sequence[Cell]) -> dict[str, dict[str, float]]:
    """Largest measured error per ``dtype/op``."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"max_abs": 0.0, "max_rel": 0.0, "cells": 0})
    for c in cells:
        row = out[f"{c.dtype}/{c.op}"]
        row["max_abs"] = max(row["max_abs"], c.max_abs)
        row["max_rel"] = max(row["max_rel"], c.max_rel)
        row["cells"] += 1
    return dict(sorted(out.items()))


def markdown(cells: Sequence[Cell], skipped: Sequence[tuple[str, str]]) -> str:
    failed = [c for c in cells if not c.passed]
    lines = [
        "# Parity report: lycoris_jax vs lycoris_torch vs PEFT",
        "",
        f"{len(cells)} cells, {len(cells) - len(failed)} passed, {len(failed)} failed. "
        "Errors are the worst over the column pairs (jax-torch, torch-peft, save/load directions); "
        "relative errors are relative to the largest reference magnitude.",
        "",
        "| case | operation | max abs | max rel | result | where / note |",
        "|---|---|---|---|---|---|",
    ]
    for c in cells:
        lines.append(
            f"| {c.case} | {c.op} | {_fmt(c.max_abs)} | {_fmt(c.max_rel)} | {'pass' if c.passed else '**FAIL**'} | "
            f"{(c.where + ' ' + c.note).strip()} |"
        )
    lines += [
        "",
        "## Largest error per (dtype, operation)",
        "",
        "| dtype/op | cells | max abs | max rel | tolerance | why |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in summary_by_dtype_op(cells).items():
        dtype, op = key.split("/")
        tol = TOLERANCES[(dtype, op)]
        lines.append(
            f"| {key} | {row['cells']} | {_fmt(row['max_abs'])} | {_fmt(row['max_rel'])} | atol {tol.atol:g} + rtol {tol.rtol:g} | {tol.why} |"
        )
    lines += ["", "## Combinations left out", "", "| case | reason |", "|---|---|"]
    lines += [f"| {cid} | {reason} |" for cid, reason in skipped]
    return "\n".join(lines) + "\n"


def text_table(cells: Sequence[Cell]) -> str:
    width = max((len(c.case) for c in cells), default=10)
    rows = [f"{'case':<{width}}  {'operation':<18} {'max abs':>9} {'max rel':>9}  result"]
    for c in cells:
        rows.append(
            f"{c.case:<{width}}  {c.op:<18} {_fmt(c.max_abs):>9} {_fmt(c.max_rel):>9}  {'pass' if c.passed else 'FAIL ' + c.note.strip()}"
        )
    return "\n".join(rows)


def write_report(cells: Sequence[Cell], skipped: Sequence[tuple[str, str]], out_dir: str) -> tuple[str, str]:
    """Write ``parity_report.md`` and ``parity_report.json`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    md_path, json_path = os.path.join(out_dir, "parity_report.md"), os.path.join(out_dir, "parity_report.json")
    atomic_write_text(md_path, markdown(cells, skipped))
    payload = {
        "cells": [c.as_dict() for c in cells],
        "summary": summary_by_dtype_op(cells),
        "skipped": [{"case": cid, "reason": reason} for cid, reason in skipped],
        "passed": all(c.passed for c in cells),
    }
    atomic_write_text(json_path, json.dumps(payload, indent=2, default=float) + "\n")
    return md_path, json_path
