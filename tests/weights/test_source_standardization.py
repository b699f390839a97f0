"""The PWS and IterNorm releases as source formats (norm_det.weights.sources.
standardization_releases), tried against re-definitions of the releases' own modules."""

from __future__ import annotations

import argparse

import pytest
import torch

from norm_det.modeling import ResNet, build_model
from norm_det.weights import (
    load_file,
    load_pretrained_backbone,
    output_agreement,
    pretrained_reference,
    read_checkpoint,
    read_state_dict,
    save_file,
    write_checkpoint,
)
from norm_det.weights.backbones import find_backbone, load_backbone_tensors, resnet_arguments
from norm_det.weights.sources.standardization_releases import (
    PWS_DROPPED,
    PWS_RELEASE_SCHEME,
    PWS_STEM_NORM,
    claims_iternorm_release,
    claims_pws_release,
)
from tests.model_utils import relative_error
from tests.modeling.tiny import tiny_cfg
from tests.weights.conftest import make_resnet18
from tests.weights.standardization_release_modules import (
    make_iternorm_release,
    make_pws_release,
)

EXACT = 1e-5


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)).double()


# ---------------------------------------------------------------------------------------------
# IterNorm release.


@pytest.fixture(scope="module")
def iternorm_release():
    return make_iternorm_release(18).double()


def _iternorm_reference(weights):
    """norm_det's network of ``weights`` in float64 (the tensors loaded again at full width)."""
    reference = pretrained_reference(weights).double()
    load_backbone_tensors(reference, weights.tensors)
    return reference


def _worst_error(release, reference, x) -> float:
    with torch.no_grad():
        expected, outputs = release.stages(x), reference(x)
    return max(relative_error(outputs[name], expected[name]) for name in expected)


def test_iternorm_release_file_is_detected_and_exact(iternorm_release, x, tmp_path):
    # best.pth: the release's save_model, a bare state dict.
    path = save_file(iternorm_release.state_dict(), tmp_path / "best.pth")
    weights = read_checkpoint(path)
    assert weights.framework == "iternorm-release"
    assert weights.scheme == "IterNorm(group_channels=64, iters=5)"
    # Strict: every tensor but the BN step counters placed (norm_det's IterNorm has none).
    counters = [k for k in iternorm_release.state_dict() if k.endswith("num_batches_tracked")]
    assert len(weights.tensors) == len(iternorm_release.state_dict()) - len(counters)
    assert weights.tensors["stem.conv1.norm.running_mean"].shape == (64,)
    # A BN's statistics: a diagonal whitening, 1 / sqrt(var + eps).
    bn = iternorm_release.layer1[0].bn1
    diagonal = weights.tensors["res2.0.conv1.norm.running_wm"][0].diagonal()
    assert torch.allclose(diagonal, torch.rsqrt(bn.running_var + bn.eps))
    assert _worst_error(iternorm_release, _iternorm_reference(weights), x) < EXACT


