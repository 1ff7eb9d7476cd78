"""``python -m lycoris_cli`` is the ``lycoris-jax`` command."""

from lycoris_cli.cli import main

raise SystemExit(main())
