"""The source-format plumbing: claims before namings, ``fmt`` naming a format, strict readers."""

from __future__ import annotations

import pytest
import torch

from norm_det.weights import read_checkpoint, read_state_dict, save_file, sources
from norm_det.weights.backbone_weights import BackboneWeights
from norm_det.weights.formats import known_formats
from norm_det.weights.sources import SourceFormat, unplaced_keys_error


def _toy_read(state, source):
    """A toy layout: ``toy.<norm_det key>``; anything else is unplaced."""
    placed = {k[len("toy.") :]: v for k, v in state.items() if k.startswith("toy.")}
    unplaced = [k for k in state if not k.startswith("toy.")]
    if unplaced:
        raise unplaced_keys_error(source, "the toy release", len(placed), unplaced)
    return BackboneWeights(
        "resnet", placed, "toy", meta={"scheme": "BN"}, naming="toy", arguments={"depth": 18}
    )


@pytest.fixture
def toy_format(monkeypatch):
    registry = dict(sources.source_formats())
    toy = SourceFormat("toy", "the toy release", lambda s: "toy.marker" in s, _toy_read)
    registry["toy"] = toy
    monkeypatch.setattr(sources, "_FORMATS", registry)
    return toy


def test_known_formats_are_the_frameworks_then_the_sources():
    names = known_formats()
    assert names[:4] == ["torchvision", "norm_det", "detectron2", "mmdet"]
    assert names[4:] == list(sources.source_formats())
    assert len(set(names)) == len(names)


def test_a_claimed_state_is_read_by_its_format(toy_format, resnet18):
    state = {f"toy.{k}": v for k, v in {"stem.conv1.conv.weight": torch.ones(1)}.items()}
    state["toy.marker"] = torch.zeros(1)
    weights = read_state_dict(state, meta={"note": "kept"})
    assert weights.framework == "toy" and weights.arguments == {"depth": 18}
    assert weights.meta == {"note": "kept", "scheme": "BN"}  # the reader's meta wins


def test_fmt_names_a_format_without_its_claim(toy_format):
    weights = read_state_dict({"toy.stem.conv1.conv.weight": torch.ones(1)}, fmt="toy")
    assert set(weights.tensors) == {"stem.conv1.conv.weight"}


def test_a_half_recognised_state_names_its_first_unplaced_keys(toy_format):
    state = {"toy.marker": torch.zeros(1), "stray.weight": torch.zeros(1)}
    with pytest.raises(
        ValueError, match=r"1 keys read as the toy release, but 1 keys .*first: stray\.weight"
    ):
        read_state_dict(state, source="'x.pth'")


def test_an_unknown_fmt_lists_the_known_formats(resnet18):
    with pytest.raises(ValueError, match=r"unknown checkpoint format 'caffe3'; known: torchvision"):
        read_state_dict(resnet18.state_dict(), fmt="caffe3")


def test_a_framework_fmt_restricts_the_namings(resnet18, tmp_path):
    path = save_file(resnet18.state_dict(), tmp_path / "r18.pth")
    assert read_checkpoint(path, fmt="torchvision").framework == "torchvision"
    # mmdet's ResNet naming is torchvision's: named, it reads as mmdet.
    assert read_checkpoint(path, fmt="mmdet").framework == "mmdet"
    with pytest.raises(ValueError, match=r"not a detectron2 checkpoint .*first unmatched keys"):
        read_checkpoint(path, fmt="detectron2")


def test_no_format_lists_every_known_one():
    with pytest.raises(ValueError, match=r"known: torchvision, norm_det, detectron2, mmdet"):
        read_state_dict({"encoder.weight": torch.zeros(1)})
