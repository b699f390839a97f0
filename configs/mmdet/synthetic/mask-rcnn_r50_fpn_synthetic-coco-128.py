# Mask R-CNN R50-FPN of configs/mmdet/mask-rcnn_r50_fpn_<scheme>_1x_coco.py (mmdet's
# mask-rcnn_r50_fpn_1x_coco.py with a norm_det scheme) on norm_det's synthetic COCO-format shapes
# at 128 px: a CPU smoke run of 20 iterations with the config's model, optimizer and schedule.
#
#   python -m norm_det.mm synthetic coco datasets/synthetic_coco_mm
#   NORMDET_SCHEME=pws-all python -m norm_det.mm train \
#       configs/mmdet/synthetic/mask-rcnn_r50_fpn_synthetic-coco-128.py --auto-scale-lr
#
# NORMDET_SCHEME picks the scheme config: frozenbn, syncbn-all, gn-all, gn-ws-all, pws-all,
# nd-all, ndpp-all, iternorm-all, czm-all; NORMDET_DATA the data folder.
_base_ = "../mask-rcnn_r50_fpn_{{$NORMDET_SCHEME:gn-all}}_1x_coco.py"
data_root = "{{$NORMDET_DATA:datasets/synthetic_coco_mm}}/"
classes = ("circle", "rectangle", "triangle", "star")  # norm_det.data.synthetic.SHAPE_CLASSES
size = (128, 128)
randomness = dict(seed=0)

num_classes = len(classes)
model = dict(
    roi_head=dict(bbox_head=dict(num_classes=num_classes), mask_head=dict(num_classes=num_classes))
)
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="Resize", scale=size, keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=size, keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(
        type="PackDetInputs",
        meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"),
    ),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        ann_file="annotations/instances_train.json",
        data_prefix=dict(img="train/"),
        metainfo=dict(classes=classes),
        pipeline=train_pipeline,
    ),
)
test_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        ann_file="annotations/instances_val.json",
        data_prefix=dict(img="val/"),
        metainfo=dict(classes=classes),
        pipeline=test_pipeline,
    ),
)
test_evaluator = dict(ann_file=data_root + "annotations/instances_val.json")
# Training only (test with `python -m norm_det.mm test THIS_FILE CHECKPOINT`).
val_dataloader = None
val_evaluator = None
val_cfg = None
train_cfg = dict(_delete_=True, type="IterBasedTrainLoop", max_iters=20)
default_hooks = dict(
    logger=dict(interval=1),
    # One checkpoint, after the last iteration.
    checkpoint=dict(by_epoch=False, interval=100000, save_last=True),
)
# Every iteration's own loss in the log, not a 50-iteration mean.
log_processor = dict(window_size=1, by_epoch=False)
