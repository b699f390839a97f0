"""Configuration: detectron2-style defaults, YAML files with _BASE_, KEY VALUE overrides."""

from norm_det.config.config import CONFIGS_DIR, CfgNode, find_config_file, get_cfg, load_config
from norm_det.config.foreign import ForeignConfigError

__all__ = [
    "CONFIGS_DIR",
    "CfgNode",
    "ForeignConfigError",
    "find_config_file",
    "get_cfg",
    "load_config",
]
