# DeepLabv3 R50-D8 Cityscapes 512x1024 with norm_det's CZM scheme:
# channel-wise zero-mean convolutions (Mean Shift Rejection), no norm layer.
# Backbone, ASPP head and auxiliary FCN head all follow the scheme.
_base_ = "mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-40k_cityscapes-512x1024.py"
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
    # Weights of the plain pretrained model do not fit these layers: train from
    # scratch, or start from them with norm_det.surgery.convert (see docs/integrations.md).
    pretrained=None,
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg),
)
