"""Model-zoo source formats: detectron2's Caffe2-named .pkl files, mmdet's GN and GN+WS ResNets.

Each source network is the framework's own (detectron2's ResNet loaded by its
``DetectionCheckpointer``, mmdet's ResNet with mmcv's ``GN`` / ``ConvWS``), narrow (32-channel
stem, 32-wide bottlenecks: every width a multiple of GN's 32 groups), random; its file is written
as the zoo writes it. norm_det reads the file and must compute, on norm_det's input, what the
source computes on its own input of the same image.
"""

from __future__ import annotations

import copy
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from norm_det.config import get_cfg
from norm_det.engine.checkpointer import Checkpointer
from norm_det.modeling import ResNet, build_model
from norm_det.weights import (
    load_pretrained_backbone,
    output_agreement,
    pretrained_reference,
    read_checkpoint,
    read_state_dict,
    to_framework,
    warm_start,
)
from norm_det.weights.sources import claimant
from norm_det.weights.sources.model_zoos import (
    CAFFE_BGR,
    MMDET_RGB,
    InputConvention,
    convert_stem,
    norm_det_input,
)
from tests.modeling.tiny import tiny_cfg
from tests.weights.conftest import make_resnet18

# The narrow ResNet-50 of every test, in norm_det's, detectron2's and mmdet's arguments.
NARROW = dict(depth=50, stem_channels=32, res2_channels=128, bottleneck_channels=32)
FEATURES = ("res2", "res3", "res4", "res5")
NUM_CLASSES = 10  # the narrow networks' ImageNet-like classifier
EXACT = 1e-5


@pytest.fixture(scope="module")
def rgb() -> torch.Tensor:
    """Two 64 x 64 RGB images in [0, 1], float64."""
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def prepared(rgb: torch.Tensor, convention: InputConvention) -> torch.Tensor:
    """``rgb`` (RGB in [0, 1]) as a network of ``convention`` takes it."""
    x = rgb.flip(1) if convention.channels == "BGR" else rgb
    mean = torch.tensor(convention.mean, dtype=rgb.dtype).view(1, 3, 1, 1)
    std = torch.tensor(convention.std, dtype=rgb.dtype).view(1, 3, 1, 1)
    return (x * convention.scale - mean) / std


