"""Fuzzing real checkpoint directories: only clean errors or correct loads, never a crash, hang or wrong load.

Each iteration copies a real directory (a LoKr one saved by the torch twin, a LoHa one saved by the
JAX twin), applies one random mutation (bytes of the weights or config, the safetensors header
and its length field, tensor dtypes and shapes, keys, JSON fields), then loads it with both twins
and with ``lycoris_jax.pytree`` (three readers), and runs ``check`` on it. Accepted outcomes:

- every reader raises ``ValueError``/``TypeError`` (a clean error); ``check`` exits 2 or 0;
- every reader loads, the factors equal an independent numpy decoding of the mutated file (cast
  to float32) and the outputs agree; ``check`` exits 0.

Anything else (another exception, the twins disagreeing, a load that differs from the file, a
call running longer than ``TIMEOUT`` seconds) fails the test. ``LYCORIS_FUZZ_SEED`` and
``LYCORIS_FUZZ_ITERATIONS`` (default 0 and 300) choose the run.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import os
import shutil
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx

from lycoris_core import CONFIG_NAME, SAFETENSORS_NAME
from lycoris_jax import pytree
from parity_tests.__main__ import main as parity_main
from tests.safety.files import edit_tensors, read_raw, write_raw
from tests.safety.twins import JAX, TORCH, TWINS

SEED = int(os.environ.get("LYCORIS_FUZZ_SEED", "0"))
ITERATIONS = int(os.environ.get("LYCORIS_FUZZ_ITERATIONS", "300"))
TIMEOUT = 20
DTYPES = ["F16", "BF16", "F32", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "X", 7, None]
JSON_VALUES = [
    None,
    True,
    0,
    -1,
    3,
    2.5,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "x",
    "(",
    [],
    [1],
    ["q"],
    {},
    {"a": 1},
    10**30,
]


class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: int):
    def alarm(*_):
        raise Hang(f"no answer within {seconds}s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- an independent reader
def decode(path: Path) -> dict[str, np.ndarray]:
    """The safetensors spec read with numpy alone: float tensors as float32."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n :]
    out = {}
    for k, e in header.items():
        b, end = e["data_offsets"]
        chunk = data[b:end]
        if e["dtype"] == "BF16":
            a = (np.frombuffer(chunk, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(chunk, {"F16": "<f2", "F32": "<f4", "F64": "<f8"}[e["dtype"]]).astype(np.float32)
        out[k] = a.reshape(e["shape"])
    return out


# ---------------------------------------------------------------- mutations
def flip_weights_byte(d, rng):
    p = d / SAFETENSORS_NAME
    b = bytearray(p.read_bytes())
    i = int(rng.integers(len(b)))
    b[i] ^= int(rng.integers(1, 256))
    p.write_bytes(bytes(b))


def truncate_weights(d, rng):
    p = d / SAFETENSORS_NAME
    b = p.read_bytes()
    p.write_bytes(b[: int(rng.integers(len(b)))])


def append_weights(d, rng):
    p = d / SAFETENSORS_NAME
    p.write_bytes(p.read_bytes() + rng.bytes(int(rng.integers(1, 64))))


def header_length(d, rng):
    p = d / SAFETENSORS_NAME
    b = p.read_bytes()
    n = int.from_bytes(b[:8], "little")
    new = int(rng.choice([0, 1, n - 1, n + 1, n * 2, 2**63, int(rng.integers(2**40))]))
    p.write_bytes(new.to_bytes(8, "little") + b[8:])


def header_entry(d, rng):
    p = d / SAFETENSORS_NAME
    header, data = read_raw(p)
    keys = [k for k in header if k != "__metadata__"]
    k = keys[int(rng.integers(len(keys)))]
    what = rng.choice(["dtype", "shape", "offsets", "drop", "rename", "garbage", "metadata"])
    if what == "dtype":
        header[k]["dtype"] = DTYPES[int(rng.integers(len(DTYPES)))]
    elif what == "shape":
        shape = list(header[k]["shape"])
        choice = rng.choice(["grow", "shrink", "add", "remove", "negative", "float"])
        if choice == "grow":
            shape[int(rng.integers(len(shape)))] += 1
        elif choice == "shrink":
            shape[int(rng.integers(len(shape)))] -= 1
        elif choice == "add":
            shape.append(1)
        elif choice == "remove" and len(shape) > 1:
            shape.pop()
        elif choice == "negative":
            shape[0] = -shape[0]
        else:
            shape[0] = shape[0] + 0.5
        header[k]["shape"] = shape
    elif what == "offsets":
        b, e = header[k]["data_offsets"]
        header[k]["data_offsets"] = [int(x) for x in (b + rng.integers(-8, 9), e + rng.integers(-8, 9))]
    elif what == "drop":
        del header[k]
    elif what == "rename":
        module, _, _ = k.rpartition(".")
        header[rng.choice([module + ".lokr_w1", module + ".hada_w1_a", "x", module + ".weight", k + "x"])] = header.pop(
            k
        )
    elif what == "garbage":
        header[k] = JSON_VALUES[int(rng.integers(len(JSON_VALUES)))]
    else:
        header["__metadata__"] = JSON_VALUES[int(rng.integers(len(JSON_VALUES)))]
    write_raw(p, header, data)


def tensor_edit(d, rng):
    def edit(t):
        k = sorted(t)[int(rng.integers(len(t)))]
        what = rng.choice(["dtype", "reshape", "drop", "add", "nan", "scale"])
        if what == "dtype":
            t[k] = t[k].to(rng.choice([torch.float64, torch.bfloat16, torch.float16, torch.int32, torch.bool]))
        elif what == "reshape":
            t[k] = torch.zeros(*[int(s) for s in rng.integers(1, 9, size=int(rng.integers(1, 4)))])
        elif what == "drop":
            del t[k]
        elif what == "add":
            module = k.rpartition(".")[0]
            t[module + "." + rng.choice(["lokr_w1_a", "lokr_t2", "hada_t1", "hada_w2_b", "bias"])] = torch.zeros(2, 2)
        elif what == "nan":
            t[k] = (
                t[k]
                .clone()
                .flatten()
                .index_fill(0, torch.tensor([0]), float(rng.choice([math.nan, math.inf])))
                .reshape(t[k].shape)
            )
        else:
            t[k] = t[k] * float(rng.choice([0.0, -1.0, 1e-30, 1e30]))
        return t

    edit_tensors(d, edit)


def config_field(d, rng):
    p = d / CONFIG_NAME
    data = json.loads(p.read_text())
    k = sorted(data)[int(rng.integers(len(data)))]
    what = rng.choice(["value", "drop", "unknown"])
    if what == "value":
        data[k] = JSON_VALUES[int(rng.integers(len(JSON_VALUES)))]
    elif what == "drop":
        del data[k]
    else:
        data["some_new_field"] = 1
    p.write_text(json.dumps(data))


def config_bytes(d, rng):
    p = d / CONFIG_NAME
    b = bytearray(p.read_bytes())
    choice = rng.choice(["flip", "truncate", "replace"])
    if choice == "flip":
        b[int(rng.integers(len(b)))] ^= int(rng.integers(1, 256))
    elif choice == "truncate":
        b = b[: int(rng.integers(len(b)))]
    else:
        b = bytearray(json.dumps(JSON_VALUES[int(rng.integers(len(JSON_VALUES)))]).encode())
    p.write_bytes(bytes(b))


MUTATIONS = [
    flip_weights_byte,
    truncate_weights,
    append_weights,
    header_length,
    header_entry,
    header_entry,
    tensor_edit,
    tensor_edit,
    config_field,
    config_field,
    config_bytes,
]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    TORCH.tuner(config=TORCH.lokr()).save_pretrained(root / "lokr")
    JAX.tuner(config=JAX.loha()).save_pretrained(root / "loha")
    return [root / "lokr", root / "loha"]


def load(twin, d):
    """``("error", type name)`` for a clean error, or ``("ok", factors, outputs)``; anything else propagates."""
    try:
        with deadline(TIMEOUT):
            tuner = twin.lib.LycorisTuner.from_pretrained(twin.model(), d)
            factors = {k: np.asarray(v, np.float32) for k, v in tuner.adapter_state_dict().items()}
            return "ok", factors, twin.run(tuner)
    except (ValueError, TypeError) as err:
        return "error", type(err).__name__


def load_pytree(d):
    """The same for ``lycoris_jax.pytree`` on the JAX mirror's ``nnx.State`` (outputs of the merged model)."""
    try:
        with deadline(TIMEOUT):
            model = JAX.model()
            params = nnx.state(model, nnx.Param)
            adapter = pytree.from_pretrained(d, params)
            nnx.update(model, pytree.merge(params, adapter))
            factors = {k: np.asarray(v, np.float32) for k, v in adapter.state_dict().items()}
            return "ok", factors, JAX.run(model)
    except (ValueError, TypeError) as err:
        return "error", type(err).__name__


READERS = ["torch", "jax", "pytree"]


@pytest.mark.filterwarnings("ignore:.*ignoring unknown config keys")
def test_fuzzed_checkpoints_give_clean_errors_or_correct_loads(seeds, tmp_path, capsys):
    rng = np.random.default_rng(SEED)
    outcomes: collections.Counter[str] = collections.Counter()
    failures = []
    for i in range(ITERATIONS):
        seed_dir = seeds[i % len(seeds)]
        d = tmp_path / f"case{i}"
        shutil.copytree(seed_dir, d)
        mutation = MUTATIONS[int(rng.integers(len(MUTATIONS)))]
        mutation(d, rng)
        label = f"#{i} {seed_dir.name}/{mutation.__name__}"
        try:
            results = [load(twin, d) for twin in TWINS] + [load_pytree(d)]
            with (
                deadline(TIMEOUT),
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                code = parity_main(["check", str(d)])
        except BaseException as err:  # a crash or a hang
            failures.append(f"{label}: {type(err).__name__}: {err}")
            continue
        kinds = [r[0] for r in results]
        if kinds == ["ok", "error", "error"] and json.loads((d / CONFIG_NAME).read_text()).get("modules_to_save"):
            outcomes["loaded by torch; modules_to_save refused by the Flax twin and pytree (documented)"] += 1
            continue
        if len(set(kinds)) > 1:
            failures.append(
                f"{label}: the readers disagree: {dict(zip(READERS, (r[:2] for r in results), strict=True))}"
            )
        elif kinds[0] == "ok":
            expected = decode(d / SAFETENSORS_NAME)
            for reader, (_, factors, _) in zip(READERS, results, strict=True):
                if factors.keys() != expected.keys() or any(
                    not np.array_equal(factors[k], expected[k], equal_nan=True) for k in factors
                ):
                    failures.append(f"{label}: {reader} loaded values that differ from the file")
            out = results[0][2]
            scale = max(1.0, float(np.abs(out[np.isfinite(out)]).max(initial=0.0)))  # a flipped exponent: 1e20
            for reader, (_, _, other) in zip(READERS[1:], results[1:], strict=True):
                if not np.allclose(out, other, rtol=1e-5, atol=1e-5 * scale, equal_nan=True):
                    failures.append(f"{label}: torch's and {reader}'s outputs differ")
            if code != 0:
                failures.append(f"{label}: every reader loads it but check exits {code}")
            outcomes["loaded"] += 1
        else:
            if code not in (0, 2):
                failures.append(f"{label}: every reader refuses it but check exits {code}")
            outcomes[f"refused ({results[0][1]})"] += 1
        shutil.rmtree(d)
    with capsys.disabled():
        print(f"\nfuzz seed {SEED}: {ITERATIONS} mutated directories: {dict(sorted(outcomes.items()))}")
    assert not failures, "\n".join(failures[:30])
