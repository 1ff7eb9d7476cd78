"""The bad-input catalogue (docs/ERRORS.md): one test per row, each run on both twins.

Every row is a clear ``ValueError``/``TypeError`` (``CheckpointError`` is a ``ValueError``) whose
message names the file, key, module or value at fault, with the model and the files on disk exactly
as before. ``test_catalogue_matches_the_docs`` keeps this table and docs/ERRORS.md in step.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flax import nnx

import lycoris_jax as lj
from lycoris_core import CONFIG_NAME, SAFETENSORS_NAME, NoMatchingModuleError
from lycoris_core._io import INCOMPLETE_MARKER
from lycoris_core.errors import CheckpointError
from tests.safety.files import edit_config, edit_tensors, key, read_raw, tensors, weights, write_raw
from tests.safety.twins import JAX, TWINS, Twin, tree_digest

DOCS = Path(__file__).resolve().parents[2] / "docs" / "ERRORS.md"
W1 = key("head", "lokr_w1")


@dataclass(frozen=True)
class FileCase:
    """A good checkpoint directory, damaged by ``mutate``; loading it must fail with ``exc``/``match``."""

    id: str
    mutate: Callable[[Path], None]
    match: str
    exc: type[Exception] = CheckpointError


def _set(field: str, value: Any) -> Callable[[Path], None]:
    return lambda d: edit_config(d, lambda c: c.__setitem__(field, value))


def _text(text: str | bytes) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        (d / CONFIG_NAME).write_bytes(text if isinstance(text, bytes) else text.encode())

    return mutate


def _header(fn: Callable[[dict, bytes], tuple[Any, bytes] | None], length: Callable[[int], int] | None = None):
    def mutate(d: Path) -> None:
        header, data = read_raw(weights(d))
        out = fn(header, data)
        header, data = out if out is not None else (header, data)
        head = header if isinstance(header, bytes) else json.dumps(header).encode()
        write_raw(weights(d), head, data, None if length is None else length(len(head)))

    return mutate


def _entry(name: str, field: str, value: Any):
    return _header(lambda h, data: h[name].__setitem__(field, value))


def _tensors(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        def edit(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            fn(t)
            return t

        edit_tensors(d, edit)

    return mutate


def _nan(t):
    t[W1][0, 0] = math.nan


def _inf(t):
    t[W1][0, 0] = math.inf


FILE_CASES = [
    FileCase("config-missing", lambda d: (d / CONFIG_NAME).unlink(), "no adapter_config.json found"),
    FileCase("config-invalid-json", _text("{not json"), "adapter_config.json: not valid JSON"),
    FileCase("config-not-utf8", _text(b"\xff\xfe{}"), "adapter_config.json: not valid JSON"),
    FileCase("config-not-object", _text("[1, 2]"), "adapter_config.json: expected a JSON object, got a JSON list"),
    FileCase("config-peft-type-other", _set("peft_type", "LORA"), "unknown peft_type 'LORA'"),
    FileCase(
        "config-peft-type-missing", lambda d: edit_config(d, lambda c: c.pop("peft_type")), "unknown peft_type None"
    ),
    FileCase(
        "config-target-modules-int",
        _set("target_modules", 5),
        "LoKrConfig.target_modules: expected a string, a list of strings or None, got int 5",
    ),
    FileCase("config-r-string", _set("r", "8"), "LoKrConfig.r: expected a positive integer rank, got '8'"),
    FileCase("config-r-zero", _set("r", 0), "LoKrConfig.r: expected a positive integer rank, got 0"),
    FileCase("config-alpha-nan", _set("alpha", math.nan), "LoKrConfig.alpha: expected a finite number, got nan"),
    FileCase("config-alpha-inf", _set("alpha", math.inf), "LoKrConfig.alpha: expected a finite number, got inf"),
    FileCase("config-alpha-string", _set("alpha", "8"), "LoKrConfig.alpha: expected a number, got '8'"),
    FileCase(
        "config-bool-field-string",
        _set("use_effective_conv2d", "yes"),
        "LoKrConfig.use_effective_conv2d: expected true or false, got str 'yes'",
    ),
    FileCase(
        "config-rank-pattern-not-object",
        _set("rank_pattern", [1]),
        "LoKrConfig.rank_pattern: expected a JSON object mapping regexes to values, got list",
    ),
    FileCase(
        "config-rank-pattern-zero",
        _set("rank_pattern", {"head": 0}),
        r"LoKrConfig.rank_pattern\['head'\]: expected a positive integer rank, got 0",
    ),
    FileCase(
        "config-dropout-out-of-range",
        _set("rank_dropout", 1.5),
        r"LoKrConfig.rank_dropout: expected a probability in \[0, 1\], got 1.5",
    ),
    FileCase(
        "config-deep-nesting",
        _text("[" * 100_000 + "]" * 100_000),
        "adapter_config.json: not valid JSON: RecursionError",
    ),
    FileCase(
        "config-huge-integer", _text('{"r": ' + "9" * 5000 + "}"), "adapter_config.json: not valid JSON: ValueError"
    ),
    FileCase("config-bad-regex", _set("target_modules", "("), "LoKrConfig.target_modules: invalid regular expression"),
    FileCase(
        "config-targets-nothing",
        _set("target_modules", ["nope"]),
        r"adapter: the adapter's config: Target modules \['nope'\] not found",
        NoMatchingModuleError,
    ),
    FileCase(
        "config-no-targets",
        _set("target_modules", None),
        r"adapter: the adapter's config: Please specify `target_modules`",
        NoMatchingModuleError,
    ),
    FileCase("weights-missing", lambda d: (d / SAFETENSORS_NAME).unlink(), "no adapter_model.safetensors found"),
    FileCase(
        "weights-pickle-only",
        lambda d: (d / SAFETENSORS_NAME).rename(d / "adapter_model.bin"),
        r"only a pickle checkpoint \(adapter_model.bin\) is here, and pickle files are never loaded",
    ),
    FileCase(
        "weights-empty-file", lambda d: (d / SAFETENSORS_NAME).write_bytes(b""), "not a safetensors file: only 0 bytes"
    ),
    FileCase(
        "weights-truncated",
        lambda d: (d / SAFETENSORS_NAME).write_bytes((d / SAFETENSORS_NAME).read_bytes()[:-10]),
        "adapter_model.safetensors: the header describes .* bytes of tensor data but the file holds .*: truncated",
    ),
    FileCase(
        "weights-trailing-bytes",
        lambda d: (d / SAFETENSORS_NAME).write_bytes((d / SAFETENSORS_NAME).read_bytes() + b"\0" * 8),
        r"damaged \(trailing bytes\)",
    ),
    FileCase(
        "weights-header-length-lies",
        _header(lambda h, data: None, length=lambda n: n + 10**9),
        "header length .* exceeds the file",
    ),
    FileCase(
        "weights-header-not-json",
        _header(lambda h, data: (b"{" + b" " * 30, data)),
        r"damaged safetensors header \(not JSON\)",
    ),
    FileCase(
        "weights-header-duplicate-key",
        _header(lambda h, data: (json.dumps(h)[:-1].encode() + b', "' + W1.encode() + b'": {}}', data)),
        r"duplicate keys \['base_model.model.head.lokr_w1'\]",
    ),
    FileCase(
        "weights-offsets-lie",
        _entry(W1, "data_offsets", [0, 10**6]),
        r"tensor 'base_model.model.head.lokr_w1': F32 \(2, 4\) needs 32 bytes, its data_offsets \[0, 1000000\] span 1000000",
    ),
    FileCase("weights-offsets-overlap", _entry(W1, "data_offsets", [8, 40]), "overlaps another tensor|leaves a gap"),
    FileCase(
        "weights-unknown-dtype",
        _entry(W1, "dtype", "F99"),
        "tensor 'base_model.model.head.lokr_w1': unknown dtype 'F99'",
    ),
    FileCase(
        "weights-header-deep-nesting",
        _header(lambda h, data: (b"[" * 100_000 + b"]" * 100_000, data)),
        r"damaged safetensors header \(not JSON\): RecursionError",
    ),
    FileCase(
        "weights-dtype-not-string",
        _entry(W1, "dtype", ["F32"]),
        r"tensor 'base_model.model.head.lokr_w1': unknown dtype",
    ),
    FileCase(
        "weights-too-many-dims",
        _entry(W1, "shape", [2**60] * 300),
        r"tensor 'base_model.model.head.lokr_w1': expected a shape of at most 16 non-negative integers",
    ),
    FileCase(
        "weights-shape-overflows",
        _entry(W1, "shape", [2**60] * 16),
        r"needs more bytes than any file holds",
    ),
    FileCase("weights-shape-lies", _entry(W1, "shape", [4, 4]), r"F32 \(4, 4\) needs 64 bytes, its data_offsets"),
    FileCase(
        "keys-missing-factor",
        _tensors(lambda t: t.pop(key("head", "lokr_w2"))),
        r"head: checkpoint factors \['lokr_w1'\] do not fit the adapter, .* \(missing \['lokr_w2'\], unexpected \[\]\)",
    ),
    FileCase(
        "keys-extra-factor",
        _tensors(lambda t: t.__setitem__(key("head", "lokr_w1_a"), torch.zeros(2, 2))),
        r"head: checkpoint factors .* \(missing \[\], unexpected \['lokr_w1_a'\]\)",
    ),
    FileCase(
        "keys-unknown",
        _tensors(lambda t: t.__setitem__("base_model.model.head.weight", torch.zeros(8, 16))),
        r"checkpoint key 'head.weight' \(8, 16\): fits no adapter factor",
    ),
    FileCase(
        "keys-other-algorithm",
        _tensors(lambda t: t.__setitem__(key("head", "hada_w1_a"), torch.zeros(8, 2))),
        r"checkpoint key 'head.hada_w1_a' \(8, 2\): fits no adapter factor",
    ),
    FileCase(
        "keys-module-absent",
        _tensors(lambda t: t.__setitem__(key("layers.7", "lokr_w1"), torch.zeros(2, 4))),
        r"checkpoint has adapter weights for modules the model does not have: \['layers.7'\]",
    ),
    FileCase(
        "keys-module-untargeted",
        _set("target_modules", ["layers.0", "layers.1"]),
        r"checkpoint has adapter weights for modules the config does not target: \['head'\]",
    ),
    FileCase(
        "shape-wrong",
        _tensors(lambda t: t.__setitem__(W1, torch.zeros(4, 2))),
        r"head.lokr_w1: checkpoint shape \(4, 2\) does not fit the adapter, expected \(2, 4\)",
    ),
    FileCase(
        "dtype-int",
        _tensors(lambda t: t.__setitem__(W1, t[W1].to(torch.int32))),
        r"adapter factors must be floating point .*, got \{'base_model.model.head.lokr_w1': 'I32'\}",
    ),
    FileCase(
        "dtype-bool",
        _tensors(lambda t: t.__setitem__(W1, t[W1] > 0)),
        r"must be floating point .*'BOOL'",
    ),
    FileCase(
        "dtype-f8",
        _tensors(lambda t: t.__setitem__(W1, t[W1].to(torch.float8_e4m3fn))),
        r"must be floating point .*'F8_E4M3'",
    ),
    FileCase(
        "nonfinite-nan",
        _tensors(_nan),
        r"non-finite values \(NaN or inf\) in \['base_model.model.head.lokr_w1'\]; pass allow_nonfinite=True",
    ),
    FileCase(
        "nonfinite-inf", _tensors(_inf), r"non-finite values \(NaN or inf\) in \['base_model.model.head.lokr_w1'\]"
    ),
    FileCase(
        "directory-is-a-file",
        lambda d: (shutil.rmtree(d), d.write_text("x")),
        "not a directory",
    ),
    FileCase("directory-missing", lambda d: shutil.rmtree(d), "not a directory"),
    FileCase(
        "incomplete-save-marker",
        lambda d: (d / INCOMPLETE_MARKER).write_text("x"),
        "an interrupted save left old and new files mixed",
    ),
]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    JAX.tuner(config=JAX.lokr()).save_pretrained(d)
    return d


def damaged(good: Path, tmp_path: Path, case: FileCase) -> Path:
    d = tmp_path / "adapter"
    shutil.copytree(good, d)
    case.mutate(d)
    return d


def digest(d: Path) -> Any:
    return tree_digest(d) if d.is_dir() else (d.read_bytes() if d.exists() else None)


@pytest.mark.parametrize("twin", TWINS, ids=lambda t: t.name)
@pytest.mark.parametrize("case", FILE_CASES, ids=lambda c: c.id)
def test_bad_files(good, tmp_path, twin, case):
    d = damaged(good, tmp_path, case)
    on_disk = digest(d)
    model = twin.model()
    snap = twin.snapshot(model)
    with pytest.raises(case.exc, match=case.match):
        twin.lib.LycorisTuner.from_pretrained(model, d)
    twin.assert_unchanged(model, snap)
    if case.id.startswith("config-peft-type"):
        return  # load_adapter checks the type against its own tuner: row "load-wrong-peft-type"
    tuner = twin.tuner(seed=3)
    snap = twin.snapshot(tuner)
    with pytest.raises(case.exc, match=case.match):
        tuner.load_adapter(d, "second")
    twin.assert_unchanged(tuner, snap)
    assert digest(d) == on_disk


# ---------------------------------------------------------------- accepted, with a rule
@pytest.mark.parametrize("twin", TWINS, ids=lambda t: t.name)
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.bfloat16, torch.float16], ids=["dtype-f64-cast", "dtype-bf16-cast", "dtype-f16-cast"]
)
def test_float_dtypes_load_cast_to_the_factor_dtype(good, tmp_path, twin, dtype):
    """Rule: stored floats are cast to the adapter's own dtype (float32 here), as PEFT's load_state_dict copies."""
    d = tmp_path / "adapter"
    shutil.copytree(good, d)
    edit_tensors(d, lambda t: {k: v.to(dtype) for k, v in t.items()})
    stored = tensors(d)
    loaded = twin.lib.LycorisTuner.from_pretrained(twin.model(), d)
    for k, v in loaded.adapter_state_dict().items():
        assert str(v.dtype).endswith("float32")
        np.testing.assert_array_equal(np.asarray(v), stored[k].to(torch.float32).numpy())


@pytest.mark.parametrize("twin", TWINS, ids=lambda t: t.name)
def test_nonfinite_factors_load_when_asked(good, tmp_path, twin):
    d = damaged(good, tmp_path, next(c for c in FILE_CASES if c.id == "nonfinite-nan"))
    loaded = twin.lib.LycorisTuner.from_pretrained(twin.model(), d, allow_nonfinite=True)
    assert np.isnan(np.asarray(loaded.adapter_state_dict()[W1])).any()
    tuner = twin.tuner()
    tuner.load_adapter(d, "second", allow_nonfinite=True)
    with pytest.raises(ValueError, match="head: NaNs detected in the merged weights. The adapter second"):
        tuner.merge_adapter(["second"], safe_merge=True)


# ---------------------------------------------------------------- calls with bad arguments
@dataclass(frozen=True)
class CallCase:
    """A bad call on a tuner holding ``default`` (saved in ``dir``); ``twins`` it applies to."""

    id: str
    call: Callable[[Twin, Any, Path], Any]
    exc: type[Exception]
    match: str
    twins: tuple[str, ...] = ("torch", "jax")
    merged: bool = False


CALL_CASES = [
    CallCase(
        "name-path-separator", lambda tw, t, d: t.add_adapter("../x", tw.lokr()), ValueError, "adapter name '../x'"
    ),
    CallCase("name-absolute", lambda tw, t, d: t.add_adapter("/tmp/x", tw.lokr()), ValueError, "adapter name '/tmp/x'"),
    CallCase("name-dot", lambda tw, t, d: t.add_adapter("a.b", tw.lokr()), ValueError, "adapter name 'a.b'"),
    CallCase("name-reserved", lambda tw, t, d: t.add_adapter("factors", tw.lokr()), ValueError, "'factors': reserved"),
    CallCase(
        "name-not-string", lambda tw, t, d: t.add_adapter(5, tw.lokr()), TypeError, "expected a string, got int 5"
    ),
    CallCase(
        "name-duplicate", lambda tw, t, d: t.add_adapter("default", tw.lokr()), ValueError, "'default' already exists"
    ),
    CallCase("name-bad-on-load", lambda tw, t, d: t.load_adapter(d, "../x"), ValueError, "adapter name '../x'"),
    CallCase(
        "config-wrong-class",
        lambda tw, t, d: t.add_adapter("b", tw.loha()),
        TypeError,
        "expected a LoKrConfig, got LoHaConfig",
    ),
    CallCase(
        "config-alpha-nan-in-code", lambda tw, t, d: tw.lokr(alpha=math.nan), ValueError, "alpha: expected a finite"
    ),
    CallCase(
        "config-target-modules-int-in-code",
        lambda tw, t, d: tw.lokr(target_modules=5),
        TypeError,
        "target_modules: expected a string, a list of strings or None, got int 5",
    ),
    CallCase("config-rank-zero-in-code", lambda tw, t, d: tw.lokr(r=0), ValueError, "r: expected a positive integer"),
    CallCase(
        "scale-nan",
        lambda tw, t, d: t.set_scale("default", math.nan),
        ValueError,
        "set_scale: scale: expected a finite number, got nan",
    ),
    CallCase(
        "scale-inf",
        lambda tw, t, d: t.scale_layer(math.inf),
        ValueError,
        "scale_layer: scale: expected a finite number",
    ),
    CallCase(
        "scale-overflow",
        lambda tw, t, d: t.set_scale("default", 1e308),
        ValueError,
        r"set_scale: the resulting scaling \{'default': inf\} is not finite",
    ),
    CallCase("scale-not-number", lambda tw, t, d: t.scale_layer("2"), TypeError, "expected a real number, got str '2'"),
    CallCase("unscale-zero", lambda tw, t, d: t.unscale_layer(0), ValueError, "cannot divide the scaling by 0"),
    CallCase(
        "scale-unknown-adapter", lambda tw, t, d: t.set_scale("nope", 1.0), ValueError, "Adapter 'nope' does not exist"
    ),
    CallCase(
        "scale-while-merged",
        lambda tw, t, d: t.set_scale("default", 0.0),
        ValueError,
        r"cannot set_scale adapter\(s\) \['default'\] while merged",
        merged=True,
    ),
    CallCase(
        "load-into-merged",
        lambda tw, t, d: t.load_adapter(d, "second"),
        ValueError,
        r"cannot add adapter 'second' while adapter\(s\) \['default'\] are merged",
        merged=True,
    ),
    CallCase(
        "add-into-merged",
        lambda tw, t, d: t.add_adapter("second", tw.lokr()),
        ValueError,
        r"cannot add adapter 'second' while adapter\(s\) \['default'\] are merged",
        merged=True,
    ),
    CallCase(
        "load-wrong-peft-type",
        lambda tw, t, d: tw.lib.LoHaModel(tw.model(), tw.loha()).load_adapter(d, "b"),
        CheckpointError,
        "adapter_config.json: LoHaModel cannot load adapter 'b' with peft_type 'LOKR'",
    ),
    CallCase(
        "from-pretrained-wrong-peft-type",
        lambda tw, t, d: tw.lib.LoHaModel.from_pretrained(tw.model(), d),
        CheckpointError,
        "adapter_config.json: LoHaModel cannot load a checkpoint with peft_type 'LOKR'",
    ),
    CallCase(
        "save-nothing-after-unload",
        lambda tw, t, d: (t.merge_and_unload(), t.save_pretrained(d / "new")),
        ValueError,
        "nothing to save: the model holds no adapters",
    ),
    CallCase(
        "save-nothing-after-delete",
        lambda tw, t, d: (t.delete_adapter("default"), t.save_pretrained(d / "new")),
        ValueError,
        "nothing to save: the model holds no adapters",
    ),
    CallCase(
        "save-selected-unknown",
        lambda tw, t, d: t.save_pretrained(d, ["default", "typo"]),
        ValueError,
        r"selected_adapters \['default', 'typo'\]: unknown \['typo'\]",
    ),
    CallCase(
        "save-selected-empty", lambda tw, t, d: t.save_pretrained(d, []), ValueError, "selected_adapters is empty"
    ),
    CallCase(
        "save-selected-string",
        lambda tw, t, d: t.save_pretrained(d, "default"),
        TypeError,
        "expected a list of adapter names, got the string 'default'",
    ),
    CallCase(
        "save-into-a-file",
        lambda tw, t, d: t.save_pretrained(d / SAFETENSORS_NAME),
        ValueError,
        "adapter_model.safetensors': exists and is not a directory",
    ),
    CallCase(
        "save-config-not-json",
        lambda tw, t, d: (t.peft_config["default"].__setattr__("revision", object()), t.save_pretrained(d)),
        TypeError,
        r"LoKrConfig: field\(s\) \['revision'\] cannot be written as JSON",
    ),
    CallCase("delete-unknown", lambda tw, t, d: t.delete_adapter("nope"), ValueError, "Adapter nope does not exist"),
    CallCase(
        "delete-merged",
        lambda tw, t, d: t.delete_adapter("default"),
        ValueError,
        r"Cannot delete adapter\(s\) \['default'\] while they are merged",
        merged=True,
    ),
    CallCase(
        "set-adapter-unknown",
        lambda tw, t, d: t.set_adapter("nope"),
        ValueError,
        r"Adapter\(s\) \['nope'\] do not exist",
    ),
    CallCase(
        "safe-merge-nan",
        lambda tw, t, d: (_poison(tw, t), t.merge_adapter(safe_merge=True)),
        ValueError,
        "head: NaNs detected in the merged weights. The adapter default seems to be broken",
    ),
    CallCase(
        "jax-rngs-without-dropout",
        lambda tw, t, d: lj.LoKrModel(tw.model(), tw.lokr(rank_dropout=0.1), rngs=nnx.Rngs(params=0)),
        ValueError,
        r"rank_dropout/module_dropout need an nnx.Rngs with a 'dropout' \(or 'default'\) stream",
        twins=("jax",),
    ),
]


def _poison(twin, tuner):
    """A NaN in the head's factor, set directly (a load would refuse it)."""
    factor = tuner.model.head.factors["default"]["lokr_w1"]
    if twin.name == "torch":
        with torch.no_grad():
            factor[0, 0] = math.nan
    else:
        factor[...] = factor[...].at[0, 0].set(math.nan)


