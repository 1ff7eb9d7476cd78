"""B6: adapter train steps as the TPU compiler sees them, compiled deviceless on any CPU machine.

JAX compiles for a TPU topology with libtpu and no TPU attached (``jax.experimental.topologies``);
the compiled program reports its exact per-chip memory and the TPU compiler's own estimate of its
run time. Every figure here is that estimate, not a measurement: compare variants by ratio, on one
topology, in one run.

    pip install -e ".[tpu]"                        # jax[tpu] at the project's jax version (libtpu)
    python benchmarks/tpu_aot.py                   # the targets' grid: Llama-3-8B shape, 4096 tokens/chip, r=16
    python benchmarks/tpu_aot.py --grid full       # every topology, mesh, model, token count, variant and rank
    python benchmarks/tpu_aot.py --model llama3-8b --layers 2 --topology v5e --mesh 1 --variants frozen,lokr:factored
    python benchmarks/tpu_aot.py --largest-batch --model llama3-8b --topology v5e --mesh fsdp --tokens 8192

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
from lycoris_jax.tpu import (  # the compiling machinery, shared with `lycoris-jax plan`
    BF16,
    GIB,
    MESHES,
    METHODS,
    PATHS,
    TOPOLOGIES,
    Figures,
    Shape,
    Variant,
    compile_variant,
    devices,
    extrapolated,
    figures,
    largest_batch,
    lowering,
)
from lycoris_jax.tpu import PRESETS as MODELS

__all__ = ["Figures", "Shape", "Variant", "compile_variant", "devices", "extrapolated", "figures", "largest_batch"]


def measure(
    shape: Shape, variant: Variant, mesh: Mesh, tokens: int, batch: int = 1, head: bool = True, rounds: int = 10
) -> float:
    """Seconds per train step, measured: the scanned program at full depth runs ``rounds`` times on
    ``mesh``'s devices (which must be attached: a TPU VM, or this CPU for a small model) on zero-filled
    weights, after one warm-up step."""
    with jax.set_mesh(mesh):
        train_step, _, structs = lowering(shape, variant, mesh, tokens, batch, head)
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
#: single Linear layers ``(in, out)``: square from 256 to 16384 wide, and every projection of B6's models
#: (Llama-3-8B: q/o 4096x4096, k/v 4096x1024, gate/up 4096x14336, down 14336x4096; Gemma-2-2B: q 2304x2048,
#: k/v 2304x1024, o 2048x2304, gate/up 2304x9216, down 9216x2304)
LAYERS = (
    (256, 256), (1024, 1024), (4096, 4096), (16384, 16384), (4096, 14336), (14336, 4096), (2304, 9216),
    (4096, 1024), (2304, 2048), (2304, 1024), (2048, 2304), (9216, 2304),
)  # fmt: skip


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
