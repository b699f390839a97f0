"""Default configuration, with detectron2's key names where the concept exists.

Every key a config file or a ``KEY VALUE`` override may set is declared here; anything else is
rejected. A norm key (``MODEL.RESNETS.NORM``, ``MODEL.FPN.NORM``, ...) takes any scheme name of
:mod:`norm_det.schemes`, with options (``"GN(groups=16)"``); ``""`` means no norm.
"""

from fvcore.common.config import CfgNode as CN

_C = CN()
_C.VERSION = 2

# ---------------------------------------------------------------------------------------------
# MODEL (norm_det.modeling)
_C.MODEL = CN()
_C.MODEL.DEVICE = "cpu"
_C.MODEL.WEIGHTS = ""
# The format of MODEL.WEIGHTS when it holds a pretrained backbone, not a whole model: "" tells it
# from the file's keys; else one of norm_det.weights.formats.known_formats() (docs/weights.md).
_C.MODEL.WEIGHTS_FORMAT = ""
# Read MODEL.WEIGHTS when it is a pickle (detectron2's and Caffe2's .pkl zoo files) or a torch
# file holding other Python objects (mmdet's meta): only arrays and containers are built.
_C.MODEL.WEIGHTS_ALLOW_PICKLE = False
# "MaskRCNN", "FasterRCNN", "GeneralizedRCNN" (detectron2: Mask R-CNN iff MASK_ON), "SSD",
# "DeepLabV3".
_C.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
# Mask branch of GeneralizedRCNN (MaskRCNN always has one; FasterRCNN refuses True).
_C.MODEL.MASK_ON = False
# Per RGB channel, for images in [0, 1] (torchvision's units; detectron2's are BGR 0-255).
_C.MODEL.PIXEL_MEAN = [0.485, 0.456, 0.406]
_C.MODEL.PIXEL_STD = [0.229, 0.224, 0.225]

_C.MODEL.BACKBONE = CN()
# 0: train all; k >= 1: freeze the stem and res2..res{k} (no gradient, always in eval mode).
_C.MODEL.BACKBONE.FREEZE_AT = 2

_C.MODEL.RESNETS = CN()
# 18, 34, 50 or 101.
_C.MODEL.RESNETS.DEPTH = 50
# Scheme of every conv and norm of the ResNet.
_C.MODEL.RESNETS.NORM = "FrozenBN"
# Maps the ResNet outputs (the FPN inputs): among "stem", "res2" .. "res5".
_C.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
# Widths: stem output, res2 output (doubling per stage), res2 bottleneck 3x3 width. ResNet-18/34
# have no bottleneck: there RES2_OUT_CHANNELS must equal WIDTH_PER_GROUP (64 as published).
_C.MODEL.RESNETS.STEM_OUT_CHANNELS = 64
_C.MODEL.RESNETS.RES2_OUT_CHANNELS = 256
_C.MODEL.RESNETS.WIDTH_PER_GROUP = 64
# Bottleneck stride in the first 1x1 (MSRA/detectron2 weights) or in the 3x3 (torchvision's).
_C.MODEL.RESNETS.STRIDE_IN_1X1 = True
# For res3, res4, res5: dilate instead of striding (DeepLab: [False, True, True] is stride 8).
_C.MODEL.RESNETS.REPLACE_STRIDE_WITH_DILATION = [False, False, False]
# The pre-activation ResNet-V2 (BiT's and NF-ResNets' trunk): norm and ReLU before each conv,
# a final norm and ReLU after the last stage.
_C.MODEL.RESNETS.PREACT = False
# The stem's 3x3 stride-2 max pool: "max" pads with -inf (torchvision, detectron2); "zero_pad" pads
# the map with zeros first, as Big Transfer (timm's resnetv2_*_bit) was trained.
_C.MODEL.RESNETS.STEM_POOL = "max"
# Projection shortcuts average-pool 2x2 before a stride-1 1x1 conv (ResNet-D; timm's NF-ResNets).
_C.MODEL.RESNETS.AVG_DOWN = False
# PREACT only: a scheme whose norm (and a ReLU) follows the stem convolution, as the PWS release's
# one-group GroupNorm ("GN(groups=1)", read from its files); "": the lone stem convolution.
_C.MODEL.RESNETS.STEM_NORM = ""

