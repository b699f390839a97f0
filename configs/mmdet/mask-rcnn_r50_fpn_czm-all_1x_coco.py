# Mask R-CNN R50-FPN 1x COCO with norm_det's CZM scheme:
# channel-wise zero-mean convolutions (Mean Shift Rejection), no norm layer.
# Backbone, FPN and RoI heads (4conv1fc box head) all follow the scheme.
_base_ = "mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"
# Run with `python -m norm_det.mm train|test THIS_FILE ...` (docs/integrations.md). For
# mmdet's / mmseg's own tools/train.py: the bridge serves mmcv.ops from torchvision where only
# mmcv-lite is installed; norm_det.integrations.mmdet registers the norm types, whose word alone
# gives the scheme's convolution too.
custom_imports = dict(
    imports=["norm_det.integrations.mmcv_ops_bridge", "norm_det.integrations.mmdet"],
    allow_failed_imports=False,
)
normdet_scheme = "CZM"
norm_cfg = dict(type="NormDetCZM")
model = dict(
    backbone=dict(
        norm_cfg=norm_cfg,
        # Weights of the plain pretrained model do not fit these layers: train from
        # scratch, or start from them with norm_det.surgery.convert (see docs/integrations.md).
        init_cfg=None,
    ),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(type="Shared4Conv1FCBBoxHead", conv_out_channels=256, norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg),
    ),
)
