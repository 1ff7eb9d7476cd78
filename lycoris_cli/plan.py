"""``lycoris-jax plan``: will a fine-tune fit a TPU slice, and what will a step cost? Asked of the TPU compiler.

The fine-tuning step is compiled, never run, for the named TPU topology with libtpu on this
machine (no TPU, no weights: only the model's ``config.json`` or a preset's shape). The model is a
stand-in of the config's shape (``lycoris_jax.tpu.Decoder``: grouped-query attention, gated MLP,
bf16, layers scanned with rematerialisation, as TPU trainers run them), so the figures are those
of a model of that shape, not of the architecture's every detail.

Per chip, side by side for the frozen model (the floor: the backward through the blocks, no
update), the adapter on the path ``"auto"`` picks on a TPU, and full fine-tuning (Adam on every
weight): arguments, temporaries and total memory against the chip's HBM, the compiler's estimated
step time (each layout custom-call's -1 s added back) and tokens/s, and the largest batch that
fits (predicted from two compiled batches, as memory grows linearly with the batch; the adapter's
prediction is then compiled, and lowered until it fits).

Exit 0: the adapter's run fits at ``--batch``; 1: it does not; 2: unusable input (libtpu missing
among them: the message gives the one command that installs it).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["add_arguments", "check_arguments", "plan", "run"]

GIB = 2**30
#: the stand-in decoder's Linear layers, each block's ("all-linear": all of them; the head is not adapted)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRESETS = ("llama3-8b", "mistral-7b", "gemma2-2b", "tiny")
GENERATIONS = ("v5e", "v6e", "v5p")
#: the largest batch predicted, at most
MOST = 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help=f"a directory with config.json, or a preset: {', '.join(PRESETS)}"
    )
    parser.add_argument("--topology", required=True, help="a TPU slice as libtpu names it: v5e:2x4, v6e:4x4, v5p:2x2x2")
    parser.add_argument("--method", choices=["lokr", "loha"], default="lokr", help="adapter type (default: lokr)")
    parser.add_argument("--rank", type=int, default=16, help="r (default: 16)")
    parser.add_argument("--targets", default="all-linear", help="all-linear (default), or " + ",".join(LINEAR))
    parser.add_argument("--batch", type=int, default=1, help="sequences per chip (per FSDP shard; default: 1)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default: 2048)")
    parser.add_argument("--mesh", default="fsdp", help="fsdp (default), fsdp,tp (tensor-parallel 2) or fsdp,tp=N")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def _config(spec: str) -> tuple[str, dict | None]:
    """``(name, config)``: a preset (config ``None``) or a directory's ``config.json``."""
    if spec in PRESETS:
        return spec, None
    from lycoris_cli import read_model_config

    expected = f"a transformers checkpoint directory (config.json) or a preset: {', '.join(PRESETS)}"
    return os.path.basename(os.path.normpath(spec)), read_model_config(spec, expected)


def check_arguments(args: argparse.Namespace) -> tuple[str, dict | None, tuple[str, ...]]:
    """Validate everything that needs no compiler: ``(model name, config or None, targets)``."""
    for name in ("rank", "batch", "seq"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)}: must be a positive integer")
    name, config = _config(args.model)
    if config is not None:
        positions = config.get("max_position_embeddings")
        if isinstance(positions, int) and args.seq > positions:
            raise ValueError(
                f"--seq {args.seq}: longer than the model's {positions} positions (max_position_embeddings)"
            )
    if not re.fullmatch(r"[a-z0-9]+:\d+(x\d+)*", args.topology) or args.topology.split(":")[0] not in GENERATIONS:
        raise ValueError(
            f"--topology {args.topology!r}: expected GENERATION:CHIPS such as v5e:2x4, v6e:4x4 or v5p:2x2x2 "
            f"(generations: {', '.join(GENERATIONS)})"
        )
    if not re.fullmatch(r"fsdp(,tp(=\d+)?)?", args.mesh):
        raise ValueError(f"--mesh {args.mesh!r}: expected fsdp, fsdp,tp or fsdp,tp=N")
    if args.targets == "all-linear":
        targets = LINEAR
    else:
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
        unknown = [t for t in targets if t not in LINEAR]
        if unknown or not targets:
            raise ValueError(
                f"--targets {args.targets!r}: {unknown or 'none given'}; each block's Linear layers are {', '.join(LINEAR)}"
            )
    if importlib.util.find_spec("libtpu") is None:
        version = importlib.metadata.version("jax")
        raise ValueError(f'compiling for a TPU needs libtpu, which is not installed: pip install "jax[tpu]=={version}"')
    return name, config, targets


