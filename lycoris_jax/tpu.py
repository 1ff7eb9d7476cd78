"""Plan a TPU run without a TPU: compile it for a TPU topology with libtpu, and read what the compiler reports.

JAX compiles for a TPU topology on any CPU machine once libtpu is installed (``pip install
"jax[tpu]==<your jax version>"``): nothing runs and nothing is allocated. The compiled program
reports its exact per-chip memory (arguments, outputs, temporaries) and the TPU compiler's own
estimate of its run time. That estimate books every custom-call it cannot cost at -1 s, and the
compiler inserts layout custom-calls (``ConcatBitcast``) into ordinary programs: :func:`figures`
adds one second back per such call. A Pallas kernel (``tpu_custom_call``) is costed as it declares.

Your own model and step (an NNX model here; any jittable step works)::

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    import lycoris_jax as lj
    from lycoris_jax import tpu

    mesh, hbm = tpu.devices("v5e:2x2", "fsdp")  # 4 chips, mesh axes ("fsdp", "tp"); HBM per chip


    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            init = nnx.initializers.lecun_normal()
            self.up = nnx.Linear(1024, 4096, kernel_init=nnx.with_partitioning(init, ("fsdp", "tp")), rngs=rngs)
            self.down = nnx.Linear(4096, 1024, kernel_init=nnx.with_partitioning(init, ("tp", "fsdp")), rngs=rngs)

        def __call__(self, x):
            return self.down(nnx.relu(self.up(x)))


    config = lj.LoKrConfig(r=16, target_modules=["up", "down"])
    with jax.set_mesh(mesh):  # abstract: nothing is allocated
        model = nnx.eval_shape(lambda: lj.LoKrModel(MLP(nnx.Rngs(0)), config))
    graphdef, trained, rest = nnx.split(model, lj.LycorisParam, ...)
    tx = optax.adam(1e-4)


    def step(trained, opt_state, rest, x):  # what your trainer jits
        grads = jax.grad(lambda t: jnp.mean(nnx.merge(graphdef, t, rest)(x) ** 2))(trained)
        updates, opt_state = tx.update(grads, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state


    t = tpu.abstract(trained, mesh)  # structs sharded by the params' partition metadata
    x = jax.ShapeDtypeStruct((4 * 2048, 1024), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("fsdp")))
    args = (t, tpu.optimizer_state(tx, t, mesh), tpu.abstract(rest, mesh), x)
    fig = tpu.compile_step(step, *args, mesh=mesh, donate_argnums=(0, 1), hbm=hbm)
    print(f"{fig.total / 2**20:.1f} MiB per chip; step {fig.seconds * 1e6:.0f} us (TPU compiler estimate)")

``compile_step`` returns ``None`` when the compiler finds the program does not fit the chip's HBM.
A scanned stack's estimate counts the loop body once: compile 1 and 2 layers unrolled and
extrapolate (:func:`compile_variant` does this for the stand-in decoder below).

The stand-in decoder (:class:`Decoder`, built from a transformers ``config.json`` by
:func:`shape_from_config` or from :data:`PRESETS`) is what ``lycoris-jax plan`` and the B6 benchmark
compile: pre-norm blocks with grouped-query attention and a gated MLP, stacked and scanned with
rematerialisation as TPU trainers run them, bf16 weights and activations.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")  # quiets libtpu's start-up warnings
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiling processes at once

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lycoris_core import LoHaConfig, LoKrConfig
from lycoris_jax.functional import compiling_for
from lycoris_jax.layer import LycorisParam
from lycoris_jax.tuner import LoHaModel, LoKrModel

GIB = 2**30
BF16 = jnp.bfloat16
#: the stand-in decoder's Linear layers ("all-linear": the output head is not adapted, as in PEFT)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = {"lokr": (LoKrConfig, LoKrModel), "loha": (LoHaConfig, LoHaModel)}
PATHS = ("auto", "merged", "factored", "peft")
#: HBM per chip in bytes, by TPU generation
HBM = {"v5e": 16 * GIB, "v6e": 32 * GIB, "v5p": 95 * GIB}
#: B6's short names -> 8-chip topologies
TOPOLOGIES = {"v5e": "v5e:2x4", "v6e": "v6e:2x4", "v5p": "v5p:2x2x2"}
#: B6's mesh names -> (mesh shape, axis names) of 8 chips; "1": one chip of the topology
MESHES = {"1": ((1, 1), ("fsdp", "tp")), "fsdp": ((8, 1), ("fsdp", "tp")), "fsdp_tp": ((4, 2), ("fsdp", "tp"))}


def install_command() -> str:
    """The one command that installs libtpu at this JAX's version."""
    return f'pip install "jax[tpu]=={jax.__version__}"'


