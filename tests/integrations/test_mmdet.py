"""norm_det schemes inside mmdet / mmseg: registry types, configs, train steps, convert."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("mmengine")
pytest.importorskip("mmcv")
# With mmcv-lite only, mmdet cannot even import its models without the bridge (a no-op where
# mmcv's compiled ops exist).
bridge = pytest.importorskip("norm_det.integrations.mmcv_ops_bridge")
pytest.importorskip("mmdet")
pytest.importorskip("mmseg")

from mmcv.cnn import build_conv_layer, build_norm_layer  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import MODELS as ROOT_MODELS  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

from norm_det import surgery  # noqa: E402
from norm_det.integrations import mmdet as nd_mmdet  # noqa: E402
from norm_det.layers import FrozenBatchNorm2d  # noqa: E402
from norm_det.schemes import (  # noqa: E402
    available_schemes,
    build_conv_norm,
    build_norm,
    get_scheme,
    predictor_scheme,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CONFIG_FILES = sorted(
    str(p.relative_to(CONFIGS))
    for folder in ("mmdet", "mmseg")
    for p in (CONFIGS / folder).glob("*.py")
)


@pytest.fixture(scope="module", autouse=True)
def read_model_index_once():
    """mmengine re-reads every metafile of mmdet's model index for each ``mmdet::`` base."""
    import mmengine.config.utils as config_utils

    original = getattr(config_utils, "_get_cfg_metainfo", None)
    if original is None:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            config_utils, "_get_cfg_metainfo", functools.lru_cache(maxsize=None)(original)
        )
        yield


@pytest.fixture(scope="module", autouse=True)
def openmmlab_registries():
    """Import mmdet's and mmseg's models (their registries), as their runners do."""
    from mmdet.utils import register_all_modules as register_mmdet
    from mmseg.utils import register_all_modules as register_mmseg

    register_mmdet(init_default_scope=False)
    register_mmseg(init_default_scope=False)
    nd_mmdet.register_schemes()  # picks up schemes registered after the first import


def _conv_class(scheme: str) -> type[nn.Module]:
    return type(get_scheme(scheme).conv(8, 8, 3, padding=1, bias=True))


def _norm_class(scheme: str) -> type[nn.Module]:
    return type(build_norm(scheme, 64))


def _scopes():
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS

    return {"mmdet": MMDET_MODELS, "mmseg": MMSEG_MODELS}


# ---------------------------------------------------------------------------------------------
# Registry types


def test_every_scheme_has_types_that_collide_with_nothing() -> None:
    names = nd_mmdet.register_schemes()
    assert "NormDetConvert" in names
    for scheme in available_schemes():
        conv_name, norm_name = nd_mmdet.type_names(scheme)
        assert norm_name in names
        assert (conv_name is None) == (get_scheme(scheme).conv is nn.Conv2d)
        for name in filter(None, (conv_name, norm_name)):
            assert names[name].__module__ == nd_mmdet.__name__
            for scope, registry in _scopes().items():
                assert name not in registry.module_dict, f"{scope} registers {name} itself"
                assert registry.get(name) is names[name]
    # mmdet's and mmcv's own names keep their meaning.
    assert _scopes()["mmdet"].get("FrozenBN").__module__ == "mmdet.models.layers.brick_wrappers"
    assert ROOT_MODELS.get("ConvWS").__module__ == "mmcv.cnn.bricks.conv_ws"
    for name in ("GN", "BN", "SyncBN", "Conv"):
        assert ROOT_MODELS.get(name).__module__ != nd_mmdet.__name__


@pytest.mark.parametrize("scheme", available_schemes())
def test_norm_type_marks_a_slot_that_becomes_the_scheme_norm(scheme: str) -> None:
    _, norm_name = nd_mmdet.type_names(scheme)
    # Outside a model build (mmcv's build_norm_layer called directly), the slot stays a slot.
    name, slot = build_norm_layer(dict(type=norm_name, requires_grad=False), 64, postfix=1)
    expected = _norm_class(scheme)
    assert isinstance(slot, nd_mmdet.PendingSchemeNorm) and slot.normdet_scheme.name == scheme
    abbr = "gn" if issubclass(expected, nn.GroupNorm) else "bn"
    assert name == f"{getattr(expected, '_abbr_', abbr)}1"
    x = torch.randn(2, 64, 5, 5)
    with pytest.raises(ValueError, match=rf"{norm_name} .*never converted.*apply_norm_types"):
        slot(x)
    layer = nd_mmdet.apply_norm_types(slot)
    assert type(layer) is expected
    assert all(not p.requires_grad for p in layer.parameters())
    reference = build_norm(scheme, 64)
    reference.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer.eval()(x), reference.eval()(x))


