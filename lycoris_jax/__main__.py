"""``python -m lycoris_jax`` is the ``lycoris-jax`` command."""

from lycoris_jax.cli import main

raise SystemExit(main())