_C.MODEL.FPN = CN()
# ResNet maps the FPN takes; empty: all of MODEL.RESNETS.OUT_FEATURES.
_C.MODEL.FPN.IN_FEATURES = []
_C.MODEL.FPN.OUT_CHANNELS = 256
# Scheme of the FPN's lateral and output convs ("": plain convs with bias, no norm).
_C.MODEL.FPN.NORM = ""

_C.MODEL.ANCHOR_GENERATOR = CN()
# Anchor sizes (pixels) per FPN level p2..p6; one list applies to all levels.
_C.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
# Anchor height/width ratios; one list applies to all levels.
_C.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]

_C.MODEL.RPN = CN()
# Scheme of the RPN head's 3x3 conv and predictors (norm_det addition; detectron2 has none).
_C.MODEL.RPN.NORM = ""
# Top-scoring anchors per FPN level before NMS, and proposals per image after it.
_C.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 2000
_C.MODEL.RPN.PRE_NMS_TOPK_TEST = 1000
_C.MODEL.RPN.POST_NMS_TOPK_TRAIN = 1000
_C.MODEL.RPN.POST_NMS_TOPK_TEST = 1000
_C.MODEL.RPN.NMS_THRESH = 0.7
# Anchors sampled per image for the RPN loss, and the positive share of them.
_C.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 256
_C.MODEL.RPN.POSITIVE_FRACTION = 0.5
# [background below, foreground from] IoU with a ground-truth box.
_C.MODEL.RPN.IOU_THRESHOLDS = [0.3, 0.7]

_C.MODEL.ROI_HEADS = CN()
# Foreground classes (the background is added inside).
_C.MODEL.ROI_HEADS.NUM_CLASSES = 80
# FPN maps the RoIAlign poolers read.
_C.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
# Proposals sampled per image for the box loss, and the positive share of them.
_C.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 512
_C.MODEL.ROI_HEADS.POSITIVE_FRACTION = 0.25
# IoU from which a proposal is foreground ([bg, fg] when two values).
_C.MODEL.ROI_HEADS.IOU_THRESHOLDS = [0.5]
_C.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.05
_C.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.5

_C.MODEL.ROI_BOX_HEAD = CN()
# Only "FastRCNNConvFCHead" (NUM_CONV conv+norm, then NUM_FC fc): 2fc and 4conv1fc.
_C.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
_C.MODEL.ROI_BOX_HEAD.NUM_CONV = 0
_C.MODEL.ROI_BOX_HEAD.CONV_DIM = 256
_C.MODEL.ROI_BOX_HEAD.NUM_FC = 2
_C.MODEL.ROI_BOX_HEAD.FC_DIM = 1024
# Scheme of the box head's convs, fcs and predictor.
_C.MODEL.ROI_BOX_HEAD.NORM = ""
_C.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
# RoIAlign samples per bin side; 0: adaptive (ceil(RoI size / resolution)).
_C.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 0

_C.MODEL.ROI_MASK_HEAD = CN()
_C.MODEL.ROI_MASK_HEAD.NUM_CONV = 4
_C.MODEL.ROI_MASK_HEAD.CONV_DIM = 256
# Scheme of the mask head's convs, deconv and predictor.
_C.MODEL.ROI_MASK_HEAD.NORM = ""
_C.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 14
_C.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO = 0

