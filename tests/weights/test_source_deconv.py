"""The ND++ and ND releases' ImageNet ResNets, read into norm_det's NDPP / ND ResNet.

Each release network (tests/weights/deconv_release_modules.py) gets random weights and random
running statistics, is saved as its main_imagenet.py saves it (float32, ``module.`` keys,
``{"epoch", "arch", "state_dict", "best_acc1", "optimizer"}``), read back with
:func:`~norm_det.weights.read_checkpoint` and compared in float64 with norm_det's network.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from norm_det.modeling import ResNet
from norm_det.schemes import get_scheme
from norm_det.weights import (
    BackboneWeights,
    convert_weights,
    load_pretrained_backbone,
    pretrained_reference,
    read_checkpoint,
    read_state_dict,
    to_framework,
)
from norm_det.weights.sources import source_formats
from tests.model_utils import relative_error
from tests.weights.deconv_release_modules import (
    ChannelDeconvBuffers,
    ReleaseResNet,
    randomize_release,
    save_release_checkpoint,
)

# The conversions are exact in float64 arithmetic: what remains is rounding (~1e-14), and for
# ND the float32 rounding of the shortcut weights its BN is folded into (measured 3e-8).
EXACT = 1e-10
FOLDED = 1e-6
NDPP_SCHEME = (
    "NDPP(block=64, linear_block=64, stride=3, iters=5, eps=1e-05, sync=True, "
    "scale_invariance='layernorm')"
)
ND_SCHEME = "ND(block=64, linear_block=64, stride=3, iters=5, eps=1e-05, sync=False)"
FC_KEYS = ["fc.weight", "fc.bias", "fc.running_deconv", "fc.running_mean"]


@dataclass
class Release:
    """A release network, its checkpoint file, and its eval maps on ``IMAGES``."""

    model: ReleaseResNet
    path: Path
    maps: dict[str, torch.Tensor]
    weights: BackboneWeights  # the file as read_checkpoint reads it


def _images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(2, 3, 48, 48, generator=generator, dtype=torch.float64)


@pytest.fixture(autouse=True)
def float64():
    """norm_det's networks are built in float64, as the release networks run."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


def _release(model: ReleaseResNet, seed: int, path: Path, arch: str) -> Release:
    # The file holds float32, as the releases' do; the network computes in float64 from the
    # same values.
    model = randomize_release(model.double(), seed).float()
    save_release_checkpoint(model, path, arch)
    model = model.double().eval()
    with torch.no_grad():
        maps = model.features(_images())
    return Release(model, path, maps, read_checkpoint(path))


@pytest.fixture(scope="module")
def ndpp(tmp_path_factory) -> Release:
    """The ND++ release's resnet18d (--norm-type layernorm, --block 64, --block-fc 64)."""
    model = ReleaseResNet(18, matrix="running_cov_isqrt", norm_type="layernorm")
    return _release(model, 0, tmp_path_factory.mktemp("ndpp") / "model_best.pth.tar", "resnet18d")


@pytest.fixture(scope="module")
def nd(tmp_path_factory) -> Release:
    """The ND release's resnet50d at width_per_group 16, with its shortcut BNs."""
    model = ReleaseResNet(
        50, matrix="running_deconv", norm_type=None, width_per_group=16, shortcut_bn=True
    )
    return _release(model, 1, tmp_path_factory.mktemp("nd") / "checkpoint.pth.tar", "resnet50d")


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _worst_error(model: torch.nn.Module, maps: dict[str, torch.Tensor]) -> float:
    """The largest relative error of ``model``'s res2..res5 maps on ``IMAGES`` against ``maps``."""
    with torch.no_grad():
        outputs = model.eval()(_images())
    assert set(outputs) == set(maps)
    return max(relative_error(outputs[name], maps[name]) for name in maps)