def _built_norm(cfg: dict, channels: int) -> nn.Module:
    """The norm a ConvModule built through the registry (hence the build hook) holds."""
    init_default_scope("mmdet")
    module = ROOT_MODELS.build(
        dict(type="ConvModule", in_channels=4, out_channels=channels, kernel_size=3, norm_cfg=cfg)
    )
    return getattr(module, module.norm_name)


def test_norm_type_options() -> None:
    gn = _built_norm(dict(type="NormDetGN", num_groups=16, eps=1e-3), 64)
    assert (type(gn), gn.num_groups, gn.eps) == (type(build_norm("GN", 64)), 16, 1e-3)
    frozen = _built_norm(dict(type="NormDetFrozenBN", eps=1e-4), 8)
    assert isinstance(frozen, FrozenBatchNorm2d) and frozen.eps == 1e-4
    # mmcv fills in eps=1e-5; a norm-free scheme ignores that default but no other value.
    assert isinstance(_built_norm(dict(type="NormDetPWS"), 8), nn.Identity)
    with pytest.raises(ValueError, match=r"NormDetPWS .*eps=0.1"):
        build_norm_layer(dict(type="NormDetPWS", eps=0.1), 8)
    with pytest.raises(ValueError, match=r"NormDetGN .*momentum.*groups=32"):
        build_norm_layer(dict(type="NormDetGN", momentum=0.2), 64)


@pytest.mark.parametrize(
    "scheme", [s for s in available_schemes() if get_scheme(s).conv is not nn.Conv2d]
)
def test_conv_type_builds_the_scheme_conv(scheme: str) -> None:
    conv_name, _ = nd_mmdet.type_names(scheme)
    resolved = get_scheme(scheme)
    conv = build_conv_layer(dict(type=conv_name), 8, 16, 3, stride=2, padding=1, bias=False)
    assert type(conv) is _conv_class(scheme)
    # A norm-free scheme's conv keeps its bias: it replaces the shift of the norm.
    assert (conv.bias is not None) == bool(resolved.conv_bias)
    x = torch.randn(2, 8, 9, 9)
    plain = conv.fuse() if hasattr(conv, "fuse") else conv
    conv.eval()
    torch.testing.assert_close(conv(x), plain(x), rtol=1e-4, atol=1e-5)
    assert conv(x).shape == (2, 16, 5, 5)


def test_conv_type_passes_a_padding_mode_on_by_keyword_or_position() -> None:
    by_keyword = build_conv_layer(dict(type="GNWSConv"), 4, 4, 3, padding=1, padding_mode="reflect")
    by_position = build_conv_layer(dict(type="GNWSConv"), 4, 4, 3, 1, 1, 1, 1, True, "reflect")
    for conv in (by_keyword, by_position):
        assert conv.padding_mode == "reflect" and conv.padding == (1, 1)
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(by_keyword.fuse()(x), by_keyword(x), rtol=1e-4, atol=1e-5)


def test_conv_type_options() -> None:
    conv = build_conv_layer(dict(type="PWSConv", gamma=1e-3), 4, 4, 3)
    assert conv.gamma == 1e-3 and conv.bias is not None
    with pytest.raises(ValueError, match=r"PWSConv .*unknown option alpha"):
        build_conv_layer(dict(type="PWSConv", alpha=2.0), 4, 4, 3)


# ---------------------------------------------------------------------------------------------
# Configs


def _load(relative: str) -> Config:
    cfg = Config.fromfile(str(CONFIGS / relative))
    scheme = cfg.get("normdet_scheme")
    if scheme is None:
        raise AssertionError(f"{relative}: no normdet_scheme")
    if nd_mmdet.type_names(scheme)[1] not in nd_mmdet.register_schemes():
        pytest.skip(f"scheme {scheme} is not registered in this checkout")
    return cfg


def _shrink_rcnn(model: Config) -> None:
    """R18 at half width with 32-channel FPN and heads: the same layer kinds, fast to build."""
    model.backbone.update(depth=18, base_channels=32)
    model.neck.update(in_channels=[32, 64, 128, 256], out_channels=32)
    model.rpn_head.update(in_channels=32, feat_channels=32)
    roi = model.roi_head
    roi.bbox_roi_extractor.out_channels = 32
    roi.bbox_head.update(in_channels=32, fc_out_channels=64, num_classes=2)
    if "conv_out_channels" in roi.bbox_head:
        roi.bbox_head.conv_out_channels = 32
    if "mask_head" in roi:
        roi.mask_roi_extractor.out_channels = 32
        roi.mask_head.update(in_channels=32, conv_out_channels=32, num_classes=2)