def require_libtpu() -> None:
    """Raise ``RuntimeError`` naming :func:`install_command` when libtpu is not installed."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(f"compiling for a TPU needs libtpu, which is not installed: {install_command()}")


# ---------------------------------------------------------------- the stand-in decoder
@dataclasses.dataclass(frozen=True)
class Shape:
    """A decoder's shape (grouped-query attention, gated MLP); ``act``: ``"silu"`` or ``"gelu"``."""

    d: int
    heads: int
    kv_heads: int
    head_dim: int
    ff: int
    layers: int
    vocab: int
    act: str = "silu"


PRESETS = {
    "llama3-8b": Shape(d=4096, heads=32, kv_heads=8, head_dim=128, ff=14336, layers=32, vocab=128256),
    "mistral-7b": Shape(d=4096, heads=32, kv_heads=8, head_dim=128, ff=14336, layers=32, vocab=32000),
    "gemma2-2b": Shape(d=2304, heads=8, kv_heads=4, head_dim=256, ff=9216, layers=26, vocab=256000, act="gelu"),
    "tiny": Shape(d=256, heads=4, kv_heads=2, head_dim=64, ff=512, layers=2, vocab=512),  # tests
}


def shape_from_config(config: dict, where: str = "config.json") -> Shape:
    """The decoder shape of a transformers config of the Llama family (Llama, Mistral, Gemma, Qwen2 and
    others with ``hidden_size``, ``num_attention_heads``, ``intermediate_size``, ``num_hidden_layers``,
    ``vocab_size``). ``ValueError`` naming ``where`` and the key when one is missing or not a positive int."""
    keys = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "vocab_size")
    for key in keys:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            got = "missing" if key not in config else f"{value!r}"
            raise ValueError(
                f"{where}: {key} is {got}; a decoder of the Llama family needs positive integers for "
                f"{', '.join(keys)} (model_type {config.get('model_type')!r})"
            )
    d, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or d // heads
    if heads % kv_heads:
        raise ValueError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    act = str(config.get("hidden_activation") or config.get("hidden_act") or "silu")
    return Shape(
        d=d,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        ff=config["intermediate_size"],
        layers=config["num_hidden_layers"],
        vocab=config["vocab_size"],
        act="gelu" if act.startswith("gelu") else "silu",
    )


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
    """Embedding, ``layers`` blocks stacked on a leading axis, final norm, output head. ``unroll``: the
    layer scan's (``True``: every layer in the program, as the compiler's cost model needs)."""

    def __init__(self, s: Shape, rngs: nnx.Rngs, unroll: int | bool = 1) -> None:
        @nnx.split_rngs(splits=s.layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
        def create(rngs: nnx.Rngs) -> Block:
            return Block(s, rngs)

        embed_init = nnx.with_partitioning(nnx.initializers.normal(), ("tp", "fsdp"))
        self.embed = nnx.Embed(s.vocab, s.d, dtype=BF16, param_dtype=BF16, embedding_init=embed_init, rngs=rngs)
        self.layers = create(rngs)
        self.norm = nnx.RMSNorm(s.d, dtype=BF16, param_dtype=BF16, rngs=rngs)
        self.lm_head = _linear(s.d, s.vocab, ("fsdp", "tp"), rngs)
        self.unroll = unroll

    def blocks(self, x: jax.Array) -> jax.Array:
        """The stack as ``jax.lax.scan`` over the layers' state, each block rematerialised."""
        graphdef, state = nnx.split(self.layers)

        def body(h: jax.Array, layer: Any) -> tuple[jax.Array, None]:
            return _batch_sharded(nnx.merge(graphdef, layer)(_batch_sharded(h))), None

        return jax.lax.scan(jax.checkpoint(body), _batch_sharded(x), state, unroll=self.unroll)[0]

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
    """``frozen``, ``full``, or a method on a forward path at rank ``r`` (``branch``: ``branch_dtype``;
    ``targets``: the adapted Linear layers of each block)."""

    kind: str
    path: str = "auto"
    r: int = 16
    branch: str = "adapter"
    targets: tuple[str, ...] = TARGETS

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


def build(shape: Shape, variant: Variant, unroll: int | bool = 1, alpha: float | None = None) -> nnx.Module:
    """The model (the tuner for an adapter, ``alpha`` defaulting to ``r``), built abstractly: nothing
    is allocated."""

    def make() -> nnx.Module:
        model = Decoder(shape, nnx.Rngs(0), unroll)
        if variant.kind in ("frozen", "full"):
            return model
        config_cls, tuner_cls = METHODS[variant.kind]
        config = config_cls(r=variant.r, alpha=alpha or variant.r, target_modules=list(variant.targets))
        tuner = tuner_cls(model, config, stacks=["layers"], forward_path=variant.path, branch_dtype=variant.branch)
        tuner.train()
        return tuner

    return nnx.eval_shape(make)


def _decoder(model: nnx.Module) -> Decoder:
    return model if isinstance(model, Decoder) else model.model


def _trained_filter(variant: Variant) -> Any:
    return {"frozen": nnx.Not(nnx.Variable), "full": nnx.Param}.get(variant.kind, LycorisParam)


def steps(model: nnx.Module, variant: Variant, head: bool = True) -> tuple[Any, Any, Any, Any, Any]:
    """``(train_step, eval_forward, trained, rest, optimizer)``: ``train_step(trained, opt_state, rest, ids)``
    (Adam on ``trained``; the blocks' input differentiated too, the backward every deep model pays, so
    ``frozen`` is the floor of any adapter step) and ``eval_forward(trained, rest, ids)`` (eval mode)."""
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
def _mesh_shape(mesh: str, chips: int) -> tuple[int, int]:
    """``(fsdp, tp)`` of a mesh name: ``"1"`` (one chip), ``"fsdp"``, ``"fsdp,tp"`` (tp = 2) or
    ``"fsdp,tp=N"``, and B6's ``"fsdp_tp"`` (8 chips as 4 x 2)."""
    if mesh in MESHES and mesh != "fsdp":
        return MESHES[mesh][0]
    if mesh == "fsdp":
        return chips, 1
    match = re.fullmatch(r"fsdp,tp(?:=(\d+))?", mesh)
    if not match:
        raise ValueError(f"mesh {mesh!r}: expected fsdp, fsdp,tp or fsdp,tp=N")
    tp = int(match[1] or 2)
    if tp < 1 or chips % tp:
        raise ValueError(f"mesh {mesh!r}: a tensor-parallel size of {tp} does not divide the {chips} chips")
    return chips // tp, tp


def devices(topology: str, mesh: str, attached: bool = False) -> tuple[Mesh, int]:
    """The mesh (axes ``("fsdp", "tp")``) of ``mesh`` on ``topology``'s chips, and the chip's HBM in
    bytes. ``topology``: a libtpu topology name (``"v5e:2x4"``, ``"v6e:4x4"``, ``"v5p:2x2x2"``) or
    B6's short names (``"v5e"``: 8 chips). ``attached``: this machine's own devices instead (a TPU VM).
    ``ValueError`` naming an unknown generation or a topology libtpu refuses; ``RuntimeError`` with the
    install command when libtpu is missing."""
    name = TOPOLOGIES.get(topology, topology)
    generation = name.split(":")[0]
    if generation not in HBM:
        raise ValueError(f"topology {topology!r}: expected GENERATION:CHIPS with a generation of {', '.join(HBM)}")
    hbm = HBM[generation]
    if attached:
        chips = jax.devices()
        stats = chips[0].memory_stats()
        hbm = stats.get("bytes_limit", hbm) if stats else hbm
    else:
        require_libtpu()
        from jax.experimental import topologies

        try:
            chips = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
        except Exception as error:
            raise ValueError(f"topology {topology!r}: libtpu refuses it: {str(error).splitlines()[0]}") from None
    fsdp, tp = _mesh_shape(mesh, len(chips))
    if fsdp * tp > len(chips):
        raise ValueError(f"mesh {mesh!r} needs {fsdp * tp} chips; topology {topology!r} has {len(chips)}")
    return Mesh(np.asarray(chips[: fsdp * tp]).reshape(fsdp, tp), ("fsdp", "tp")), hbm


def abstract(tree: Any, mesh: Mesh) -> Any:
    """``ShapeDtypeStruct``s of an abstract nnx state, each sharded on ``mesh`` by its partition
    metadata (``nnx.with_partitioning``; an axis that does not divide its dim is dropped)."""
    specs = nnx.get_partition_spec(tree)

    def struct(value: Any, spec: Any) -> jax.ShapeDtypeStruct:
        spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
        parts = []
        for dim, axis in zip(value.shape, tuple(spec) + (None,) * (value.ndim - len(spec)), strict=False):
            size = 1 if axis is None else mesh.shape[axis] if isinstance(axis, str) else 0
            parts.append(axis if size and dim % size == 0 else None)
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, PartitionSpec(*parts)))

    return jax.tree.map(struct, tree, specs)


