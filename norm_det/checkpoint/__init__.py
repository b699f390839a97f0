"""Deprecated: the weight conversion package is :mod:`norm_det.weights`.

``norm_det.checkpoint`` and its submodules (``formats``, ``keymaps``, ``warm_start`` ...) are the
same modules under their old names, for one release; import them from ``norm_det.weights``.
"""

from __future__ import annotations

import importlib
import sys
import warnings

from norm_det.weights import *  # noqa: F403  (the old package's public names)
from norm_det.weights import __all__  # noqa: F401

warnings.warn(
    "norm_det.checkpoint is deprecated: import norm_det.weights (the same modules)",
    DeprecationWarning,
    stacklevel=2,
)

_SUBMODULES = (
    "backbones",
    "deploy",
    "formats",
    "io",
    "keymaps",
    "sources",
    "warm_start",
)
sys.modules[f"{__name__}.weights"] = importlib.import_module("norm_det.weights.backbone_weights")
for _name in _SUBMODULES:
    sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"norm_det.weights.{_name}")
