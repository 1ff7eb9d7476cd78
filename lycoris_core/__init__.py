"""Framework-free plan shared by ``lycoris_torch`` and ``lycoris_jax``.

Configs (PEFT's fields and JSON), target matching and rank/alpha patterns, LoKr factorization
and per-layer factor shape plans, checkpoint key naming. Imports neither torch nor jax.
"""

from lycoris_core.checkpoint import (
    KEY_PREFIX,
    SAFETENSORS_METADATA,
    SAFETENSORS_NAME,
    check_factor_shapes,
    checkpoint_key,
    split_checkpoint_keys,
)
from lycoris_core.config import (
    CONFIG_NAME,
    PEFT_FORMAT_VERSION,
    LoHaConfig,
    LoKrConfig,
    LycorisConfig,
    config_class_for,
    config_from_dict,
)
from lycoris_core.errors import CheckpointError
from lycoris_core.plan import (
    LOHA_FACTORS,
    LOKR_FACTORS,
    AdapterPlan,
    LayerShape,
    factorization,
    fan_in,
    plan_adapter,
    plan_from_factors,
    plan_loha,
    plan_lokr,
)
from lycoris_core.state import check_adapter_name
from lycoris_core.targets import (
    NoMatchingModuleError,
    TargetMatch,
    check_target_module_exists,
    get_pattern_key,
    match_targets,
    resolve_rank_alpha,
)

__all__ = [
    "CONFIG_NAME",
    "KEY_PREFIX",
    "LOHA_FACTORS",
    "LOKR_FACTORS",
    "PEFT_FORMAT_VERSION",
    "SAFETENSORS_METADATA",
    "SAFETENSORS_NAME",
    "AdapterPlan",
    "CheckpointError",
    "LayerShape",
    "LoHaConfig",
    "LoKrConfig",
    "LycorisConfig",
    "NoMatchingModuleError",
    "TargetMatch",
    "check_adapter_name",
    "check_factor_shapes",
    "check_target_module_exists",
    "checkpoint_key",
    "config_class_for",
    "config_from_dict",
    "factorization",
    "fan_in",
    "get_pattern_key",
    "match_targets",
    "plan_adapter",
    "plan_from_factors",
    "plan_loha",
    "plan_lokr",
    "resolve_rank_alpha",
    "split_checkpoint_keys",
]
