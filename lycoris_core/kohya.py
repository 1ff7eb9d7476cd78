"""LyCORIS/kohya single-file adapters: read, write, and convert to and from PEFT directories.

A LyCORIS file is one safetensors file with, per module, ``<prefix>_<module path, '.' -> '_'>.<factor>``
and ``<...>.alpha`` (0-d). The prefix is ``lycoris`` for lycoris-lora's ``create_lycoris``,
``lora_unet``/``lora_te`` for kohya's Stable Diffusion trainers. Factors have PEFT's names and
layouts, except a Conv1d Tucker core: LyCORIS ``(r, r, k)``, PEFT ``(r, r, k, 1)``.

What lycoris-lora (4.1.3) computes, and so what a conversion keeps:

- scale ``alpha / r``, with ``r`` the factors' rank; a missing or zero alpha means ``alpha = r``;
- a LoKr module whose ``W1`` and ``W2`` are both full ignores alpha (scale 1); written to PEFT
  with ``alpha = r``, and from PEFT with the scale folded into ``lokr_w1``;
- its ``merge_to`` scales ΔW by ``(alpha / r)²``, not ``alpha / r`` (README, "LyCORIS files");
- a Conv1d LoKr with a full 3-D ``lokr_w2`` means ``kron(W1[..., None], W2)`` there and PEFT's
  ``torch.kron`` layout here (docs/DEVIATIONS.md, d): no factors of either form give the other's
  ΔW, so such modules are refused both ways.

The underscore form loses the dots: names resolve against the target model's module names, and a
name that fits no module, or several, is refused. Everything is numpy; nothing is half-written.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lycoris_core.checkpoint import SAFETENSORS_METADATA, checkpoint_key, split_checkpoint_keys
from lycoris_core.config import LycorisConfig, config_class_for
from lycoris_core.errors import CheckpointError
from lycoris_core.files import read_adapter_files, save_adapters
from lycoris_core.plan import (
    LOHA_FACTORS,
    LOKR_FACTORS,
    AdapterPlan,
    LayerShape,
    candidate_layers,
    full_3d_lokr_w2,
    plan_adapter,
    plan_from_factors,
)
from lycoris_core.resolve import exact_pattern, exact_targets
from lycoris_core.targets import resolve_rank_alpha
from lycoris_core.tensors import dump_safetensors, load_safetensors, save_safetensors

__all__ = [
    "LYCORIS_PREFIX",
    "LycorisFile",
    "LycorisModule",
    "as_peft_directory",
    "file_plan",
    "lycoris_adapter",
    "lycoris_name",
    "lycoris_to_peft",
    "peft_to_lycoris",
    "read_lycoris",
    "read_peft",
    "resolve_names",
    "save_adapter",
    "save_lycoris",
    "write_peft",
]

LYCORIS_PREFIX = "lycoris"
_FACTORS = {"LOHA": LOHA_FACTORS, "LOKR": LOKR_FACTORS}
#: Keys of LyCORIS algorithms we do not support, and what they are.
_OTHER_ALGOS = {
    "dora_scale": "DoRA-style weight decomposition (dora_wd)",
    "lora_up": "LoRA/LoCon",
    "lora_down": "LoRA/LoCon",
    "lora_mid": "LoRA/LoCon",
    "diff": "full (diff)",
    "diff_b": "full (diff)",
    "oft_blocks": "OFT/BOFT",
    "oft_diag": "OFT",
    "rescale": "OFT/BOFT",
    "on_input": "IA3",
    "weight": "IA3",
    "w_norm": "norm",
    "b_norm": "norm",
    "lokr_t1": "LoKr with a Tucker W1 (not written by lycoris-lora)",
}


@dataclass(frozen=True)
class LycorisModule:
    """One module of a LyCORIS file: ``factors`` in PEFT's names (LyCORIS layouts), ``alpha`` or None."""

    name: str
    peft_type: str
    factors: dict[str, np.ndarray]
    alpha: float | None

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.factors.items()}

    @property
    def full(self) -> bool:
        """A LoKr module with ``W1`` and ``W2`` both full (lycoris-lora ignores its alpha)."""
        return self.peft_type == "LOKR" and "lokr_w1" in self.factors and "lokr_w2" in self.factors

    @property
    def r(self) -> int | None:
        """The factors' rank (None for a full LoKr module, which has none)."""
        f = self.shapes
        if self.peft_type == "LOHA":
            return f["hada_w1_b"][0]
        for key in ("lokr_w1_b", "lokr_w2_b"):
            if key in f:
                return f[key][0]
        return None

    @property
    def scale(self) -> float:
        """The scale lycoris-lora's forward applies."""
        if self.full or not self.alpha:
            return 1.0
        return self.alpha / self.r

    @property
    def load_rank_alpha(self) -> tuple[int, float]:
        """``(r, alpha)`` as a load reads them (the PEFT config of :func:`lycoris_to_peft`): a missing or
        zero alpha means ``alpha = r``; a full LoKr module is every factor full under PEFT's rule,
        ``r = max(a, b, c, d)``, with ``alpha = r`` (scale 1, as lycoris-lora ignores its alpha)."""
        if self.full:
            (a, c), (b, d) = self.shapes["lokr_w1"], self.shapes["lokr_w2"][:2]
            r = max(a, b, c, d)
            return r, float(r)
        return self.r, self.alpha if self.alpha else float(self.r)