_C.MODEL.SEM_SEG_HEAD = CN()
# The one ResNet map DeepLabV3 reads.
_C.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res5"]
_C.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 19
# Scheme of the ASPP and classifier.
_C.MODEL.SEM_SEG_HEAD.NORM = "GN"
_C.MODEL.SEM_SEG_HEAD.ASPP_CHANNELS = 256
# Dilations of the three 3x3 ASPP branches (at output stride 16; double them at 8).
_C.MODEL.SEM_SEG_HEAD.ASPP_DILATIONS = [6, 12, 18]
_C.MODEL.SEM_SEG_HEAD.ASPP_DROPOUT = 0.1
# Label of pixels without loss.
_C.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255

_C.MODEL.VGG = CN()
# Scheme of SSD's VGG-16 convs (conv1_1 .. fc7).
_C.MODEL.VGG.NORM = ""
# Width of conv1; all VGG and SSD extra-layer widths scale with it (64 as published).
_C.MODEL.VGG.BASE_CHANNELS = 64

_C.MODEL.SSD = CN()
# Scheme of SSD's extra layers and predictors.
_C.MODEL.SSD.NORM = ""
# Input side; only 300 (SSD300).
_C.MODEL.SSD.SIZE = 300
# Foreground classes (the background is added inside).
_C.MODEL.SSD.NUM_CLASSES = 80
_C.MODEL.SSD.SCORE_THRESH_TEST = 0.01
_C.MODEL.SSD.NMS_THRESH_TEST = 0.45

# ---------------------------------------------------------------------------------------------
# INPUT, DATASETS, DATALOADER (norm_det.data)
_C.INPUT = CN()
# Training resize: the shorter edge becomes one of MIN_SIZE_TRAIN ("choice") or an integer drawn
# between its two values ("range"); the longer edge is capped at MAX_SIZE_TRAIN.
_C.INPUT.MIN_SIZE_TRAIN = (800,)
_C.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
_C.INPUT.MAX_SIZE_TRAIN = 1333
# Test resize of the shorter edge (0: keep the file's size), longer edge capped.
_C.INPUT.MIN_SIZE_TEST = 800
_C.INPUT.MAX_SIZE_TEST = 1333
# Training flip with probability 0.5: "horizontal", "vertical" or "none".
_C.INPUT.RANDOM_FLIP = "horizontal"
# Random crop before the resize (training only): TYPE "relative_range" (height and width
# fractions drawn from [SIZE[i], 1]) or "absolute" (SIZE = (height, width) in pixels).
_C.INPUT.CROP = CN()
_C.INPUT.CROP.ENABLED = False
_C.INPUT.CROP.TYPE = "relative_range"
_C.INPUT.CROP.SIZE = [0.9, 0.9]
_C.DATASETS = CN()
# Registered dataset names (norm_det.data.DatasetCatalog.list()); several TRAIN sets with the
# same classes are concatenated.
_C.DATASETS.TRAIN = ()
_C.DATASETS.TEST = ()
_C.DATALOADER = CN()
# Loader worker processes per training process (0: load in the training process).
_C.DATALOADER.NUM_WORKERS = 2
# Batch images of the same orientation (wider than tall, or not) together: less padding.
_C.DATALOADER.ASPECT_RATIO_GROUPING = True
# Only "TrainingSampler": an endless seeded stream, sharded over processes.
_C.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"
# Leave images without (non-crowd, non-difficult) annotations out of training.
_C.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True