@pytest.mark.parametrize(
    ("name", "fmt", "scheme", "folded_bns", "bound"),
    [
        ("ndpp", "ndpp-release", NDPP_SCHEME, 0, EXACT),
        ("nd", "nd-release", ND_SCHEME, 4, FOLDED),
    ],
)
def test_release_equals_norm_det_in_eval(request, name, fmt, scheme, folded_bns, bound):
    release: Release = request.getfixturevalue(name)
    weights = release.weights
    assert (weights.framework, weights.naming, weights.scheme) == (fmt, fmt, scheme)
    # Strict: every key is placed; a shortcut BN's five tensors go into its deconvolution.
    assert len(weights.tensors) == len(_state(release.path)) - 5 * folded_bns
    matrices = [t for k, t in weights.tensors.items() if k.endswith("running_deconv")]
    assert matrices and all(t.shape == (1, *t.shape[-2:]) for t in matrices)
    named = read_checkpoint(release.path, fmt=fmt)
    assert all(torch.equal(named.tensors[k], v) for k, v in weights.tensors.items())

    assert _worst_error(pretrained_reference(weights), release.maps) < bound
    # The classifier, which norm_det's backbone leaves out, is the scheme's linear layer.
    fc = release.model.fc
    classifier = get_scheme(weights.scheme).linear(fc.in_features, fc.out_features).eval()
    state = {k[len("fc.") :]: v for k, v in weights.tensors.items() if k.startswith("fc.")}
    classifier.load_state_dict(state, strict=False)  # no step counter in the release
    res5 = release.maps["res5"]
    with torch.no_grad():
        logits = classifier(torch.flatten(F.adaptive_avg_pool2d(res5, 1), 1))
        assert relative_error(logits, release.model.classify(res5)) < EXACT


def test_detection_by_keys_is_specific(ndpp, nd, resnet18):
    formats = source_formats()
    # claims() sees the keys without the DataParallel "module." (read_state_dict strips it).
    ndpp_state, nd_state = (
        {key[len("module.") :]: value for key, value in _state(release.path).items()}
        for release in (ndpp, nd)
    )
    assert formats["ndpp-release"].claims(ndpp_state)
    assert formats["nd-release"].claims(nd_state)
    assert not formats["nd-release"].claims(ndpp_state)
    assert not formats["ndpp-release"].claims(nd_state)
    assert read_state_dict(_state(nd.path)).framework == "nd-release"  # with "module."
    assert read_state_dict(nd_state).framework == "nd-release"
    # norm_det's own ND weights, in its names and in torchvision's, hold (1, F, F) matrices.
    own = ResNet(depth=18, norm="ND(block=8)", stem_channels=8, res2_channels=8).state_dict()
    torchvision_named = to_framework(read_state_dict(own, fmt="norm_det"), "torchvision")
    releases = [formats["ndpp-release"], formats["nd-release"]]
    for state in (own, torchvision_named, resnet18.state_dict()):
        assert not any(f.claims(state) for f in releases)
    assert read_state_dict(torchvision_named).framework == "torchvision"


def test_nd_head_deconvolution_is_dropped(nd):
    """ND's ChannelDeconv before the pooling (``--delinear False``) is part of the head."""
    state = dict(_state(nd.path))
    head = ChannelDeconvBuffers(64).state_dict()
    state.update({f"module.deconv1.{key}": value for key, value in head.items()})
    weights = read_state_dict(state)
    assert set(weights.tensors) == set(nd.weights.tensors)
    assert all(torch.equal(weights.tensors[k], v) for k, v in nd.weights.tensors.items())


def test_ndpp_release_warm_starts_other_schemes(ndpp):
    # norm_det's detection NDPP (sampling stride 5, linear block 256, ...): its new layers hold
    # the release's whitened weights with identity statistics, which compute the same in eval.
    backbone = ResNet(depth=18, norm="NDPP")
    report = load_pretrained_backbone(backbone, ndpp.weights, "NDPP")
    assert report["left_out"] == FC_KEYS
    assert _worst_error(backbone, ndpp.maps) < EXACT
    converted = convert_weights(ndpp.weights, "NDPP")
    assert converted.scheme == "NDPP"
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(converted.tensors[key], value, rtol=0, atol=0)


