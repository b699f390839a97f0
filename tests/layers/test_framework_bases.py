"""Every layer class keeps its torch class among its direct bases.

mmengine's initializers (``init_cfg=dict(type='Kaiming', layer='Conv2d')``, the default of
mmdet's SSD head, RetinaNet head, ...) select a module when ``layer`` is the name of its class or
of one of its *direct* bases. A layer deriving from ``nn.Conv2d`` through an intermediate class
of its own would silently keep PyTorch's default init in mmdet: a regression once found by the
SSD training test only.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from torch import nn

import norm_det.layers

_FRAMEWORK_CLASSES = (
    nn.Conv2d,
    nn.ConvTranspose2d,
    nn.Linear,
    nn.BatchNorm2d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)


def _layer_classes() -> list[type]:
    found = {}
    for info in pkgutil.walk_packages(norm_det.layers.__path__, "norm_det.layers."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__.startswith("norm_det.") and issubclass(cls, _FRAMEWORK_CLASSES):
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return [found[name] for name in sorted(found)]


@pytest.mark.parametrize("cls", _layer_classes(), ids=lambda cls: cls.__name__)
def test_torch_class_is_a_direct_base(cls):
    torch_classes = [base for base in _FRAMEWORK_CLASSES if issubclass(cls, base)]
    # The most derived torch class, e.g. SyncBatchNorm rather than its own base.
    nearest = [
        c for c in torch_classes if not any(o is not c and issubclass(o, c) for o in torch_classes)
    ]
    direct = {base.__name__ for base in cls.__bases__}
    for torch_class in nearest:
        assert torch_class.__name__ in direct, (
            f"{cls.__qualname__} derives from nn.{torch_class.__name__} through "
            f"{[b.__name__ for b in cls.__bases__]}: mmengine's init_cfg layer='"
            f"{torch_class.__name__}' would not select it"
        )


def test_the_walk_finds_the_scheme_convolutions():
    names = {cls.__name__ for cls in _layer_classes()}
    assert {"WSConv2d", "PWSConv2d", "ScaledStdConv2d", "DeconvConv2d"} <= names
