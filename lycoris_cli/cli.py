"""The ``lycoris-jax`` command (``python -m lycoris_cli``).

Subcommands: ``demo`` (fine-tune and cross-load, the README's main job), ``finetune`` (your
checkpoint, your text), ``plan`` (a TPU run's memory and step time, from the TPU compiler), ``convert`` (PEFT
directory <-> LyCORIS/kohya file), ``check`` (validate an adapter and compare the frameworks on it),
``inspect`` (what an adapter holds, as a table or ``--json``). ``--help`` on each.

Exit codes: 0 ok, 1 failed (``check``: the frameworks disagree), 2 unusable input or bad usage,
141 the reader of the output went away (``... | head``), quietly, as a program killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "model_modules"]

_MODEL_HELP = (
    "the model the adapter is for, to resolve LyCORIS's underscore names: a transformers model directory "
    "(config.json; built on torch's meta device, no weights read), or a text file with one module path per "
    "line (or a JSON list)"
)


def model_modules(spec: str) -> Any:
    """``--model``: ``{module path: LayerShape}`` of a transformers model directory (built on the meta
    device, no weights), or the module paths listed in a text/JSON file."""
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ValueError(f"--model {spec!r}: a directory without config.json (expected a transformers model)")
        import torch
        import transformers

        from lycoris_torch.layer import SUPPORTED_LAYERS, layer_shape_of

        try:  # no code from the directory runs (trust_remote_code=False), no weights are read
            config = transformers.AutoConfig.from_pretrained(spec, trust_remote_code=False)
            arch = (getattr(config, "architectures", None) or [None])[0]
            # the torch class of the architecture (a Flax/TF name maps to its torch twin: same module paths)
            cls = (
                getattr(transformers, arch.removeprefix("Flax").removeprefix("TF"), None)
                if isinstance(arch, str)
                else None
            )
            if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
                cls = None
            with torch.device("meta"):
                model = cls._from_config(config) if cls is not None else transformers.AutoModel.from_config(config)
        except Exception as err:  # transformers' own errors, whatever they are: unusable input
            raise ValueError(
                f"--model {spec!r}: cannot build a transformers model: {type(err).__name__}: {err}"
            ) from None
        return {n: layer_shape_of(m, n) for n, m in model.named_modules() if isinstance(m, SUPPORTED_LAYERS)}
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as fh:
            text = fh.read()
        names = json.loads(text) if spec.endswith(".json") else [line.strip() for line in text.splitlines()]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"--model {spec!r}: expected a JSON list of module paths")
        return [n for n in names if n and not n.startswith("#")]
    raise ValueError(f"--model {spec!r}: no such file or directory")


def _check_destination(source: str, destination: str, force: bool) -> None:
    """Refuse a destination that is, holds or lies inside the source (``--force`` or not), and an
    existing one (an empty directory aside) without ``--force``."""
    src, dst = os.path.realpath(source), os.path.realpath(destination)
    if src == dst or (os.path.exists(dst) and os.path.samefile(src, dst)):
        raise ValueError(f"{destination!r}: is the source itself; choose another destination")
    if os.path.commonpath([src, dst]) == src:
        raise ValueError(
            f"{destination!r}: lies inside the source {source!r}, whose adapter it could replace; "
            "choose a destination outside it"
        )
    if os.path.commonpath([src, dst]) == dst:
        raise ValueError(
            f"{destination!r}: holds the source {source!r}, which writing there could replace; "
            "choose another destination"
        )
    if os.path.exists(dst) and not force and not (os.path.isdir(dst) and not os.listdir(dst)):
        what = "a directory" if os.path.isdir(dst) else "a file"
        raise ValueError(f"{destination!r}: exists ({what}); pass --force to replace it, or choose another destination")


def _convert(args: argparse.Namespace) -> int:
    from lycoris_core import kohya

    if not os.path.exists(args.source):
        raise ValueError(f"{args.source!r}: no such file or directory")
    _check_destination(args.source, args.destination, args.force)
    layers = model_modules(args.model) if args.model else None
    if os.path.isdir(args.source):
        config, tensors = kohya.read_peft(args.source)
        out, metadata = kohya.peft_to_lycoris(
            config,
            tensors,
            prefix=kohya.LYCORIS_PREFIX if args.prefix is None else args.prefix,
            layers=layers if isinstance(layers, dict) else None,
            where=args.source,
        )
        kohya.save_lycoris(args.destination, out, metadata)
        modules = len({k.partition(".")[0] for k in out})
        print(f"wrote {args.destination}: LyCORIS {config.peft_type} file, {modules} modules")
        return 0
    if layers is None:
        raise ValueError(
            "--model is needed to turn a LyCORIS file into a PEFT directory: its underscore names "
            "(lycoris_layers_0_self_attn_q_proj) must be matched to the model's module paths"
        )
    source = kohya.read_lycoris(args.source)
    config, tensors = kohya.lycoris_to_peft(source, layers, prefix=args.prefix)
    kohya.write_peft(args.destination, config, tensors)
    print(f"wrote {args.destination}: PEFT {config.peft_type} adapter, {len(config.target_modules)} modules")
    return 0


def _check(args: argparse.Namespace) -> int:
    from lycoris_core import kohya
    from parity_tests.__main__ import run_check

    if os.path.isdir(args.path):
        return run_check(args.path)
    source = kohya.read_lycoris(args.path)  # no model needed: the file's own names serve as module paths
    with kohya.as_peft_directory(source, list(source.modules), prefix="") as directory:
        return run_check(directory)


def _inspect(args: argparse.Namespace) -> int:
    from lycoris_core.summary import describe

    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}: {info['format']} {info['method']} adapter, {len(info['modules'])} modules")
    head = f"{'module':<44} {'method':<6} {'r':>4} {'alpha':>8} {'scale':>8} {'params':>10} {'bytes':>11}  dtypes"
    print(head)
    for row in info["modules"]:
        print(
            f"{row['module']:<44} {row['method']:<6} {row['r']:>4} {row['alpha']:>8g} {row['scale']:>8.4g} "
            f"{row['params']:>10,} {row['bytes']:>11,}  {','.join(row['dtypes'])}"
        )
    print(f"total: {info['params']:,} parameters, {info['bytes']:,} bytes")
    return 0


def _parser() -> argparse.ArgumentParser:
    from lycoris_cli import demo, finetune, plan

    parser = argparse.ArgumentParser(
        prog="lycoris-jax",
        description="LyCORIS adapters (LoHa, LoKr) for JAX/Flax, with PEFT's and LyCORIS/kohya's files.",
        epilog="exit codes: 0 ok, 1 failed, 2 unusable input or bad usage, 141 output pipe closed",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "demo",
        help="fine-tune LoKr/LoHa on a transformers Flax Llama (or a local Llama, Gemma or Mistral checkpoint) and "
        "load the result in PEFT and lycoris_torch",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(p)
    p = commands.add_parser(
        "finetune",
        help="train a LoKr/LoHa adapter on your local checkpoint and your text; resumable; PEFT's files at the end",
        description=finetune.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    finetune.add_arguments(p)
    p = commands.add_parser(
        "plan",
        help="compile the fine-tuning step for a TPU slice (libtpu, no TPU): memory per chip, step time and the "
        "largest batch, for frozen, the adapter and full fine-tuning",
        description=plan.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_arguments(p)
    p = commands.add_parser(
        "convert",
        help="PEFT adapter directory <-> LyCORIS/kohya single .safetensors file",
        description="Convert a PEFT LoHa/LoKr directory to a LyCORIS/kohya file (SOURCE a directory), or a "
        "LyCORIS file to a PEFT directory (SOURCE a file; needs --model). Both compute what the source computes; "
        "see docs/guide/tour.md, 'LyCORIS and kohya files'. An existing destination is replaced only with --force; factors with NaN or "
        "inf are refused.",
    )
    p.add_argument("source", help="a PEFT adapter directory, or a LyCORIS .safetensors file")
    p.add_argument("destination", help="the LyCORIS file to write, or the PEFT directory to write")
    p.add_argument("--model", help=_MODEL_HELP)
    p.add_argument("--prefix", help="the LyCORIS name prefix: written (default 'lycoris'), or read (default: found)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing destination (never the source, a path inside it or one that holds it)",
    )
    p = commands.add_parser(
        "check",
        help="validate an adapter and compare lycoris_jax, lycoris_torch and PEFT on it",
        description="Validate a PEFT directory or a LyCORIS file like a loader, then rebuild every module's ΔW "
        "with lycoris_jax, lycoris_torch and PEFT and print their agreement. Exit 0: agree, 1: disagree, "
        "2: unusable input.",
    )
    p.add_argument("path", help="a PEFT adapter directory or a LyCORIS .safetensors file")
    p = commands.add_parser(
        "inspect",
        help="modules, method, ranks, alphas, parameter counts, bytes and dtypes of an adapter",
        description="Print what a PEFT adapter directory or a LyCORIS/kohya file holds, per module.",
    )
    p.add_argument("path", help="a PEFT adapter directory or a LyCORIS .safetensors file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from lycoris_cli import demo, finetune, plan

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo": demo.run,
        "finetune": finetune.run,
        "plan": plan.run,
        "convert": _convert,
        "check": _check,
        "inspect": _inspect,
    }
    run = commands[args.command]
    unusable = (
        (ValueError, OSError) if args.command in ("demo", "finetune", "plan") else (ValueError, TypeError, OSError)
    )
    try:
        code = run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:  # ``lycoris-jax inspect ... | head``: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the exit's own flush must not fail again
        os.close(devnull)
        return 141
    except unusable as err:  # unusable input: one line, no traceback
        print(f"lycoris-jax {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