def _shrink_deeplab(model: Config) -> None:
    model.backbone.update(depth=18, stem_channels=32, base_channels=32)
    model.decode_head.update(in_channels=256, channels=32)
    model.auxiliary_head.update(in_channels=128, channels=32)
    model.data_preprocessor.size = (64, 64)


def _shrink_ssd(model: Config) -> None:
    # VGG16's widths are fixed; a 96 px input needs padded 3x3 convs in the last neck levels.
    model.neck.level_paddings = (1, 1, 1, 1)
    model.bbox_head.model.update(num_classes=2)


def _build(relative: str) -> tuple[nn.Module, str]:
    cfg = _load(relative)
    if relative.startswith("mmseg"):
        _shrink_deeplab(cfg.model)
    elif "ssd" in relative:
        _shrink_ssd(cfg.model)
    else:
        _shrink_rcnn(cfg.model)
    init_default_scope(cfg.default_scope)
    return ROOT_MODELS.build(cfg.model), cfg.normdet_scheme


def _build_initialised(relative: str) -> tuple[nn.Module, str]:
    """Build and initialise as mmengine's runner does (SSD's L2Norm scale is set there)."""
    model, scheme = _build(relative)
    model.init_weights()
    return model, scheme


def _types(module: nn.Module) -> set[type]:
    return {type(m) for m in module.modules()}


@pytest.mark.parametrize("relative", CONFIG_FILES)
def test_config_builds_with_the_scheme_layers(relative: str) -> None:
    model, scheme = _build(relative)
    resolved = get_scheme(scheme)
    _, norm_name = nd_mmdet.type_names(scheme)
    cfg_text = (CONFIGS / relative).read_text()
    # One word: the norm type; the scheme's convolution follows it without a conv_cfg.
    assert f'"{norm_name}"' in cfg_text and not re.search(r"conv_cfg\s*=", cfg_text)
    assert not any(isinstance(m, nd_mmdet.PendingSchemeNorm) for m in model.modules())

    if relative.startswith("mmseg"):
        parts = [model.backbone, model.decode_head, model.auxiliary_head]
    elif "ssd" in relative:
        parts = [model.backbone, model.neck]
    elif "frozenbn" in relative:
        parts = [model.backbone]
    else:
        parts = [model.backbone, model.neck, model.roi_head]
    for part in parts:
        if resolved.norm is not None:
            if "frozenbn" in relative and part is not model.backbone:
                continue
            assert _norm_class(scheme) in _types(part), type(part).__name__
        if resolved.conv is not nn.Conv2d:
            assert _conv_class(scheme) in _types(part), type(part).__name__
    if "ssd" in relative:
        # SSD's head is its predictors: the scheme's layers where the scheme's rule puts them.
        predictor = predictor_scheme(scheme)
        if predictor.conv is not nn.Conv2d:
            assert _conv_class(predictor) in _types(model.bbox_head)
        else:
            convs = [m for m in model.bbox_head.modules() if isinstance(m, nn.Conv2d)]
            assert convs and all(type(m) is nn.Conv2d for m in convs)
    if scheme not in ("BN", "SyncBN") and "frozenbn" not in relative:
        assert nn.BatchNorm2d not in _types(model)
    if "frozenbn" in relative:
        assert nn.BatchNorm2d not in _types(model.backbone)
    # mmdet's checkpoint layout: the stem norm is named by the layer's _abbr_ (bn1, gn1).
    if not relative.startswith("mmseg") and "ssd" not in relative:
        abbr = getattr(_norm_class(scheme), "_abbr_", "bn")
        assert model.backbone.norm1_name == f"{abbr}1"


def test_czm_config_keeps_the_czm_initialisation() -> None:
    if "NormDetCZM" not in nd_mmdet.register_schemes():
        pytest.skip("scheme CZM is not registered")
    model, _ = _build("mmdet/faster-rcnn_r50_fpn_czm-all_1x_coco.py")
    model.init_weights()  # mmdet's Kaiming init must not break V's zero spatial mean
    convs = [m for m in model.modules() if hasattr(m, "v")]
    assert convs
    for conv in convs:
        torch.testing.assert_close(
            conv.v.mean(dim=(-2, -1)), torch.zeros(conv.v.shape[:2]), atol=1e-6, rtol=0
        )


