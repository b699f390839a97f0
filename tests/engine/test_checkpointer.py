import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from norm_det.engine import (
    Checkpointer,
    atomic_save,
    capture_rng_state,
    load_model_weights,
    restore_rng_state,
)


def _draws():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist())


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    state = capture_rng_state()
    first = _draws()
    atomic_save({"rng": state}, tmp_path / "rng.pth")
    restore_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    assert _draws() == first


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "model.pth"
    atomic_save({"x": torch.ones(2)}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        atomic_save({"x": lambda: None}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))
    assert os.listdir(tmp_path) == ["model.pth"]  # no temporary file left behind


def test_save_points_last_checkpoint_and_restores_everything(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    checkpointer = Checkpointer(model, tmp_path, optimizer=optimizer, scheduler=scheduler)
    checkpointer.save("model_0000001", iteration=1)
    expected_rng = torch.get_rng_state()
    assert checkpointer.last_checkpoint() == tmp_path / "model_0000001.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]

    torch.manual_seed(123)
    other = nn.Linear(3, 2)
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    other_scheduler = torch.optim.lr_scheduler.StepLR(other_optimizer, step_size=1, gamma=0.5)
    state = Checkpointer(
        other, tmp_path, optimizer=other_optimizer, scheduler=other_scheduler
    ).resume_or_load("", resume=True)
    assert state["iteration"] == 1
    assert torch.equal(state["rng_state"]["torch"], expected_rng)
    assert torch.equal(other.weight, model.weight)
    assert other_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert other_scheduler.last_epoch == 1
    momentum = other_optimizer.state[other.weight]["momentum_buffer"]
    assert torch.equal(momentum, optimizer.state[model.weight]["momentum_buffer"])


class _Small(nn.Module):
    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.backbone = nn.Linear(3, hidden)
        self.head = nn.Linear(hidden, 1)


def test_mismatched_weights_name_the_first_missing_and_unexpected_keys(tmp_path):
    state = _Small().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["head.bias"]
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as excinfo:
        Checkpointer(_Small(), tmp_path / "out").resume_or_load(str(path), resume=False)
    message = str(excinfo.value)
    assert f"MODEL.WEIGHTS '{path}'" in message
    assert "1 missing keys (first: 'head.bias')" in message
    assert "1 unexpected keys (first: 'extra.weight')" in message


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match=r"'backbone.weight' has shape \(8, 3\) in the file"):
        load_model_weights(_Small(), _Small(hidden=8).state_dict(), "weights.pth")


def test_weights_saved_from_a_ddp_wrapper_load(tmp_path):
    source = _Small()
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "w.pth")
    target = _Small()
    Checkpointer(target, tmp_path / "out").resume_or_load(str(tmp_path / "w.pth"), resume=False)
    assert torch.equal(target.head.weight, source.head.weight)


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MODEL\.WEIGHTS 'nope\.pth'"):
        Checkpointer(_Small(), tmp_path).resume_or_load("nope.pth", resume=False)


def test_model_weights_may_be_a_pretrained_backbone_alone(tmp_path):
    """A torchvision ResNet-18 state dict as MODEL.WEIGHTS initializes a detector's backbone."""
    import torchvision

    from norm_det.modeling import build_model
    from tests.model_utils import randomize_norms
    from tests.modeling.tiny import tiny_cfg

    resnet = randomize_norms(torchvision.models.resnet18())
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    model = build_model(tiny_cfg("FasterRCNN", "FrozenBN", width=64)).eval()
    checkpointer = Checkpointer(model, tmp_path / "out")
    checkpointer.resume_or_load(str(path), resume=False, backbone_scheme="FrozenBN")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = resnet.layer4(
            resnet.layer3(
                resnet.layer2(
                    resnet.layer1(resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x)))))
                )
            )
        )
        features = model.backbone.body(x)
    assert torch.allclose(features["res5"], expected, atol=1e-5)
    # Without a scheme to warm-start in, the strict whole-model error stands.
    with pytest.raises(ValueError, match="missing keys"):
        checkpointer.resume_or_load(str(path), resume=False)


def test_model_weights_of_no_known_kind_say_both_failures(tmp_path):
    from norm_det.modeling import build_model
    from tests.modeling.tiny import tiny_cfg

    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    model = build_model(tiny_cfg("FasterRCNN", "FrozenBN"))
    checkpointer = Checkpointer(model, tmp_path / "out")
    with pytest.raises(ValueError, match=r"(?s)missing keys.*Nor does it load as a pretrained"):
        checkpointer.resume_or_load(str(path), resume=False, backbone_scheme="FrozenBN")
