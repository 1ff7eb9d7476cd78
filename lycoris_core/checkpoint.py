"""PEFT checkpoint key naming: ``base_model.model.<module path>.<factor>``.

Adapters saved by ``PeftModel.save_pretrained`` carry the ``base_model.model.`` prefix; adapters
saved after ``inject_adapter_in_model`` carry none. Both forms are read; the prefixed one is written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["KEY_PREFIX", "SAFETENSORS_NAME", "checkpoint_key", "split_checkpoint_keys"]

KEY_PREFIX = "base_model.model."
SAFETENSORS_NAME = "adapter_model.safetensors"
#: safetensors metadata PEFT writes (and transformers checks) on adapter files.
SAFETENSORS_METADATA = {"format": "pt"}


def checkpoint_key(module_path: str, name: str) -> str:
    """``checkpoint_key("layers.0.q", "hada_w1_a") == "base_model.model.layers.0.q.hada_w1_a"``."""
    return f"{KEY_PREFIX}{module_path}.{name}"


def split_checkpoint_keys(
    keys: Iterable[str], factor_names: Iterable[str]
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Group checkpoint keys by module: ``({module_path: {factor: key}}, other_keys)``.

    A key belongs to a module if its last component is a factor name; the ``base_model.model.``
    prefix is optional. Keys that are not factors (e.g. ``modules_to_save`` weights) are returned
    in ``other_keys`` as ``{key without prefix: key}``.
    """
    factor_names = set(factor_names)
    modules: dict[str, dict[str, str]] = {}
    other: dict[str, str] = {}
    for key in keys:
        bare = key.removeprefix(KEY_PREFIX)
        module_path, _, name = bare.rpartition(".")
        if name in factor_names and module_path:
            modules.setdefault(module_path, {})[name] = key
        else:
            other[bare] = key
    return modules, other


def check_factor_shapes(
    module_path: str, expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]
) -> None:
    """Raise a ``ValueError`` naming the module and factor when a checkpoint does not fit a plan."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{module_path}: checkpoint factors {sorted(found)} do not fit the adapter, which expects "
            f"{sorted(expected)} (missing {missing}, unexpected {extra}); check r, rank_pattern, "
            "decompose_both/decompose_factor and use_effective_conv2d"
        )
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise ValueError(
                f"{module_path}.{name}: checkpoint shape {tuple(found[name])} does not fit the adapter, "
                f"expected {tuple(shape)}"
            )
