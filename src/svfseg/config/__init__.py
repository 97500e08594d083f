"""Experiment configuration: typed dataclass defaults <- YAML recipe <- command-line dotlist.

``schema`` holds the sections and their checks, ``loading`` the YAML/dotlist layers, ``aliases``
svfseg 0.1's deprecated regime keys.
"""
from svfseg.config.loading import (
    config_with_overrides,
    dump_yaml,
    from_dict,
    git_commit,
    keys_set_by,
    load_config,
    parse_dotlist,
    read_yaml,
)
from svfseg.config.schema import (
    REGIMES,
    ConfigError,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    LoRAConfig,
    ModelConfig,
    OptimConfig,
    SVFPolicy,
    TrainConfig,
    to_dict,
    validate,
)

__all__ = [
    "REGIMES", "ConfigError", "DataConfig", "EvalConfig", "ExperimentConfig", "LoRAConfig", "ModelConfig", "OptimConfig",
    "SVFPolicy", "TrainConfig", "config_with_overrides", "dump_yaml", "from_dict", "git_commit", "keys_set_by",
    "load_config", "parse_dotlist", "read_yaml", "to_dict", "validate",
]
