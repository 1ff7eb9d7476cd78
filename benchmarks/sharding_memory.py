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
    def __init__(self, up_spec, down_spec, rngs: nnx.Rngs) -> None:
        def init(spec):
            base = nnx.initializers.lecun_normal()
            return nnx.with_partitioning(base, spec) if spec else base

        self.up = nnx.Linear(D, F, use_bias=False, kernel_init=init(up_spec), rngs=rngs)
        self.down = nnx.Linear(F, D, use_bias=False, kernel_init=init(down_spec), rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.relu(self.up(x)))


def kernel_sized_all_gathers(hlo: str, shard_elements: int) -> int:
    """All-gathers whose result holds at least one kernel shard."""
    count = 0
    for match in re.finditer(r"= \(?f32\[([0-9,]+)\][^=]*? all-gather(?:-start)?\(", hlo):
        size = 1
        for d in match.group(1).split(","):
            size *= int(d)
        count += size >= shard_elements
    return count


def measure(layout: str, kind: str) -> dict:
    """``{"temp_mib", "shards", "kernel_all_gathers"}`` of one compiled step."""
    mesh_shape, up_spec, down_spec, batch_spec = LAYOUTS[layout]
    mesh = jax.make_mesh(mesh_shape, ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
    with jax.set_mesh(mesh):
        model = MLP(up_spec, down_spec, nnx.Rngs(0))
        x = jax.device_put(jnp.ones((BATCH, D)), PartitionSpec(*batch_spec))
        if kind == "frozen":
            graphdef, state = nnx.split(model)
            step = jax.jit(lambda s, x: jax.grad(lambda x: (nnx.merge(graphdef, s)(x) ** 2).mean())(x))
            compiled = step.lower(state, x).compile()
        else:
            cfg = (lj.LoKrConfig if kind == "lokr" else lj.LoHaConfig)(
                r=8, target_modules=["up", "down"], init_weights=False
            )
            tuner = (lj.LoKrModel if kind == "lokr" else lj.LoHaModel)(model, cfg)
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


def table() -> dict[tuple[str, str], dict]:
    return {(layout, kind): measure(layout, kind) for layout in LAYOUTS for kind in ("frozen", "lokr", "loha")}


if __name__ == "__main__":
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, Auto mesh axes")
    print("| layout | step | temp MiB | kernel shards | kernel-sized all-gathers |")
    print("|---|---|---|---|---|")
    for (layout, kind), row in table().items():
        print(f"| {layout} | {kind} | {row['temp_mib']:.2f} | {row['shards']:.2f} | {row['kernel_all_gathers']} |")