@dataclass
class LycorisFile:
    """A LyCORIS file's modules by file name (``lycoris_layers_0_q``), and its metadata."""

    path: str
    modules: dict[str, LycorisModule]
    metadata: dict[str, str] = field(default_factory=dict)


def lycoris_name(module_path: str, prefix: str = LYCORIS_PREFIX) -> str:
    """``lycoris_name("layers.0.q") == "lycoris_layers_0_q"``."""
    return f"{prefix}_{module_path}".replace(".", "_") if prefix else module_path.replace(".", "_")


def _algo(path: str, name: str, suffixes: set[str]) -> str:
    other = sorted(s for s in suffixes if s.split(".")[0] in _OTHER_ALGOS)  # ``lora_up.weight``
    if other:
        what = sorted({_OTHER_ALGOS[s.split(".")[0]] for s in other})
        raise CheckpointError(
            path, f"module {name!r}: {other} belong to {', '.join(what)}, which is not supported (LoHa and LoKr only)"
        )
    found = [t for t, names in _FACTORS.items() if suffixes & set(names)]
    if len(found) != 1:
        raise CheckpointError(
            path,
            f"module {name!r}: keys {sorted(suffixes)} are "
            + ("a mix of LoHa and LoKr factors" if found else "no LoHa (hada_*) or LoKr (lokr_*) factors"),
        )
    unknown = sorted(suffixes - set(_FACTORS[found[0]]) - {"alpha"})
    if unknown:
        raise CheckpointError(path, f"module {name!r}: unknown keys {unknown} beside its {found[0]} factors")
    return found[0]


_W1 = ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"})
_W2 = ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"}, {"lokr_w2_a", "lokr_w2_b", "lokr_t2"})
_HADA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
#: The factor sets a module may hold.
_SETS = {"LOHA": (_HADA, _HADA | {"hada_t1", "hada_t2"}), "LOKR": tuple(a | b for a in _W1 for b in _W2)}


def _check_module(path: str, name: str, peft_type: str, f: Mapping[str, tuple[int, ...]]) -> None:
    """A complete factor set whose inner sizes agree (what any lycoris-lora module holds)."""
    if set(f) not in _SETS[peft_type]:
        sets = " or ".join(str(sorted(x)) for x in _SETS[peft_type])
        raise CheckpointError(path, f"module {name!r}: factors {sorted(f)} are not a {peft_type} set ({sets})")
    ranks = []
    if peft_type == "LOHA":
        ok = f["hada_w1_a"] == f["hada_w2_a"] and f["hada_w1_b"] == f["hada_w2_b"]
        if "hada_t1" in f:
            ok = ok and f["hada_t1"] == f["hada_t2"] and len(f["hada_t1"]) in (3, 4) and len(f["hada_w1_a"]) == 2
            ranks = [f["hada_w1_a"][0], f["hada_w1_b"][0], *f["hada_t1"][:2]]
        else:
            ok = ok and len(f["hada_w1_a"]) == len(f["hada_w1_b"]) == 2
            ranks = [f["hada_w1_a"][-1], f["hada_w1_b"][0]]
    else:
        ok = all(len(v) == 2 for k, v in f.items() if k not in ("lokr_w2", "lokr_t2"))
        ok = ok and ("lokr_w2" not in f or len(f["lokr_w2"]) in (2, 3, 4))
        if "lokr_w1_a" in f:
            ranks += [f["lokr_w1_a"][-1], f["lokr_w1_b"][0]]
        if "lokr_t2" in f:
            ok = ok and len(f["lokr_t2"]) in (3, 4)
            ranks += [f["lokr_w2_a"][0], f["lokr_w2_b"][0], *f["lokr_t2"][:2]]
        elif "lokr_w2_a" in f:
            ranks += [f["lokr_w2_a"][-1], f["lokr_w2_b"][0]]
    if not ok or len(set(ranks)) > 1 or 0 in ranks:
        raise CheckpointError(path, f"module {name!r}: factor shapes {dict(sorted(f.items()))} do not fit together")


