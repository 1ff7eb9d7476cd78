"""The ``lycoris-jax`` command (``python -m lycoris_cli``): demo, convert, check, inspect.

Kept apart from ``lycoris_jax`` because it uses ``lycoris_torch`` and ``parity_tests`` too.
"""
