"""Which modules get an adapter, and with which rank and alpha: PEFT's rules, framework-free.

Module names are dotted paths (``model.layers.0.q_proj``). The functions below take names and
configs only; the twins supply the names from ``named_modules()`` or an NNX graph walk.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "NoMatchingModuleError",
    "TargetMatch",
    "check_target_module_exists",
    "get_pattern_key",
    "match_targets",
    "resolve_rank_alpha",
]

#: PEFT's default ``target_modules`` per ``model.config.model_type`` (the LoRA table).
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": ".*language_model\\..*\\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


class NoMatchingModuleError(ValueError):
    """No module of the model was selected for adaptation (PEFT's ``NoMatchingPeftModuleError``)."""


class _Excluded:
    """Marker: the module was matched by ``exclude_modules`` or lies inside ``modules_to_save``."""

    def __bool__(self) -> bool:
        return False


EXCLUDED = _Excluded()


def check_target_module_exists(config: Any, key: str) -> bool | _Excluded:
    """PEFT's ``check_target_module_exists`` for one dotted module name.

    Returns ``True`` if ``key`` is targeted, ``False`` if not, and the falsy ``EXCLUDED``
    marker if ``exclude_modules`` or ``modules_to_save`` rule it out.
    """
    exclude = config.exclude_modules
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return EXCLUDED
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return EXCLUDED
    for m in config.modules_to_save or ():
        if re.match(rf"(^|.*\.){m}($|\..*)", key):
            return EXCLUDED

    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False

    indexes = config.layers_to_transform
    if indexes is None or (isinstance(indexes, (list, tuple)) and len(indexes) == 0):
        return True
    patterns = config.layers_pattern
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


def get_pattern_key(pattern_keys: Iterable[str], key: str) -> str:
    """The first pattern (in iteration order) matching a dot-aligned suffix of ``key``; else ``key``."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def resolve_rank_alpha(config: Any, key: str) -> tuple[int, float]:
    """``(r, alpha)`` for module ``key`` after ``rank_pattern``/``alpha_pattern`` (resolved independently)."""
    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern, key), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern, key), config.alpha)
    return r, alpha


@dataclass
class TargetMatch:
    """Outcome of matching every module name of a model against a config."""

    targeted: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)


def _expand_all_linear(targets: Any, linear_names: Sequence[str], output_names: Sequence[str]) -> Any:
    """PEFT's expansion: the full names of all linear layers but the output layer (matched exactly)."""
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return {name for name in linear_names if name not in set(output_names)}
    return targets


def match_targets(
    config: Any,
    module_names: Iterable[str],
    *,
    linear_names: Sequence[str] = (),
    output_names: Sequence[str] = (),
    model_type: str | None = None,
) -> TargetMatch:
    """Match every module name, raise PEFT's errors when nothing is targeted, warn like PEFT.

    ``linear_names`` (all linear layers) and ``output_names`` (the output embedding) serve the
    ``"all-linear"`` shorthand; ``model_type`` picks PEFT's default targets when none are given.
    Neither the config nor anything else is modified.
    """
    targets = config.target_modules
    if targets is None:
        if model_type not in DEFAULT_TARGET_MODULES:
            raise NoMatchingModuleError("Please specify `target_modules` in `peft_config`")
        default = DEFAULT_TARGET_MODULES[model_type]
        targets = default if isinstance(default, str) else set(default)
    view = _ConfigView(config, target_modules=_expand_all_linear(targets, linear_names, output_names))
    result = TargetMatch()
    for key in module_names:
        if not key:
            continue
        found = check_target_module_exists(view, key)
        if found is EXCLUDED:
            result.excluded.append(key)
        elif found:
            result.targeted.append(key)
        else:
            result.unmatched.append(key)
    _raise_or_warn(config, view.target_modules, result)
    return result


class _ConfigView:
    """Read-only view of a config with some fields overridden (no mutation of the user's config)."""

    def __init__(self, config: Any, **overrides: Any) -> None:
        self._config = config
        self._overrides = overrides

    def __getattr__(self, name: str) -> Any:
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._config, name)


def _layer_note(config: Any) -> str:
    note = ""
    if config.layers_to_transform is not None:
        note += f" Note: You specified 'layers_to_transform': {config.layers_to_transform}."
    if config.layers_pattern is not None:
        note += f" You also specified 'layers_pattern': {config.layers_pattern}."
    return note


def _raise_or_warn(config: Any, targets: Any, result: TargetMatch) -> None:
    if not result.targeted:
        if result.excluded and not result.unmatched:
            raise NoMatchingModuleError(
                "All modules were excluded. This is likely unintended. "
                "Check your `target_modules`, `exclude_modules` and `modules_to_save` configuration."
            )
        if not result.excluded:
            shown = sorted(targets) if isinstance(targets, (set, frozenset)) else targets
            raise NoMatchingModuleError(
                f"Target modules {shown} not found in the base model. "
                f"Please check the target modules and try again." + _layer_note(config)
            )
        raise NoMatchingModuleError(
            "No modules were targeted for adaptation. This might be caused by a combination of mismatched "
            "target modules and excluded modules. Please check your `target_modules` and `exclude_modules` "
            "configuration. You may also have only targeted modules that are marked to be saved "
            "(`modules_to_save`)." + _layer_note(config)
        )
    if config.exclude_modules and not result.excluded:
        warnings.warn(
            f"You have passed exclude_modules={config.exclude_modules} but no modules were excluded. "
            "Please check that exclude_modules was set correctly.",
            stacklevel=3,
        )
    for attr in ("rank_pattern", "alpha_pattern"):
        patterns: Mapping[str, Any] = getattr(config, attr)
        unmatched = sorted(
            p for p in patterns if not any(re.match(rf"(.*\.)?({p})$", name) for name in result.targeted)
        )
        if unmatched:
            warnings.warn(
                f"The following {attr} keys did not match any targeted module and were ignored: {unmatched}.",
                RuntimeWarning,
                stacklevel=3,
            )
