#!/usr/bin/env bash
# B1, B2 and B4 of benchmarks/speed.py on a CUDA machine that already has jax (CUDA), flax, optax,
# torch, peft and safetensors: no network, no install. Runs from the repository root in under
# 8 minutes on one H200; prints the tables and the device's name.
#   bash benchmarks/gpu.sh [extra speed.py args]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the card
python3 - <<'PY'
import jax, torch
print("jax devices:", jax.devices(), "| torch:", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")
PY
timeout 450 python3 benchmarks/speed.py b1 b2 b4 --rounds 20 --tokens 1 16 128 1024 4096 16384 "$@"
