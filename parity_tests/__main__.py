"""``python -m parity_tests [--quick] [--out DIR] [-k SUBSTRING]`` runs the parity matrix and writes
a Markdown + JSON report; ``python -m parity_tests check DIR`` validates an adapter directory and
compares the frameworks on it (exit 0 agree, 1 disagree, 2 unusable input)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

__all__ = ["main"]


def _progress(i: int, n: int, label: str, start: float) -> None:
    width = 30
    done = int(width * i / n)
    elapsed = time.perf_counter() - start
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {elapsed:5.0f}s {label[:60]:<60}")
    sys.stderr.flush()


def run_matrix(quick: bool, out: str, keyword: str | None) -> int:
    from parity_tests.cases import CASES, QUICK, SKIPPED
    from parity_tests.report import summary_by_dtype_op, text_table, write_report
    from parity_tests.runner import run_case

    cases = [c for c in (QUICK if quick else CASES) if keyword is None or keyword in c.id]
    cells = []
    start = time.perf_counter()
    for i, case in enumerate(cases):
        _progress(i, len(cases), case.id, start)
        cells += run_case(case)
    _progress(len(cases), len(cases), "done", start)
    sys.stderr.write("\n")
    print(text_table(cells))
    md, js = write_report(cells, SKIPPED, out)
    failed = [c for c in cells if not c.passed]
    print("\nlargest error per dtype/operation:")
    for key, row in summary_by_dtype_op(cells).items():
        print(f"  {key:<26} max abs {row['max_abs']:.2e}  max rel {row['max_rel']:.2e}  ({row['cells']} cells)")
    print(f"\n{len(cells)} cells in {len(cases)} cases, {time.perf_counter() - start:.0f}s; report: {md}, {js}")
    print(f"parity: {len(cells) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def run_check(directory: str) -> int:
    """Exit 0: every module agrees; 1: some disagree; 2: the directory is unusable (message, no traceback)."""
    from parity_tests.check import check_directory

    try:
        report = check_directory(directory)
    except (ValueError, TypeError, OSError) as err:  # CheckpointError is a ValueError
        print(f"parity_tests check: unusable input: {err}", file=sys.stderr)
        return 2
    print(f"{'module':<40} {'ΔW shape':<18} {'scale':>7} {'|ΔW|max':>9} {'jax-torch':>10} {'torch-peft':>10}  ok")
    for r in report.modules:
        peft_err = (
            ("crash" if r.peft_note and "raises" in r.peft_note else "n/a")
            if r.torch_vs_peft is None
            else f"{r.torch_vs_peft:.1e}"
        )
        print(
            f"{r.module:<40} {r.shape!s:<18} {r.scaling:>7.3g} {r.norm:>9.2e} {r.jax_vs_torch:>10.1e} {peft_err:>10}  {'yes' if r.passed else 'NO'}"
        )
    for r in report.modules:
        if r.peft_note:
            print(f"{r.module}: no PEFT comparison: {r.peft_note}")
    if report.modules_to_save:
        print(f"not compared (modules_to_save weights, no factors): {report.modules_to_save}")
    bad = [r for r in report.modules if not r.passed]
    print(f"{len(report.modules)} modules, {len(report.modules) - len(bad)} agree, {len(bad)} disagree")
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"]:
        parser = argparse.ArgumentParser(
            prog="parity_tests check",
            description="Validate a PEFT LoHa/LoKr adapter directory like a loader, then rebuild every module's ΔW "
            "with lycoris_torch, lycoris_jax and PEFT and print agreement. Exit 0: agree, 1: disagree, 2: unusable input.",
        )
        parser.add_argument("directory")
        return run_check(parser.parse_args(argv[1:]).directory)
    parser = argparse.ArgumentParser(prog="parity_tests", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="a small subset (16 cases) in about 2 minutes on 2 CPU cores"
    )
    parser.add_argument("--out", default="parity_report", help="directory for parity_report.md/.json")
    parser.add_argument("-k", dest="keyword", default=None, help="only cases whose id contains this")
    args = parser.parse_args(argv)
    return run_matrix(args.quick, args.out, args.keyword)


if __name__ == "__main__":
    raise SystemExit(main())