# ---------------------------------------------------------------------------------------------
# Train steps on CPU


def _det_batch(model: nn.Module, size: int, with_mask: bool) -> dict:
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    generator = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[8.0, 10.0, 40.0, 44.0], [30.0, 20.0, 62.0, 60.0]]) * size / 64
    image = torch.randint(0, 255, (3, size, size), generator=generator, dtype=torch.uint8)
    instances = InstanceData(bboxes=boxes, labels=torch.tensor([0, 1]))
    if with_mask:
        masks = np.zeros((2, size, size), dtype=np.uint8)
        for index, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[index, y1:y2, x1:x2] = 1
        instances.masks = BitmapMasks(masks, size, size)
    sample = DetDataSample(
        metainfo=dict(img_shape=(size, size), ori_shape=(size, size), scale_factor=(1.0, 1.0))
    )
    sample.gt_instances = instances
    return model.data_preprocessor(dict(inputs=[image], data_samples=[sample]), True)


def _seg_batch(model: nn.Module, size: int) -> dict:
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    generator = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(2):  # ASPP's image pooling branch needs more than one value per channel
        inputs.append(torch.randint(0, 255, (3, size, size), generator=generator).to(torch.uint8))
        label = torch.zeros(1, size, size, dtype=torch.long)
        label[:, size // 4 :, size // 3 :] = 1
        label[:, :4] = 255
        sample = SegDataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size)))
        sample.gt_sem_seg = PixelData(data=label)
        samples.append(sample)
    return model.data_preprocessor(dict(inputs=inputs, data_samples=samples), True)


def _total_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    torch.manual_seed(0)  # the same proposal / pixel sampling at every step
    losses = model(**batch, mode="loss")
    total, _ = model.parse_losses(losses)
    return total