def max_relative_error(outputs: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    """Worst ``max |out - ref| / max |ref|`` over corresponding maps."""
    assert len(outputs) == len(references) == len(FEATURES)
    return max(
        float((o - r).abs().max() / r.abs().max()) for o, r in zip(outputs, references, strict=True)
    )


@torch.no_grad()
def norm_det_maps(model: nn.Module, rgb: torch.Tensor) -> list[torch.Tensor]:
    """norm_det's res2..res5 maps of ``rgb`` given in norm_det's default input convention."""
    outputs = copy.deepcopy(model).double().eval()(prepared(rgb, norm_det_input()))
    return [outputs[name] for name in FEATURES]


def randomize_affines(model: nn.Module, seed: int) -> None:
    """Random affine parameters for every norm (GN, detectron2's FrozenBN)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(module, nn.Conv2d) or not isinstance(weight, torch.Tensor):
                continue
            weight.copy_(torch.rand(weight.shape, generator=generator) + 0.5)
            bias.copy_(torch.rand(bias.shape, generator=generator) - 0.5)


# ---------------------------------------------------------------------------------------------
# detectron2's Caffe2-named files.


def detectron2_resnet(norm: str) -> nn.Module:
    """detectron2's own narrow ResNet-50 as its configs build it for these files."""
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg as detectron2_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    cfg = detectron2_cfg()
    resnets = cfg.MODEL.RESNETS
    resnets.DEPTH = 50
    resnets.NORM = norm
    resnets.STEM_OUT_CHANNELS = NARROW["stem_channels"]
    resnets.RES2_OUT_CHANNELS = NARROW["res2_channels"]
    resnets.WIDTH_PER_GROUP = NARROW["bottleneck_channels"]
    # MSRA's BN models put the stride in the 1x1 (the default), FAIR's GN models in the 3x3.
    resnets.STRIDE_IN_1X1 = norm == "FrozenBN"
    resnets.OUT_FEATURES = list(FEATURES)
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()


_CAFFE2_BRANCH = {
    "shortcut": "branch1",
    "conv1": "branch2a",
    "conv2": "branch2b",
    "conv3": "branch2c",
}


def caffe2_name(key: str, norm: str) -> str | None:
    """The Caffe2 blob Detectron names detectron2's ``key`` (None: statistics, not saved)."""
    module, _, tensor = key.rpartition(".")
    if tensor in ("running_mean", "running_var"):
        return None
    suffix = {"weight": "s", "bias": "b"}[tensor] if module.endswith(".norm") else "w"
    module = module.removesuffix(".norm")
    if module == "stem.conv1":
        unit = "conv1" if suffix == "w" else ("res_conv1_bn" if norm == "bn" else "conv1_gn")
        return f"{unit}_{suffix}"
    stage, block, layer = module.split(".")
    unit = f"{stage}_{block}_{_CAFFE2_BRANCH[layer]}"
    return f"{unit}_{suffix}" if suffix == "w" else f"{unit}_{norm}_{suffix}"


def caffe2_blobs(model: nn.Module, norm: str, seed: int) -> dict[str, np.ndarray]:
    """The blobs of a Detectron ImageNet file of ``model``: every parameter with its SGD momentum,
    the 1000-way classifier (narrow here) and, for the MSRA BN files, the unused stem bias."""
    generator = torch.Generator().manual_seed(seed)
    blobs: dict[str, np.ndarray] = {}
    for key, value in model.state_dict().items():
        name = caffe2_name(key, norm)
        if name is not None:
            blobs[name] = value.numpy().copy()
    width = model.res5[-1].conv3.out_channels
    blobs["fc1000_w"] = torch.randn(NUM_CLASSES, width, generator=generator).numpy()
    blobs["fc1000_b"] = torch.randn(NUM_CLASSES, generator=generator).numpy()
    if norm == "bn":
        blobs["conv1_b"] = torch.randn(NARROW["stem_channels"], generator=generator).numpy()
    for name in list(blobs):
        blobs[f"{name}_momentum"] = np.zeros_like(blobs[name])
    return blobs


def write_pickle(obj: object, path: Path) -> Path:
    with open(path, "wb") as file:
        pickle.dump(obj, file, protocol=2)  # Detectron's files are Python 2 pickles
    return path


def write_caffe2_file(norm: str, folder: Path) -> dict:
    """A Detectron ImageNet file (MSRA's BN model as ``{"blobs": ...}``, FAIR's GN model as the
    bare dict) of a random detectron2 ResNet, and that ResNet loaded back by detectron2."""
    d2_norm = "FrozenBN" if norm == "bn" else "GN"
    source = detectron2_resnet(d2_norm)
    randomize_affines(source, seed=1)
    blobs = caffe2_blobs(source, norm, seed=2)
    path = folder / f"R-50{'-GN' if norm == 'gn' else ''}.pkl"
    write_pickle({"blobs": blobs} if norm == "bn" else blobs, path)

    from detectron2.checkpoint import DetectionCheckpointer

    reference = detectron2_resnet(d2_norm)
    DetectionCheckpointer(reference).load(str(path))
    return {"norm": norm, "path": path, "blobs": blobs, "source": source, "reference": reference}


@pytest.fixture(scope="module")
def caffe2_files(tmp_path_factory) -> Callable[[str], dict]:
    """``norm ("bn" | "gn") -> write_caffe2_file(norm)``, each written once."""
    written: dict[str, dict] = {}

    def get(norm: str) -> dict:
        if norm not in written:
            written[norm] = write_caffe2_file(norm, tmp_path_factory.mktemp("caffe2"))
        return written[norm]

    return get


@torch.no_grad()
def detectron2_maps(model: nn.Module, rgb: torch.Tensor) -> list[torch.Tensor]:
    """detectron2's maps of ``rgb``, normalized as its configs do for these files (BGR, 0-255,
    minus MODEL.PIXEL_MEAN, divided by MODEL.PIXEL_STD: detectron2's defaults)."""
    from detectron2.config import get_cfg as detectron2_cfg

    cfg = detectron2_cfg()
    assert cfg.INPUT.FORMAT == "BGR"
    convention = InputConvention(
        "BGR", 255.0, tuple(cfg.MODEL.PIXEL_MEAN), tuple(cfg.MODEL.PIXEL_STD)
    )
    outputs = copy.deepcopy(model).double().eval()(prepared(rgb, convention))
    return [outputs[name] for name in FEATURES]


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_detectron2_reads_the_written_file_as_the_source(caffe2_files, norm):
    """The file is what detectron2 reads: its checkpointer gives back every saved tensor."""
    caffe2_file = caffe2_files(norm)
    source, loaded = caffe2_file["source"].state_dict(), caffe2_file["reference"].state_dict()
    saved = [k for k in source if caffe2_name(k, norm) is not None]
    assert len(saved) > 100
    for key in saved:
        torch.testing.assert_close(loaded[key], source[key], rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_caffe2_files_equal_detectron2s_network(caffe2_files, norm, rgb):
    caffe2_file = caffe2_files(norm)
    weights = read_checkpoint(caffe2_file["path"], allow_pickle=True)
    assert weights.framework == weights.naming == "detectron2-caffe2"
    bn = norm == "bn"
    assert weights.scheme == ("FrozenBN" if bn else "GN(groups=32)")
    assert weights.arguments == {"stride_in_1x1": bn}
    assert weights.meta["source_input"] == str(CAFFE_BGR)
    model = pretrained_reference(weights)
    # Strict: every backbone tensor comes from the file (BN statistics: detectron2's 0 and 1).
    assert set(weights.tensors) == set(model.state_dict()) | {"fc.weight", "fc.bias"}
    blobs = caffe2_file["blobs"]
    dropped = [k for k in blobs if k.endswith("_momentum") or k == "conv1_b"]
    placed = len(blobs) - len(dropped)
    statistics = 2 * sum(k.endswith("_bn_s") for k in blobs) if bn else 0
    assert len(weights.tensors) == placed + statistics
    error = max_relative_error(
        norm_det_maps(model, rgb), detectron2_maps(caffe2_file["reference"], rgb)
    )
    assert error < EXACT, error


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_caffe2_format_by_name_and_its_pickle_opt_in(caffe2_files, norm):
    caffe2_file = caffe2_files(norm)
    by_name = read_checkpoint(caffe2_file["path"], allow_pickle=True, fmt="detectron2-caffe2")
    detected = read_checkpoint(caffe2_file["path"], allow_pickle=True)
    assert by_name.tensors.keys() == detected.tensors.keys()
    with pytest.raises(ValueError, match=r"pickle"):
        read_checkpoint(caffe2_file["path"])


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_a_half_recognised_caffe2_file_names_its_first_unplaced_keys(caffe2_files, norm, tmp_path):
    caffe2_file = caffe2_files(norm)
    blobs = dict(caffe2_file["blobs"])
    blobs["res3_0_branch2x_w"] = blobs.pop("res3_0_branch2a_w")
    blobs["res4_0_branch2a_xn_s"] = blobs["res3_0_branch2b_w"]
    path = write_pickle(blobs, tmp_path / "renamed.pkl")
    with pytest.raises(
        ValueError,
        match=r"keys read as detectron2's Caffe2-named .*, but 2 keys have no place in it; "
        r"first: res3_0_branch2x_w, res4_0_branch2a_xn_s",
    ):
        read_checkpoint(path, allow_pickle=True)


def test_a_caffe2_file_mixing_bn_and_gn_is_refused():
    state = {
        "conv1_w": torch.ones(4, 3, 7, 7),
        "res_conv1_bn_s": torch.ones(4),
        "res2_0_branch2a_w": torch.ones(4, 4, 1, 1),
        "res2_0_branch2a_gn_s": torch.ones(4),
    }
    with pytest.raises(ValueError, match=r"has _bn_ and _gn_ norm blobs"):
        read_state_dict(state, source="'mixed.pkl'")


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_a_caffe2_file_into_a_backbone_of_another_width_names_the_shapes(caffe2_files, norm):
    caffe2_file = caffe2_files(norm)
    bn = norm == "bn"
    scheme = "FrozenBN" if bn else "GN(groups=32)"
    wide = ResNet(**{**NARROW, "stem_channels": 64}, norm=scheme, stride_in_1x1=bn)
    with pytest.raises(
        ValueError,
        match=r"'stem\.conv1\.conv\.weight' has shape \(32, 3, 7, 7\) in the checkpoint and "
        r"\(64, 3, 7, 7\)",
    ):
        load_pretrained_backbone(wide, caffe2_file["path"], scheme, allow_pickle=True)
    # The stride's place leaves no trace in the tensors: the format records it.
    other_stride = ResNet(**NARROW, norm=scheme, stride_in_1x1=not bn)
    with pytest.raises(ValueError, match=rf"stride_in_1x1={bn} \(the model's backbone has"):
        load_pretrained_backbone(other_stride, caffe2_file["path"], scheme, allow_pickle=True)


# Relative L2 difference bound from the network the file holds, in eval: ND folds the affines
# exactly; NDPP, calibrated on 8 other images, cannot (it standardizes each sample's input), and
# keeps the bound test_warm_start measures for it.
MSRA_WARM_STARTS = {"ND": EXACT, "NDPP": 0.6}


@pytest.mark.parametrize("scheme", list(MSRA_WARM_STARTS))
def test_msra_file_warm_starts_another_scheme(caffe2_files, rgb, scheme):
    caffe2_file = caffe2_files("bn")
    generator = torch.Generator().manual_seed(4)
    images = prepared(
        torch.rand(8, 3, 64, 64, generator=generator, dtype=torch.float64), norm_det_input()
    )
    calibration = images.float() if scheme == "NDPP" else None
    model = ResNet(**NARROW, norm=scheme, stride_in_1x1=True)
    report = load_pretrained_backbone(
        model, caffe2_file["path"], scheme, allow_pickle=True, calibration_images=calibration
    )
    assert report["left_out"] == ["fc.weight", "fc.bias"]
    reference = pretrained_reference(read_checkpoint(caffe2_file["path"], allow_pickle=True))
    x = prepared(rgb, norm_det_input()).float()
    agreement = output_agreement(reference, model, x)
    assert agreement["relative_l2"] < MSRA_WARM_STARTS[scheme], agreement


def test_model_weights_of_a_caffe2_pkl_start_a_detectors_backbone(caffe2_files, rgb, tmp_path):
    """MODEL.WEIGHTS of a .pkl needs MODEL.WEIGHTS_ALLOW_PICKLE; then it starts the backbone."""
    caffe2_file = caffe2_files("bn")
    cfg = tiny_cfg("FasterRCNN", "FrozenBN", width=32)
    resnets = cfg.MODEL.RESNETS
    resnets.DEPTH = NARROW["depth"]
    resnets.RES2_OUT_CHANNELS = NARROW["res2_channels"]
    resnets.WIDTH_PER_GROUP = NARROW["bottleneck_channels"]
    resnets.STRIDE_IN_1X1 = True
    cfg.MODEL.WEIGHTS = str(caffe2_file["path"])
    model = build_model(cfg).eval()

    def load(allow_pickle: bool) -> None:
        Checkpointer(model, tmp_path).resume_or_load(
            cfg.MODEL.WEIGHTS,
            resume=False,
            backbone_scheme=cfg.MODEL.RESNETS.NORM,
            weights_format=cfg.MODEL.WEIGHTS_FORMAT or None,
            allow_pickle=allow_pickle,
        )

    with pytest.raises(ValueError, match=r"MODEL\.WEIGHTS.*pickle"):
        load(cfg.MODEL.WEIGHTS_ALLOW_PICKLE)
    load(True)
    error = max_relative_error(
        norm_det_maps(model.backbone.body, rgb), detectron2_maps(caffe2_file["reference"], rgb)
    )
    assert error < EXACT, error


# ---------------------------------------------------------------------------------------------
# mmdet's GN and GN+WS ResNets.


@pytest.fixture(scope="module")
def mmdet_resnet() -> Callable[[bool], nn.Module]:
    """mmdet's ResNet class (its models import mmcv.ops: the bridge stands in for mmcv-lite)."""
    pytest.importorskip("mmcv")
    pytest.importorskip("norm_det.integrations.mmcv_ops_bridge")
    pytest.importorskip("mmdet")
    from mmdet.models.backbones import ResNet as MMDetResNet

    def build(weight_standardized: bool) -> nn.Module:
        # As configs/gn/*.py and configs/gn+ws/*.py build it (style 'pytorch', 32 groups).
        model = MMDetResNet(
            depth=50,
            stem_channels=NARROW["stem_channels"],
            base_channels=NARROW["bottleneck_channels"],
            out_indices=(0, 1, 2, 3),
            style="pytorch",
            norm_cfg=dict(type="GN", num_groups=32, requires_grad=True),
            conv_cfg=dict(type="ConvWS") if weight_standardized else None,
        )
        model.eval()
        return model

    return build


@pytest.fixture(scope="module", params=["mmdet-gn", "mmdet-gn-ws", "mmdet-gn-contrib"])
def mmdet_file(request, mmdet_resnet, tmp_path_factory) -> dict:
    """A zoo file (``{"state_dict": ...}`` as mmdet's converters save) of a random mmdet ResNet."""
    name = request.param
    source = mmdet_resnet(name == "mmdet-gn-ws")
    randomize_affines(source, seed=3)
    path = tmp_path_factory.mktemp("mmdet") / f"{name}.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    return {"name": name, "path": path, "source": source}


def test_mmdet_gn_files_equal_mmdets_network(mmdet_file, rgb):
    name = mmdet_file["name"]
    # GN and GN+WS files have the same keys: GN is recognised, GN+WS is named.
    assert read_checkpoint(mmdet_file["path"]).framework == "mmdet-gn"
    weights = read_checkpoint(mmdet_file["path"], fmt=name)
    assert weights.framework == name
    assert weights.scheme == ("GN+WS(groups=32)" if name == "mmdet-gn-ws" else "GN(groups=32)")
    assert weights.arguments == {"stride_in_1x1": False}
    model = pretrained_reference(weights)
    # Strict: every key of the file is placed, and fills every tensor of the backbone.
    assert len(weights.tensors) == len(mmdet_file["source"].state_dict())
    assert set(weights.tensors) == set(model.state_dict())
    # detectron/resnet50_gn takes Caffe's BGR input (configs/gn); jhu's GN+WS and contrib's GN
    # mmdet's default, norm_det's own input in other units (their stem stays as it is).
    convention = CAFFE_BGR if name == "mmdet-gn" else MMDET_RGB
    assert weights.meta["source_input"] == str(convention)
    stem = weights.tensors["stem.conv1.conv.weight"]
    assert torch.equal(stem, mmdet_file["source"].conv1.weight) == (convention is MMDET_RGB)
    with torch.no_grad():
        source = copy.deepcopy(mmdet_file["source"]).double()
        references = list(source(prepared(rgb, convention)))
    error = max_relative_error(norm_det_maps(model, rgb), references)
    assert error < EXACT, error


def test_a_half_recognised_mmdet_file_names_its_first_unplaced_keys(mmdet_file):
    state = dict(mmdet_file["source"].state_dict())
    state["layer2.0.gnx.weight"] = state.pop("layer2.0.gn1.weight")
    state["layer3.0.gn1.running_mean"] = state["layer3.0.gn1.bias"]
    with pytest.raises(
        ValueError,
        match=r"158 keys read as mmdet's .*GN.*, but 2 keys have no place in it; "
        r"first: layer2\.0\.gnx\.weight, layer3\.0\.gn1\.running_mean",
    ):
        read_state_dict(state, fmt=mmdet_file["name"], source="'renamed.pth'")


def test_an_mmdet_file_into_a_backbone_of_another_width_names_the_shapes(mmdet_file):
    scheme = read_checkpoint(mmdet_file["path"], fmt=mmdet_file["name"]).scheme
    wide = ResNet(**{**NARROW, "stem_channels": 64}, norm=scheme)
    with pytest.raises(ValueError, match=r"'stem\.conv1\.conv\.weight' has shape \(32, 3, 7, 7\)"):
        load_pretrained_backbone(wide, mmdet_file["path"], scheme, fmt=mmdet_file["name"])


# ---------------------------------------------------------------------------------------------
# Detection and input conventions.


def _framework_files() -> dict[str, Mapping[str, torch.Tensor]]:
    """State dicts the framework namings read, none of which a zoo format may claim."""
    torchvision = make_resnet18().state_dict()
    bn = read_state_dict(torchvision)
    gn = warm_start(pretrained_reference(bn), "GN").state_dict()
    gn_weights = read_state_dict(gn, meta={"scheme": "GN"})
    return {
        "torchvision": torchvision,
        "norm_det GN": gn,
        "detectron2": to_framework(bn, "detectron2"),
        "mmdet BN": {k.removeprefix("backbone."): v for k, v in to_framework(bn, "mmdet").items()},
        "mmdet GN written by norm_det": to_framework(gn_weights, "mmdet"),
    }


def test_zoo_formats_claim_no_framework_file():
    for kind, state in _framework_files().items():
        found = claimant(state)
        assert found is None or found.name not in {"detectron2-caffe2", "mmdet-gn"}, kind


def test_norm_det_input_is_caffes_and_mmdets_up_to_order_and_units():
    ours = norm_det_input()
    cfg = get_cfg()
    assert ours.mean == tuple(cfg.MODEL.PIXEL_MEAN) and ours.std == tuple(cfg.MODEL.PIXEL_STD)
    # 255 x ImageNet's mean is Caffe's, channel for channel (reversed: BGR), so the stem needs
    # no bias; mmdet's default input is 255 x norm_det's altogether.
    assert np.allclose([255 * m for m in reversed(ours.mean)], CAFFE_BGR.mean, rtol=0, atol=1e-9)
    assert np.allclose([255 * m for m in ours.mean], MMDET_RGB.mean, rtol=0, atol=1e-9)
    assert np.allclose([255 * s for s in ours.std], MMDET_RGB.std, rtol=0, atol=1e-9)
    weight = torch.randn(4, 3, 7, 7, dtype=torch.float64)
    assert convert_stem(weight, MMDET_RGB, ours, "'x'") is weight
    converted = convert_stem(weight, CAFFE_BGR, ours, "'x'")
    torch.testing.assert_close(converted[:, 0], weight[:, 2] * 255 * ours.std[0])
    shifted = InputConvention("BGR", 255.0, (100.0, 116.28, 123.675), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"'x': its input mean .* cannot be converted exactly"):
        convert_stem(weight, shifted, ours, "'x'")


def test_unknown_layouts_still_list_the_zoo_formats():
    with pytest.raises(ValueError, match=r"known: .*detectron2-caffe2, mmdet-gn, mmdet-gn-ws"):
        read_state_dict({"blob_w": torch.ones(1)}, source="'x.pkl'")
    with pytest.raises(ValueError, match=re.escape("0 keys read as detectron2's Caffe2-named")):
        read_state_dict(make_resnet18().state_dict(), fmt="detectron2-caffe2")