def _check_finite(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    """A ``CheckpointError`` naming the keys that hold NaN or ±inf, as a PEFT load refuses them."""
    bad = sorted(k for k, v in tensors.items() if not np.isfinite(v).all())
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(
            path,
            f"non-finite values (NaN or inf) in {bad[:5]}{more}; the adapter is unusable as it is: "
            "repair or re-export it (allow_nonfinite=True reads it anyway)",
        )


def read_lycoris(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> LycorisFile:
    """Read and validate a LyCORIS file: every key is ``<module>.<factor>`` or ``<module>.alpha``,
    each module one LoHa or LoKr factor set, finite unless ``allow_nonfinite``; anything else is a
    ``CheckpointError`` naming it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(path, "is a directory; a LyCORIS adapter is one .safetensors file")
    arrays, metadata = load_safetensors(path)
    if not arrays:
        raise CheckpointError(path, "holds no tensors")
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, array in arrays.items():
        name, dot, suffix = key.partition(".")
        if not dot or not name:
            raise CheckpointError(path, f"key {key!r} is not '<module>.<factor>' (not a LyCORIS file?)")
        grouped.setdefault(name, {})[suffix] = array
    modules = {}
    for name, entries in sorted(grouped.items()):
        peft_type = _algo(path, name, set(entries))
        alpha = entries.pop("alpha", None)
        _check_module(path, name, peft_type, {k: tuple(v.shape) for k, v in entries.items()})
        if alpha is not None and alpha.size != 1:
            raise CheckpointError(path, f"{name}.alpha: expected one value, got shape {alpha.shape}")
        value = None if alpha is None else float(alpha.astype(np.float64).reshape(()))
        if value is not None and not np.isfinite(value):
            raise CheckpointError(path, f"{name}.alpha: not finite ({value})")
        modules[name] = LycorisModule(name, peft_type, entries, value)
    if not allow_nonfinite:
        _check_finite(path, {f"{name}.{k}": v for name, m in modules.items() for k, v in m.factors.items()})
    return LycorisFile(path, modules, metadata)


def save_lycoris(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Write a LyCORIS file crash-safely."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{os.fspath(path)!r}: its directory {parent!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{os.fspath(path)!r}: is a directory (a LyCORIS adapter is one .safetensors file)")
    save_safetensors(path, tensors, metadata)


def resolve_names(names: Iterable[str], module_names: Iterable[str], prefix: str | None = None) -> dict[str, str]:
    """``{file name: module path}``: each LyCORIS name (``lycoris_layers_0_q``) matched to the one
    module whose path, with ``.`` as ``_``, follows ``prefix + '_'``. Without ``prefix`` the one
    prefix under which every name matches is used. Unmatched or ambiguous names are a ``ValueError``
    naming them."""
    names = list(names)
    by_form: dict[str, list[str]] = {}
    for m in dict.fromkeys(module_names):
        if m:
            by_form.setdefault(m.replace(".", "_"), []).append(m)

    def prefixes(name: str) -> set[str]:
        found = {name[:i] for i, ch in enumerate(name) if ch == "_" and name[i + 1 :] in by_form}
        return found | ({""} if name in by_form else set())

    if prefix is None:
        common: set[str] | None = None
        for name in names:
            common = prefixes(name) if common is None else common & prefixes(name)
        if not common:
            loose = [n for n in names if not prefixes(n)]
            raise ValueError(
                f"no module of the model matches the LyCORIS names {(loose or names)[:5]}"
                + (f" (and {len(loose) - 5} more)" if len(loose) > 5 else "")
                + f"; the model's modules look like {sorted(by_form.values())[:3]}: is it the model the file was made for?"
                if loose
                else f"the LyCORIS names {names[:3]}... match the model under no single prefix; pass the prefix"
            )
        if len(common) > 1:
            raise ValueError(
                f"the LyCORIS names match the model under several prefixes {sorted(common)}; pass the prefix"
            )
        prefix = common.pop()
    lead = f"{prefix}_" if prefix else ""
    out, missing, ambiguous = {}, [], {}
    for name in names:
        modules = by_form.get(name[len(lead) :], []) if name.startswith(lead) else []
        if not modules:
            missing.append(name)
        elif len(modules) > 1:
            ambiguous[name] = modules
        else:
            out[name] = modules[0]
    if ambiguous:
        raise ValueError(f"ambiguous LyCORIS names, each fits several modules: {ambiguous}")
    if missing:
        raise ValueError(f"no module of the model matches {missing[:5]} under the prefix {prefix!r}")
    return out


def _check_representable(where: str, peft_type: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
    if peft_type == "LOKR" and full_3d_lokr_w2(shapes):
        raise ValueError(
            f"{where}: a Conv1d LoKr with a full 3-D lokr_w2 {shapes['lokr_w2']} is kron(W1[..., None], W2) in LyCORIS but "
            "PEFT's torch.kron layout in PEFT (docs/DEVIATIONS.md, d); no factors of one form give the other's ΔW, "
            "so it cannot be converted (use a rank below max(b, d)/2 for a low-rank W2)"
        )


def _int_if_integral(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def _planner(layers: Mapping[str, LayerShape | None] | None):
    """``plan_of(peft_type, shapes, r, alpha, config, module, where)``: the module's plan, from the
    model's layer if known (then checked against ``shapes``), else from the factors alone."""

    def plan_of(
        peft_type: str, shapes: dict, r: int, alpha: float, config: Any, module: str, where: str
    ) -> AdapterPlan:
        if layers is None or (module in layers and layers[module] is None):
            return plan_from_factors(peft_type, shapes, r, alpha, config, where=where)
        if module not in layers:
            raise ValueError(
                f"{where}: the model has no adaptable layer {module!r} (is it the model the adapter is for?)"
            )
        plan = plan_adapter(layers[module], r, alpha, config, where=where)
        if plan.factor_shapes != shapes:
            raise ValueError(
                f"{where}: factors {shapes} do not fit its layer {plan.weight_shape}, which holds {plan.factor_shapes}"
            )
        return plan

    return plan_of


def file_plan(
    layer: LayerShape | None, peft_type: str, shapes: Mapping[str, tuple[int, ...]], r: int, alpha: float, config: Any
) -> AdapterPlan:
    """The plan of a LoKr module as a LyCORIS file holds it, for ``layer`` (``None``: inferred from the
    factors): any factorization ``out = a·b``, ``in = c·d`` and any full or low-rank choice of ``W1`` and
    ``W2`` that fits the layer, beyond the ones PEFT's ``decompose_factor``/``r`` rules give (lycoris-lora's
    ``factor`` sorts the pair, PEFT's does not; ``unbalanced_factorization``, ``full_matrix``). The
    Kronecker product is the same math either way. A ``ValueError`` when the factors fit no layer."""
    if peft_type != "LOKR":
        raise ValueError(f"{peft_type} factors have one layout per layer; these fit none")
    f = dict(shapes)
    (a, c) = f["lokr_w1"] if "lokr_w1" in f else (f["lokr_w1_a"][0], f["lokr_w1_b"][1])
    candidates = [layer] if layer is not None else candidate_layers(peft_type, f)
    for shape in candidates:
        out, inp, kernel = shape.out_features, shape.in_features, tuple(shape.kernel_size)
        if out % a or inp % c:
            continue
        b, d = out // a, inp // c
        if "lokr_w2" in f:
            expected_w2: dict[str, tuple[int, ...]] = {"lokr_w2": (b, d, *kernel)}
        elif "lokr_t2" in f:
            t_kernel = kernel if shape.kind == "conv2d" else (*kernel, 1)
            expected_w2 = {"lokr_w2_a": (r, b), "lokr_w2_b": (r, d), "lokr_t2": (r, r, *t_kernel)}
        else:
            expected_w2 = {"lokr_w2_a": (b, r), "lokr_w2_b": (r, d * shape.kernel_numel)}
        expected_w1 = {"lokr_w1": (a, c)} if "lokr_w1" in f else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
        if {**expected_w1, **expected_w2} != f:
            continue
        factors = tuple((name, f[name], "kaiming") for name in LOKR_FACTORS if name in f)
        return AdapterPlan(
            "LOKR",
            shape,
            r,
            alpha,
            factors,
            rank_dropout=config.rank_dropout,
            module_dropout=config.module_dropout,
            rank_dropout_scale=bool(config.rank_dropout_scale),
            effective_conv="lokr_t2" in f,
            fp32_dropout_mask=True,
        )
    where = f"its layer {layer.weight_shape}" if layer is not None else "any layer"
    raise ValueError(f"factors are no LoKr factorization of {where} either")


def lycoris_adapter(
    source: LycorisFile, module_names: Iterable[str] | Mapping[str, LayerShape], *, prefix: str | None = None
) -> tuple[LycorisConfig, dict[str, np.ndarray], dict[str, AdapterPlan]]:
    """``(config, {PEFT key: array}, {module path: plan})``: the PEFT adapter that computes what
    ``source`` computes in lycoris-lora, for the model whose module paths are ``module_names`` (a mapping
    to :class:`LayerShape` also checks every factor against its layer), and the plans of the modules
    whose factors no PEFT config can hold (:func:`file_plan`; empty when PEFT's rules give them all).
    Every front end's ``from_lycoris`` loads the three; errors name the file and its module."""
    layers = module_names if isinstance(module_names, Mapping) else None
    names = resolve_names(source.modules, module_names, prefix)
    types = {m.peft_type for m in source.modules.values()}
    if len(types) != 1:
        raise CheckpointError(
            source.path, f"mixes LoHa and LoKr modules ({sorted(types)}); a PEFT adapter holds one method"
        )
    (peft_type,) = types
    entries = []  # (file name, module path, factors in PEFT layout, r, alpha)
    for name, module in source.modules.items():
        path = names[name]
        factors = dict(module.factors)
        for core in ("hada_t1", "hada_t2", "lokr_t2"):
            if core in factors and factors[core].ndim == 3:  # Conv1d: LyCORIS (r, r, k), PEFT (r, r, k, 1)
                factors[core] = factors[core][..., None]
        _check_representable(f"{source.path}: {name} ({path})", peft_type, module.shapes)
        r, alpha = module.load_rank_alpha
        entries.append((name, path, factors, r, _int_if_integral(alpha)))
    r0 = Counter(e[3] for e in entries).most_common(1)[0][0]
    a0 = Counter(e[4] for e in entries).most_common(1)[0][0]
    # exactly the file's modules under PEFT's matching: "fc" must not also select "block.fc"
    fields: dict[str, Any] = {
        "target_modules": exact_targets([e[1] for e in entries], module_names),
        "r": r0,
        "alpha": a0,
        "rank_pattern": {exact_pattern(p): r for _, p, _, r, _ in entries if r != r0},
        "alpha_pattern": {exact_pattern(p): a for _, p, _, _, a in entries if a != a0},
        "use_effective_conv2d": any(k in f for _, _, f, _, _ in entries for k in ("hada_t1", "lokr_t2")),
    }
    if peft_type == "LOKR":
        fields["decompose_both"] = any("lokr_w1_a" in f for _, _, f, _, _ in entries)
    cls = config_class_for(peft_type)
    plan_of = _planner(layers)
    factors_seen = sorted(
        {s for _, _, f, _, _ in entries for k in ("lokr_w1", "lokr_w1_a") if k in f for s in f[k].shape}
    )
    best: tuple[Any, dict[str, ValueError]] | None = None
    for factor in [-1, *factors_seen] if peft_type == "LOKR" else [None]:
        config = cls(**fields, **({} if factor is None else {"decompose_factor": factor}))
        misfits: dict[str, ValueError] = {}
        for name, path, factors, r, alpha in entries:
            shapes = {k: tuple(v.shape) for k, v in factors.items()}
            try:
                plan_of(peft_type, shapes, r, alpha, config, path, f"{name} ({path})")
            except ValueError as err:
                misfits[path] = err
        if best is None or len(misfits) < len(best[1]):
            best = (config, misfits)
        if not misfits:
            break
    assert best is not None
    config, misfits = best
    plans: dict[str, AdapterPlan] = {}
    for _, path, factors, r, alpha in entries:
        if path not in misfits:
            continue
        shapes = {k: tuple(v.shape) for k, v in factors.items()}
        try:
            layer = layers.get(path) if layers is not None else None
            plans[path] = file_plan(layer, peft_type, shapes, r, alpha, config)
        except ValueError as err:
            raise CheckpointError(source.path, f"{misfits[path]}; and its {err}") from None
    tensors = {checkpoint_key(path, k): v for _, path, factors, _, _ in entries for k, v in factors.items()}
    return config, tensors, plans


def lycoris_to_peft(
    source: LycorisFile, module_names: Iterable[str] | Mapping[str, LayerShape], *, prefix: str | None = None
) -> tuple[LycorisConfig, dict[str, np.ndarray]]:
    """A PEFT adapter ``(config, {PEFT key: array})`` computing what ``source`` computes in
    lycoris-lora, for the model whose module paths are ``module_names`` (a mapping to
    :class:`LayerShape` also checks every factor against its layer). A module whose factors no PEFT
    config can hold (lycoris-lora's own factorization, :func:`file_plan`) is refused, naming it."""
    config, tensors, plans = lycoris_adapter(source, module_names, prefix=prefix)
    if plans:
        by_path = {path: name for name, path in resolve_names(source.modules, module_names, prefix).items()}
        path, plan = next(iter(sorted(plans.items())))
        raise CheckpointError(
            source.path,
            f"{by_path[path]} ({path}): its LoKr factors {plan.factor_shapes} factor the layer "
            f"{plan.weight_shape} in a way no PEFT LoKrConfig gives (lycoris-lora's `factor`, "
            "`unbalanced_factorization` or `full_matrix`; PEFT's factorization puts its factor first); "
            f"{len(plans)} module(s) so. A PEFT directory cannot hold it: load the file itself with from_lycoris",
        )
    return config, tensors


def peft_to_lycoris(
    config: LycorisConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    prefix: str = LYCORIS_PREFIX,
    layers: Mapping[str, LayerShape] | None = None,
    plans: Mapping[str, AdapterPlan] | None = None,
    where: str = "",
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A LyCORIS file's ``({key: array}, metadata)`` computing what the PEFT adapter computes
    (``layers``: the model's layer shapes, needed only to tell a Conv1d Tucker core from a
    Conv2d one with a ``(k, 1)`` kernel; ``plans``: modules' own plans, which the config alone
    cannot give, e.g. a factorization loaded from a LyCORIS file)."""
    names = _FACTORS.get(config.peft_type)
    if names is None:
        raise ValueError(f"{where}: only LoHa and LoKr adapters convert, got {config.peft_type!r}")
    by_module, other = split_checkpoint_keys(tensors, names)
    if other:
        raise ValueError(
            f"{where}: keys {sorted(other)} hold no {config.peft_type} factors (modules_to_save?); a LyCORIS file cannot hold them"
        )
    plan_of = _planner(layers)
    out: dict[str, np.ndarray] = {}
    owners: dict[str, str] = {}
    for path, keys in sorted(by_module.items()):
        factors = {k: np.asarray(tensors[key]) for k, key in keys.items()}
        shapes = {k: tuple(v.shape) for k, v in factors.items()}
        if plans is not None and path in plans:
            plan = plans[path]
            r, alpha = plan.r, plan.alpha
            if plan.factor_shapes != shapes:
                raise ValueError(f"{where}: {path}: factors {shapes} are not its plan's {plan.factor_shapes}")
        else:
            r, alpha = resolve_rank_alpha(config, path)
            plan = plan_of(config.peft_type, shapes, r, alpha, config, path, f"{where}: {path}" if where else path)
        _check_representable(path, config.peft_type, shapes)
        name = lycoris_name(path, prefix)
        if name in owners:
            raise ValueError(f"{where}: modules {owners[name]!r} and {path!r} both become {name!r} in a LyCORIS file")
        owners[name] = path
        for core in ("hada_t1", "hada_t2", "lokr_t2"):
            if core in factors and plan.layer.kind == "conv1d":
                factors[core] = factors[core][..., 0]
            elif core in factors and layers is None and shapes[core][-1] == 1 and shapes[core][-2] != 1:
                raise ValueError(
                    f"{path}.{core}: {shapes[core]} is a Conv1d or a Conv2d with a (k, 1) kernel, which LyCORIS "
                    "stores differently; give the model's layers to tell (on the command line: --model with a "
                    "transformers model directory)"
                )
        scale = plan.scaling
        if "lokr_w1" in factors and "lokr_w2" in factors:  # lycoris-lora ignores alpha here: fold the scale
            if scale != 1:
                w1 = factors["lokr_w1"]
                factors["lokr_w1"] = (w1.astype(np.float64) * scale).astype(w1.dtype)
            alpha_value = 1.0
        else:
            alpha_value = float(alpha)
        out.update({f"{name}.{k}": v for k, v in factors.items()})
        out[f"{name}.alpha"] = np.asarray(alpha_value, np.float32)
    if not out:
        raise ValueError(f"{where}: the adapter holds no modules")
    algo = "loha" if config.peft_type == "LOHA" else "lokr"
    args = {"algo": algo, "use_tucker": bool(config.use_effective_conv2d)}
    if config.peft_type == "LOKR":
        args |= {"decompose_both": bool(config.decompose_both), "factor": int(config.decompose_factor)}
    metadata = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(config.r),
        "ss_network_alpha": str(config.alpha),
        "ss_network_args": json.dumps(args),
    }
    return out, metadata


def read_peft(
    directory: str | os.PathLike, *, allow_nonfinite: bool = False
) -> tuple[LycorisConfig, dict[str, np.ndarray]]:
    """A PEFT adapter directory's config and tensors (validated, numpy; finite unless ``allow_nonfinite``)."""
    files = read_adapter_files(directory)
    tensors, _ = load_safetensors(files.weights)
    if not allow_nonfinite:
        _check_finite(files.weights, tensors)
    return files.config, tensors


def write_peft(directory: str | os.PathLike, config: LycorisConfig, tensors: Mapping[str, np.ndarray]) -> None:
    """Write a PEFT adapter directory crash-safely (the ``default`` adapter)."""
    save_adapters(directory, {"default": (config, dump_safetensors(tensors, SAFETENSORS_METADATA))})


@contextmanager
def as_peft_directory(
    source: LycorisFile | str | os.PathLike,
    module_names: Iterable[str] | Mapping[str, LayerShape],
    *,
    prefix: str | None = None,
    allow_nonfinite: bool = False,
) -> Iterator[str]:
    """A LyCORIS file as a temporary PEFT adapter directory for the model with ``module_names``, for
    any front end's ``from_pretrained`` (every check of a PEFT load then applies)."""
    if not isinstance(source, LycorisFile):
        source = read_lycoris(source, allow_nonfinite=allow_nonfinite)
    config, tensors = lycoris_to_peft(source, module_names, prefix=prefix)
    with tempfile.TemporaryDirectory() as directory:
        write_peft(directory, config, tensors)
        yield directory


def save_adapter(
    path: str | os.PathLike,
    config: LycorisConfig,
    tensors: Mapping[str, np.ndarray],
    plans: Mapping[str, AdapterPlan],
    *,
    prefix: str = LYCORIS_PREFIX,
    where: str = "",
) -> None:
    """Write an adapter (``config``, its tensors under PEFT's keys, ``{module: plan}``) as a LyCORIS file,
    crash-safely: what every front end's ``save_lycoris`` calls."""
    layers = {name: plan.layer for name, plan in plans.items()}
    out, metadata = peft_to_lycoris(config, tensors, prefix=prefix, layers=layers, plans=plans, where=where)
    save_lycoris(path, out, metadata)