def _train_steps(model: nn.Module, batch: dict, steps: int = 2, lr: float = 1e-3) -> list[float]:
    """Losses before each of ``steps`` SGD steps on ``batch`` and after the last."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    values = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = _total_loss(model, batch)
        loss.backward()
        optimizer.step()
        values.append(loss.item())
    values.append(_total_loss(model, batch).item())
    return values


def _scheme_convs_with_gradient(model: nn.Module, scheme: str) -> int:
    """How many of the backbone's convolutions of the scheme received a nonzero gradient.

    (mmdet freezes the first stage and zero-initialises the last norm of each residual branch,
    so not all of them do.)
    """
    wanted = _conv_class(scheme)
    convs = [m for m in model.backbone.modules() if type(m) is wanted]
    return sum(
        any(p.grad is not None and p.grad.abs().sum() > 0 for p in conv.parameters())
        for conv in convs
    )


@pytest.mark.parametrize(
    "relative",
    [
        "mmseg/deeplabv3_r50-d8_gn-ws-all_4xb2-40k_cityscapes-512x1024.py",
        "mmseg/deeplabv3_r50-d8_pws-all_4xb2-40k_cityscapes-512x1024.py",
    ],
)
def test_deeplabv3_train_step_lowers_the_loss(relative: str) -> None:
    torch.manual_seed(0)
    model, scheme = _build_initialised(relative)
    batch = _seg_batch(model, 64)
    losses = _train_steps(model, batch, lr=1e-2)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert _scheme_convs_with_gradient(model, scheme) > 0


def test_ssd_train_step_lowers_the_loss() -> None:
    torch.manual_seed(0)
    model, scheme = _build_initialised("mmdet/ssd300_gn-ws-all_coco.py")
    batch = _det_batch(model, 96, with_mask=False)
    losses = _train_steps(model, batch)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert _scheme_convs_with_gradient(model, scheme) > 0


@pytest.mark.parametrize(
    "relative",
    ["mmdet/mask-rcnn_r50_fpn_pws-all_1x_coco.py", "mmdet/mask-rcnn_r50_fpn_gn-ws-all_1x_coco.py"],
)
def test_mask_rcnn_train_step_lowers_the_loss(relative: str) -> None:
    import mmcv.ops

    if not bridge.compiled_ops_available():
        # mmcv-lite: RPN's NMS, the RoI extractors and the mask targets run on the bridge.
        assert mmcv.ops.RoIAlign is bridge.RoIAlign and mmcv.ops.batched_nms is bridge.batched_nms
    torch.manual_seed(0)
    model, scheme = _build_initialised(relative)
    assert isinstance(model.roi_head.mask_roi_extractor.roi_layers[0], mmcv.ops.RoIAlign)
    batch = _det_batch(model, 64, with_mask=True)
    torch.manual_seed(0)
    losses = model(**batch, mode="loss")
    assert {"loss_rpn_cls", "loss_cls", "loss_bbox", "loss_mask"} <= set(losses)
    # One step: later steps change the proposals, hence which RoIs are sampled.
    values = _train_steps(model, batch, steps=1)
    assert all(np.isfinite(values)) and values[-1] < values[0]
    assert _scheme_convs_with_gradient(model, scheme) > 0


# ---------------------------------------------------------------------------------------------
# The zero-config route: norm_det.surgery.convert on an mmdet model object


def _plain_faster_rcnn() -> nn.Module:
    import mmdet

    mim_configs = Path(mmdet.__file__).parent / ".mim" / "configs"
    cfg = Config.fromfile(str(mim_configs / "faster_rcnn" / "faster-rcnn_r50_fpn_1x_coco.py"))
    cfg.model.backbone.init_cfg = None
    _shrink_rcnn(cfg.model)
    init_default_scope("mmdet")
    model = ROOT_MODELS.build(cfg.model)
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # statistics of a "trained" model
            module.running_mean.uniform_(-0.5, 0.5, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.uniform_(-0.5, 0.5, generator=generator)
    return model.eval()


@pytest.mark.parametrize("scheme", ["FrozenBN", "none"])
def test_convert_an_mmdet_model_keeps_its_function(scheme: str) -> None:
    model = _plain_faster_rcnn()
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model.extract_feat(images)
    converted = surgery.convert(copy.deepcopy(model), scheme).eval()
    kinds = _types(converted.backbone)
    assert nn.BatchNorm2d not in kinds
    if scheme == "FrozenBN":
        assert FrozenBatchNorm2d in kinds and converted.backbone.norm1_name == "bn1"
    with torch.no_grad():
        after = converted.extract_feat(images)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_convert_an_mmdet_model_to_a_conv_scheme() -> None:
    model = surgery.convert(_plain_faster_rcnn(), "GN+WS")
    kinds = _types(model.backbone)
    assert _conv_class("GN+WS") in kinds and _norm_class("GN+WS") in kinds
    assert nn.BatchNorm2d not in kinds
    losses = _train_steps(model, _det_batch(model, 64, with_mask=False), steps=1)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------
# mmengine checkpoints on torch >= 2.6: weights_only loading with norm_det's allow-list


class _AsksForAttribute:
    """Pickles as ``getattr(owner, name)``, as HistoryBuffer pickles its statistics methods."""

    def __init__(self, owner: object, name: str) -> None:
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_mmengine_checkpoint_loads_with_the_allow_list_only(tmp_path, monkeypatch) -> None:
    from mmengine.logging import HistoryBuffer, MessageHub
    from mmengine.runner import load_checkpoint, save_checkpoint

    from norm_det.mm.checkpoint import allow_mmengine_checkpoints

    init_default_scope("mmdet")

    def backbone() -> nn.Module:
        cfg = dict(type="ResNet", depth=18, base_channels=32, norm_cfg=dict(type="NormDetGNWS"))
        return ROOT_MODELS.build(cfg)

    torch.manual_seed(0)
    trained, fresh = backbone(), backbone()
    # What mmengine's runner writes besides the weights: a message hub and numpy metadata.
    hub = MessageHub.get_instance("norm_det_test")
    hub.update_scalar("train/loss", 1.5)
    hub.update_info("eta", np.float64(3.0))
    path = str(tmp_path / "iter_1.pth")
    meta = {"iter": 1, "seed": np.int64(0)}
    save_checkpoint(
        {"state_dict": trained.state_dict(), "meta": meta, "message_hub": hub.state_dict()}, path
    )
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(fresh, path)
    assert not torch.equal(fresh.conv1.weight, trained.conv1.weight)
    with allow_mmengine_checkpoints():
        checkpoint = load_checkpoint(fresh, path)
    assert checkpoint["meta"]["iter"] == 1 and checkpoint["meta"]["seed"] == 0
    buffer = checkpoint["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buffer, HistoryBuffer) and buffer.current() == 1.5
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value)
    # The allow-list ends with the block, and its getattr resolves HistoryBuffer's statistics
    # methods only.
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path)
    for owner, name in ((HistoryBuffer, "__init__"), (np.ndarray, "tofile")):
        crafted = str(tmp_path / f"{name}.pth")
        torch.save({"method": _AsksForAttribute(owner, name)}, crafted)
        with allow_mmengine_checkpoints(), pytest.raises(Exception, match=r"getattr.*statistics"):
            torch.load(crafted)
    mean = str(tmp_path / "mean.pth")
    torch.save({"method": _AsksForAttribute(HistoryBuffer, "mean")}, mean)
    with allow_mmengine_checkpoints():
        assert torch.load(mean)["method"] is HistoryBuffer.mean


def test_normdet_convert_builds_and_converts_any_model_config() -> None:
    init_default_scope("mmdet")
    cfg = dict(type="ResNet", depth=18, base_channels=32, norm_cfg=dict(type="BN"))
    plain = ROOT_MODELS.build(cfg)
    converted = ROOT_MODELS.build(
        dict(type="NormDetConvert", scheme="FrozenBN", model=cfg, frozen_stages=1)
    )
    # The result is the inner model itself; extra keys reach its config.
    assert type(converted) is type(plain) and converted.frozen_stages == 1
    assert FrozenBatchNorm2d in _types(converted) and nn.BatchNorm2d not in _types(converted)
    assert list(converted.state_dict()) == [
        k for k in plain.state_dict() if not k.endswith("num_batches_tracked")
    ]
    with pytest.raises(ValueError, match="NormDetConvert: 'model' must be a config dict"):
        ROOT_MODELS.build(dict(type="NormDetConvert", scheme="GN", model="ResNet"))


# ---------------------------------------------------------------------------------------------
# One config word in mmdet's own configs: the norm type alone gives the scheme's network


def _mmdet_config(relative: str) -> Config:
    import mmdet

    return Config.fromfile(str(Path(mmdet.__file__).parent / ".mim" / "configs" / relative))


def _set_norm_word(node: object, old: str, new: str) -> int:
    """Replace the type word of every ``norm_cfg`` naming ``old``: what a user edits."""
    count = 0
    if isinstance(node, dict):
        norm = node.get("norm_cfg")
        if isinstance(norm, dict) and norm.get("type") == old:
            norm["type"] = new
            count += 1
        for value in node.values():
            count += _set_norm_word(value, old, new)
    elif isinstance(node, (list, tuple)):
        count += sum(_set_norm_word(value, old, new) for value in node)
    return count


NORM_ABBREVIATIONS = "bn|gn|iternorm|cbn|mabn|bcn|frn|evonorm_b0|evonorm_s0"


def _layer_types(model: nn.Module) -> dict[str, str]:
    """Module path -> layer class; mmdet's norm names (``bn1``, ``gn``: mmcv names a norm by its
    class's ``_abbr_``) read ``norm1``, ``norm``."""
    return {
        re.sub(rf"(?<![^.])(?:{NORM_ABBREVIATIONS})(\d*)(?![^.])", r"norm\1", path): type(
            m
        ).__name__
        for path, m in model.named_modules()
    }


