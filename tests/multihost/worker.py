"""One simulated host of a multi-process run (``tests/multihost/harness.py`` starts it).

Scenarios ``pytree-fsdp`` and ``pytree-fsdp-tp``: a two-layer MLP's params (kernels sharded over every
device of every process: FSDP, or FSDP x tensor-parallel 2), a LoKr adapter through ``lycoris_jax.pytree``, three jitted Adam steps on batches
each process holds only its part of (``jax.make_array_from_process_local_data``); the factors are
gathered (``process_allgather``) and process 0 alone saves PEFT's files.
"""

from __future__ import annotations

import json
import os
import sys


def _mlp_params(np):  # the same weights on every process
    rng = np.random.default_rng(0)
    return {
        "up": {"kernel": rng.normal(size=(16, 64)).astype(np.float32) / 4, "bias": np.zeros(64, np.float32)},
        "down": {"kernel": rng.normal(size=(64, 8)).astype(np.float32) / 8, "bias": np.zeros(8, np.float32)},
    }


def pytree_fsdp(out: str, tp: int = 1, phase: str = "all", method: str = "lokr") -> dict:
    """``phase``: ``"all"`` (3 steps, then PEFT's files), ``"save"`` (2 steps, then an orbax checkpoint
    of the adapter and Adam's state in ``out``), ``"resume"`` (restore that checkpoint onto this run's
    devices, whatever their process count, and take step 3)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import lycoris_jax as lj
    from lycoris_jax import pytree

    devices = np.asarray(jax.devices())
    mesh = Mesh(devices.reshape(devices.size // tp, tp), ("fsdp", "tp"))
    n = mesh.devices.size
    host = _mlp_params(np)
    # FSDP: one dim of each kernel over "fsdp"; tensor-parallel (Megatron): up's columns, down's rows on "tp"
    specs = {"up": {"kernel": P("fsdp", "tp"), "bias": P()}, "down": {"kernel": P("tp", "fsdp"), "bias": P()}}
    params = jax.tree.map(
        lambda a, s: jax.make_array_from_callback(a.shape, NamedSharding(mesh, s), lambda i: a[i]), host, specs
    )
    config_cls = lj.LoKrConfig if method == "lokr" else lj.LoHaConfig
    config = config_cls(r=4, target_modules=["up", "down"], init_weights=False)
    adapter = pytree.init(params, config, key=jax.random.key(0))
    adapter = jax.device_put(adapter, NamedSharding(mesh, P()))

    def forward(p, x):
        return jnp.tanh(x @ p["up"]["kernel"] + p["up"]["bias"]) @ p["down"]["kernel"] + p["down"]["bias"]

    tx = optax.adam(1e-2)

    @jax.jit
    def step(adapter, state, params, x, y):  # params an argument: a global array is never closed over
        loss, grads = jax.value_and_grad(lambda a: jnp.mean((forward(pytree.merge(params, a), x) - y) ** 2))(adapter)
        updates, state = tx.update(grads, state)
        return optax.apply_updates(adapter, updates), state, loss

    rows = 4 * n  # the global batch over "fsdp"; each process holds the rows of its own devices
    data = np.random.default_rng(1)
    state, losses = tx.init(adapter), []
    if phase == "resume":
        import orbax.checkpoint as ocp

        replicated = NamedSharding(mesh, P())  # Adam's step count, made on one device: on every one
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding if a.ndim else replicated),
            {"adapter": adapter, "state": state},
        )
        restored = ocp.StandardCheckpointer().restore(os.path.abspath(out), target)
        adapter, state = restored["adapter"], restored["state"]
    for i in range(3):
        x_all = data.normal(size=(rows, 16)).astype(np.float32)
        if (phase == "save" and i == 2) or (phase == "resume" and i < 2):
            continue  # the same data order in every phase
        y_all = np.sin(x_all[:, :8])
        sharding = NamedSharding(mesh, P("fsdp"))
        per = rows // jax.process_count()
        mine = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
        x = jax.make_array_from_process_local_data(sharding, x_all[mine])
        y = jax.make_array_from_process_local_data(sharding, y_all[mine])
        adapter, state, loss = step(adapter, state, params, x, y)
        losses.append(float(loss))
    if phase == "save":  # every process writes its shards; orbax finalises once all have
        import orbax.checkpoint as ocp

        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.abspath(out), {"adapter": adapter, "state": state})
        checkpointer.wait_until_finished()
    elif phase == "all":
        whole = multihost_utils.process_allgather(adapter, tiled=True)
        if jax.process_index() == 0:  # the others wait at the barrier below: one writer per file
            pytree.save_pretrained(whole, out)
            pytree.save_lycoris(whole, f"{out}.safetensors")
    multihost_utils.sync_global_devices("saved")
    return {"losses": losses, "process": jax.process_index(), "devices": n}


LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def linen_llama(out: str, method: str = "loha", tp: int = 1) -> dict:
    """transformers' Flax Llama through the Linen transform: its weights FSDP-sharded where a dim
    divides the devices, a LoHa adapter on q/v/down, three jitted steps on process-local sequences."""
    import warnings

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import lycoris_jax as lj
    from lycoris_jax import linen

    warnings.simplefilter("ignore")
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    model = FlaxLlamaForCausalLM(LlamaConfig(**LLAMA), seed=0)  # the same weights on every process
    host = jax.tree.map(np.asarray, model.params)
    devices = np.asarray(jax.devices())
    mesh = Mesh(devices.reshape(devices.size // tp, tp), ("fsdp", "tp"))
    n, groups = mesh.devices.size, mesh.shape["fsdp"]

    def place(a):  # a matrix's rows over "fsdp" and, tensor-parallel, its columns over "tp", where they divide
        spec = (
            P()
            if a.ndim != 2
            else P("fsdp" if a.shape[0] % groups == 0 else None, "tp" if a.shape[1] % tp == 0 and tp > 1 else None)
        )
        return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda i: a[i])

    params = jax.tree.map(place, host)
    config_cls = lj.LoKrConfig if method == "lokr" else lj.LoHaConfig
    cfg = config_cls(r=2, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False)
    adapted, lycoris = linen.adapt(model.module, host, cfg, key=jax.random.key(0))
    lycoris = jax.device_put(lycoris, NamedSharding(mesh, P()))
    tx = optax.adam(1e-2)

    @jax.jit
    def step(lycoris, state, params, ids):
        def loss(lyc):
            t = ids.shape[1] - 1
            positions = jnp.broadcast_to(jnp.arange(t), (ids.shape[0], t))
            logits = adapted.apply(
                {"params": params, "lycoris": lyc}, ids[:, :-1], jnp.ones_like(positions), positions
            ).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss)(lycoris)
        updates, state = tx.update(grads, state)
        return optax.apply_updates(lycoris, updates), state, value

    data, state, losses = np.random.default_rng(1), tx.init(lycoris), []
    per = n // jax.process_count()  # n sequences over the "fsdp" groups; each process holds its groups'
    for _ in range(3):
        ids_all = data.integers(0, LLAMA["vocab_size"], size=(n, 17)).astype(np.int32)
        mine = ids_all[jax.process_index() * per : (jax.process_index() + 1) * per]
        ids = jax.make_array_from_process_local_data(NamedSharding(mesh, P("fsdp")), mine)
        lycoris, state, value = step(lycoris, state, params, ids)
        losses.append(float(value))
    whole = multihost_utils.process_allgather(lycoris, tiled=True)
    if jax.process_index() == 0:
        linen.save_pretrained(adapted, whole, out)
        linen.save_lycoris(adapted, whole, f"{out}.safetensors")
    multihost_utils.sync_global_devices("saved")
    return {"losses": losses, "process": jax.process_index(), "devices": n}


def dies(out: str) -> dict:
    """Process 1 dies after the first step (as a host that loses power); the others must stop with
    an error, not wait for it forever."""
    import os

    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.asarray(jax.devices()), ("fsdp",))
    total = jax.jit(lambda x: x.sum())
    for i in range(100):
        x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("fsdp")), np.ones((4, 3), np.float32))
        float(total(x))
        if i == 0 and jax.process_index() == 1:
            os._exit(3)
    return {"process": jax.process_index(), "finished": True}


def nnx_mlp(out: str, method: str = "loha", tp: int = 1) -> dict:
    """An NNX MLP built under the mesh (kernels FSDP-sharded by their partition metadata), a LoHa tuner
    on both layers (its factors placed like their kernels), three jitted steps on process-local rows,
    then PEFT's files from process 0."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import lycoris_jax as lj

    devices = np.asarray(jax.devices())
    mesh = Mesh(devices.reshape(devices.size // tp, tp), ("fsdp", "tp"))
    n = mesh.devices.size
    init = nnx.initializers.lecun_normal()
    # FSDP: one dim of each kernel over "fsdp"; tensor-parallel (Megatron): up's columns, down's rows on "tp"
    up, down = (("fsdp", "tp"), ("tp", "fsdp")) if tp > 1 else ((None, "fsdp"), ("fsdp", None))

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(16, 64, kernel_init=nnx.with_partitioning(init, up), rngs=rngs)
            self.down = nnx.Linear(64, 8, kernel_init=nnx.with_partitioning(init, down), rngs=rngs)

        def __call__(self, x):
            return self.down(jnp.tanh(self.up(x)))

    config_cls, tuner_cls = (lj.LoKrConfig, lj.LoKrModel) if method == "lokr" else (lj.LoHaConfig, lj.LoHaModel)
    config = config_cls(r=4, target_modules=["up", "down"], init_weights=False)
    with jax.set_mesh(mesh):
        tuner = tuner_cls(MLP(nnx.Rngs(0)), config, rngs=nnx.Rngs(params=0, dropout=1))
    graphdef, trained, rest = nnx.split(tuner, lj.LycorisParam, ...)
    put = lambda tree: jax.tree.map(  # noqa: E731  # global arrays, each as its partition metadata says
        lambda a, s: jax.device_put(a, NamedSharding(mesh, s if isinstance(s, P) else P())),
        tree,
        nnx.get_partition_spec(tree),
    )
    trained, rest = put(trained), put(rest)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(trained, state, rest, x, y):
        loss = lambda t: jnp.mean((nnx.merge(graphdef, t, rest)(x) - y) ** 2)  # noqa: E731
        value, grads = jax.value_and_grad(loss)(trained)
        updates, state = tx.update(grads, state)
        return optax.apply_updates(trained, updates), state, value

    data, state, losses = np.random.default_rng(1), jax.jit(tx.init)(trained), []
    per = 4 * n // jax.process_count()
    for _ in range(3):
        x_all = data.normal(size=(4 * n, 16)).astype(np.float32)
        mine = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
        sharding = NamedSharding(mesh, P("fsdp"))
        x = jax.make_array_from_process_local_data(sharding, x_all[mine])
        y = jax.make_array_from_process_local_data(sharding, np.sin(x_all[mine, :8]))
        trained, state, value = step(trained, state, rest, x, y)
        losses.append(float(value))
    whole = multihost_utils.process_allgather(trained, tiled=True)
    if jax.process_index() == 0:
        nnx.update(tuner, whole)
        tuner.save_pretrained(out)
        tuner.save_lycoris(f"{out}.safetensors")
    multihost_utils.sync_global_devices("saved")
    return {"losses": losses, "process": jax.process_index(), "devices": n}


def step_time(out: str) -> dict:
    """Seconds per jitted train step (median of 20 after 3 warm-up steps) of the pytree LoKr adapter
    on a 1024-wide MLP, kernels FSDP-sharded: the collectives' overhead between processes."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import lycoris_jax as lj
    from lycoris_jax import pytree

    mesh = Mesh(np.asarray(jax.devices()), ("fsdp",))
    n, width = mesh.devices.size, 1024
    rng = np.random.default_rng(0)
    host = {name: {"kernel": rng.normal(size=(width, width)).astype(np.float32) / 32} for name in ("up", "down")}
    params = jax.tree.map(
        lambda a: jax.make_array_from_callback(a.shape, NamedSharding(mesh, P("fsdp")), lambda i: a[i]), host
    )
    adapter = jax.device_put(
        pytree.init(
            params, lj.LoKrConfig(r=16, target_modules=["up", "down"], init_weights=False), key=jax.random.key(0)
        ),
        NamedSharding(mesh, P()),
    )
    tx = optax.adam(1e-3)

    @jax.jit
    def step(adapter, state, params, x):
        def loss(a):
            p = pytree.merge(params, a)
            return jnp.mean(jnp.tanh(x @ p["up"]["kernel"]) @ p["down"]["kernel"] ** 2)

        value, grads = jax.value_and_grad(loss)(adapter)
        updates, state = tx.update(grads, state)
        return optax.apply_updates(adapter, updates), state, value

    per = 64 * n // jax.process_count()
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("fsdp")), np.ones((per, width), np.float32))
    state, times = jax.jit(tx.init)(adapter), []
    for i in range(23):
        start = time.perf_counter()
        adapter, state, value = step(adapter, state, params, x)
        jax.block_until_ready(value)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return {"seconds": float(np.median(times)), "process": jax.process_index(), "devices": n}


def interrupted_save(out: str) -> dict:
    """Process 0 saves the adapter after two steps, then dies (SIGKILL) half-way through writing the
    weights of the next save: the directory must still hold the first save, byte for byte."""
    import hashlib
    import signal
    from pathlib import Path

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    import lycoris_core._io as io
    import lycoris_jax as lj
    from lycoris_jax import pytree

    def digest() -> str:
        files = sorted(p for p in Path(out).rglob("*") if p.is_file())
        return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()

    host = _mlp_params(np)
    config = lj.LoKrConfig(r=4, target_modules=["up", "down"], init_weights=False)
    first = pytree.init(host, config, key=jax.random.key(0))
    second = pytree.init(host, config, key=jax.random.key(1))
    if jax.process_index() == 0:
        pytree.save_pretrained(first, out)
        print("RESULT " + json.dumps({"digest": digest(), "process": 0}), flush=True)
        write = io._write_new

        def write_half_then_die(path: str, data: bytes) -> None:
            if path.endswith(".safetensors"):
                with open(path, "xb") as fh:
                    fh.write(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            write(path, data)

        io._write_new = write_half_then_die
        pytree.save_pretrained(second, out)
    multihost_utils.sync_global_devices("saved")  # process 1 waits here for a process that is gone
    return {"process": jax.process_index(), "finished": True}


SCENARIOS = {
    "pytree-fsdp": pytree_fsdp,
    "pytree-fsdp-tp": lambda out: pytree_fsdp(out, tp=2),
    "linen-llama": linen_llama,
    "dies": dies,
    "nnx-mlp": nnx_mlp,
    "nnx-mlp-lokr": lambda out: nnx_mlp(out, method="lokr"),
    "pytree-fsdp-loha": lambda out: pytree_fsdp(out, method="loha"),
    "linen-llama-lokr": lambda out: linen_llama(out, method="lokr"),
    # the same on an FSDP x tensor-parallel mesh (4 x 2)
    "pytree-fsdp-tp-loha": lambda out: pytree_fsdp(out, tp=2, method="loha"),
    "nnx-mlp-tp": lambda out: nnx_mlp(out, tp=2),
    "nnx-mlp-lokr-tp": lambda out: nnx_mlp(out, method="lokr", tp=2),
    "linen-llama-tp": lambda out: linen_llama(out, tp=2),
    "linen-llama-lokr-tp": lambda out: linen_llama(out, method="lokr", tp=2),
    "step-time": step_time,
    "interrupted-save": interrupted_save,
    "save": lambda out: pytree_fsdp(out, phase="save"),
    "resume": lambda out: pytree_fsdp(out, phase="resume"),
}


def main(argv: list[str]) -> None:
    scenario, process, processes, port, out = argv
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if int(processes) > 1:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=int(processes),
            process_id=int(process),
            initialization_timeout=60,
            heartbeat_timeout_seconds=10,  # a dead host is noticed in seconds, not the default 100
        )
    result = SCENARIOS[scenario](out)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
