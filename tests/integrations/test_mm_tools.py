"""``python -m norm_det.mm train|test``: mmdet's and mmseg's tools end to end, in subprocesses.

Each test trains a norm_det config (derived from ``configs/mmdet/synthetic`` /
``configs/mmseg/synthetic``, shrunk to a narrow ResNet-18) for 2 iterations on norm_det's
synthetic data, saves the checkpoint, then tests that checkpoint in a fresh process, as a user
runs the two commands. Measured on one core (``OMP_NUM_THREADS=1``, the other core busy): 20 s
for the mmdet test and 23 s for the mmseg test, 45 s for the file; each of the four commands
spends about 8 s importing torch, mmengine and mmdet / mmseg, the 2 iterations take 0.2 s.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmengine")
pytest.importorskip("mmcv")
pytest.importorskip("mmdet")
pytest.importorskip("mmseg")

from norm_det.mm.checkpoint import allow_mmengine_checkpoints
from norm_det.mm.synthetic import write_synthetic_cityscapes, write_synthetic_coco

REPO = Path(__file__).resolve().parents[2]
DET_BASE = REPO / "configs/mmdet/synthetic/mask-rcnn_r50_fpn_synthetic-coco-128.py"
SEG_BASE = REPO / "configs/mmseg/synthetic/deeplabv3_r50-d8_synthetic-cityscapes-64x128.py"

# A user's own config on top of norm_det's: ResNet-18 at half width, 32-channel FPN and heads,
# fewer proposals and RoIs, 2 iterations.
DET_CONFIG = """
_base_ = {base!r}
model = dict(
    backbone=dict(depth=18, base_channels=32),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, conv_out_channels=32, fc_out_channels=64),
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(in_channels=32, conv_out_channels=32),
    ),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=300, max_per_img=100), rcnn=dict(sampler=dict(num=32))
    ),
    test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=50), rcnn=dict(max_per_img=20)),
)
train_cfg = dict(max_iters=2)
"""
SEG_CONFIG = """
_base_ = {base!r}
model = dict(
    backbone=dict(depth=18, stem_channels=32, base_channels=32),
    # 64 channels: GN's 32 groups need more than one value each on ASPP's pooled 1x1 branch.
    decode_head=dict(in_channels=256, channels=64),
    auxiliary_head=dict(in_channels=128, channels=32),
)
train_cfg = dict(max_iters=2)
"""


def _run(args: list[str], env: dict[str, str], cwd: Path) -> str:
    """``python -m norm_det.mm ARGS`` in a fresh process; its output, or a failure with it."""
    result = subprocess.run(
        [sys.executable, "-m", "norm_det.mm", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, (
        f"python -m norm_det.mm {' '.join(args)} failed:\n{output[-4000:]}"
    )
    return output


def _env(scheme: str, data: Path) -> dict[str, str]:
    env = dict(os.environ, NORMDET_SCHEME=scheme, NORMDET_DATA=str(data), OMP_NUM_THREADS="1")
    # The checkout under test, not an installed norm_det; and no escape hatch: the checkpoint
    # must load under torch's weights_only default.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    return env


def _train_losses(work_dir: Path) -> list[float]:
    """The total loss of every iteration, from mmengine's scalar log of the training run."""
    (scalars,) = work_dir.glob("*/vis_data/scalars.json")
    rows = [json.loads(line) for line in scalars.read_text().splitlines() if line.strip()]
    return [row["loss"] for row in rows if "loss" in row]


def _test_metrics(work_dir: Path) -> dict[str, float]:
    """The metrics mmengine's LoggerHook dumped after the test epoch."""
    (metrics,) = [p for p in work_dir.glob("*/*.json") if p.stem == p.parent.name]
    return json.loads(metrics.read_text())


def _train_then_test(
    tmp_path: Path, config_text: str, base: Path, scheme: str, data: Path
) -> tuple[list[float], dict[str, float], Path]:
    config = tmp_path / "user_config.py"
    config.write_text(config_text.format(base=str(base)))
    env = _env(scheme, data)
    train_dir, test_dir = tmp_path / "train", tmp_path / "test"
    _run(["train", str(config), "--work-dir", str(train_dir)], env, tmp_path)
    checkpoint = train_dir / "iter_2.pth"
    assert checkpoint.is_file()
    assert Path((train_dir / "last_checkpoint").read_text().strip()) == checkpoint
    _run(["test", str(config), str(checkpoint), "--work-dir", str(test_dir)], env, tmp_path)
    return _train_losses(train_dir), _test_metrics(test_dir), checkpoint


def _check_checkpoint_loading(checkpoint: Path) -> dict:
    """The runner's checkpoint needs the allow-list under weights_only, and loads with it."""
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(checkpoint, weights_only=True)
    with allow_mmengine_checkpoints():
        loaded = torch.load(checkpoint, weights_only=True)
    assert loaded["meta"]["iter"] == 2
    assert "train/loss" in loaded["message_hub"]["log_scalars"]
    return loaded["state_dict"]


def test_mmdet_mask_rcnn_trains_saves_and_tests_from_the_checkpoint(tmp_path: Path) -> None:
    data = write_synthetic_coco(tmp_path / "coco", num_train=4, num_val=2, size=64)
    losses, metrics, checkpoint = _train_then_test(tmp_path, DET_CONFIG, DET_BASE, "pws-all", data)
    assert len(losses) == 2 and all(math.isfinite(v) and 0 < v < 50 for v in losses)
    for name in ("coco/bbox_mAP", "coco/bbox_mAP_50", "coco/segm_mAP", "coco/segm_mAP_50"):
        assert math.isfinite(metrics[name]) and 0 <= metrics[name] <= 1, (name, metrics)
    state = _check_checkpoint_loading(checkpoint)
    # The one config word made the convolutions PWS (alpha per output channel) in every part,
    # and left the predictors plain.
    for key in (
        "backbone.layer1.0.conv1.alpha",
        "neck.fpn_convs.0.conv.alpha",
        "roi_head.bbox_head.shared_convs.0.conv.alpha",
        "roi_head.mask_head.convs.0.conv.alpha",
    ):
        assert key in state, key
    assert "roi_head.mask_head.conv_logits.alpha" not in state
    assert not any(k.endswith("running_mean") for k in state)  # no BN left anywhere


def test_mmseg_deeplabv3_trains_saves_and_tests_from_the_checkpoint(tmp_path: Path) -> None:
    data = write_synthetic_cityscapes(tmp_path / "cityscapes", num_train=4, num_val=2, height=64)
    losses, metrics, checkpoint = _train_then_test(
        tmp_path, SEG_CONFIG, SEG_BASE, "gn-ws-all", data
    )
    assert len(losses) == 2 and all(math.isfinite(v) and 0 < v < 50 for v in losses)
    for name in ("aAcc", "mIoU", "mAcc"):
        assert math.isfinite(metrics[name]) and 0 <= metrics[name] <= 100, (name, metrics)
    state = _check_checkpoint_loading(checkpoint)
    assert "backbone.stem.0.weight" in state and "decode_head.conv_seg.weight" in state
    assert not any(k.endswith("running_mean") for k in state)  # GN everywhere, heads included