@pytest.mark.parametrize("scheme", available_schemes())
def test_one_norm_word_in_mmdets_gn_all_config_builds_the_scheme_network(scheme: str) -> None:
    """mmdet's mask-rcnn_r50_fpn_gn-all config with only ``type="GN"`` changed, every part.

    The network equals mmdet's GN network converted part by part (what ``convert`` makes of
    the parts the norm word covers), and has the scheme's layers at the known places.
    """
    _, norm_name = nd_mmdet.type_names(scheme)
    init_default_scope("mmdet")
    reference_cfg = _mmdet_config("gn/mask-rcnn_r50_fpn_gn-all_2x_coco.py")
    reference_cfg.model.backbone.init_cfg = None
    _shrink_rcnn(reference_cfg.model)
    cfg = copy.deepcopy(reference_cfg)
    assert _set_norm_word(cfg.model, "GN", norm_name) == 4  # backbone, neck, box and mask heads
    torch.manual_seed(0)
    model = ROOT_MODELS.build(cfg.model)
    reference = ROOT_MODELS.build(reference_cfg.model)
    roi = reference.roi_head
    for part in (reference.backbone, reference.neck, roi.bbox_head, roi.mask_head):
        surgery.convert(part, scheme, keep_weights=False)
    assert _layer_types(model) == _layer_types(reference)

    assert not any(isinstance(m, nd_mmdet.PendingSchemeNorm) for m in model.modules())
    resolved = get_scheme(scheme)
    conv, norm = build_conv_norm(scheme, 8, 8, 3)
    first = model.backbone.conv1
    image_scheme = "none" if resolved.keep_first_conv_plain else scheme
    assert type(first) is type(build_conv_norm(image_scheme, 3, 8, 7)[0])
    assert type(model.backbone.layer1[0].conv1) is type(conv)
    # A ReLU follows the block's first norm: a scheme's normalization-activation layer there.
    activated = build_conv_norm(scheme, 8, 8, 3, activation=True)[1]
    assert type(model.backbone.layer1[0].norm1) is type(activated)
    assert type(model.backbone.layer1[0].norm2) is type(norm)
    assert type(model.neck.fpn_convs[0].conv) is type(conv)
    assert type(model.roi_head.bbox_head.shared_convs[0].conv) is type(conv)
    assert type(model.roi_head.mask_head.convs[0].conv) is type(conv)
    # The predictor: the scheme's where its rule says so, else mmdet's own plain layer.
    predictor = type(build_conv_norm(predictor_scheme(scheme), 8, 8, 1)[0])
    logits = type(model.roi_head.mask_head.conv_logits)
    assert logits is predictor or (
        predictor is nn.Conv2d
        and issubclass(logits, nn.Conv2d)
        and "norm_det" not in logits.__module__
    )
    noise = [m for m in model.backbone.modules() if hasattr(m, "residual_input")]
    assert len(noise) == (8 if resolved.residual_input is not None else 0)  # every block


