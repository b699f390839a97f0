"""Framework residual blocks that apply their own ReLU: a norm carrying it replaces both."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from norm_det import convert
from norm_det.activation_blocks import activated_children, knows_block
from norm_det.layers import EvoNormS0, FilterResponseNorm2d

pytestmark = pytest.mark.filterwarnings("ignore:.*groups do not divide")


def _bottleneck() -> nn.Module:
    torch.manual_seed(0)
    block = torchvision.models.resnet.Bottleneck(
        16, 8, stride=2, downsample=nn.Sequential(nn.Conv2d(16, 32, 1, 2), nn.BatchNorm2d(32))
    )
    return block.eval()


def test_torchvision_blocks_are_known() -> None:
    block = _bottleneck()
    assert knows_block(block) and activated_children(block) == {"bn1", "bn2"}
    basic = torchvision.models.resnet.BasicBlock(8, 8)
    assert activated_children(basic) == {"bn1"}
    assert not knows_block(nn.Sequential())


def test_a_converted_bottleneck_applies_tlu_in_place_of_relu() -> None:
    block = convert(_bottleneck(), "FRN").eval()
    assert block.bn1.tau is not None and block.bn2.tau is not None  # followed by a ReLU
    assert block.bn3.tau is None  # goes into the addition
    x = torch.randn(2, 16, 8, 8)
    out = block.bn1(block.conv1(x))  # FRN + TLU, no ReLU after it
    out = block.bn2(block.conv2(out))
    out = block.bn3(block.conv3(out))
    expected = F.relu(out + block.downsample(x))
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected)
    # Copies and pickles keep the behaviour; the class still reads as torchvision's.
    assert isinstance(block, torchvision.models.resnet.Bottleneck)
    for clone in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        with torch.no_grad():
            torch.testing.assert_close(clone(x), expected)


def test_converting_back_restores_the_framework_function() -> None:
    reference = _bottleneck()
    block = convert(convert(copy.deepcopy(reference), "EvoNorm-S0"), "BN").eval()
    assert type(block.bn1) is nn.BatchNorm2d
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference(x))


def test_a_whole_torchvision_resnet_warns_only_for_its_stem() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    with pytest.warns(UserWarning, match=r"after 1 conv\+norm pair\(s\) \('conv1'\)"):
        convert(model, "EvoNorm-S0")
    assert isinstance(model.layer1[0].bn1, EvoNormS0) and model.layer1[0].bn1.carries_activation
    assert not model.layer1[0].bn2.carries_activation
    assert not model.bn1.carries_activation  # ResNet.forward applies its own ReLU there


def test_detectron2_blocks_leave_out_the_relu_after_a_carrying_norm() -> None:
    resnet = pytest.importorskip("detectron2.modeling.backbone.resnet")
    torch.manual_seed(0)
    block = resnet.BottleneckBlock(16, 32, bottleneck_channels=8, stride=2, norm="BN")
    assert activated_children(block) == {"conv1", "conv2"}
    convert(block, "FRN")
    block.eval()
    assert isinstance(block.conv1.norm, FilterResponseNorm2d) and block.conv1.norm.tau is not None
    assert block.conv3.norm.tau is None
    x = torch.randn(2, 16, 8, 8)
    out = block.conv3(block.conv2(block.conv1(x)))  # each applies its own norm
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.relu(out + block.shortcut(x)))
