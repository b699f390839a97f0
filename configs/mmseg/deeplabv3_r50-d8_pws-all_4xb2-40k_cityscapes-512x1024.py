# DeepLabv3 R50-D8 Cityscapes 512x1024 with norm_det's PWS scheme:
# parametric weight standardization (PWS paper, eq. 12), no norm layer.
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
normdet_scheme = "PWS"
# The paper's alpha = 1, not PWS's default data-dependent alpha (init_alpha): with it this
# dilated R50-D8 diverged in 20 synthetic iterations (NaN from iteration 7 at LR 0.01, from 16
# at 0.0025),
# with alpha = 1 it stayed finite (docs/integrations.md, "What was run").
norm_cfg = dict(type="NormDetPWS", init_alpha=False)
model = dict(
    # Weights of the plain pretrained model do not fit these layers: train from
    # scratch, or start from them with norm_det.surgery.convert (see docs/integrations.md).
    pretrained=None,
    backbone=dict(norm_cfg=norm_cfg),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg),
)
