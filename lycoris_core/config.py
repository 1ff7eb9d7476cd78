"""Adapter configurations with PEFT 0.21.2's field names, types, defaults and JSON layout.

``LoHaConfig`` and ``LoKrConfig`` round-trip through ``adapter_config.json`` files that real
PEFT reads and writes. Validation happens at construction so that bad values never reach a model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from lycoris_core._io import atomic_write_text
from lycoris_core.errors import CheckpointError

__all__ = [
    "CONFIG_NAME",
    "PEFT_FORMAT_VERSION",
    "LoHaConfig",
    "LoKrConfig",
    "LycorisConfig",
    "config_class_for",
    "config_from_dict",
]

CONFIG_NAME = "adapter_config.json"
#: The PEFT release whose file format and semantics these configs reproduce.
PEFT_FORMAT_VERSION = "0.21.2"
TASK_TYPES = frozenset({"SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"})

_CONFIG_CLASSES: dict[str, type[LycorisConfig]] = {}


def _compile(field_name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{field_name}: invalid regular expression {pattern!r}: {err}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_rank(where: str, value: Any) -> None:
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{where}: expected a positive integer rank, got {value!r}")


def _check_alpha(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")


def _check_type(where: str, value: Any, types: tuple[type, ...], expected: str) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise TypeError(f"{where}: expected {expected}, got {type(value).__name__} {value!r}")


def _check_modules(where: str, value: Any) -> Any:
    """A module selector: ``None``, a regex string, or a collection of names (returned as a set)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.lower() != "all-linear":
            _compile(where, value)
        return value
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(f"{where}: expected a string, a list of strings or None, got {type(value).__name__} {value!r}")
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{where}: expected strings, got {bad!r}")
    return set(value)


