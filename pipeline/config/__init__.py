"""Typed configuration: the package's public names, re-exported from the modules that own
them (``from pipeline.config import X`` is the import every other module uses).

- :mod:`pipeline.config.schemas`: the dataclasses and their ConfigStore registration
- :mod:`pipeline.config.workload_schema`: the workload group's dataclass
- :mod:`pipeline.config.validation`: unknown keys, types, ranges, choices
- :mod:`pipeline.config.flatten`: ``a.b.c -> value`` for tracking
- :mod:`pipeline.config.precheck`: the command-line pre-check of group choices
- :mod:`pipeline.config.field_docs`: the fields' attribute docstrings
- :mod:`pipeline.config.settings_doc`: generates ``docs/settings.md``

The names below are imported from their submodule on first use (PEP 562): the package itself
imports nothing else at load time, so its submodules can import one another without an
import cycle through this file. ``flatten`` alone is bound at load time: it shares its name
with its module, and binding it first keeps the function, not the module, under that name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config.flatten import flatten  # imports nothing else
from pipeline.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from pipeline.config.precheck import GROUPS, check_group_choices
    from pipeline.config.schemas import (
        CHAT_TEMPLATE_CHOICES,
        DEVICES,
        DTYPES,
        MODEL_SOURCES,
        TARGET_DEVICES,
        WEIGHTS,
        Config,
        DecodingConfig,
        MeasureConfig,
        ModelConfig,
        PathsConfig,
        ScoringConfig,
        TargetConfig,
        TrackingConfig,
        register_configs,
    )
    from pipeline.config.validation import (
        PROFILES,
        check_choice,
        check_range,
        fail,
        looks_local,
        validate,
        validate_decoding,
        validate_model,
        validate_workload,
    )
    from pipeline.config.workload_schema import ARRIVALS, WorkloadConfig
    from pipeline.errors import ConfigError

_EXPORTS = {
    "ARRIVALS": "pipeline.config.workload_schema",
    "CHAT_TEMPLATE_CHOICES": "pipeline.config.schemas",
    "Config": "pipeline.config.schemas",
    "ConfigError": "pipeline.errors",
    "DEVICES": "pipeline.config.schemas",
    "DTYPES": "pipeline.config.schemas",
    "DecodingConfig": "pipeline.config.schemas",
    "GROUPS": "pipeline.config.precheck",
    "MODEL_SOURCES": "pipeline.config.schemas",
    "MeasureConfig": "pipeline.config.schemas",
    "ModelConfig": "pipeline.config.schemas",
    "PROFILES": "pipeline.config.validation",
    "PathsConfig": "pipeline.config.schemas",
    "ScoringConfig": "pipeline.config.schemas",
    "TARGET_DEVICES": "pipeline.config.schemas",
    "TargetConfig": "pipeline.config.schemas",
    "TrackingConfig": "pipeline.config.schemas",
    "WEIGHTS": "pipeline.config.schemas",
    "WorkloadConfig": "pipeline.config.workload_schema",
    "check_choice": "pipeline.config.validation",
    "check_group_choices": "pipeline.config.precheck",
    "check_range": "pipeline.config.validation",
    "fail": "pipeline.config.validation",
    "looks_local": "pipeline.config.validation",
    "register_configs": "pipeline.config.schemas",
    "validate": "pipeline.config.validation",
    "validate_decoding": "pipeline.config.validation",
    "validate_model": "pipeline.config.validation",
    "validate_workload": "pipeline.config.validation",
}

__all__ = [
    "flatten",
    "ARRIVALS",
    "CHAT_TEMPLATE_CHOICES",
    "Config",
    "ConfigError",
    "DEVICES",
    "DTYPES",
    "DecodingConfig",
    "GROUPS",
    "MODEL_SOURCES",
    "MeasureConfig",
    "ModelConfig",
    "PROFILES",
    "PathsConfig",
    "ScoringConfig",
    "TARGET_DEVICES",
    "TargetConfig",
    "TrackingConfig",
    "WEIGHTS",
    "WorkloadConfig",
    "check_choice",
    "check_group_choices",
    "check_range",
    "fail",
    "looks_local",
    "register_configs",
    "validate",
    "validate_decoding",
    "validate_model",
    "validate_workload",
]


__getattr__ = lazy_exports(__name__, _EXPORTS)