def test_iternorm_release_training_checkpoint_and_fmt(iternorm_release, x, tmp_path):
    # checkpoint.pth: the release's save_checkpoint (its cfg is an argparse Namespace).
    optimizer = torch.optim.SGD(iternorm_release.parameters(), lr=0.1, momentum=0.9)
    checkpoint = {
        "model": iternorm_release.state_dict(),
        "cfg": argparse.Namespace(arch="resnet18", norm="ItN"),
        "optimizer": optimizer.state_dict(),
        "epoch": 100,
        "best_prec1": 70.0,
        "arch": "resnet18",
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    weights = read_checkpoint(path, allow_pickle=True, fmt="iternorm-release")
    assert weights.framework == "iternorm-release"
    assert _worst_error(iternorm_release, _iternorm_reference(weights), x) < EXACT


def test_iternorm_release_with_module_prefix_and_small_groups(x):
    # Groups of 16 channels (4 in the stem): norm_det's IterNorm takes the release's group size.
    release = make_iternorm_release(18, num_channels=16, seed=1).double()
    assert claims_iternorm_release(release.state_dict())
    # read_state_dict strips a DataParallel model's "module." before any format claims it.
    weights = read_state_dict({f"module.{k}": v for k, v in release.state_dict().items()})
    assert weights.scheme == "IterNorm(group_channels=16, iters=5)"
    assert weights.tensors["stem.conv1.norm.running_wm"].shape == (4, 16, 16)
    assert _worst_error(release, _iternorm_reference(weights), x) < EXACT


def test_iternorm_release_last_bn_is_folded_into_fc(x):
    release = make_iternorm_release(50, last=True, seed=2).double()
    weights = read_state_dict(release.state_dict())
    assert not any(k.startswith("last_bn") for k in weights.tensors)
    reference = _iternorm_reference(weights)
    assert _worst_error(release, reference, x) < EXACT
    with torch.no_grad():
        features = reference(x)["res5"].mean(dim=(2, 3))
        logits = torch.nn.functional.linear(
            features, weights.tensors["fc.weight"], weights.tensors["fc.bias"]
        )
        assert relative_error(logits, release(x)) < EXACT


def test_iternorm_release_warm_starts_nd_exactly_and_ndpp(iternorm_release):
    weights = read_state_dict({k: v.float() for k, v in iternorm_release.state_dict().items()})
    reference = pretrained_reference(weights)
    nd = ResNet(depth=18, norm="ND")
    info = load_pretrained_backbone(nd, weights, "ND")
    assert sorted(info["left_out"]) == ["fc.bias", "fc.weight"]
    # ND in eval (identity statistics) computes the folded convolution: the release's function.
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    assert output_agreement(reference, nd.eval(), images)["relative_l2"] < EXACT
    # MODEL.RESNETS.NORM: NDPP in a detector: its backbone holds the same folded convolutions.
    cfg = tiny_cfg("FasterRCNN", "NDPP", width=64)
    model = build_model(cfg)
    info = load_pretrained_backbone(model, weights, cfg.MODEL.RESNETS.NORM)
    _, backbone, _ = find_backbone(model)
    assert info["loaded"] == len(backbone.state_dict())
    for key, value in nd.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key


def test_iternorm_release_bad_files(iternorm_release):
    state = dict(iternorm_release.state_dict())
    state["layer2.1.bn2.running_variance"] = state.pop("layer2.1.bn2.running_var")
    state["projector.weight"] = torch.zeros(2)
    with pytest.raises(
        ValueError,
        match=r"'half.pth': 116 keys read as the IterNorm release .*but 6 keys have no place in "
        r"it; first: layer2\.1\.bn2\.running_variance, projector\.weight, layer2\.1\.bn2\.bias",
    ):
        read_state_dict(state, source="'half.pth'")
    weights = read_state_dict(iternorm_release.state_dict())
    narrow = ResNet(depth=18, norm="ND", stem_channels=32, res2_channels=32)
    with pytest.raises(ValueError, match=r"'stem.conv1.conv.weight' has shape \(64, 3, 7, 7\) in"):
        load_pretrained_backbone(narrow, weights, "ND")
    deeper = ResNet(depth=50, norm="ND")
    with pytest.raises(ValueError, match=r"holds a ResNet-18 but .* is a ResNet-50"):
        load_pretrained_backbone(deeper, weights, "ND")


# ---------------------------------------------------------------------------------------------
# PWS release.


@pytest.fixture(scope="module")
def pws_release():
    return make_pws_release(50).double()


def _pws_reference(weights) -> ResNet:
    """norm_det's network of ``weights`` in float64, in eval (built as it reads them)."""
    reference = pretrained_reference(weights).double()
    load_backbone_tensors(reference, weights.tensors)
    return reference.eval()


def _pws_errors(network: ResNet, release, x: torch.Tensor) -> dict[str, float]:
    """Relative errors of norm_det's whole network against the release's backbone, res2..res5.

    The release's backbone returns each stage's output before any ReLU (its neck applies one,
    after its GroupNorm); norm_det's pre-activation ResNet applies ``final`` after the last
    stage, a ReLU alone with the norm-free PWS scheme: res5 is compared with ``relu(layer4)``.
    """
    with torch.no_grad():
        outputs, expected = network(x), release(x)
    expected[-1] = torch.relu(expected[-1])
    return {
        stage: relative_error(outputs[stage], expected[index])
        for index, stage in enumerate(("res2", "res3", "res4", "res5"))
    }


def _pws_files(release) -> dict[str, dict]:
    optimizer = torch.optim.SGD(release.parameters(), lr=0.025, momentum=0.9)
    saved = {"state_dict": release.state_dict(), "epoch": 100, "optimizer": optimizer.state_dict()}
    backbone = {k: v for k, v in release.state_dict().items() if k.startswith("backbone.")}
    return {
        "epoch_100.pth": saved,  # the release's Saver
        "backbone.pth": {"state_dict": backbone, "author": "myselfsup"},  # process_ckpt.py
    }


def test_pws_release_files_are_detected_and_exact(pws_release, x, tmp_path):
    state = pws_release.state_dict()
    backbone_keys = [k for k in state if k.startswith("backbone.")]
    for name, content in _pws_files(pws_release).items():
        path = save_file(content, tmp_path / name)
        for fmt in (None, "pws-release"):
            weights = read_checkpoint(path, fmt=fmt)
            assert weights.framework == "pws-release"
            assert weights.scheme == PWS_RELEASE_SCHEME
            assert weights.arguments == {"preact": True, "stem_norm": PWS_STEM_NORM}
            # Strict: every backbone tensor placed, the stem GroupNorm too; the classifier
            # (neck.norm, head.fc) dropped.
            assert len(weights.tensors) == len(backbone_keys)
            assert not set(PWS_DROPPED) & set(weights.tensors)
            assert torch.equal(
                weights.tensors["stem.conv1.norm.weight"], state["backbone.norm1.weight"]
            )
            assert weights.tensors["res2.0.conv3.alpha"].shape == (64,)
            errors = _pws_errors(_pws_reference(weights), pws_release.backbone, x)
            assert max(errors.values()) < EXACT, errors


def test_pws_release_stem_and_units_in_norm_det_as_built(pws_release, x):
    """The stem (convolution, one-group GroupNorm, ReLU, pool) and each stage on the release's
    own input to it: every unit ``x + f(relu(x))`` unrectified on the identity path."""
    network = _pws_reference(read_state_dict(pws_release.state_dict()))
    release = pws_release.backbone
    assert network.stem_norm == "GN(groups=1)"
    with torch.no_grad():
        assert relative_error(network.stem(x), release.stem(x)) < EXACT
        h = release.stem(x)
        for index in range(1, 5):
            out = getattr(network, f"res{index + 1}")(h)
            h = getattr(release, f"layer{index}")(h)
            assert relative_error(out, h) < EXACT, index
            # The stage's input has negative values the release's identity paths add as they are.
            assert (h < 0).any()


def test_pws_release_resnet18_with_bare_keys(x):
    # process_ckpt.py's keys without the "backbone." prefix: a BasicBlock ResNet.
    release = make_pws_release(18, seed=1).double()
    state = {
        k[len("backbone.") :]: v
        for k, v in release.state_dict().items()
        if k.startswith("backbone.")
    }
    assert claims_pws_release(state)
    weights = read_state_dict(state)
    assert resnet_arguments(weights.tensors)["depth"] == 18
    assert max(_pws_errors(_pws_reference(weights), release.backbone, x).values()) < EXACT


def test_pws_release_warm_starts_nd_and_ndpp():
    release = make_pws_release(18, seed=2)
    weights = read_state_dict(release.state_dict())
    shape = dict(stem_channels=16, res2_channels=16, preact=True, stem_norm=PWS_STEM_NORM)
    nd = ResNet(depth=18, norm="ND", **shape)
    info = load_pretrained_backbone(nd, weights, "ND")
    assert info["left_out"] == []
    nd.eval()
    # ND in eval (identity statistics) computes the PWS convolutions' kernels exactly: the stem
    # convolution and every stage, fed the release's input to it, are the release's.
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert relative_error(nd.stem.conv1.conv(images), release.backbone.conv1(images)) < 1e-5
        h = release.backbone.stem(images)
        for index in range(1, 5):
            out = getattr(nd, f"res{index + 1}")(h)
            h = getattr(release.backbone, f"layer{index}")(h)
            assert relative_error(out, h) < 1e-5, index
    # MODEL.RESNETS.NORM: NDPP in a detector with the release's stem: the same conversion.
    cfg = tiny_cfg("FasterRCNN", "NDPP", width=16)
    cfg.MODEL.RESNETS.PREACT = True
    cfg.MODEL.RESNETS.STEM_NORM = PWS_STEM_NORM
    model = build_model(cfg)
    load_pretrained_backbone(model, weights, cfg.MODEL.RESNETS.NORM)
    _, backbone, _ = find_backbone(model)
    assert backbone.stem_norm == PWS_STEM_NORM
    expected = ResNet(depth=18, norm="NDPP", **shape)
    load_pretrained_backbone(expected, weights, "NDPP")
    for key, value in expected.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key


def test_pws_release_warm_start_into_nd_is_exact():
    release = make_pws_release(18, seed=2)
    nd = ResNet(
        depth=18,
        norm="ND",
        stem_channels=16,
        res2_channels=16,
        preact=True,
        stem_norm=PWS_STEM_NORM,
    )
    load_pretrained_backbone(nd, read_state_dict(release.state_dict()), "ND")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    assert max(_pws_errors(nd.eval(), release.backbone, images).values()) < 1e-5


def test_pws_release_stem_norm_must_match(pws_release):
    weights = read_state_dict(pws_release.state_dict())
    widths = dict(depth=50, stem_channels=16, res2_channels=64, bottleneck_channels=16)
    # A pre-activation backbone without the release's stem norm (MODEL.RESNETS.STEM_NORM "").
    plain = ResNet(norm="ND", preact=True, **widths)
    with pytest.raises(
        ValueError,
        match=r"pws-release checkpoint's RESNET has stem_norm='GN\(groups=1\)' \(the model's "
        r"backbone has None\)",
    ):
        load_pretrained_backbone(plain, weights, "ND")
    other = ResNet(norm="ND", preact=True, stem_norm="GN(groups=2)", **widths)
    with pytest.raises(ValueError, match=r"the model's backbone has 'GN\(groups=2\)'"):
        load_pretrained_backbone(other, weights, "ND")
    # The tensors alone into a backbone without it: the stem, not the scheme, is named.
    no_stem_norm = ResNet(norm=PWS_RELEASE_SCHEME, preact=True, **widths)
    with pytest.raises(
        ValueError,
        match=r"unexpected \(first: stem\.conv1\.conv\.alpha.*stem has a norm after its "
        r"convolution \(stem\.conv1\.norm\) and the backbone's none: build it with stem_norm "
        r"\(MODEL\.RESNETS\.STEM_NORM",
    ):
        load_backbone_tensors(no_stem_norm, weights.tensors)


def test_pws_release_bad_files(pws_release):
    state = dict(pws_release.state_dict())
    state["backbone.layer2.0.conv2.scale"] = state.pop("backbone.layer2.0.conv2.alpha")
    state["projector.0.weight"] = torch.zeros(2)
    state["backbone.norm1.running_mean"] = torch.zeros(16)
    with pytest.raises(
        ValueError,
        match=r"read as the PWS release \(lyxzzz/PWSConv\), but 3 keys have no place in it; "
        r"first: projector\.0\.weight, backbone\.norm1\.running_mean, "
        r"backbone\.layer2\.0\.conv2\.scale",
    ):
        read_state_dict(state, source="'half.pth'")
    weights = read_state_dict(pws_release.state_dict())
    wide = ResNet(depth=50, norm="ND", preact=True, stem_norm=PWS_STEM_NORM)
    with pytest.raises(
        ValueError,
        match=r"'stem\.conv1\.conv\.alpha' has shape \(16,\) in the checkpoint and \(64,\) in",
    ):
        load_pretrained_backbone(wide, weights, "ND")


# ---------------------------------------------------------------------------------------------
# Specific claims: norm_det's own files with these schemes' tensors read as they always did.


@pytest.mark.parametrize("framework", ["torchvision", "mmdet", "norm_det"])
@pytest.mark.parametrize("scheme", ["IterNorm", "PWS"])
def test_norm_det_files_of_these_schemes_are_not_claimed(framework, scheme, tmp_path):
    torch.manual_seed(0)
    network = ResNet(depth=18, norm=scheme, stem_channels=16, res2_channels=16).eval()
    weights = read_state_dict(network.state_dict(), meta={"scheme": scheme})
    path = write_checkpoint(weights, tmp_path / "r18.pth", framework)
    state = load_file(path)
    state = state.get("model", state.get("state_dict", state))
    assert not claims_pws_release(state) and not claims_iternorm_release(state)
    read = read_checkpoint(path)
    assert read.framework == framework
    x = torch.randn(1, 3, 64, 64)
    assert output_agreement(network, pretrained_reference(read, scheme), x)["relative_l2"] == 0


def test_the_releases_do_not_claim_each_other_or_torchvision(pws_release, iternorm_release):
    pws, iternorm = pws_release.state_dict(), iternorm_release.state_dict()
    assert claims_pws_release(pws) and not claims_iternorm_release(pws)
    assert claims_iternorm_release(iternorm) and not claims_pws_release(iternorm)
    plain = make_resnet18().state_dict()
    assert not claims_pws_release(plain) and not claims_iternorm_release(plain)