def optimizer_state(tx: optax.GradientTransformation, trained: Any, mesh: Mesh) -> Any:
    """``tx``'s state of the structs ``trained``, each leaf sharded as the parameter whose path ends
    its own (Adam's moments like their parameters), the rest (step counts) replicated on ``mesh``."""
    shardings = {tuple(map(str, path)): leaf.sharding for path, leaf in jax.tree.leaves_with_path(trained)}
    replicated = NamedSharding(mesh, PartitionSpec())

    def struct(path: tuple, value: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        keys = tuple(map(str, path))
        match = next((sh for i in range(len(keys)) if (sh := shardings.get(keys[i:])) is not None), None)
        fits = match is not None and len(match.spec) <= value.ndim
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=match if fits else replicated)

    return jax.tree.map_with_path(struct, jax.eval_shape(tx.init, trained))


@dataclasses.dataclass
class Figures:
    """What one compiled program reports, per chip (bytes; seconds: the TPU compiler's estimate)."""

    seconds: float  # corrected: each layout custom-call's -1 s added back
    layout_calls: int  # ConcatBitcast custom-calls
    kernels: int  # Pallas custom-calls (cost as declared)
    flops: float
    bytes: float
    argument: int
    output: int
    temp: int
    alias: int

    @property
    def total(self) -> int:
        """Bytes the program holds at its peak: arguments, outputs and temporaries, less donated ones."""
        return self.argument + self.output + self.temp - self.alias


