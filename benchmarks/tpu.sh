#!/usr/bin/env bash
# On a TPU VM (jax[tpu], flax, optax, torch and peft installed; no network needed): B1 of
# benchmarks/speed.py measured on the chip, then B6's targets compiled for this VM's own chips and
# each train step run beside the TPU compiler's estimate (measured against estimated).
#   bash benchmarks/tpu.sh [extra tpu_aot.py args, e.g. --mesh fsdp]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY'
import jax
print("jax", jax.__version__, "devices:", jax.devices())
assert jax.default_backend() == "tpu", "benchmarks/tpu.sh runs on a TPU VM (B6 alone compiles anywhere: benchmarks/tpu_aot.py)"
PY
python3 benchmarks/speed.py b1 --rounds 20
python3 benchmarks/tpu_aot.py --grid targets --measure --out tpu_measured.json "$@"
