"""``python -m parity_tests [--quick] [--shard I/N] [--out DIR] [-k SUBSTRING]`` runs the parity matrix
and writes a Markdown + JSON report; ``--mutants`` plants each bug of ``parity_tests.mutants`` and
reports which cells caught it; ``python -m parity_tests check DIR`` validates an adapter directory and
compares the frameworks on it (exit 0 agree, 1 disagree, 2 unusable input)."""

from __future__ import annotations

import argparse
import datetime
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


def _select(quick: bool, keyword: str | None, shard_spec: str | None) -> tuple[list, str]:
    """The cases to run and a line saying which (``--shard I/N``, or ``auto/N``: the shard of today's UTC date)."""
    from parity_tests.cases import CASES, QUICK, shard

    cases = [c for c in (QUICK if quick else CASES) if keyword is None or keyword in c.id]
    if not shard_spec:
        return cases, ""
    index, _, count = shard_spec.partition("/")
    total = int(count)
    i = (datetime.date.today().toordinal() % total) + 1 if index == "auto" else int(index)
    return shard(cases, i, total), f"shard {i}/{total} ({len(shard(cases, i, total))} of {len(cases)} cases)"


def run_matrix(quick: bool, out: str, keyword: str | None, shard_spec: str | None = None) -> int:
    import torch

    from parity_tests.cases import SKIPPED
    from parity_tests.report import summary_by_row_op, text_table, write_report
    from parity_tests.runner import run_case

    torch.set_num_threads(1)  # tiny tensors: threads only add overhead, and one thread sums in one order
    cases, which = _select(quick, keyword, shard_spec)
    if which:
        print(which)
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
    print("\nlargest errors per row/operation (ours and PEFT's own, against float64):")
    for key, row in summary_by_row_op(cells).items():
        print(
            f"  {key:<32} ours {row['max_rel']:.2e}  PEFT {row['max_peft_rel']:.2e}  ours/PEFT {row['max_ratio']:5.2f}"
            f"  ({row['cells']} cells)"
        )
    print(f"\n{len(cells)} cells in {len(cases)} cases, {time.perf_counter() - start:.0f}s; report: {md}, {js}")
    print(f"parity: {len(cells) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def run_mutants(keyword: str | None) -> int:
    """Plant every mutant in turn, run the quick matrix, report the cells that caught it; exit 1 if
    a mutant was caught by no cell on a value (cells that only raised do not count) or one of its
    targets was never called."""
    import torch

    from parity_tests.cases import QUICK
    from parity_tests.mutants import MUTANTS, run_mutant

    torch.set_num_threads(1)
    missed = []
    start = time.perf_counter()
    for mutant in MUTANTS:
        if keyword is not None and keyword not in mutant.name:
            continue
        t0 = time.perf_counter()
        caught, crashed, calls = run_mutant(mutant, QUICK)
        print(f"{mutant.name} ({', '.join(mutant.targets)}): {mutant.what}")
        print(f"  caught by {len(caught)} cells in {time.perf_counter() - t0:.0f}s: {', '.join(caught) or 'NONE'}")
        if crashed:
            print(f"  raised (not counted) in {len(crashed)} cells: {', '.join(crashed)}")
        idle = [target for target, n in calls.items() if n == 0]
        if idle:
            print(f"  never called (the patch changed nothing there): {', '.join(idle)}")
        if not caught or idle:
            missed.append(mutant.name)
    print(f"\n{time.perf_counter() - start:.0f}s; mutants missed: {missed or 'none'}")
    return 1 if missed else 0


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
    from parity_tests.cases import QUICK

    parser = argparse.ArgumentParser(prog="parity_tests", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a small subset ({len(QUICK)} cases) in about 2 minutes on 2 CPU cores that sees every mutant",
    )
    parser.add_argument("--out", default="parity_report", help="directory for parity_report.md/.json")
    parser.add_argument("-k", dest="keyword", default=None, help="only cases (mutants) whose id (name) contains this")
    parser.add_argument(
        "--shard", default=None, metavar="I/N", help="the I-th of N interleaved shards; auto/N: by date"
    )
    parser.add_argument(
        "--mutants", action="store_true", help="plant each bug of parity_tests.mutants, report who caught it"
    )
    args = parser.parse_args(argv)
    if args.mutants:
        return run_mutants(args.keyword)
    return run_matrix(args.quick, args.out, args.keyword, args.shard)


if __name__ == "__main__":
    raise SystemExit(main())
