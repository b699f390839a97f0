"""The four meta-architectures: training curves, output formats, fusing, config errors."""

import pytest
import torch
import torch.nn.functional as F

from norm_det import fuse
from norm_det.layers.protocol import ActivationInNorm
from norm_det.modeling import build_model
from norm_det.schemes import available_schemes
from tests.modeling.tiny import NUM_CLASSES, tiny_batch, tiny_cfg

pytestmark = pytest.mark.filterwarnings("ignore:GroupNorm")

ARCHS = ("MaskRCNN", "FasterRCNN", "SSD", "DeepLabV3")
EXPECTED_LOSSES = {
    "MaskRCNN": {
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss_objectness",
        "loss_rpn_box_reg",
    },
    "FasterRCNN": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    "SSD": {"loss_bbox_regression", "loss_classification"},
    "DeepLabV3": {"loss_sem_seg"},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_goes_down_on_a_repeated_batch(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(arch, "GN"))
    images, targets = tiny_batch()
    # DeepLab's classifier starts at std 0.001 (Detectron2's init) and needs a larger step.
    lr = 0.05 if arch == "DeepLabV3" else 0.01
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    totals = []
    for _ in range(8):
        losses = model(images, targets)
        assert set(losses) == EXPECTED_LOSSES[arch]
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert sum(totals[-2:]) < 0.8 * sum(totals[:2]), totals


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_output_format(arch: str) -> None:
    """common.md: per image, detections in input-image pixels, or logits at its size."""
    model = build_model(tiny_cfg(arch, "GN")).eval()
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for image, output in zip(images, outputs):
        height, width = image.shape[-2:]
        if arch == "DeepLabV3":
            assert set(output) == {"sem_seg"}
            assert output["sem_seg"].shape == (NUM_CLASSES + 1, height, width)
            continue
        expected = {"boxes", "scores", "labels"} | ({"masks"} if arch == "MaskRCNN" else set())
        assert set(output) == expected
        boxes, count = output["boxes"], len(output["scores"])
        assert boxes.shape == (count, 4) and boxes.dtype == torch.float32 and count > 0
        # Boxes scaled back from SSD's 300x300 may exceed the border by rounding.
        assert (boxes[:, 0::2] <= width + 1e-3).all() and (boxes[:, 1::2] <= height + 1e-3).all()
        assert (boxes >= 0).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
        assert output["labels"].dtype == torch.int64
        assert ((output["labels"] >= 1) & (output["labels"] <= NUM_CLASSES)).all()
        if arch == "MaskRCNN":
            masks = output["masks"]
            assert masks.shape == (count, 1, height, width) and masks.dtype == torch.float32
            assert ((masks >= 0) & (masks <= 1)).all()


def test_rcnn_keeps_the_input_size() -> None:
    """The data pipeline resizes; the model only normalizes and pads to a multiple of 32."""
    model = build_model(tiny_cfg("FasterRCNN"))
    images, targets = tiny_batch(size=(70, 50))
    batch, resized = model.transform(images, targets)
    assert batch.tensors.shape[-2:] == (96, 64)
    assert batch.image_sizes == [(70, 50), (70, 50)]
    torch.testing.assert_close(resized[0]["boxes"], targets[0]["boxes"])
    mean = torch.tensor(model.transform.image_mean).view(3, 1, 1)
    std = torch.tensor(model.transform.image_std).view(3, 1, 1)
    torch.testing.assert_close(batch.tensors[0, :, :70, :50], (images[0] - mean) / std)


def test_deeplab_loss_is_cross_entropy_over_labelled_pixels() -> None:
    cfg = tiny_cfg("DeepLabV3", "GN")
    cfg.MODEL.SEM_SEG_HEAD.ASPP_DROPOUT = 0.0  # train and eval compute the same function
    model = build_model(cfg)
    images, targets = tiny_batch()
    images[1] = images[1][:, :48, :56]  # padded in the batch
    targets[1]["sem_seg"] = targets[1]["sem_seg"][:48, :56].clone()
    targets[0]["sem_seg"][:10] = 255  # ignored
    loss = model(images, targets)["loss_sem_seg"]
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    logits = torch.cat([o["sem_seg"].flatten(1) for o in outputs], dim=1).t()
    labels = torch.cat([t["sem_seg"].flatten() for t in targets])
    reference = F.cross_entropy(logits, labels, ignore_index=255)
    torch.testing.assert_close(loss.detach(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", available_schemes())
def test_fused_deeplab_computes_the_same_logits(scheme: str) -> None:
    """After a training step (statistics updated), fuse() leaves the eval logits unchanged."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("DeepLabV3", scheme))
    images, targets = tiny_batch()
    sum(model(images, targets).values()).backward()
    model.eval()
    with torch.no_grad():
        expected = model(images)[0]["sem_seg"]
        fused = fuse(model)
        # Only the norms with no eval form in torch's layers are left (FRN, EvoNorm with its
        # activation, NF's scaled ReLU: per-sample statistics or a non-linearity).
        left = [
            m
            for m in fused.modules()
            if type(m).__module__.startswith("norm_det.layers")
            and not isinstance(m, ActivationInNorm)  # an empty slot (nn.Identity)
        ]
        assert all(not hasattr(m, "fuse") and m.folded_affine() is None for m in left), left
        torch.testing.assert_close(fused(images)[0]["sem_seg"], expected, rtol=1e-4, atol=1e-4)


def test_generalized_rcnn_follows_mask_on() -> None:
    cfg = tiny_cfg("MaskRCNN")
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    assert build_model(cfg).roi_heads.has_mask() is False
    cfg.MODEL.MASK_ON = True
    assert build_model(cfg).roi_heads.has_mask() is True


@pytest.mark.parametrize(
    ("arch", "key", "value", "message"),
    [
        ("MaskRCNN", "META_ARCHITECTURE", "MaskRCN", "did you mean 'MaskRCNN'"),
        ("FasterRCNN", "MASK_ON", True, "MODEL.MASK_ON"),
        ("MaskRCNN", "FPN.NORM", "NotAScheme", "MODEL.FPN.NORM: unknown normalization"),
        ("MaskRCNN", "ROI_BOX_HEAD.NAME", "StandardHead", "MODEL.ROI_BOX_HEAD.NAME"),
        ("MaskRCNN", "ANCHOR_GENERATOR.SIZES", [[8], [16]], "MODEL.ANCHOR_GENERATOR.SIZES"),
        ("MaskRCNN", "ROI_HEADS.IN_FEATURES", ["p7"], "MODEL.ROI_HEADS.IN_FEATURES"),
        ("SSD", "SSD.SIZE", 512, "MODEL.SSD.SIZE"),
        ("DeepLabV3", "SEM_SEG_HEAD.IN_FEATURES", ["res4", "res5"], "SEM_SEG_HEAD.IN_FEATURES"),
    ],
)
def test_bad_config_values_name_the_key(arch: str, key: str, value, message: str) -> None:
    cfg = tiny_cfg(arch)
    *path, leaf = key.split(".")
    node = cfg.MODEL
    for part in path:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ValueError, match=message):
        build_model(cfg)
