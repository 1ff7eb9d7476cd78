"""B8: the step time of one sharded adapter on 2 JAX processes x 4 devices against 1 x 8, on this CPU.

Both runs use gloo collectives on loopback (``tests/multihost``'s harness and worker, scenario
``step-time``: a pytree LoKr r=16 adapter on a 1024-wide two-layer MLP, kernels FSDP-sharded over the
8 devices, 512 rows per step). The ratio is the overhead of collectives between processes on one
machine, not a TPU figure.

    python benchmarks/multihost.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.multihost.harness import run_hosts


def main() -> None:
    with tempfile.TemporaryDirectory() as out:
        one = run_hosts("step-time", processes=1, devices=8, out=Path(out))[0]["seconds"]
        two = max(r["seconds"] for r in run_hosts("step-time", processes=2, devices=4, out=Path(out)))
    print("| processes x devices | ms per step | / 1 x 8 |")
    print("|---|---|---|")
    print(f"| 1 x 8 | {one * 1e3:.2f} | 1.00 |")
    print(f"| 2 x 4 | {two * 1e3:.2f} | {two / one:.2f} |")


if __name__ == "__main__":
    main()