def test_one_norm_word_in_mmdets_stock_mask_rcnn_changes_its_backbone() -> None:
    """mmdet's mask-rcnn_r50_fpn_1x_coco.py names a norm in its backbone only: that part follows."""
    cfg = _mmdet_config("mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py")
    cfg.model.backbone.init_cfg = None
    _shrink_rcnn(cfg.model)
    assert _set_norm_word(cfg.model, "BN", "NormDetPWS") == 1
    init_default_scope("mmdet")
    model = ROOT_MODELS.build(cfg.model)
    pws = _conv_class("PWS")
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is pws for m in convs)
    assert _types(model.backbone).isdisjoint({nn.BatchNorm2d, nd_mmdet.PendingSchemeNorm})
    # The neck and heads name no norm: they stay mmdet's.
    assert pws not in _types(model.neck) | _types(model.roi_head) | _types(model.rpn_head)


def test_build_hook_is_reversible_and_apply_norm_types_does_its_work() -> None:
    cfg = dict(type="ResNet", depth=18, base_channels=32, norm_cfg=dict(type="NormDetNDPP"))
    init_default_scope("mmdet")
    assert nd_mmdet.remove_build_hook()
    try:
        unconverted = ROOT_MODELS.build(cfg)
    finally:
        assert nd_mmdet.install_build_hook()
    assert not nd_mmdet.install_build_hook()  # idempotent
    slots = [m for m in unconverted.modules() if isinstance(m, nd_mmdet.PendingSchemeNorm)]
    assert len(slots) == 20  # every conv+norm pair of a ResNet-18, marked
    with pytest.raises(ValueError, match=r"NormDetNDPP .*never converted"):
        unconverted(torch.randn(1, 3, 32, 32))
    converted = nd_mmdet.apply_norm_types(unconverted)
    assert _layer_types(converted) == _layer_types(ROOT_MODELS.build(cfg))
    assert _conv_class("NDPP") in _types(converted)


def test_a_module_with_norm_words_of_two_schemes_is_refused() -> None:
    def conv_module(in_channels: int, norm_cfg: dict) -> dict:
        return dict(
            type="ConvModule",
            in_channels=in_channels,
            out_channels=8,
            kernel_size=3,
            norm_cfg=norm_cfg,
        )

    init_default_scope("mmdet")
    # A list config builds one nn.Sequential: one module, two schemes.
    with pytest.raises(ValueError, match=r"Sequential: .*NormDetPWS \(PWS\).*NormDetGN \(GN"):
        ROOT_MODELS.build(
            [conv_module(3, dict(type="NormDetPWS")), conv_module(8, dict(type="NormDetGN"))]
        )


# ---------------------------------------------------------------------------------------------
# SSD predicts (mmdet 3.3.0's SSDHead lacks loss_cls), every scheme starts near GN, CZM in
# mmengine's OptimWrapper


