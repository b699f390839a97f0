"""Recognising checkpoint formats, and reading files safely."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from norm_det.weights import load_file, read_checkpoint, read_state_dict, write_checkpoint


class Opaque:
    """A Python object inside a checkpoint (as mmengine objects in mmdet checkpoints)."""

    def __init__(self) -> None:
        self.value = 3


class RunsCommand:
    """A pickle that would run a shell command when loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unknown_keys_are_listed():
    with pytest.raises(
        ValueError,
        match=r"no known checkpoint format.*first unmatched keys: "
        r"encoder\.weight, decoder\.bias",
    ):
        read_state_dict({"encoder.weight": torch.zeros(1), "decoder.bias": torch.zeros(1)})


def test_keys_beside_a_known_backbone_are_listed(resnet18):
    state = dict(resnet18.state_dict())
    state["projector.0.weight"] = torch.zeros(2)
    with pytest.raises(
        ValueError,
        match=r"torchvision/resnet backbone, but 1 keys match no "
        r"known format; first unmatched keys: projector\.0\.weight",
    ):
        read_state_dict(state)


def test_values_must_be_tensors(resnet18):
    state = dict(resnet18.state_dict())
    state["conv1.weight"] = "not a tensor"
    with pytest.raises(ValueError, match=r"entry 'conv1.weight' is a str"):
        read_state_dict(state)


def test_a_pickle_needs_the_opt_in(resnet18, tmp_path):
    path = tmp_path / "R-18.pkl"
    write_checkpoint(read_state_dict(resnet18.state_dict()), path, "detectron2")
    with pytest.raises(ValueError, match=r"is a pickle.*allow_pickle=True \(--allow-pickle"):
        read_checkpoint(path)
    weights = read_checkpoint(path, allow_pickle=True)
    assert weights.framework == "detectron2" and len(weights.tensors) == 122


def test_a_pickle_that_names_code_is_refused_even_with_the_opt_in(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as file:
        pickle.dump({"model": {"stem.conv1.weight": RunsCommand(str(marker))}}, file)
    with pytest.raises(ValueError, match=r"refusing to build (posix|nt|os)\.system"):
        load_file(path, allow_pickle=True)
    assert not marker.exists()


def test_a_caffe2_style_pickle_of_arrays_loads(tmp_path):
    path = tmp_path / "blobs.pkl"
    arrays = {"conv1.weight": np.ones((2, 3), dtype=np.float32), "step": np.int64(5)}
    with open(path, "wb") as file:
        pickle.dump(arrays, file, protocol=2)
    loaded = load_file(path, allow_pickle=True)
    assert loaded["conv1.weight"].dtype == np.float32 and int(loaded["step"]) == 5


def test_python_objects_in_a_torch_file_need_the_opt_in(resnet18, tmp_path):
    path = tmp_path / "with_objects.pth"
    torch.save({"state_dict": resnet18.state_dict(), "meta": {"hub": Opaque()}}, path)
    with pytest.raises(ValueError, match=r"holds Python objects.*allow_pickle=True"):
        read_checkpoint(path)
    assert read_checkpoint(path, allow_pickle=True).framework == "mmdet"


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "nothing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"garbage\.pth"):
        read_checkpoint(tmp_path / "garbage.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="holds a Tensor, not a state dict"):
        read_checkpoint(tmp_path / "tensor.pth")


def test_pickles_are_written_for_detectron2_only(resnet18, tmp_path):
    weights = read_state_dict(resnet18.state_dict())
    with pytest.raises(ValueError, match=r"only detectron2 checkpoints are written as pickles"):
        write_checkpoint(weights, tmp_path / "r18.pkl", "mmdet")
    with pytest.raises(ValueError, match="unknown checkpoint format 'caffe'"):
        write_checkpoint(weights, tmp_path / "r18.pth", "caffe")


def test_containers_say_which_framework(resnet18, tmp_path):
    state = resnet18.state_dict()
    torch.save({"state_dict": dict(state)}, tmp_path / "mmdet.pth")
    torch.save(dict(state), tmp_path / "bare.pth")
    torch.save({"model": dict(state), "iteration": 5}, tmp_path / "trainer.pth")
    assert read_checkpoint(tmp_path / "mmdet.pth").framework == "mmdet"
    assert read_checkpoint(tmp_path / "bare.pth").framework == "torchvision"
    assert read_checkpoint(tmp_path / "trainer.pth").framework == "torchvision"


def test_written_norm_det_files_remember_their_scheme(resnet18, tmp_path):
    weights = read_state_dict(resnet18.state_dict())
    weights.meta["scheme"] = "BN"
    write_checkpoint(weights, tmp_path / "nd.pth", "norm_det")
    write_checkpoint(weights, tmp_path / "d2.pkl", "detectron2")
    write_checkpoint(weights, tmp_path / "mm.pth", "mmdet")
    for name in ("nd.pth", "d2.pkl", "mm.pth"):
        assert read_checkpoint(tmp_path / name, allow_pickle=True).scheme == "BN"


def test_a_distributed_wrapper_prefix_is_dropped(resnet18, tmp_path):
    torch.save({f"module.{k}": v for k, v in resnet18.state_dict().items()}, tmp_path / "ddp.pth")
    weights = read_checkpoint(tmp_path / "ddp.pth")
    assert weights.framework == "torchvision" and "stem.conv1.conv.weight" in weights.tensors
