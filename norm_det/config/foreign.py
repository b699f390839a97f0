"""Recognizing config files that belong to another framework's tools, and naming the tool.

norm_det's ``tools/train_net.py`` reads norm_det's YAML configs. The repository also ships
configs for detectron2 (``configs/detectron2``, YAML with detectron2's keys) and for mmdet /
mmsegmentation (``configs/mmdet``, ``configs/mmseg``, Python files), which those frameworks' own
tools run; a user who hands one of them to ``train_net.py`` gets the command that runs it instead
of an unknown-key or YAML parser error.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ForeignConfigError", "foreign_config_hint"]

# detectron2 config keys that norm_det's defaults do not declare (norm_det shares detectron2's
# names where the concept exists, META_ARCHITECTURE "GeneralizedRCNN" and VERSION 2 included).
_DETECTRON2_ONLY_KEYS = (
    "MODEL.BACKBONE.NAME",
    "MODEL.NORMDET",
    "MODEL.PROPOSAL_GENERATOR",
    "MODEL.ROI_HEADS.NAME",
    "MODEL.RPN.HEAD_NAME",
    "MODEL.RETINANET",
    "MODEL.ROI_BOX_CASCADE_HEAD",
    "MODEL.PANOPTIC_FPN",
)


class ForeignConfigError(ValueError):
    """A config file of detectron2 or OpenMMLab was given to norm_det's own tools."""


def _nested(mapping: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(mapping, dict) or part not in mapping:
            return None
        mapping = mapping[part]
    return mapping


def _detectron2_keys(loaded: Any) -> list[str]:
    """The detectron2-only keys a parsed YAML file sets."""
    return [key for key in _DETECTRON2_ONLY_KEYS if _nested(loaded, key) is not None]


def _python_config_kind(text: str) -> str | None:
    """``"mmseg"``, ``"mmdet"``, ``"detectron2-lazy"`` or None for a Python config's text."""
    if re.search(r"\bLazyCall\b|\bfrom\s+detectron2\b|\bimport\s+detectron2\b", text):
        return "detectron2-lazy"
    if re.search(r"default_scope\s*=\s*['\"]mmseg['\"]|mmseg::|\bEncoderDecoder\b", text):
        return "mmseg"
    if re.search(r"\b_base_\s*=|default_scope\s*=|\bmodel\s*=\s*dict\(|mmdet::", text):
        return "mmdet"
    return None


def _yaml_chain(path: Path, text: str, depth: int = 0) -> list[Any]:
    """The parsed file and its ``_BASE_`` files, as far as they can be read."""
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        return []
    chain = [loaded]
    base = loaded.get("_BASE_") if isinstance(loaded, dict) else None
    if isinstance(base, str) and depth < 10:
        base_path = (path.parent / base).resolve()
        with contextlib.suppress(OSError, UnicodeDecodeError):
            chain += _yaml_chain(base_path, base_path.read_text(encoding="utf-8"), depth + 1)
    return chain


def foreign_config_hint(path: str | Path) -> str | None:
    """What runs ``path`` when it is a detectron2 or OpenMMLab config, else None.

    Returns:
        a message naming the framework and the command that runs the file, or None for a file
        that looks like norm_det's own YAML (or cannot be read: the normal loader reports that).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if path.suffix == ".py":
        kind = _python_config_kind(text)
        if kind == "detectron2-lazy":
            return (
                f"'{path}' is a detectron2 LazyConfig (Python) file, not a norm_det config. Run "
                "it with detectron2's own tool, with norm_det's schemes enabled by one import in "
                "that script (`import norm_det.integrations.detectron2`): python "
                f"<detectron2>/tools/lazyconfig_train_net.py --config-file {path} "
                "(docs/integrations.md)"
            )
        if kind is not None:
            return (
                f"'{path}' is an OpenMMLab ({kind}) config, not a norm_det config. Run it with "
                f"`python -m norm_det.mm train {path} --work-dir WORK_DIR` (train) and "
                f"`python -m norm_det.mm test {path} CHECKPOINT` (test), which wrap {kind}'s "
                "own tools/train.py and tools/test.py (docs/integrations.md)"
            )
        return (
            f"'{path}' is a Python file; norm_det's tools/train_net.py reads YAML configs "
            "(configs/**/*.yaml). detectron2 LazyConfigs and mmdet/mmseg configs run with those "
            "frameworks' tools (docs/integrations.md)"
        )
    keys = sorted({key for loaded in _yaml_chain(path, text) for key in _detectron2_keys(loaded)})
    if keys:
        return (
            f"'{path}' is a detectron2 config (it or its _BASE_ sets {', '.join(keys)}, which "
            "only detectron2 has), not a norm_det config. Run it with detectron2's own tool "
            "after `import norm_det.integrations.detectron2` in that script: "
            "python <detectron2>/tools/train_net.py --config-file "
            f"{path} (docs/integrations.md). norm_det's own configs of the same models are under "
            "configs/COCO-InstanceSegmentation and configs/COCO-Detection."
        )
    return None