def test_ssd_config_predicts() -> None:
    from mmdet.structures import DetDataSample

    torch.manual_seed(0)
    model, _ = _build_initialised("mmdet/ssd300_pws-all_coco.py")
    model.eval()
    image = torch.randint(0, 255, (3, 96, 96), generator=torch.Generator().manual_seed(0))
    sample = DetDataSample(
        metainfo=dict(img_shape=(96, 96), ori_shape=(96, 96), scale_factor=(1.0, 1.0))
    )
    batch = model.data_preprocessor(dict(inputs=[image.to(torch.uint8)], data_samples=[sample]))
    assert model.bbox_head.loss_cls is None  # the workaround, set when the model was built
    with torch.no_grad():
        (result,) = model(**batch, mode="predict")
    scores, boxes = result.pred_instances.scores, result.pred_instances.bboxes
    assert len(scores) > 0 and torch.isfinite(boxes).all()
    assert ((scores > 0) & (scores <= 1)).all()
    assert set(result.pred_instances.labels.tolist()) <= {0, 1}
    # mmdet's own SSDHead without it: the upstream bug.
    del model.bbox_head.loss_cls
    with pytest.raises(AttributeError, match="loss_cls"), torch.no_grad():
        model(**batch, mode="predict")


MASK_RCNN_SCHEME_CONFIGS = [f for f in CONFIG_FILES if f.startswith("mmdet/mask-rcnn")]


def test_every_scheme_starts_within_twice_gns_loss_and_stays_finite() -> None:
    """Mask R-CNN of configs/mmdet (shrunk, 128 px): 2 steps of the config's SGD, LR for 2 images.

    128 px, not less: ND's statistics (no per-sample standardization) come from a few patch
    samples on the 4x4 top level there, fewer on smaller images, and its first loss grows. The
    full-size figures (R50-FPN, 20 iterations) are in docs/integrations.md. About 12 s.
    """
    from mmengine.optim import OptimWrapper

    init_default_scope("mmdet")
    losses: dict[str, list[float]] = {}
    for relative in MASK_RCNN_SCHEME_CONFIGS:
        cfg = _load(relative)
        _shrink_rcnn(cfg.model)
        cfg.model.backbone.init_cfg = None  # from scratch: FrozenBN's ImageNet weights too
        torch.manual_seed(0)
        model, scheme = ROOT_MODELS.build(cfg.model), cfg.normdet_scheme
        model.init_weights()
        model.train()
        batch = _det_batch(model, 128, with_mask=True)
        # The config's optimizer: SGD, lr 0.02 for 16 images, momentum 0.9, weight decay 1e-4.
        wrapper = OptimWrapper(
            torch.optim.SGD(model.parameters(), lr=0.02 * 2 / 16, momentum=0.9, weight_decay=1e-4)
        )
        values = []
        for _ in range(2):
            loss = _total_loss(model, batch)
            values.append(loss.item())
            wrapper.update_params(loss)
        values.append(_total_loss(model, batch).item())
        losses[scheme] = values
    assert set(losses) >= {"GN", "PWS", "ND", "NDPP", "CZM", "GN+WS", "IterNorm"}
    start = {scheme: values[0] for scheme, values in losses.items()}
    for scheme, values in losses.items():
        assert all(np.isfinite(values)), (scheme, values)
        assert start[scheme] < 2 * start["GN"], (scheme, start)


def _czm_in_optim_wrapper(zmg: float) -> tuple[float, float]:
    """3 steps of mmengine's OptimWrapper on an mmdet ResNet-18 built with ``NormDetCZM``.

    Returns:
        ``(largest |spatial mean| of any V, smallest change of any V)`` after the steps.
    """
    from mmengine.optim import OptimWrapper

    from norm_det.layers import CZMConv2d

    init_default_scope("mmdet")
    torch.manual_seed(0)
    norm_cfg = dict(type="NormDetCZM", zmg=zmg)
    model = ROOT_MODELS.build(dict(type="ResNet", depth=18, base_channels=16, norm_cfg=norm_cfg))
    model.train()
    convs = [m for m in model.modules() if isinstance(m, CZMConv2d)]
    assert len(convs) == 16 and type(model.conv1) is nn.Conv2d  # the image conv stays plain
    before = [conv.v.detach().clone() for conv in convs]
    wrapper = OptimWrapper(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    )
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        wrapper.update_params(sum(feature.mean() for feature in model(images)))
    means = max(conv.v.detach().mean(dim=(-2, -1)).abs().max().item() for conv in convs)
    change = min((conv.v.detach() - b).abs().max().item() for conv, b in zip(convs, before))
    return means, change


def test_czm_acts_in_mmengines_optim_wrapper() -> None:
    """CZMG keeps every V on the zero-spatial-mean isocline with no call from the loop."""
    means, change = _czm_in_optim_wrapper(zmg=1.0)
    assert change > 5e-5  # every V trained
    assert means < 1e-6
    # The same steps without the correction leave the isocline: the bound above means something.
    drifted, _ = _czm_in_optim_wrapper(zmg=0.0)
    assert drifted > 1e-5