def test_ndpp_release_warm_starts_gn(ndpp):
    backbone = ResNet(depth=18, norm="GN")
    load_pretrained_backbone(backbone, ndpp.weights, "GN")
    # GN keeps the whitened weights (and drops the statistics), as it does from BN.
    reference = pretrained_reference(ndpp.weights)
    for unit in ("stem.conv1", "res3.0.conv2", "res5.1.conv1"):
        whitened = reference.get_submodule(f"{unit}.conv").whitened_weight()[0]
        torch.testing.assert_close(backbone.get_submodule(f"{unit}.conv").weight, whitened)


def test_nd_release_warm_starts_plain_convolutions(nd):
    """ND in eval is a convolution with the whitened weight: the plain network is exact."""
    plain = ResNet(depth=50, norm="none", bottleneck_channels=16)
    load_pretrained_backbone(plain, nd.weights, "none")
    assert _worst_error(plain, nd.maps) < FOLDED


def test_ndpp_code_without_scale_invariance_reads_with_its_scheme(ndpp):
    """The ND++ code without ``--norm-type`` saves the same keys: its scheme must be named."""
    release = copy.deepcopy(ndpp.model)
    for module in release.modules():
        if hasattr(module, "norm_type"):
            module.norm_type = None
    with torch.no_grad():
        maps = release.features(_images())
    reference = pretrained_reference(ndpp.weights, "NDPP(scale_invariance='none')")
    assert _worst_error(reference, maps) < EXACT
    assert _worst_error(pretrained_reference(ndpp.weights), maps) > 0.1


def test_a_half_recognised_release_names_its_unplaced_keys(ndpp, tmp_path):
    checkpoint = torch.load(ndpp.path, weights_only=True)
    state = {
        key.replace("layer2.0.conv1.running_cov_isqrt", "layer2.0.conv1.running_cov"): value
        for key, value in checkpoint["state_dict"].items()
    }
    state["module.layer3.0.se.fc1.weight"] = torch.zeros(4, 4)
    checkpoint["state_dict"] = state
    torch.save(checkpoint, tmp_path / "edited.pth.tar")
    with pytest.raises(
        ValueError,
        match=rf"{len(state) - 2} keys read as the ND\+\+ release's ImageNet ResNet .*, but 2 "
        r"keys have no place in it; first: layer2\.0\.conv1\.running_cov, "
        r"layer3\.0\.se\.fc1\.weight$",
    ):
        read_checkpoint(tmp_path / "edited.pth.tar")
    # Read as the other release, its matrices have no place.
    with pytest.raises(
        ValueError, match=r"Network Deconvolution release.*first: conv1\.running_cov_isqrt, "
    ):
        read_checkpoint(ndpp.path, fmt="nd-release")


def test_another_width_names_the_mismatching_shapes(ndpp, nd):
    narrow = ResNet(depth=18, norm="NDPP", stem_channels=32, res2_channels=32)
    with pytest.raises(
        ValueError,
        match=r"'stem\.conv1\.conv\.weight' has shape \(64, 3, 7, 7\) in the checkpoint and "
        r"\(32, 3, 7, 7\) in the ResNet",
    ):
        load_pretrained_backbone(narrow, ndpp.path, "NDPP")
    wider = ResNet(depth=50, norm="ND", bottleneck_channels=32)
    with pytest.raises(
        ValueError,
        match=r"'res2\.0\.conv1\.conv\.weight' has shape \(16, 64, 1, 1\) in the checkpoint and "
        r"\(32, 64, 1, 1\)",
    ):
        load_pretrained_backbone(wider, nd.weights, "ND")
