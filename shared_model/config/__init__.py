"""Typed configuration, parsed in one place: the model (one dataclass per pipeline block and the
presets registry), the data and single-site training, privacy, and a federated run with its mapping onto
Flower's run config. Configs are plain dataclasses that round-trip through dictionaries and YAML; parsing
is strict: an unknown key or a value of the wrong type raises :class:`ConfigError` naming the dotted field
(e.g. ``model.sam.lora_rank``) or, in a run config, the kebab-case key."""

from __future__ import annotations

from shared_model.config.parse import (  # noqa: F401
    ConfigError,
    blame_overrides,
    from_dict,
    kebab,
    load_yaml,
    merge,
    to_dict,
)
from shared_model.config.model import (  # noqa: F401
    ATTENTION_IMPLS,
    BottleneckConfig,
    BoxConfig,
    CRFConfig,
    ClipConfig,
    ClipTextConfig,
    ClipVisionConfig,
    LossConfig,
    ModelConfig,
    PRESETS,
    PromptConfig,
    SamConfig,
    base_config,
    get_preset,
    model_config_from_dict,
    register_preset,
    tiny_config,
)
from shared_model.config.site import (  # noqa: F401
    DataConfig,
    SiteExperiment,
    TrainConfig,
    check_data,
    check_train,
    site_experiment_from_dict,
)
from shared_model.config.privacy import (  # noqa: F401
    CENTRAL_DP_MODES,
    DP_ACCOUNTANTS,
    GRAD_SAMPLE_MODES,
    PrivacyConfig,
    check_privacy,
)
from shared_model.config.adapter import AdapterConfig, check_adapter  # noqa: F401
from shared_model.config.federation import (  # noqa: F401
    FederationConfig,
    PARTITION_MODES,
    PartitionConfig,
    RunSettings,
    STRATEGIES,
    _RUN_JSON_KEYS,
    check_federation,
    from_run_config,
    to_run_config,
)

__all__ = ['ATTENTION_IMPLS', 'AdapterConfig', 'check_adapter', 'BottleneckConfig', 'BoxConfig', 'CENTRAL_DP_MODES', 'CRFConfig', 'ClipConfig', 'ClipTextConfig', 'ClipVisionConfig', 'ConfigError', 'DP_ACCOUNTANTS', 'DataConfig', 'FederationConfig', 'GRAD_SAMPLE_MODES', 'LossConfig', 'ModelConfig', 'PARTITION_MODES', 'PRESETS', 'PartitionConfig', 'PrivacyConfig', 'PromptConfig', 'RunSettings', 'STRATEGIES', 'SamConfig', 'SiteExperiment', 'TrainConfig', '_RUN_JSON_KEYS', 'base_config', 'blame_overrides', 'check_data', 'check_federation', 'check_privacy', 'check_train', 'from_dict', 'from_run_config', 'get_preset', 'kebab', 'load_yaml', 'merge', 'model_config_from_dict', 'register_preset', 'site_experiment_from_dict', 'tiny_config', 'to_dict', 'to_run_config']
