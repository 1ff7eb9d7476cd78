"""Per-device memory of a jitted adapter train step on 8 simulated devices, by sharding layout.

A 1024x4096 MLP (``up``: ``(1024, 4096)``, ``down``: ``(4096, 1024)``, f32, batch 16) on a
``("data", "model")`` mesh of 8 CPU devices. For each layout the frozen step (gradient with respect
to the input only), the LoKr and the LoHa step (gradients with respect to the factors, r=8) are
compiled and their ``memory_analysis().temp_size_in_bytes`` reported in MiB and in kernel shards
(one kernel's bytes on one device), with the number of all-gathers of kernel-sized arrays.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sharding_memory.py
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

import lycoris_jax as lj

D, F, BATCH, MIB = 1024, 4096, 16, 2**20
#: layout -> (mesh shape, up kernel spec, down kernel spec, batch spec)
LAYOUTS = {
    "data-parallel": ((8, 1), None, None, ("data", None)),
    "tensor-parallel": ((2, 4), (None, "model"), ("model", None), ("data", None)),
    "fsdp": ((8, 1), ("data", None), (None, "data"), ("data", None)),
}


class MLP(nnx.Module):
    """``out_shardings`` (Explicit meshes): the ``out_sharding`` each layer's call is given."""

    def __init__(self, up_spec, down_spec, rngs: nnx.Rngs, out_shardings=(None, None)) -> None:
        def init(spec):
            base = nnx.initializers.lecun_normal()
            return nnx.with_partitioning(base, spec) if spec else base

        self.up = nnx.Linear(D, F, use_bias=False, kernel_init=init(up_spec), rngs=rngs)
        self.down = nnx.Linear(F, D, use_bias=False, kernel_init=init(down_spec), rngs=rngs)
        self.out_shardings = out_shardings

    def __call__(self, x):
        up, down = ({"out_sharding": s} if s is not None else {} for s in self.out_shardings)
        return self.down(nnx.relu(self.up(x, **up)), **down)


def kernel_sized_all_gathers(hlo: str, shard_elements: int) -> int:
    """All-gathers whose result holds at least one kernel shard."""
    count = 0
    for match in re.finditer(r"= \(?f32\[([0-9,]+)\][^=]*? all-gather(?:-start)?\(", hlo):
        size = 1
        for d in match.group(1).split(","):
            size *= int(d)
        count += size >= shard_elements
    return count


def measure(layout: str, kind: str, mode: str = "auto", path: str = "auto") -> dict:
    """``{"temp_mib", "shards", "kernel_all_gathers"}`` of one compiled step (``mode``: ``"auto"`` or
    ``"explicit"`` mesh axes; Explicit layers are called with the ``out_sharding`` of their output;
    ``path``: the adapters' ``forward_path``)."""
    mesh_shape, up_spec, down_spec, batch_spec = LAYOUTS[layout]
    axis = AxisType.Explicit if mode == "explicit" else AxisType.Auto
    mesh = jax.make_mesh(mesh_shape, ("data", "model"), axis_types=(axis, axis))
    outputs = (None, None)
    if mode == "explicit":
        outputs = tuple(
            PartitionSpec(batch_spec[0], spec[1] if spec and spec[1] != batch_spec[0] else None)
            for spec in (up_spec, down_spec)
        )
    with jax.set_mesh(mesh):
        model = MLP(up_spec, down_spec, nnx.Rngs(0), outputs)
        x = jax.device_put(jnp.ones((BATCH, D)), PartitionSpec(*batch_spec))
        if kind == "frozen":
            graphdef, state = nnx.split(model)
            step = jax.jit(lambda s, x: jax.grad(lambda x: (nnx.merge(graphdef, s)(x) ** 2).mean())(x))
            compiled = step.lower(state, x).compile()
        else:
            cfg = (lj.LoKrConfig if kind == "lokr" else lj.LoHaConfig)(
                r=8, target_modules=["up", "down"], init_weights=False
            )
            tuner = (lj.LoKrModel if kind == "lokr" else lj.LoHaModel)(model, cfg, forward_path=path)
            graphdef, factors, rest = nnx.split(tuner, lj.LycorisParam, ...)

            def step(factors, rest, x):
                return jax.grad(lambda f: (nnx.merge(graphdef, f, rest)(x) ** 2).mean())(factors)

            compiled = jax.jit(step).lower(factors, rest, x).compile()
    shard_elements = D * F // (mesh.size if layout == "fsdp" else mesh_shape[1])
    temp = compiled.memory_analysis().temp_size_in_bytes
    return {
        "temp_mib": temp / MIB,
        "shards": temp / (4 * shard_elements),
        "kernel_all_gathers": kernel_sized_all_gathers(compiled.as_text(), shard_elements),
    }


def table(mode: str = "auto", path: str = "auto") -> dict[tuple[str, str], dict]:
    """``{(layout, step): measure(...)}`` for every layout and step, adapters on ``path``."""
    return {
        (layout, kind): measure(layout, kind, mode, path) for layout in LAYOUTS for kind in ("frozen", "lokr", "loha")
    }


STEPS = (("frozen", "-"), *((kind, path) for kind in ("lokr", "loha") for path in ("auto", "merged", "peft")))


if __name__ == "__main__":
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices")
    print("| mesh axes | layout | step | forward_path | temp MiB | kernel shards | kernel-sized all-gathers |")
    print("|---|---|---|---|---|---|---|")
    for mode in ("auto", "explicit"):
        for layout in LAYOUTS:
            for kind, path in STEPS:
                try:
                    row = measure(layout, kind, mode, path if path != "-" else "auto")
                except Exception as err:  # reported in the table
                    print(f"| {mode} | {layout} | {kind} | {path} | n/a: {type(err).__name__}: {str(err)[:90]} | | |")
                    continue
                print(
                    f"| {mode} | {layout} | {kind} | {path} | {row['temp_mib']:.2f} | {row['shards']:.2f} "
                    f"| {row['kernel_all_gathers']} |"
                )