# ---------------------------------------------------------------------------------------------
# SOLVER (norm_det.solver)
_C.SOLVER = CN()
# "SGD" (momentum), "LARS" (You et al. 2017) or "LAMB" (You et al. 2020); the last two leave
# norm parameters and biases out of their trust ratio and (unless WEIGHT_DECAY_BIAS is set) decay.
_C.SOLVER.OPTIMIZER = "SGD"
# Images per iteration (optimizer step) over all processes and accumulated passes; each process
# loads IMS_PER_BATCH // (world_size * ACCUMULATE_STEPS) per pass.
_C.SOLVER.IMS_PER_BATCH = 16
# Forward/backward passes per optimizer step (gradient accumulation; docs/large_batch.md).
_C.SOLVER.ACCUMULATE_STEPS = 1
# Learning rate at the end of warmup, for IMS_PER_BATCH images.
_C.SOLVER.BASE_LR = 0.02
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.NESTEROV = False
# Weight decay of ordinary weights.
_C.SOLVER.WEIGHT_DECAY = 1e-4
# Weight decay of the affine parameters of torch norm layers (BN, SyncBN, GN, LN).
_C.SOLVER.WEIGHT_DECAY_NORM = 0.0
# Weight decay of biases; None: WEIGHT_DECAY. Parameters a layer lists in `_no_weight_decay`
# (PWS alpha, CZM g and v, ...) get none, whatever these keys say.
_C.SOLVER.WEIGHT_DECAY_BIAS = None
# Training length in iterations.
_C.SOLVER.MAX_ITER = 90000
# "WarmupMultiStepLR", "WarmupCosineLR" or "WarmupPolyLR".
_C.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
# WarmupMultiStepLR: iterations at which the LR is multiplied by GAMMA.
_C.SOLVER.STEPS = (60000, 80000)
_C.SOLVER.GAMMA = 0.1
# WarmupCosineLR: the LR reached at MAX_ITER.
_C.SOLVER.BASE_LR_END = 0.0
# WarmupPolyLR: LR = BASE_LR * (1 - iter / MAX_ITER) ** POLY_LR_POWER (DeepLab).
_C.SOLVER.POLY_LR_POWER = 0.9
# Warmup: the LR factor grows from WARMUP_FACTOR to 1 over WARMUP_ITERS ("linear"), or stays
# at WARMUP_FACTOR during them ("constant").
_C.SOLVER.WARMUP_ITERS = 1000
_C.SOLVER.WARMUP_FACTOR = 1.0 / 1000
_C.SOLVER.WARMUP_METHOD = "linear"
# Iterations between checkpoints in OUTPUT_DIR (a final one is always written).
_C.SOLVER.CHECKPOINT_PERIOD = 5000
# The workers (processes x ACCUMULATE_STEPS) this schedule was written for: on another number,
# IMS_PER_BATCH and BASE_LR scale with it and the iteration counts inversely (detectron2's
# rule, docs/large_batch.md). 0 disables rescaling.
_C.SOLVER.REFERENCE_WORLD_SIZE = 0
# How BASE_LR follows that rescaling: "linear" (Goyal et al. 2017) or "sqrt" (Krizhevsky 2014).
_C.SOLVER.LR_SCALING = "linear"
# LARS: trust coefficient eta (local LR = eta * |w| / (|grad| + WEIGHT_DECAY * |w|)).
_C.SOLVER.LARS = CN()
_C.SOLVER.LARS.TRUST_COEFFICIENT = 0.001
# LAMB: decay rates of the first and second moments, and the epsilon of the Adam direction.
_C.SOLVER.LAMB = CN()
_C.SOLVER.LAMB.BETAS = (0.9, 0.999)
_C.SOLVER.LAMB.EPS = 1e-6
# Gradient clipping, after the layers' optimizer-step work and before the optimizer step.
_C.SOLVER.CLIP_GRADIENTS = CN()
_C.SOLVER.CLIP_GRADIENTS.ENABLED = False
# "value": clamp every gradient element to [-CLIP_VALUE, CLIP_VALUE]; "norm": rescale all
# gradients together so that their NORM_TYPE-norm is at most CLIP_VALUE; "agc": adaptive
# gradient clipping (Brock et al., ICML 2021), each unit's (output channel's) gradient norm at
# most CLIP_VALUE times max(its weight norm, AGC_EPS). For "agc" CLIP_VALUE is the paper's
# lambda: 0.01 at batch 4096, larger for smaller batches (set it; the 1.0 here is for "value").
_C.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
_C.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
_C.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
# "agc": the floor of the unit weight norms (the paper's 1e-3), so zero-initialised units move.
_C.SOLVER.CLIP_GRADIENTS.AGC_EPS = 1e-3
# "agc": parameters left unclipped, by regular expressions searched in their names (the paper
# does not clip the final classifier). The default matches every predictor of norm_det's models:
# RPN objectness/deltas, box class scores/deltas, the mask predictor, SSD's predictors and
# DeepLab's classifier. [] clips every parameter; patterns that match nothing are refused.
_C.SOLVER.CLIP_GRADIENTS.AGC_EXCLUDE = [
    r"(^|\.)rpn\.head\.(cls_logits|bbox_pred)\.",
    r"(^|\.)roi_heads\.box_predictor\.(cls_score|bbox_pred)\.",
    r"(^|\.)roi_heads\.mask_predictor\.mask_fcn_logits\.",
    r"(^|\.)head\.(classification_head|regression_head)\.module_list\.",
    r"(^|\.)classifier\.predictor\.",
]

