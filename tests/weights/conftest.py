"""Random pretrained-like backbones for the checkpoint tests (no downloads)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from tests.model_utils import randomize_norms

# A VGG-16 at 1/8 width: the layer indices of torchvision's vgg16 / vgg16_bn, small tensors.
NARROW_VGG16 = [8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 64, 64, 64, "M", 64, 64, 64, "M"]


def make_resnet18(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_norms(torchvision.models.resnet18(**kwargs), seed)


def torchvision_resnet_features(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The res2..res5 maps of a torchvision ResNet, named as norm_det's ResNet names them."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    outputs = {}
    for index, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4)):
        x = layer(x)
        outputs[f"res{index + 2}"] = x
    return outputs


class NarrowVGG(nn.Module):
    """torchvision's VGG layout at 1/8 width: ``features`` and a three-layer ``classifier``."""

    def __init__(self, batch_norm: bool) -> None:
        super().__init__()
        self.features = torchvision.models.vgg.make_layers(NARROW_VGG16, batch_norm=batch_norm)
        self.classifier = nn.Sequential(
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Dropout(),
            nn.Linear(32, 32),
            nn.ReLU(),
            nn.Dropout(),
            nn.Linear(32, 10),
        )


def make_narrow_vgg(batch_norm: bool, seed: int = 0) -> NarrowVGG:
    torch.manual_seed(seed)
    return randomize_norms(NarrowVGG(batch_norm), seed)


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output - reference).norm() / reference.norm())


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return make_resnet18()
