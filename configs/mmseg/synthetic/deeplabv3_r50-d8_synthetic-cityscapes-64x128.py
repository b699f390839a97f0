# DeepLabv3 R50-D8 of configs/mmseg/deeplabv3_r50-d8_<scheme>_4xb2-40k_cityscapes-512x1024.py
# (mmseg's deeplabv3_r50-d8 Cityscapes config with a norm_det scheme) on norm_det's synthetic
# street scenes in the Cityscapes layout at 64 x 128: a CPU smoke run of 20 iterations with the
# config's model, optimizer and schedule.
#
#   python -m norm_det.mm synthetic cityscapes datasets/synthetic_cityscapes_mm --size 64
#   NORMDET_SCHEME=ndpp-all python -m norm_det.mm train \
#       configs/mmseg/synthetic/deeplabv3_r50-d8_synthetic-cityscapes-64x128.py
#
# NORMDET_SCHEME picks the scheme config: frozenbn, syncbn-all, gn-all, gn-ws-all, pws-all,
# nd-all, ndpp-all, iternorm-all, czm-all; NORMDET_DATA the data folder.
_base_ = "../deeplabv3_r50-d8_{{$NORMDET_SCHEME:gn-all}}_4xb2-40k_cityscapes-512x1024.py"
data_root = "{{$NORMDET_DATA:datasets/synthetic_cityscapes_mm}}/"
crop_size = (64, 128)
randomness = dict(seed=0)

model = dict(data_preprocessor=dict(size=crop_size))
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackSegInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations"),
    dict(type="PackSegInputs"),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline),
)
test_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline),
)
# Training only (test with `python -m norm_det.mm test THIS_FILE CHECKPOINT`).
val_dataloader = None
val_evaluator = None
val_cfg = None
train_cfg = dict(max_iters=20, val_interval=100000)
default_hooks = dict(
    logger=dict(interval=1),
    # One checkpoint, after the last iteration.
    checkpoint=dict(interval=100000, save_last=True),
)
# Every iteration's own loss in the log, not a 10-iteration mean.
log_processor = dict(window_size=1)
env_cfg = dict(cudnn_benchmark=False)