def figures(compiled: Any) -> Figures:
    """Memory and the corrected cost estimate of a compiled program (``jax.jit(f).lower(...).compile()``)."""
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


_NO_FIT = re.compile(r"exceeds available HBM|RESOURCE_EXHAUSTED|Ran out of memory")


def fit(
    fn: Callable, *args: Any, mesh: Mesh, donate_argnums: Sequence[int] = (), hbm: int | None = None
) -> tuple[Figures | None, int | None]:
    """``(figures, needed)`` of ``jax.jit(fn, donate_argnums)`` compiled for ``args`` (``ShapeDtypeStruct``s
    sharded on ``mesh``, a topology's mesh from :func:`devices`): ``figures`` ``None`` when it does not
    fit the chip (the compiler says so, or its total exceeds ``hbm``); ``needed`` the bytes per chip it
    asks for (its total; where the compiler refused it, the arguments plus the temporaries its message
    names; ``None`` when the message names none). Forward paths choose as on a TPU."""
    held = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(args))
    try:
        with jax.set_mesh(mesh), compiling_for("tpu"):
            fig = figures(jax.jit(fn, donate_argnums=tuple(donate_argnums)).lower(*args).compile())
    except Exception as error:  # libtpu reports an over-budget program as a compile error
        if not _NO_FIT.search(str(error)):
            raise
        found = re.search(r"temporaries \(([0-9.]+)([GM])\)", str(error))
        return None, None if not found else held + int(float(found[1]) * (GIB if found[2] == "G" else 2**20))
    return (None if hbm is not None and fig.total > hbm else fig), fig.total


def compile_step(
    fn: Callable, *args: Any, mesh: Mesh, donate_argnums: Sequence[int] = (), hbm: int | None = None
) -> Figures | None:
    """The figures of :func:`fit`, or ``None`` when the step does not fit the chip."""
    return fit(fn, *args, mesh=mesh, donate_argnums=donate_argnums, hbm=hbm)[0]


def lowering(
    shape: Shape, variant: Variant, mesh: Mesh, tokens: int, batch: int, head: bool = True, unroll: int | bool = 1
) -> tuple:
    """``(train_step, eval_forward, (trained, opt_state, rest, ids))``: the stand-in decoder's steps and
    their argument structs on ``mesh``, ``batch`` sequences of ``tokens`` per fsdp group."""
    train_step, eval_forward, trained, rest, tx = steps(build(shape, variant, unroll), variant, head)
    t, r = abstract(trained, mesh), abstract(rest, mesh)
    ids = jax.ShapeDtypeStruct(
        (batch * mesh.shape["fsdp"], tokens), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec("fsdp"))
    )
    return train_step, eval_forward, (t, optimizer_state(tx, t, mesh), r, ids)


def _compile(
    shape: Shape, variant: Variant, mesh: Mesh, tokens: int, batch: int, head: bool, unroll: Any
) -> tuple[Figures, Figures]:
    with jax.set_mesh(mesh), compiling_for("tpu"):  # Auto axes: the kernels' partition metadata names them
        train_step, eval_forward, (t, o, r, ids) = lowering(shape, variant, mesh, tokens, batch, head, unroll)
        train = jax.jit(train_step, donate_argnums=(0, 1)).lower(t, o, r, ids).compile()
        forward = jax.jit(eval_forward).lower(t, r, ids).compile()
    return figures(train), figures(forward)


