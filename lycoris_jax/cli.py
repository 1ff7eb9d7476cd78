"""The ``lycoris-jax`` command (``python -m lycoris_jax``): ``demo`` for now.

Exit codes: 0 ok, 1 failed, 2 unusable input or bad usage (argparse's own).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    from lycoris_jax import demo

    parser = argparse.ArgumentParser(prog="lycoris-jax", description="LyCORIS adapters for JAX/Flax with PEFT's files.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo",
        help="fine-tune LoKr/LoHa on a transformers Flax Llama and load the result in PEFT and lycoris_torch",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(demo_parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return demo.run(args)
    except (ValueError, OSError) as err:  # unusable input (e.g. --model): one line, no traceback
        print(f"lycoris-jax {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
