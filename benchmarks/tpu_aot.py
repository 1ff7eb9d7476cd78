"""B6: adapter train steps as the TPU compiler sees them, compiled deviceless on any CPU machine.

JAX compiles for a TPU topology with libtpu and no TPU attached (``jax.experimental.topologies``);
the compiled program reports its exact per-chip memory and the TPU compiler's own estimate of its
run time. Every figure here is that estimate, not a measurement: compare variants by ratio, on one
topology, in one run.

    pip install -e ".[tpu]"                        # jax[tpu] at the project's jax version (libtpu)
    python benchmarks/tpu_aot.py                   # the targets' grid: Llama-3-8B shape, 4096 tokens/chip, r=16
    python benchmarks/tpu_aot.py --grid full       # every topology, mesh, model, token count, variant and rank
    python benchmarks/tpu_aot.py --model llama3-8b --layers 2 --topology v5e --mesh 1 --variants frozen,lokr:factored

Each step is one Adam step on the trained variables (none for ``frozen``) of a decoder at full depth
(``--layers`` cuts it; one chip holds two of the 8B model's blocks): layers stacked with ``nnx.vmap``,
applied by ``jax.lax.scan`` over a rematerialised block, as TPU trainers run them; bf16 weights and
activations; the loss is the next-token cross-entropy through the output head (a cut model is
measured without its head: the mean square of its blocks' output). Every step also differentiates the blocks' input
(the activation backward every deep model pays), so ``frozen`` (no trained weight) is the floor of
any adapter step; ``full`` trains every weight. The eval forward runs the same model without a
gradient (an adapter unmerged, eval mode).

The custom-call correction: the compiler's ``optimal_seconds`` books every custom-call it cannot
cost as -1 s, and it inserts layout custom-calls (``ConcatBitcast``) into ordinary programs; one
second is added back per such call and the count printed. A Pallas kernel (``tpu_custom_call``) is
counted apart: its cost is whatever it declares, so a figure that rests on one is flagged.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")  # quiets libtpu's start-up warnings
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiling processes at once

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import lycoris_jax as lj

GIB = 2**30
BF16 = jnp.bfloat16
#: unroll the layer scan (the compiler's cost model counts a loop's body once)
UNROLL = [1]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Shape:
    """A decoder's shape (grouped-query attention, gated MLP)."""

    d: int
    heads: int
    kv_heads: int
    head_dim: int
    ff: int
    layers: int
    vocab: int
    act: str = "silu"


MODELS = {
    "llama3-8b": Shape(d=4096, heads=32, kv_heads=8, head_dim=128, ff=14336, layers=32, vocab=128256),
    "gemma2-2b": Shape(d=2304, heads=8, kv_heads=4, head_dim=256, ff=9216, layers=26, vocab=256000, act="gelu"),
    "tiny": Shape(d=256, heads=4, kv_heads=2, head_dim=64, ff=512, layers=2, vocab=512),  # the CI smoke test
}
#: name -> (topology of 8 chips, HBM per chip in bytes)
TOPOLOGIES = {"v5e": ("v5e:2x4", 16 * GIB), "v6e": ("v6e:2x4", 32 * GIB), "v5p": ("v5p:2x2x2", 95 * GIB)}
#: name -> (mesh shape, axis names); "1": one chip of the topology
MESHES = {"1": ((1, 1), ("fsdp", "tp")), "fsdp": ((8, 1), ("fsdp", "tp")), "fsdp_tp": ((4, 2), ("fsdp", "tp"))}
METHODS = {"lokr": (lj.LoKrConfig, lj.LoKrModel), "loha": (lj.LoHaConfig, lj.LoHaModel)}
PATHS = ("auto", "merged", "factored", "peft")


