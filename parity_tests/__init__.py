"""Cross-framework parity harness for lycoris_torch, lycoris_jax and real PEFT."""
