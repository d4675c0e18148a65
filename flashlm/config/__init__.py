"""Configuration: `ModelConfig` (+ named presets), `TrainConfig`, `DistillConfig`, `RunConfig`; YAML in/out,
dotted overrides. One module a part: `model`, `training`, `run`; `fields` reads values.

Every invalid value raises `ConfigError` with one line naming the key, what is wrong and what to do.
"""

from __future__ import annotations

from flashlm.config.model import FLAVOURS, PRESETS, ModelConfig, count_parameters, get_preset, layer_parameters, replace
from flashlm.config.run import RunConfig, apply_overrides, load_run_config, load_yaml, save_yaml
from flashlm.config.training import (
    DIVERGENCE_ALIASES,
    DIVERGENCES,
    OBJECTIVE_TERMS,
    TERM_KEYS,
    DistillConfig,
    MaskingConfig,
    ObjectiveTerm,
    TrainConfig,
    canonical_train_settings,
    objective_terms,
)

__all__ = [
    "DIVERGENCES",
    "DIVERGENCE_ALIASES",
    "DistillConfig",
    "FLAVOURS",
    "MaskingConfig",
    "ModelConfig",
    "OBJECTIVE_TERMS",
    "ObjectiveTerm",
    "PRESETS",
    "RunConfig",
    "TERM_KEYS",
    "TrainConfig",
    "apply_overrides",
    "canonical_train_settings",
    "count_parameters",
    "get_preset",
    "layer_parameters",
    "load_run_config",
    "load_yaml",
    "objective_terms",
    "replace",
    "save_yaml",
]