@pytest.mark.parametrize("twin", TWINS, ids=lambda t: t.name)
@pytest.mark.parametrize("case", CALL_CASES, ids=lambda c: c.id)
def test_bad_calls(good, tmp_path, twin, case):
    if twin.name not in case.twins:
        pytest.skip(f"{case.id} applies to {case.twins} only (torch draws dropout from its global RNG)")
    d = tmp_path / "adapter"
    shutil.copytree(good, d)
    tuner = twin.tuner()
    if case.merged:
        tuner.merge_adapter()
    if case.id == "safe-merge-nan":
        _poison(twin, tuner)
    snap, on_disk = twin.snapshot(tuner), tree_digest(tmp_path)
    with pytest.raises(case.exc, match=case.match):
        case.call(twin, tuner, d)
    if not case.id.startswith(("save-nothing", "save-config")):  # those mutate first, on purpose
        twin.assert_unchanged(tuner, snap)
    assert tree_digest(tmp_path) == on_disk


def test_catalogue_matches_the_docs():
    library = DOCS.read_text().split("\n## Command line\n", 1)[0]  # that section: tests/test_cli.py
    ids = re.findall(r"^\| `([a-z0-9-]+)` \|", library, flags=re.M)
    assert len(ids) == len(set(ids)), "duplicate rows in docs/ERRORS.md"
    accepted = {"dtype-f64-cast", "dtype-bf16-cast", "dtype-f16-cast", "nonfinite-allowed"}
    assert set(ids) == {c.id for c in FILE_CASES} | {c.id for c in CALL_CASES} | accepted


@pytest.mark.parametrize("twin", TWINS, ids=lambda t: t.name)
def test_problems_of_the_model_are_not_blamed_on_the_file(good, twin):
    """A shared module or an unsupported layer is about the model: same error as without a file."""
    import torch.nn as tnn

    if twin.name == "torch":
        model = twin.model()
        model.head = model.layers[0] = tnn.Linear(12, 24)  # one module on two paths
        shared = model
        unsupported = twin.model()
        unsupported.head = tnn.Embedding(16, 8)
    else:
        shared = twin.model()
        shared.head = shared.layers[0]
        unsupported = twin.model()
        unsupported.head = nnx.Embed(16, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="this module is shared") as info:
        twin.lib.LycorisTuner.from_pretrained(shared, good)
    assert not isinstance(info.value, CheckpointError)
    with pytest.raises(TypeError, match="head: target module of type .* not supported"):
        twin.lib.LycorisTuner.from_pretrained(unsupported, good)
