"""Child process for the hard-crash save tests: ``python -m tests.safety._save_child DIR STEP``.

Saves the "new" two-adapter checkpoint (torch twin, seed 1, alpha 16) into ``DIR`` and kills
itself with SIGKILL at ``STEP`` (no cleanup, no ``finally``): ``weights`` / ``config`` (while
writing the first such file), ``before-swap``, ``after-swap``, or ``in-place`` (the directory cannot
be swapped, so files are renamed in place; killed after the first rename).
"""

from __future__ import annotations

import errno
import os
import signal
import sys

import lycoris_core._io as io
from tests.safety.twins import TORCH, two_adapters


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(directory: str, step: str) -> None:
    write, exchange, replace = io._write_new, io._exchange, os.replace

    def write_new(path: str, data: bytes) -> None:
        if step == "weights" and path.endswith(".safetensors"):
            with open(path, "xb") as fh:  # half of the file, then gone
                fh.write(data[: len(data) // 2])
            _die()
        write(path, data)
        if step == "config" and path.endswith(".json"):
            _die()

    def exchange_or_die(a: str, b: str) -> bool:
        if step == "before-swap":
            _die()
        if step == "in-place":
            raise OSError(errno.EBUSY, "simulated mount point", b)
        done = exchange(a, b)
        if step == "after-swap":
            _die()
        return done

    def replace_then_die(a: str, b: str) -> None:
        replace(a, b)
        if step == "in-place":
            _die()

    io._write_new, io._exchange, os.replace = write_new, exchange_or_die, replace_then_die
    two_adapters(TORCH, seed=1, alpha=16).save_pretrained(directory)
    raise SystemExit(f"step {step!r} was never reached")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
