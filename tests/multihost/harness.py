"""Start N local JAX processes (one per simulated host, loopback only), as a TPU pod's hosts run,
and collect what each reports.

Each process runs ``python -m tests.multihost.worker SCENARIO PROCESS_ID N PORT OUT`` with
``--xla_force_host_platform_device_count`` devices of its own, gloo collectives and a coordinator on
``127.0.0.1:PORT``, and prints one ``RESULT {json}`` line on its stdout. The harness bounds the run
in time and kills every process when one fails or the time is up, so nothing is left behind.
Each process's stdout and stderr go to files of their own: a pipe could fill and stall a process,
and gloo writes to stderr mid-line, so a shared stream could split the ``RESULT`` line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class HostsFailed(RuntimeError):
    """A process exited non-zero, printed no result, or the run passed its time limit."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    commands: list[list[str]],
    devices: int,
    timeout: float = 240.0,
    wait_all: bool = False,
    what: str = "run",
    watch: Callable[[list[subprocess.Popen]], None] | None = None,
) -> list[dict]:
    """Run one command per process (each with ``devices`` CPU devices of its own), at once, bounded by
    ``timeout``; ``{"exit", "seconds", "stdout", "output"}`` per process, in order (``output``: stdout,
    then stderr). When one fails the others are killed (they would wait on it), unless ``wait_all``:
    then they end by themselves, within ``timeout``. ``watch(processes)`` is called while they run (to
    signal one, say). ``HostsFailed`` when the time is up."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
    }
    streams = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in commands]
    procs = [
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        for command, (out, err) in zip(commands, streams, strict=True)
    ]
    start_time = time.monotonic()
    deadline, ended = start_time + timeout, [None] * len(procs)
    try:
        while any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                if p.poll() is not None and ended[i] is None:
                    ended[i] = time.monotonic() - start_time
            if time.monotonic() > deadline:
                raise HostsFailed(f"{what}: not done after {timeout:.0f} s")
            if not wait_all and any(p.poll() not in (None, 0) for p in procs):  # the others would wait on it
                break
            if watch is not None:
                watch(procs)
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for i, p in enumerate(procs):
            p.wait()
            ended[i] = ended[i] if ended[i] is not None else time.monotonic() - start_time
    runs = []
    for p, seconds, pair in zip(procs, ended, streams, strict=True):
        stdout, stderr = (_read_and_close(stream) for stream in pair)
        runs.append({"exit": p.returncode, "seconds": seconds, "stdout": stdout, "output": f"{stdout}\n{stderr}"})
    return runs


def _read_and_close(stream) -> str:
    with stream:
        stream.seek(0)
        return stream.read()


def failed(what: str, runs: list[dict]) -> HostsFailed:
    tails = "\n".join(f"--- process {j} (exit {r['exit']}):\n{r['output'][-3000:]}" for j, r in enumerate(runs))
    return HostsFailed(f"{what}: a process failed\n{tails}")


def run_hosts(
    scenario: str, processes: int, devices: int, out: Path, timeout: float = 240.0, wait_all: bool = False
) -> list[dict]:
    """Run ``scenario`` on ``processes`` processes of ``devices`` CPU devices each; their results in
    process order. ``HostsFailed`` (with each process's output tail) on any failure or on timeout.
    ``wait_all``: when one fails, let the others end by themselves (within ``timeout``) and return
    ``{"exit": code, "seconds": s, "output": text}`` per process instead of raising."""
    port = free_port()
    commands = [
        [sys.executable, "-m", "tests.multihost.worker", scenario, str(i), str(processes), str(port), str(out)]
        for i in range(processes)
    ]
    runs = start(commands, devices, timeout, wait_all, what=scenario)
    if wait_all:
        return runs
    results = []
    for run in runs:
        lines = [line for line in run["stdout"].splitlines() if line.startswith("RESULT ")]
        if run["exit"] != 0 or not lines:
            raise failed(scenario, runs)
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    return results