def _progress(what: str, start: float) -> None:
    print(f"  compiled {what} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)


class _Compiler:
    """The compiles one plan needs, each once: the scanned step at a batch, and one layer's step."""

    def __init__(self, tpu: Any, shape: Any, mesh: Any, seq: int, hbm: int) -> None:
        self.tpu, self.shape, self.mesh, self.seq, self.hbm = tpu, shape, mesh, seq, hbm
        self.figures: dict[tuple, Any] = {}  # (variant, batch) -> Figures that fit, or None
        self.totals: dict[tuple, int | None] = {}  # (variant, batch) -> bytes per chip, fitting or not

    def at(self, variant: Any, batch: int) -> Any:
        """The scanned step's figures at ``batch``, or ``None`` when it does not fit the chip."""
        key = (variant, batch)
        if key in self.figures:
            return self.figures[key]
        import jax

        import lycoris_jax as lj

        tpu, start = self.tpu, time.perf_counter()
        with jax.set_mesh(self.mesh), lj.compiling_for("tpu"):
            step, _, args = tpu.lowering(self.shape, variant, self.mesh, self.seq, batch)
        fig, total = tpu.fit(step, *args, mesh=self.mesh, donate_argnums=(0, 1), hbm=self.hbm)
        self.figures[key], self.totals[key] = fig, total
        _progress(f"{variant.name} at batch {batch}: {'fits' if fig else 'does not fit'}", start)
        return fig

    def seconds(self, variant: Any, batch: int) -> float:
        """The step's estimated seconds at full depth: the scanned program's estimate (the rest of the
        step and one layer: the cost model counts a loop body once) and ``layers - 1`` single layers."""
        start = time.perf_counter()
        layer = self.tpu.layer_seconds(self.shape, variant, self.mesh, self.seq, batch)
        _progress(f"{variant.name}, one layer alone, for the step time", start)
        return self.figures[(variant, batch)].seconds + (self.shape.layers - 1) * layer.seconds

    def slope(self, variant: Any, batch: int) -> float | None:
        """Bytes per chip each sequence adds, between ``batch`` and its double (or 1), compiled."""
        other = 2 * batch if self.at(variant, batch) is not None else 1
        if other != batch:
            self.at(variant, other)
        a, b = self.totals.get((variant, batch)), self.totals.get((variant, other))
        if other == batch or a is None or b is None or a == b:
            return None
        return (b - a) / (other - batch)

    def largest(self, variant: Any, batch: int, slope: float | None) -> int:
        """The largest batch that fits, predicted from the total at ``batch`` and ``slope`` (memory is
        linear in the batch); never at or beyond a batch that did not fit, nor below one that did."""
        fits = [b for (v, b), f in self.figures.items() if v == variant and f is not None]
        fails = [b for (v, b), f in self.figures.items() if v == variant and f is None]
        low, high = max(fits, default=0), min(fails, default=MOST + 1) - 1
        total = self.totals.get((variant, batch))
        if slope is None or total is None:
            return low
        predicted = batch + math.floor((self.hbm - total) / slope)
        return max(low, min(predicted, high, MOST))

    def confirm(self, variant: Any, predicted: int) -> int:
        """Compile ``predicted``; while it does not fit, halve the way down to the last batch that did."""
        while True:
            fits = [b for (v, b), f in self.figures.items() if v == variant and f is not None]
            below = max((b for b in fits if b <= predicted), default=0)
            if predicted <= below:
                return predicted
            if self.at(variant, predicted) is not None:
                return predicted
            predicted = below + (predicted - below) // 2


def plan(
    model: str | dict,
    topology: str,
    method: str = "lokr",
    rank: int = 16,
    targets: Sequence[str] = LINEAR,
    batch: int = 1,
    seq: int = 2048,
    mesh: str = "fsdp",
) -> dict:
    """The figures ``lycoris-jax plan`` prints, as a dict: ``model`` a preset name or a transformers
    config (a dict); per variant (``frozen``, the adapter, ``full``): memory in bytes per chip, the
    estimated step seconds, tokens/s per chip and the largest batch. ``ValueError`` on a shape, a
    topology or a mesh the compiler cannot take.

    Compiles: each variant's scanned step at ``batch`` and one layer alone (its step time); the
    frozen step at a second batch (bytes per sequence, which every variant shares: the weights,
    factors and their optimizer state do not grow with the batch); the adapter's predicted largest
    batch (and lower ones until one fits). The frozen and full largest batches are predictions."""
    import jax

    from lycoris_jax import tpu

    shape = tpu.PRESETS[model] if isinstance(model, str) else tpu.shape_from_config(model)
    devices, hbm = tpu.devices(topology, mesh)
    fsdp, tp = devices.shape["fsdp"], devices.shape["tp"]
    if seq > tpu.LONG and seq % tpu.BLOCK:
        raise ValueError(f"--seq {seq}: beyond {tpu.LONG} tokens, a multiple of {tpu.BLOCK} (attention runs in blocks)")
    adapter = tpu.Variant(method, "auto", rank, targets=tuple(targets))
    compiler, rows, slope = _Compiler(tpu, shape, devices, seq, hbm), [], None
    for variant in (tpu.Variant("frozen"), adapter, tpu.Variant("full")):
        start = time.perf_counter()
        with jax.set_mesh(devices):
            trained = sum(x.size for x in jax.tree.leaves(tpu.steps(tpu.build(shape, variant), variant)[2]))
        fig = compiler.at(variant, batch)
        seconds = compiler.seconds(variant, batch) if fig is not None else None
        if slope is None:
            slope = compiler.slope(variant, batch)
        largest = compiler.largest(variant, batch, slope)
        confirmed = variant is adapter and largest > 0
        if confirmed:
            largest = compiler.confirm(variant, largest)
        total = compiler.totals.get((variant, batch))
        rows.append(
            {
                "variant": variant.name if variant.kind in ("frozen", "full") else f"{method} (auto, r={rank})",
                "trainable": 0 if variant.kind == "frozen" else int(trained),
                "fits": fig is not None,
                "argument": fig.argument if fig else None,
                "temp": fig.temp if fig else None,
                "total": fig.total if fig else None,
                "needs_total": None if fig else total,
                "seconds": seconds,
                "tokens_per_second": batch * seq / seconds if seconds else None,
                "largest_batch": largest,
                "largest_batch_compiled": confirmed,
                "total_by_batch": {
                    b: compiler.totals[(v, b)] for v, b in sorted(compiler.totals, key=lambda k: k[1]) if v == variant
                },
                "compile_seconds": round(time.perf_counter() - start, 1),
            }
        )
    return {
        "model": model if isinstance(model, str) else model.get("model_type"),
        "shape": {k: getattr(shape, k) for k in ("d", "heads", "kv_heads", "head_dim", "ff", "layers", "vocab")},
        "topology": topology,
        "chips": fsdp * tp,
        "mesh": {"fsdp": fsdp, "tp": tp},
        "hbm": hbm,
        "batch": batch,
        "seq": seq,
        "method": method,
        "rank": rank,
        "targets": list(targets),
        "fits": rows[1]["fits"],
        "variants": rows,
        "estimate": "TPU compiler (libtpu, deviceless); layout custom-calls' -1 s added back",
    }


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _table(result: dict, name: str) -> str:
    rows, hbm = result["variants"], result["hbm"]
    frozen = rows[0]["seconds"]

    def cell(row: dict, key: str) -> str:
        if key == "trainable":
            n = row["trainable"]
            return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"
        if key == "largest_batch":
            n = row["largest_batch"]
            return f">={MOST}" if n >= MOST else f"{'' if row['largest_batch_compiled'] else '~'}{n}" if n else "0"
        if not row["fits"]:
            if key == "total":
                need = row["needs_total"]
                return "does not fit" + (f" (needs {need / GIB:.1f} GiB)" if need else "")
            return "-"
        if key in ("argument", "temp"):
            return _size(row[key])
        if key == "total":
            return f"{_size(row['total'])} ({row['total'] / hbm:.0%})"
        if key == "seconds":
            ratio = f" ({row['seconds'] / frozen:.2f}x)" if frozen else ""
            return f"{row['seconds'] * 1e3:.1f} ms{ratio}"
        return f"{row['tokens_per_second']:,.0f}"

    labels = {
        "trainable": "trainable parameters",
        "argument": "arguments",
        "temp": "temporaries",
        "total": f"total of {hbm / GIB:.0f} GiB HBM",
        "seconds": "step time (x frozen)",
        "tokens_per_second": "tokens/s",
        "largest_batch": "largest batch (~ predicted)",
    }
    width = max(len(v) for v in labels.values())
    cols = [[cell(r, k) for k in labels] for r in rows]
    widths = [max(len(r["variant"]), *(len(c) for c in col)) for r, col in zip(rows, cols, strict=True)]
    mesh = result["mesh"]
    lines = [
        f"{name}: {result['shape']['layers']} layers, d={result['shape']['d']}; {result['topology']} "
        f"({result['chips']} chips, mesh fsdp={mesh['fsdp']} tp={mesh['tp']}); {result['batch']} x {result['seq']} "
        "tokens per chip",
        "per chip, the TPU compiler's estimate (nothing ran):",
        "  " + " " * width + "  " + "  ".join(r["variant"].rjust(w) for r, w in zip(rows, widths, strict=True)),
    ]
    for i, label in enumerate(labels.values()):
        lines.append(
            "  " + label.ljust(width) + "  " + "  ".join(c[i].rjust(w) for c, w in zip(cols, widths, strict=True))
        )
    adapter = rows[1]
    verdict = (
        f"fits: {adapter['variant']} at batch {result['batch']} uses {_size(adapter['total'])} of {hbm / GIB:.0f} GiB per chip"
        if adapter["fits"]
        else f"does not fit: {adapter['variant']} at batch {result['batch']} needs more than {hbm / GIB:.0f} GiB per chip"
        + (f"; batch {adapter['largest_batch']} should" if adapter["largest_batch"] else "")
    )
    return "\n".join([*lines, verdict])


def run(args: argparse.Namespace) -> int:
    name, config, targets = check_arguments(args)
    result = plan(
        config if config is not None else name,
        args.topology,
        method=args.method,
        rank=args.rank,
        targets=targets,
        batch=args.batch,
        seq=args.seq,
        mesh=args.mesh,
    )
    print(json.dumps(result, indent=1) if args.json else _table(result, name))
    return 0 if result["fits"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    from lycoris_cli.cli import main as cli_main

    return cli_main(["plan", *(sys.argv[1:] if argv is None else argv)])