def layer_seconds(shape: Shape, variant: Variant, mesh: Mesh, tokens: int, batch: int = 1) -> Figures:
    """The figures of one block's share of the train step, compiled alone: its rematerialised forward,
    its backward to its input and trained variables, and their Adam update (what the layer scan's body
    does once per layer). A full-depth step costs about the scanned program's estimate (the rest of the
    step and one layer: the cost model counts a loop body once) plus ``layers - 1`` of these."""
    config_cls, tuner_cls = METHODS.get(variant.kind, (None, None))

    def make() -> nnx.Module:
        block = Block(shape, nnx.Rngs(0))
        if config_cls is None:
            return block
        config = config_cls(r=variant.r, alpha=variant.r, target_modules=list(variant.targets))
        tuner = tuner_cls(block, config, forward_path=variant.path, branch_dtype=variant.branch)
        tuner.train()
        return tuner

    with jax.set_mesh(mesh), compiling_for("tpu"):
        graphdef, trained, rest = nnx.split(nnx.eval_shape(make), _trained_filter(variant), ...)
        tx = optax.adam(1e-5)
        t, r = abstract(trained, mesh), abstract(rest, mesh)
        x = jax.ShapeDtypeStruct(
            (batch * mesh.shape["fsdp"], tokens, shape.d), BF16, sharding=NamedSharding(mesh, PartitionSpec("fsdp"))
        )

        def step(trained: Any, opt_state: Any, rest: Any, x: jax.Array) -> tuple:
            def loss(trained: Any, x: jax.Array) -> jax.Array:
                apply = jax.checkpoint(lambda t, h: nnx.merge(graphdef, t, rest)(_batch_sharded(h)))
                return jnp.mean(jnp.square(_batch_sharded(apply(trained, x)).astype(jnp.float32)))

            grads, dx = jax.grad(loss, argnums=(0, 1))(trained, x)
            if variant.kind == "frozen":
                return trained, opt_state, dx
            updates, opt_state = tx.update(grads, opt_state, trained)
            return optax.apply_updates(trained, updates), opt_state, dx

        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(t, optimizer_state(tx, t, mesh), r, x).compile()
    return figures(compiled)


def extrapolated(one: Figures, two: Figures, layers: int, memory: Figures) -> Figures:
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
    return tuple(extrapolated(one[i], two[i], shape.layers, memory[i]) for i in range(2))


def train_memory(
    shape: Shape, variant: Variant, mesh: Mesh, tokens: int, batch: int, head: bool = True, hbm: int | None = None
) -> Figures | None:
    """The scanned train step's per-chip figures (memory as it runs; its time is one layer's), or
    ``None`` when it does not fit the chip (see :func:`compile_step`)."""
    with jax.set_mesh(mesh), compiling_for("tpu"):
        train_step, _, args = lowering(shape, variant, mesh, tokens, batch, head)
    return compile_step(train_step, *args, mesh=mesh, donate_argnums=(0, 1), hbm=hbm)


def largest_batch(
    shape: Shape,
    variant: Variant,
    mesh: Mesh,
    tokens: int,
    hbm: int,
    head: bool = True,
    cap: int = 64,
    known: dict[int, Figures | None] | None = None,
) -> tuple[int, Figures | None]:
    """The most sequences of ``tokens`` per chip whose train step fits ``hbm``, and that step's figures:
    two compiled batches predict it (temporaries grow linearly with the batch), then the compiler
    confirms it (the prediction fits, one more does not). At most ``cap``. ``known``: batches already
    compiled (:func:`train_memory`), reused and extended."""
    fits = {} if known is None else known

    def fit(batch: int) -> Figures | None:
        if batch not in fits:
            fits[batch] = train_memory(shape, variant, mesh, tokens, batch, head, hbm)
        return fits[batch]

    if fit(1) is None:
        return 0, None
    done = sorted(b for b, f in fits.items() if f is not None)
    low, high = (done[-2], done[-1]) if len(done) > 1 else (1, 2)
    if fit(high) is None:  # only batch 1 was known and 2 does not fit
        return 1, fits[1]
    slope = max((fits[high].total - fits[low].total) / (high - low), 1)
    batch = min(cap, max(high, high + int((hbm - fits[high].total) // slope)))
    while True:  # walk from the prediction to the boundary: usually two compiles
        if fit(batch) is None:
            batch -= 1
            if batch in fits and fits[batch] is not None:
                return batch, fits[batch]
        else:
            if batch == cap or (batch + 1 in fits and fits[batch + 1] is None):
                return batch, fits[batch]
            batch += 1