# ---------------------------------------------------------------------------------------------
# TEST (norm_det.evaluation, norm_det.engine)
_C.TEST = CN()
# Evaluate every this many iterations during training (0: only after the last iteration).
_C.TEST.EVAL_PERIOD = 0
# COCO AP engine: "pycocotools" or "faster_coco_eval" (same numbers, C++ matching, faster).
_C.TEST.COCO_BACKEND = "pycocotools"
# Detections kept per image: the model's output cap and COCOeval's largest maxDets.
_C.TEST.DETECTIONS_PER_IMAGE = 100
# Precise running statistics (detectron2's key; norm_det.engine.precise_statistics): before each
# evaluation and the final checkpoint, re-estimate the running averages of every layer with batch
# statistics (BN, SyncBN, ND/ND++, IterNorm) as the mean over NUM_ITER training batches at the
# current weights, instead of the moving average over weights that have since changed.
_C.TEST.PRECISE_BN = CN()
_C.TEST.PRECISE_BN.ENABLED = False
_C.TEST.PRECISE_BN.NUM_ITER = 200

# ---------------------------------------------------------------------------------------------
# Engine and misc (norm_det.engine)
# Checkpoints, config.yaml, log.txt, metrics.jsonl and TensorBoard events go here.
_C.OUTPUT_DIR = "./output"
# Global random seed; negative: drawn at start (and reused by --resume from OUTPUT_DIR).
_C.SEED = -1
# Let cuDNN pick the fastest convolution algorithms (non-deterministic).
_C.CUDNN_BENCHMARK = False
# Iterations between writes to metrics.jsonl and TensorBoard.
_C.LOG_PERIOD = 20

# ---------------------------------------------------------------------------------------------
# DIAGNOSTICS (norm_det.diagnostics; docs/diagnostics.md)
_C.DIAGNOSTICS = CN()
# Run the papers' probes during training and write them to metrics.jsonl and TensorBoard. Off:
# no hook is registered and the model is never touched.
_C.DIAGNOSTICS.ENABLED = False
# Probe the first iteration and every PERIOD-th (other iterations run as without diagnostics).
_C.DIAGNOSTICS.PERIOD = 20
# Among "activations", "snd", "gradient_shift", "filter_magnitude", "whitened_condition".
_C.DIAGNOSTICS.PROBES = [
    "activations",
    "snd",
    "gradient_shift",
    "filter_magnitude",
    "whitened_condition",
]
# Regular expression on module paths (re.search); only matching layers are probed. "": all.
_C.DIAGNOSTICS.LAYERS = ""
# Stochastic normalization disturbance: SETS sample sets of SET_SIZE positions (drawn with
# replacement from the layer's input), EXAMPLES example positions.
_C.DIAGNOSTICS.SND = CN()
_C.DIAGNOSTICS.SND.SETS = 8
_C.DIAGNOSTICS.SND.SET_SIZE = 1024
_C.DIAGNOSTICS.SND.EXAMPLES = 64
# A filter is deflated below this fraction of its magnitude at the start of training.
_C.DIAGNOSTICS.DEFLATION_RATIO = 0.1
