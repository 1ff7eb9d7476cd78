"""``benchmarks/tpu.sh``'s measuring half (``tpu_aot.measure``): the scanned train step runs on attached
devices and is timed. Here on this CPU with the tiny decoder (no libtpu needed); on a TPU VM the same
function runs B6's shapes on its chips. Not a timing test: it checks that the step runs."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from benchmarks import tpu_aot


def test_the_train_step_runs_on_attached_devices_and_is_timed():
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    seconds = tpu_aot.measure(tpu_aot.MODELS["tiny"], tpu_aot.Variant.parse("lokr:merged:r8"), mesh, 32, rounds=2)
    assert 0 < seconds < 60


def test_the_rule_is_scored_against_the_compilers_faster_path():
    near = {"merged": 1.000, "factored": 1.005, "auto": "factored"}  # within 1% of the faster one: agrees
    far = {"merged": 1.0, "factored": 2.0, "auto": "factored"}
    assert tpu_aot._agrees(near) and not tpu_aot._agrees(far)
    rows = [{"train": near, "eval": far}]
    assert tpu_aot.agreement(rows) == (
        "auto agrees with the TPU compiler in 1 of 2 cases (50%); "
        "auto's path against the faster one: 1.502x on average, 2.00x at worst"
    )
    # the rule's own answer for a layer (no compiling): LoKr on a 4096-wide Linear, few tokens against many
    assert tpu_aot.auto_path((4096, 4096), 256, 16, "lokr", "train") == "factored"
    assert tpu_aot.auto_path((4096, 4096), 8192, 16, "lokr", "train") == "merged"


def test_the_tpu_rule_holds_its_calibration():
    """``"auto"`` on a TPU against the compiler's estimates saved by ``--calibrate`` (v5e): the share
    BENCHMARKS.md states, so a change to the rule that loses agreement fails here."""
    import json
    from pathlib import Path

    rows = json.loads((Path(tpu_aot.__file__).parent / "tpu_calibration_v5e.json").read_text())
    for row in rows:
        for mode in ("train", "eval"):
            row[mode]["auto"] = tpu_aot.auto_path(tuple(row["features"]), row["tokens"], row["r"], row["method"], mode)
    hits = sum(tpu_aot._agrees(row[mode]) for row in rows for mode in ("train", "eval"))
    assert len(rows) == 216 and hits >= 398
