# Mask R-CNN R50-FPN 1x COCO with norm_det's FrozenBN scheme:
# norm_det's FrozenBatchNorm2d in the backbone (the Detectron baseline).
_base_ = "mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"
# Run with `python -m norm_det.mm train|test THIS_FILE ...` (docs/integrations.md). For
# mmdet's / mmseg's own tools/train.py: the bridge serves mmcv.ops from torchvision where only
# mmcv-lite is installed; norm_det.integrations.mmdet registers the norm types, whose word alone
# gives the scheme's convolution too.
custom_imports = dict(
    imports=["norm_det.integrations.mmcv_ops_bridge", "norm_det.integrations.mmdet"],
    allow_failed_imports=False,
)
normdet_scheme = "FrozenBN"
norm_cfg = dict(type="NormDetFrozenBN")
model = dict(
    backbone=dict(
        norm_cfg=norm_cfg,
    )
)