# ---------------------------------------------------------------- the model
def _linear(i: int, o: int, spec: tuple, rngs: nnx.Rngs) -> nnx.Linear:
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), spec)
    return nnx.Linear(i, o, use_bias=False, dtype=BF16, param_dtype=BF16, kernel_init=init, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm decoder block. Kernels are ``(in, out)``: columns of q/k/v/gate/up and rows of o/down
    on the tensor-parallel axis ``tp``, the other dim on ``fsdp`` (Megatron layout under FSDP)."""

    def __init__(self, s: Shape, rngs: nnx.Rngs) -> None:
        col, row = ("fsdp", "tp"), ("tp", "fsdp")
        self.s = s
        self.q_proj = _linear(s.d, s.heads * s.head_dim, col, rngs)
        self.k_proj = _linear(s.d, s.kv_heads * s.head_dim, col, rngs)
        self.v_proj = _linear(s.d, s.kv_heads * s.head_dim, col, rngs)
        self.o_proj = _linear(s.heads * s.head_dim, s.d, row, rngs)
        self.gate_proj, self.up_proj = _linear(s.d, s.ff, col, rngs), _linear(s.d, s.ff, col, rngs)
        self.down_proj = _linear(s.ff, s.d, row, rngs)
        norm = functools.partial(nnx.RMSNorm, s.d, dtype=BF16, param_dtype=BF16, rngs=rngs)
        self.input_norm, self.post_norm = norm(), norm()

    def __call__(self, x: jax.Array) -> jax.Array:
        s, (b, t, _) = self.s, x.shape
        h = self.input_norm(x)
        q = self.q_proj(h).reshape(b, t, s.heads, s.head_dim)
        k = self.k_proj(h).reshape(b, t, s.kv_heads, s.head_dim)
        v = self.v_proj(h).reshape(b, t, s.kv_heads, s.head_dim)
        x = x + self.o_proj(_attention(q, k, v).reshape(b, t, -1))
        h = self.post_norm(x)
        act = nnx.silu if s.act == "silu" else nnx.gelu
        return x + self.down_proj(act(self.gate_proj(h)) * self.up_proj(h))


#: sequences longer than this run attention in blocks of ``BLOCK`` queries and the loss in blocks of
#: ``BLOCK`` tokens, each rematerialised (as memory-efficient TPU trainers do: at 8192 tokens one
#: chip's attention scores and vocabulary logits alone exceed a v5e chip); shorter ones in one piece
LONG, BLOCK = 4096, 2048


def _blocks(t: int) -> int:
    return t // BLOCK if t > LONG and t % BLOCK == 0 else 1


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal grouped-query attention, ``(b, t, heads, head_dim)``; in query blocks for long sequences."""
    t, n = q.shape[1], _blocks(q.shape[1])
    if n == 1:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    blocks = q.reshape(q.shape[0], n, t // n, *q.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def block(i: jax.Array, qb: jax.Array) -> jax.Array:
        rows = i * (t // n) + jnp.arange(t // n)
        return jax.nn.dot_product_attention(qb, k, v, mask=(rows[:, None] >= jnp.arange(t)[None, :])[None, None])

    out = jax.lax.map(lambda a: block(*a), (jnp.arange(n), blocks))
    return out.swapaxes(0, 1).reshape(q.shape)


def _batch_sharded(x: jax.Array) -> jax.Array:
    """Activations split by sequence over ``fsdp`` (else the compiler may split them by features, as
    the embedding table is, and replicate the attention scores)."""
    return jax.lax.with_sharding_constraint(x, PartitionSpec("fsdp"))


class Decoder(nnx.Module):
    """Embedding, ``layers`` blocks stacked on a leading axis, final norm, output head."""

    def __init__(self, s: Shape, rngs: nnx.Rngs) -> None:
        @nnx.split_rngs(splits=s.layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
        def create(rngs: nnx.Rngs) -> Block:
            return Block(s, rngs)

        embed_init = nnx.with_partitioning(nnx.initializers.normal(), ("tp", "fsdp"))
        self.embed = nnx.Embed(s.vocab, s.d, dtype=BF16, param_dtype=BF16, embedding_init=embed_init, rngs=rngs)
        self.layers = create(rngs)
        self.norm = nnx.RMSNorm(s.d, dtype=BF16, param_dtype=BF16, rngs=rngs)
        self.lm_head = _linear(s.d, s.vocab, ("fsdp", "tp"), rngs)

    def blocks(self, x: jax.Array) -> jax.Array:
        """The stack as ``jax.lax.scan`` over the layers' state, each block rematerialised."""
        graphdef, state = nnx.split(self.layers)

        def body(h: jax.Array, layer: Any) -> tuple[jax.Array, None]:
            return _batch_sharded(nnx.merge(graphdef, layer)(_batch_sharded(h))), None

        return jax.lax.scan(jax.checkpoint(body), _batch_sharded(x), state, unroll=UNROLL[0])[0]

    def loss(self, x: jax.Array, ids: jax.Array, head: bool = True) -> jax.Array:
        """Next-token cross-entropy of the blocks' output ``x`` (the embedded ``ids``) through the head;
        without ``head``, the mean square of the blocks' output (the blocks alone)."""
        if not head:
            return jnp.mean(jnp.square(self.norm(self.blocks(x)).astype(jnp.float32)))
        h, labels = self.norm(self.blocks(x))[:, :-1], ids[:, 1:]
        n = _blocks(ids.shape[1])
        if n == 1:
            logits = self.lm_head(h).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        # blocks of BLOCK positions (the last one short by the shifted label), each rematerialised
        h = jnp.pad(h, ((0, 0), (0, 1), (0, 0))).reshape(h.shape[0], n, -1, h.shape[-1]).swapaxes(0, 1)
        labels = jnp.pad(labels, ((0, 0), (0, 1)), constant_values=-1).reshape(labels.shape[0], n, -1).swapaxes(0, 1)

        @jax.checkpoint
        def block(hb: jax.Array, lb: jax.Array) -> jax.Array:
            losses = optax.softmax_cross_entropy_with_integer_labels(self.lm_head(hb).astype(jnp.float32), lb)
            return jnp.sum(jnp.where(lb >= 0, losses, 0.0))

        total = jax.lax.map(lambda a: block(*a), (h, labels))  # label -1: padding, masked out
        return total.sum() / (ids.shape[0] * (ids.shape[1] - 1))


# ---------------------------------------------------------------- variants and steps
@dataclasses.dataclass(frozen=True)
class Variant:
    """``frozen``, ``full``, or a method on a forward path at rank ``r`` (``branch``: ``branch_dtype``)."""

    kind: str
    path: str = "auto"
    r: int = 16
    branch: str = "adapter"

    @property
    def name(self) -> str:
        if self.kind in ("frozen", "full"):
            return self.kind
        return f"{self.kind}:{self.path}:r{self.r}" + ("" if self.branch == "adapter" else f":{self.branch}")

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``frozen`` | ``full`` | ``METHOD[:PATH[:rR[:base]]]``."""
        kind, *rest = text.split(":")
        if kind not in ("frozen", "full", *METHODS):
            raise ValueError(f"variant {text!r}: the kind is one of frozen, full, {', '.join(METHODS)}")
        path = rest[0] if rest else "auto"
        if path not in PATHS:
            raise ValueError(f"variant {text!r}: the path is one of {', '.join(PATHS)}")
        r = int(rest[1].removeprefix("r")) if len(rest) > 1 else 16
        branch = rest[2] if len(rest) > 2 else "adapter"
        return cls(kind, path, r, branch)


def build(shape: Shape, variant: Variant) -> nnx.Module:
    """The model (the tuner for an adapter), built abstractly: nothing is allocated."""

    def make() -> nnx.Module:
        model = Decoder(shape, nnx.Rngs(0))
        if variant.kind in ("frozen", "full"):
            return model
        config_cls, tuner_cls = METHODS[variant.kind]
        config = config_cls(r=variant.r, alpha=variant.r, target_modules=list(TARGETS))
        tuner = tuner_cls(model, config, stacks=["layers"], forward_path=variant.path, branch_dtype=variant.branch)
        tuner.train()
        return tuner

    return nnx.eval_shape(make)


def _decoder(model: nnx.Module) -> Decoder:
    return model if isinstance(model, Decoder) else model.model


def _trained_filter(variant: Variant) -> Any:
    return {"frozen": nnx.Not(nnx.Variable), "full": nnx.Param}.get(variant.kind, lj.LycorisParam)


def steps(model: nnx.Module, variant: Variant, head: bool = True) -> tuple[Any, Any, Any, Any, Any]:
    """``(train_step, eval_forward, trained, rest, optimizer)``: ``train_step(trained, opt_state, rest, ids)``
    (Adam on ``trained``; the blocks' input differentiated too) and ``eval_forward(trained, rest, ids)``."""
    graphdef, trained, rest = nnx.split(model, _trained_filter(variant), ...)
    tx = optax.adam(1e-5)

    def loss(trained: Any, x: jax.Array, rest: Any, ids: jax.Array) -> jax.Array:
        return _decoder(nnx.merge(graphdef, trained, rest)).loss(x, ids, head)

    def embed(trained: Any, rest: Any, ids: jax.Array) -> jax.Array:
        return _decoder(nnx.merge(graphdef, trained, rest)).embed(ids)

    def train_step(trained: Any, opt_state: Any, rest: Any, ids: jax.Array) -> tuple:
        x = embed(trained, rest, ids)
        value, (grads, dx) = jax.value_and_grad(loss, argnums=(0, 1))(trained, x, rest, ids)
        if variant.kind == "frozen":
            return trained, opt_state, value, dx
        updates, opt_state = tx.update(grads, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state, value, dx.sum()

    def eval_forward(trained: Any, rest: Any, ids: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, trained, rest)
        model.eval()
        return _decoder(model).loss(_decoder(model).embed(ids), ids, head)

    return train_step, eval_forward, trained, rest, tx


# ---------------------------------------------------------------- compiling deviceless
def devices(topology: str, mesh: str, attached: bool = False) -> tuple[Mesh, int]:
    """The mesh of ``mesh`` on ``topology``'s chips, and the chip's HBM; ``attached``: on this machine's
    own devices instead (a TPU VM: what ``--measure`` runs on)."""
    from jax.experimental import topologies

    name, hbm = TOPOLOGIES[topology]
    if attached:
        chips = jax.devices()
        hbm = chips[0].memory_stats().get("bytes_limit", hbm) if chips[0].memory_stats() else hbm
    else:
        chips = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
    shape, axes = MESHES[mesh]
    n = shape[0] * shape[1]
    return Mesh(__import__("numpy").asarray(chips[:n]).reshape(shape), axes), hbm


def _structs(tree: Any, mesh: Mesh) -> Any:
    """``ShapeDtypeStruct``s of an abstract nnx state, each sharded by its partition metadata (axes
    that do not divide a dim are dropped)."""
    specs = nnx.get_partition_spec(tree)

    def struct(value: Any, spec: Any) -> jax.ShapeDtypeStruct:
        spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
        parts = []
        for dim, axis in zip(value.shape, tuple(spec) + (None,) * (value.ndim - len(spec)), strict=False):
            size = 1 if axis is None else mesh.shape[axis] if isinstance(axis, str) else 0
            parts.append(axis if size and dim % size == 0 else None)
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, PartitionSpec(*parts)))

    return jax.tree.map(struct, tree, specs)


def _opt_structs(tx: Any, trained: Any) -> Any:
    """The optimizer state as structs, sharded as the compiler propagates it from ``trained`` (Adam's
    moments like their parameters)."""
    init = jax.jit(tx.init).lower(trained).compile()
    return jax.tree.map(
        lambda value, sharding: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding),
        jax.eval_shape(tx.init, trained),
        init.output_shardings,
    )


@dataclasses.dataclass
class Figures:
    """What one compiled program reports, per chip."""

    seconds: float  # the TPU compiler's estimate, corrected
    layout_calls: int  # ConcatBitcast custom-calls, each booked at -1 s (added back)
    kernels: int  # Pallas custom-calls (cost as declared)
    flops: float
    bytes: float
    argument: int
    output: int
    temp: int
    alias: int

    @property
    def total(self) -> int:
        return self.argument + self.output + self.temp - self.alias


def figures(compiled: Any) -> Figures:
    """Memory and the corrected cost estimate of ``compiled``."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    text = compiled.as_text()
    layout = len(re.findall(r'custom_call_target="ConcatBitcast"', text))
    kernels = len(re.findall(r'custom_call_target="tpu_custom_call"', text))
    memory = compiled.memory_analysis()
    return Figures(
        seconds=float(cost.get("optimal_seconds", float("nan"))) + layout + kernels,
        layout_calls=layout,
        kernels=kernels,
        flops=float(cost.get("flops", 0.0)),
        bytes=float(cost.get("bytes accessed", 0.0)),
        argument=memory.argument_size_in_bytes,
        output=memory.output_size_in_bytes,
        temp=memory.temp_size_in_bytes,
        alias=memory.alias_size_in_bytes,
    )


def _lowering(shape: Shape, variant: Variant, mesh: Mesh, tokens: int, batch: int, head: bool) -> tuple:
    """``(train_step, eval_forward, (trained, opt_state, rest, ids))``: the steps and their argument
    structs on ``mesh`` (call under ``jax.set_mesh(mesh)``)."""
    train_step, eval_forward, trained, rest, tx = steps(build(shape, variant), variant, head)
    t, r = _structs(trained, mesh), _structs(rest, mesh)
    ids = jax.ShapeDtypeStruct(
        (batch * mesh.shape["fsdp"], tokens), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec("fsdp"))
    )
    return train_step, eval_forward, (t, _opt_structs(tx, t), r, ids)


def _compile(
    shape: Shape, variant: Variant, mesh: Mesh, tokens: int, batch: int, head: bool, unroll: Any
) -> tuple[Figures, Figures]:
    UNROLL[0] = unroll
    with jax.set_mesh(mesh), lj.compiling_for("tpu"):  # Auto axes: the kernels' partition metadata names them
        train_step, eval_forward, (t, o, r, ids) = _lowering(shape, variant, mesh, tokens, batch, head)
        train = jax.jit(train_step, donate_argnums=(0, 1)).lower(t, o, r, ids).compile()
        forward = jax.jit(eval_forward).lower(t, r, ids).compile()
    return figures(train), figures(forward)


def measure(
    shape: Shape, variant: Variant, mesh: Mesh, tokens: int, batch: int = 1, head: bool = True, rounds: int = 10
) -> float:
    """Seconds per train step, measured: the scanned program at full depth runs ``rounds`` times on
    ``mesh``'s devices (which must be attached: a TPU VM, or this CPU for a small model) on zero-filled
    weights, after one warm-up step."""
    UNROLL[0] = 1
    with jax.set_mesh(mesh):
        train_step, _, structs = _lowering(shape, variant, mesh, tokens, batch, head)
        zeros = lambda s: jax.jit(lambda: jnp.zeros(s.shape, s.dtype), out_shardings=s.sharding)()  # noqa: E731
        state, opt_state, params, batch_ids = jax.tree.map(zeros, structs)
        compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(*structs).compile()
        state, opt_state, *out = compiled(state, opt_state, params, batch_ids)
        jax.block_until_ready(out)
        start = time.perf_counter()
        for _ in range(rounds):
            state, opt_state, *out = compiled(state, opt_state, params, batch_ids)
        jax.block_until_ready((state, out))
    return (time.perf_counter() - start) / rounds


def _extrapolated(one: Figures, two: Figures, layers: int, memory: Figures) -> Figures:
    """Time, flops, bytes and layout calls of ``layers`` layers from 1 and 2 unrolled ones (every layer
    costs the same); memory from the scanned program at full depth."""
    at = lambda a, b: a + (layers - 1) * (b - a)  # noqa: E731
    return dataclasses.replace(
        memory,
        seconds=at(one.seconds, two.seconds),
        layout_calls=at(one.layout_calls, two.layout_calls),
        kernels=at(one.kernels, two.kernels),
        flops=at(one.flops, two.flops),
        bytes=at(one.bytes, two.bytes),
    )


def compile_variant(
    shape: Shape, variant: Variant, mesh: Mesh, tokens: int, batch: int = 1, head: bool = True
) -> tuple[Figures, Figures]:
    """``(train step, eval forward)`` figures of ``variant``: ``batch`` sequences of ``tokens`` per
    fsdp group (a tensor-parallel group shares its sequences); ``head``: as :meth:`Decoder.loss`.

    The compiler's cost model counts a loop's body once, so a scanned stack's estimate would be one
    layer's: memory comes from the scanned program at full depth (as it runs), time, flops and bytes
    from the same model unrolled at 1 and 2 layers, extrapolated to full depth (at most 2 layers: the
    unrolled program itself)."""
    memory = _compile(shape, variant, mesh, tokens, batch, head, 1)
    if shape.layers <= 2:
        train, forward = _compile(shape, variant, mesh, tokens, batch, head, True)
        keep = lambda f, m: dataclasses.replace(  # noqa: E731
            m, seconds=f.seconds, layout_calls=f.layout_calls, kernels=f.kernels, flops=f.flops, bytes=f.bytes
        )
        return keep(train, memory[0]), keep(forward, memory[1])
    one = _compile(dataclasses.replace(shape, layers=1), variant, mesh, tokens, batch, head, True)
    two = _compile(dataclasses.replace(shape, layers=2), variant, mesh, tokens, batch, head, True)
    return tuple(_extrapolated(one[i], two[i], shape.layers, memory[i]) for i in range(2))


_NO_FIT = re.compile(r"exceeds available HBM|RESOURCE_EXHAUSTED|Ran out of memory")


def train_memory(
    shape: Shape, variant: Variant, mesh: Mesh, tokens: int, batch: int, head: bool = True
) -> Figures | None:
    """The scanned train step's per-chip figures (memory as it runs; its time is one layer's), or
    ``None`` when the compiler finds it does not fit the chip's HBM."""
    UNROLL[0] = 1
    try:
        with jax.set_mesh(mesh), lj.compiling_for("tpu"):
            train_step, _, (t, o, r, ids) = _lowering(shape, variant, mesh, tokens, batch, head)
            return figures(jax.jit(train_step, donate_argnums=(0, 1)).lower(t, o, r, ids).compile())
    except Exception as error:  # libtpu reports an over-budget program as a compile error
        if _NO_FIT.search(str(error)):
            return None
        raise


def largest_batch(
    shape: Shape, variant: Variant, mesh: Mesh, tokens: int, hbm: int, head: bool = True, cap: int = 64
) -> tuple[int, Figures | None]:
    """The most sequences of ``tokens`` per chip whose train step fits, and that step's figures: the
    memory at 1 and 2 sequences predicts it (temporaries grow linearly with the batch), then the
    compiler confirms it (the prediction compiles within ``hbm``, one more does not). At most ``cap``."""

    def fit(batch: int) -> Figures | None:  # libtpu may compile a program over HBM without an error
        fig = train_memory(shape, variant, mesh, tokens, batch, head)
        return fig if fig is not None and fig.total <= hbm else None

    one = fit(1)
    if one is None:
        return 0, None
    two = fit(2)
    if two is None:
        return 1, one
    fits = {1: one, 2: two}
    slope = max(two.total - one.total, 1)
    batch = min(cap, max(2, 1 + int((hbm - one.total) // slope)))
    while True:  # walk from the prediction to the boundary: usually two compiles
        if batch not in fits:
            fits[batch] = fit(batch)
        if fits[batch] is None:
            batch -= 1
            if batch in fits and fits[batch] is not None:
                return batch, fits[batch]
        else:
            if batch == cap or (batch + 1 in fits and fits[batch + 1] is None):
                return batch, fits[batch]
            batch += 1


def batch_table(
    models: Sequence[str],
    topologies: Sequence[str],
    meshes: Sequence[str],
    tokens: Sequence[int],
    variants: Sequence[str],
    out: str | None = None,
) -> list[dict]:
    """The largest batch that fits per variant (full depth, with the head): one row each."""
    rows = []
    for model_name in models:
        for topology in topologies:
            for mesh_name in meshes:
                mesh, hbm = devices(topology, mesh_name)
                for n in tokens:
                    print(f"\n{model_name}, {topology} mesh {mesh_name}, sequences of {n} tokens per chip")
                    print("| variant | largest batch | tokens per chip | total GiB at it | of HBM |")
                    print("|---|---|---|---|---|")
                    for text in variants:
                        variant, start = Variant.parse(text), time.perf_counter()
                        batch, fig = largest_batch(MODELS[model_name], variant, mesh, n, hbm)
                        row = dict(
                            model=model_name,
                            topology=topology,
                            mesh=mesh_name,
                            tokens=n,
                            variant=variant.name,
                            batch=batch,
                            hbm=hbm,
                            total=fig.total if fig else None,
                            compile_seconds=time.perf_counter() - start,
                        )
                        rows.append(row)
                        total = f"{fig.total / GIB:.2f} | {fig.total / hbm:.0%}" if fig else "- | -"
                        print(f"| {variant.name} | {batch} | {batch * n} | {total} |", flush=True)
                        if out:
                            with open(out, "w") as f:
                                json.dump(rows, f, indent=1)
    return rows


# ---------------------------------------------------------------- one layer: the cost rule's grid
#: single Linear layers ``(in, out)``: square from 256 to 16384 wide, and the models' projections
LAYERS = ((256, 256), (1024, 1024), (4096, 4096), (16384, 16384), (4096, 14336), (14336, 4096), (2304, 9216))


class _Layer(nnx.Module):
    def __init__(self, i: int, o: int, rngs: nnx.Rngs) -> None:
        self.proj = nnx.Linear(i, o, use_bias=False, dtype=BF16, param_dtype=BF16, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


def compile_layer(
    features: tuple[int, int], tokens: int, variant: Variant, topology: str = "v5e"
) -> tuple[float, float]:
    """``(train step, eval forward)`` seconds (the TPU compiler's estimate, corrected) of one bf16
    Linear on one chip of ``topology``: ``tokens`` input rows; the step takes the gradients of the
    factors and of the input (the backward any layer inside a model pays) and an Adam update."""
    mesh, _ = devices(topology, "1")
    sharding = NamedSharding(mesh, PartitionSpec())

    def make() -> nnx.Module:
        model = _Layer(*features, nnx.Rngs(0))
        config_cls, tuner_cls = METHODS[variant.kind]
        config = config_cls(r=variant.r, alpha=variant.r, target_modules=["proj"])
        tuner = tuner_cls(model, config, forward_path=variant.path, branch_dtype=variant.branch)
        tuner.train()
        return tuner

    graphdef, trained, rest = nnx.split(nnx.eval_shape(make), lj.LycorisParam, ...)
    tx = optax.adam(1e-5)

    def step(trained: Any, opt: Any, rest: Any, x: jax.Array, probe: jax.Array) -> tuple:
        def loss(trained: Any, x: jax.Array) -> jax.Array:
            return jnp.sum(nnx.merge(graphdef, trained, rest)(x).astype(jnp.float32) * probe)

        value, (grads, dx) = jax.value_and_grad(loss, argnums=(0, 1))(trained, x)
        updates, opt = tx.update(grads, opt, trained)
        return optax.apply_updates(trained, updates), opt, value, dx

    def forward(trained: Any, rest: Any, x: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, trained, rest)
        model.eval()
        return model(x)

    struct = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)  # noqa: E731
    t, r = struct(trained), struct(rest)
    x = jax.ShapeDtypeStruct((tokens, features[0]), BF16, sharding=sharding)
    probe = jax.ShapeDtypeStruct((tokens, features[1]), BF16, sharding=sharding)
    with lj.compiling_for("tpu"):
        train = jax.jit(step).lower(t, struct(jax.eval_shape(tx.init, trained)), r, x, probe).compile()
        evaluate = jax.jit(forward).lower(t, r, x).compile()
    return figures(train).seconds, figures(evaluate).seconds


def calibrate(
    topology: str = "v5e",
    layers: Sequence[tuple[int, int]] = LAYERS,
    tokens: Sequence[int] = (256, 2048, 8192),
    ranks: Sequence[int] = (8, 16, 64),
    out: str | None = None,
) -> list[dict]:
    """The cost rule's grid: each layer x tokens x rank x method compiled on the ``"merged"`` and the
    ``"factored"`` path, train step and eval forward. Prints, and returns as rows, which path the
    compiler estimates faster and which one ``"auto"`` (``lycoris_core.paths.choose_path``, platform
    ``"tpu"``) picks."""
    rows = []
    for features in layers:
        for n in tokens:
            for r in ranks:
                for kind in METHODS:
                    seconds = {
                        p: compile_layer(features, n, Variant(kind, p, r), topology) for p in ("merged", "factored")
                    }
                    row = dict(topology=topology, features=features, tokens=n, r=r, method=kind)
                    for i, mode in enumerate(("train", "eval")):
                        merged, factored = seconds["merged"][i], seconds["factored"][i]
                        row[mode] = dict(merged=merged, factored=factored, auto=auto_path(features, n, r, kind, mode))
                    rows.append(row)
                    print(_calibration_line(row), flush=True)
                    if out:
                        with open(out, "w") as f:
                            json.dump(rows, f, indent=1)
    print(agreement(rows))
    return rows


def auto_path(features: tuple[int, int], tokens: int, r: int, kind: str, mode: str) -> str:
    """The path ``"auto"`` takes for a bf16 Linear on a TPU (the cost rule alone: no arrays)."""
    from lycoris_core import LayerShape
    from lycoris_core.paths import choose_path
    from lycoris_core.plan import plan_adapter

    config_cls, _ = METHODS[kind]
    plan = plan_adapter(LayerShape("linear", features[1], features[0]), r, float(r), config_cls(r=r, alpha=r))
    return choose_path("auto", plan, tokens, training=mode == "train", supported=True, itemsize=2, platform="tpu")


def _faster(entry: dict) -> str:
    return "merged" if entry["merged"] <= entry["factored"] else "factored"


def _calibration_line(row: dict) -> str:
    parts = [f"{row['features'][0]}x{row['features'][1]} N={row['tokens']} r={row['r']} {row['method']}"]
    for mode in ("train", "eval"):
        e = row[mode]
        mark = "ok" if _agrees(e) else "MISS"
        parts.append(
            f"{mode}: merged {e['merged'] * 1e3:.3f} factored {e['factored'] * 1e3:.3f} ms, auto {e['auto']} {mark}"
        )
    return " | ".join(parts)


def _agrees(entry: dict, tolerance: float = 0.01) -> bool:
    """``auto`` took the faster path, or one within ``tolerance`` of it."""
    best = min(entry["merged"], entry["factored"])
    return entry[entry["auto"]] <= best * (1 + tolerance)


def agreement(rows: Sequence[dict]) -> str:
    """How often ``auto`` takes the path the compiler estimates fastest (within 1%)."""
    entries = [row[mode] for row in rows for mode in ("train", "eval")]
    hits = sum(_agrees(e) for e in entries)
    lost = [e[e["auto"]] / min(e["merged"], e["factored"]) for e in entries]
    return (
        f"auto agrees with the TPU compiler in {hits} of {len(entries)} cases ({hits / max(len(entries), 1):.0%}); "
        f"auto's path against the faster one: {sum(lost) / max(len(lost), 1):.3f}x on average, {max(lost, default=1):.2f}x at worst"
    )


# ---------------------------------------------------------------- the grid
GRIDS = {
    # the targets: Llama-3-8B shape, 4096 tokens per chip, r=16, v5e and v6e, one chip and FSDP 8
    # (one chip holds 2 of the 8B model's blocks: its 16 GB of bf16 weights alone fill a v5e chip)
    "targets": dict(
        models=("llama3-8b",),
        topologies=("v5e", "v6e"),
        meshes=("1", "fsdp"),
        tokens=(4096,),
        variants=("frozen", "full", *(f"{m}:{p}:r16" for m in METHODS for p in PATHS)),
        layers={"1": 2},
    ),
    "full": dict(
        models=("llama3-8b", "gemma2-2b"),
        topologies=tuple(TOPOLOGIES),
        meshes=tuple(MESHES),
        tokens=(2048, 8192),
        variants=("frozen", "full", *(f"{m}:{p}:r{r}" for m in METHODS for p in PATHS for r in (8, 16, 64))),
    ),
    "smoke": dict(models=("tiny",), topologies=("v5e",), meshes=("1",), tokens=(128,), variants=("frozen", "lokr")),
}


def run(
    models: Sequence[str],
    topologies: Sequence[str],
    meshes: Sequence[str],
    tokens: Sequence[int],
    variants: Sequence[str],
    layers: int | dict[str, int] | None = None,
    out: str | None = None,
    attached: bool = False,
) -> list[dict]:
    """Compile every combination; print one table per (model, topology, mesh, tokens), ratios to
    ``frozen``'s (and to ``full``'s where both ran); returns the rows. ``layers``: cut the depth (per
    mesh name with a dict). A variant that does not fit the chip is a row saying what it needs.
    ``attached``: compile for this machine's own TPU chips and measure each train step beside the
    estimate (``benchmarks/tpu.sh`` on a TPU VM)."""
    rows = []
    for model_name in models:
        for topology in topologies:
            for mesh_name in meshes:
                shape = MODELS[model_name]
                depth = layers.get(mesh_name) if isinstance(layers, dict) else layers
                if depth:
                    shape = dataclasses.replace(shape, layers=depth)
                head = shape.layers == MODELS[model_name].layers  # a cut model: its blocks alone
                mesh, hbm = devices(topology, mesh_name, attached)
                for n in tokens:
                    group = []
                    for text in variants:
                        variant = Variant.parse(text)
                        start = time.perf_counter()
                        try:
                            train, forward = compile_variant(shape, variant, mesh, n, head=head)
                        except Exception as error:
                            need = re.search(
                                r"temporaries \(([0-9.]+G)\) exceeds available HBM \(([0-9.]+G)\)", str(error)
                            )
                            why = (
                                f"does not fit: {need[1]} of temporaries, {need[2]} free" if need else str(error)[:300]
                            )
                            print(f"| {variant.name} | {why} |", flush=True)
                            continue
                        row = dict(
                            model=model_name,
                            layers=shape.layers,
                            head=head,
                            topology=topology,
                            mesh=mesh_name,
                            tokens_per_chip=n,
                            variant=variant.name,
                            hbm=hbm,
                            train=dataclasses.asdict(train) | {"total": train.total},
                            eval=dataclasses.asdict(forward) | {"total": forward.total},
                            compile_seconds=time.perf_counter() - start,
                        )
                        if attached:
                            row["measured_seconds"] = measure(shape, variant, mesh, n, head=head)
                        group.append(row)
                        rows.append(row)
                        measured = f", measured {row['measured_seconds'] * 1e3:.1f} ms" if attached else ""
                        print(
                            f"  {variant.name}: compiled in {row['compile_seconds']:.0f}s, TPU compiler estimate "
                            f"{train.seconds * 1e3:.1f} ms{measured}",
                            file=sys.stderr,
                            flush=True,
                        )
                        if out:  # every row as it comes: a long grid can be stopped and still read
                            with open(out, "w") as f:
                                json.dump(rows, f, indent=1)
                    print_table(group)
    return rows


def print_table(group: list[dict]) -> None:
    if not group:
        return
    first = group[0]
    base = next((r for r in group if r["variant"] == "frozen"), None)
    full = next((r for r in group if r["variant"] == "full"), None)
    print(
        f"\n{first['model']} ({first['layers']} layers{'' if first['head'] else ', blocks only'}), "
        f"{first['topology']} mesh {first['mesh']}, "
        f"{first['tokens_per_chip']} tokens per chip; TPU compiler estimate (per chip; layout custom-calls "
        "added back at 1 s each)"
    )
    print(
        "| variant | step ms | / frozen | / full | temp MiB | / frozen | total GiB | of HBM | layout calls | "
        "GFLOP | / frozen | GB accessed | eval ms | / frozen |"
    )
    print("|" + "---|" * 14)
    for r in group:
        t, e = r["train"], r["eval"]
        ratio = lambda key, sub, ref, r=r: (  # noqa: E731
            f"{r[key][sub] / ref[key][sub]:.3f}" if ref and ref[key][sub] else "-"
        )
        flag = f" (+{t['kernels']} Pallas, declared)" if t["kernels"] else ""
        print(
            f"| {r['variant']} | {t['seconds'] * 1e3:.4g}{flag} | {ratio('train', 'seconds', base)} | "
            f"{ratio('train', 'seconds', full)} | {t['temp'] / 2**20:.0f} | {ratio('train', 'temp', base)} | "
            f"{t['total'] / GIB:.2f} | {t['total'] / r['hbm']:.0%} | {t['layout_calls']} | {t['flops'] / 1e9:.0f} | "
            f"{ratio('train', 'flops', base)} | {t['bytes'] / 1e9:.1f} | {e['seconds'] * 1e3:.4g} | "
            f"{ratio('eval', 'seconds', base)} |",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=tuple(GRIDS), default="targets")
    parser.add_argument("--model", help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--topology", help="comma-separated: " + ", ".join(TOPOLOGIES))
    parser.add_argument("--mesh", help="comma-separated: " + ", ".join(MESHES))
    parser.add_argument("--tokens", help="tokens per chip, comma-separated")
    parser.add_argument("--variants", help="comma-separated: frozen, full, METHOD[:PATH[:rR[:base]]]")
    parser.add_argument("--layers", type=int, help="cut the depth (default: the model's)")
    parser.add_argument("--out", help="write every row as JSON here")
    parser.add_argument("--calibrate", action="store_true", help="the cost rule's single-layer grid instead")
    parser.add_argument("--measure", action="store_true", help="on a TPU VM: also run each step on its chips")
    parser.add_argument("--largest-batch", action="store_true", help="the largest batch that fits, per variant")
    parser.add_argument("--agreement", nargs="+", metavar="JSON", help="re-score --calibrate's rows with the rule")
    args = parser.parse_args(argv)
    if args.agreement:  # the rule against saved compiler estimates: no compiling
        rows = [row for path in args.agreement for row in json.load(open(path))]
        for row in rows:
            for mode in ("train", "eval"):
                row[mode]["auto"] = auto_path(tuple(row["features"]), row["tokens"], row["r"], row["method"], mode)
            if not (_agrees(row["train"]) and _agrees(row["eval"])):
                print(_calibration_line(row))
        print(agreement(rows))
        return
    if args.calibrate:
        calibrate(
            topology=(args.topology or "v5e").split(",")[0],
            tokens=tuple(int(t) for t in args.tokens.split(",")) if args.tokens else (256, 2048, 8192),
            out=args.out,
        )
        return
    grid = dict(GRIDS[args.grid])
    for key, value in (("models", args.model), ("topologies", args.topology), ("meshes", args.mesh)):
        if value:
            grid[key] = tuple(value.split(","))
    if args.tokens:
        grid["tokens"] = tuple(int(t) for t in args.tokens.split(","))
    if args.variants:
        grid["variants"] = tuple(args.variants.split(","))
    for v in grid["variants"]:
        Variant.parse(v)  # a bad variant fails before anything compiles
    if args.layers:
        grid["layers"] = args.layers
    if args.largest_batch:
        keys = ("models", "topologies", "meshes", "tokens", "variants")
        batch_table(**{k: grid[k] for k in keys}, out=args.out)
        return
    run(**grid, out=args.out, attached=args.measure)


if __name__ == "__main__":
    main()
