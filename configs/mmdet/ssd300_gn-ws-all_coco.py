# SSD300 COCO with norm_det's GN+WS scheme:
# weight-standardized convolutions followed by GroupNorm(32).
# SSD's VGG has no norm and no conv_cfg: norm_det builds it and converts it
# (NormDetConvert; add_norms puts the scheme's norm after each VGG convolution), the
# neck takes norm_cfg, and the head (no norm of its own) is converted too, as the
# scheme's rule for lone convolutions says.
_base_ = "mmdet::ssd/ssd300_coco.py"
# Run with `python -m norm_det.mm train|test THIS_FILE ...` (docs/integrations.md). For
# mmdet's / mmseg's own tools/train.py: the bridge serves mmcv.ops from torchvision where only
# mmcv-lite is installed; norm_det.integrations.mmdet registers the norm types, whose word alone
# gives the scheme's convolution too.
custom_imports = dict(
    imports=["norm_det.integrations.mmcv_ops_bridge", "norm_det.integrations.mmdet"],
    allow_failed_imports=False,
)
normdet_scheme = "GN+WS"
norm_cfg = dict(type="NormDetGNWS")
model = dict(
    backbone=dict(
        _delete_=True,
        type="NormDetConvert",
        scheme=normdet_scheme,
        add_norms=True,
        model={{_base_.model.backbone}},
        # Weights of the plain pretrained model do not fit these layers: train from
        # scratch, or start from them with norm_det.surgery.convert (see docs/integrations.md).
        init_cfg=None,
    ),
    neck=dict(norm_cfg=norm_cfg),
    bbox_head=dict(
        _delete_=True,
        type="NormDetConvert",
        scheme=normdet_scheme,
        model={{_base_.model.bbox_head}},
    ),
)