def _check_probability(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: expected a probability in [0, 1], got {value!r}")


@dataclass
class LycorisConfig:
    """Fields shared by every LyCORIS adapter (PEFT's ``PeftConfig`` + LoHa/LoKr common fields).

    Subclasses set ``PEFT_TYPE`` and register themselves for :func:`config_from_dict`.
    ``rank_pattern``/``alpha_pattern`` map regexes (matched against a dot-aligned suffix of the
    module path) to per-module rank/alpha; the first matching key in dict order wins.
    """

    PEFT_TYPE: ClassVar[str | None] = None
    _BOOL_FIELDS: ClassVar[tuple[str, ...]] = ("inference_mode", "use_effective_conv2d")

    task_type: str | None = None
    peft_type: str | None = None
    auto_mapping: dict | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: set[str] | str | None = None
    exclude_modules: set[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("PEFT_TYPE"):
            _CONFIG_CLASSES[cls.PEFT_TYPE] = cls

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.PEFT_TYPE is not None:
            self.peft_type = self.PEFT_TYPE
        if self.peft_version is None:
            self.peft_version = PEFT_FORMAT_VERSION
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"{name}.task_type: expected one of {sorted(TASK_TYPES)}, got {self.task_type!r}")
        for field_name in ("peft_type", "peft_version", "base_model_name_or_path", "revision"):
            value = getattr(self, field_name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
                setattr(self, field_name, value)
            if value is not None:
                _check_type(f"{name}.{field_name}", value, (str,), "a string or None")
        for field_name in self._BOOL_FIELDS:
            _check_type(f"{name}.{field_name}", getattr(self, field_name), (bool,), "true or false")
        if self.auto_mapping is not None:
            _check_type(f"{name}.auto_mapping", self.auto_mapping, (dict,), "a JSON object or None")
        _check_rank(f"{name}.r", self.r)
        _check_alpha(f"{name}.alpha", self.alpha)
        _check_probability(f"{name}.rank_dropout", self.rank_dropout)
        _check_probability(f"{name}.module_dropout", self.module_dropout)
        self._check_init_weights()
        for field_name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, field_name)
            if value is not None:
                _check_type(f"{name}.{field_name}", value, (dict,), "a JSON object mapping regexes to values")
            setattr(self, field_name, dict(value or {}))
        for key, value in self.rank_pattern.items():
            _compile(f"{name}.rank_pattern", key)
            _check_rank(f"{name}.rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _compile(f"{name}.alpha_pattern", key)
            _check_alpha(f"{name}.alpha_pattern[{key!r}]", value)
        self.target_modules = _check_modules(f"{name}.target_modules", self.target_modules)
        self.exclude_modules = _check_modules(f"{name}.exclude_modules", self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"{name}: when `layers_pattern` is specified, `layers_to_transform` must also be specified."
            )
        layers = self.layers_to_transform
        if layers is not None:
            items = [layers] if not isinstance(layers, (list, tuple)) else list(layers)
            if not all(_is_int(i) for i in items):
                raise TypeError(f"{name}.layers_to_transform: expected an int or a list of ints, got {layers!r}")
        if self.layers_pattern is not None:
            patterns = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
            if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
                raise TypeError(
                    f"{name}.layers_pattern: expected a string or a list of strings, got {self.layers_pattern!r}"
                )
            for pattern in patterns:
                _compile(f"{name}.layers_pattern", pattern)
        if self.modules_to_save is not None:
            if not isinstance(self.modules_to_save, (list, tuple)) or not all(
                isinstance(m, str) for m in self.modules_to_save
            ):
                raise TypeError(
                    f"{name}.modules_to_save: expected a list of module names, got {self.modules_to_save!r}"
                )
            self.modules_to_save = list(self.modules_to_save)
            for module in self.modules_to_save:
                _compile(f"{name}.modules_to_save", module)

    def _check_init_weights(self) -> None:
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"{type(self).__name__}.init_weights: expected True or False, got {self.init_weights!r}")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: sets become sorted lists; pattern dicts keep their order."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            elif isinstance(value, (set, frozenset)):
                value = sorted(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out

    def to_json_string(self) -> str:
        """PEFT's layout (``indent=2``, top-level keys sorted). Unlike PEFT, the pattern dicts are
        *not* re-sorted, so their first-match order survives a save/load (docs/DEVIATIONS.md).
        A field JSON cannot hold is a ``TypeError`` naming it."""
        data = self.to_dict()
        try:
            return json.dumps({k: data[k] for k in sorted(data)}, indent=2, allow_nan=False) + "\n"
        except (TypeError, ValueError) as err:
            bad = [k for k in sorted(data) if not _is_json(data[k])]
            raise TypeError(f"{type(self).__name__}: field(s) {bad} cannot be written as JSON: {err}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LycorisConfig:
        """Build ``cls`` from a dict; unknown keys are dropped with one warning naming them."""
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise TypeError(f"{cls.__name__}: expected a JSON object with string keys, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown config keys {unknown}", UserWarning, stacklevel=2)
        kwargs = {k: v for k, v in data.items() if k in known}
        if cls.PEFT_TYPE is not None and kwargs.get("peft_type") not in (None, cls.PEFT_TYPE):
            raise ValueError(f"{cls.__name__}: expected peft_type {cls.PEFT_TYPE!r}, got {kwargs['peft_type']!r}")
        return cls(**kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` (atomically) into ``save_directory``."""
        text = self.to_json_string()
        os.makedirs(save_directory, exist_ok=True)
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), text)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> LycorisConfig:
        """Read ``adapter_config.json``; on the base class, dispatch on its ``peft_type``.

        Anything wrong with the file (missing, not UTF-8 JSON, not an object, a field of the
        wrong type or value, another ``peft_type``) is a :class:`CheckpointError` naming it.
        """
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise CheckpointError(directory, f"no {CONFIG_NAME} found (not a PEFT adapter directory)")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (ValueError, RecursionError) as err:  # JSON, UTF-8, nesting, huge integers
            raise CheckpointError(path, f"not valid JSON: {type(err).__name__}: {err}") from None
        if not isinstance(data, dict):
            raise CheckpointError(path, f"expected a JSON object, got a JSON {type(data).__name__}")
        try:
            return config_from_dict(data) if cls.PEFT_TYPE is None else cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise CheckpointError(path, str(err)) from None


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


@dataclass
class LoHaConfig(LycorisConfig):
    """Low-rank Hadamard product (FedPara) adapter config; PEFT's ``LoHaConfig``."""

    PEFT_TYPE: ClassVar[str] = "LOHA"


@dataclass
class LoKrConfig(LycorisConfig):
    """Low-rank Kronecker product adapter config; PEFT's ``LoKrConfig``.

    ``init_weights`` may also be ``"lycoris"`` (zero ``w2`` instead of zero ``w1``).
    """

    PEFT_TYPE: ClassVar[str] = "LOKR"
    _BOOL_FIELDS: ClassVar[tuple[str, ...]] = (*LycorisConfig._BOOL_FIELDS, "decompose_both", "rank_dropout_scale")

    init_weights: bool | Literal["lycoris"] = True
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_int(self.decompose_factor):
            raise TypeError(
                f"LoKrConfig.decompose_factor: expected an integer (-1: most square), got {self.decompose_factor!r}"
            )

    def _check_init_weights(self) -> None:
        if not (isinstance(self.init_weights, bool) or self.init_weights == "lycoris"):
            raise ValueError(f"LoKrConfig.init_weights: expected True, False or 'lycoris', got {self.init_weights!r}")


def config_class_for(peft_type: Any) -> type[LycorisConfig]:
    """The registered config class for a ``peft_type`` string (``"LOHA"``, ``"LOKR"``, ...)."""
    try:
        return _CONFIG_CLASSES[peft_type]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown peft_type {peft_type!r}: only {sorted(_CONFIG_CLASSES)} adapters are supported"
        ) from None


def config_from_dict(data: dict[str, Any]) -> LycorisConfig:
    """Build the config class named by ``data["peft_type"]``."""
    if not isinstance(data, dict):
        raise TypeError(f"adapter config: expected a JSON object, got {type(data).__name__}")
    return config_class_for(data.get("peft_type")).from_dict(data)
