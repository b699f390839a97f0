"""Backbone weights across frameworks and schemes, and deployment.

- :mod:`~norm_det.weights.keymaps`: module names of torchvision, detectron2, mmdet and
  norm_det ResNet / VGG-16 backbones, both ways;
- :mod:`~norm_det.weights.formats`: recognise a checkpoint file's framework, write any;
- :mod:`~norm_det.weights.io`: safe reading (``weights_only``; pickles only on request);
- :mod:`~norm_det.weights.warm_start`: start a backbone of any scheme from BN weights;
- :mod:`~norm_det.weights.deploy`: fold everything into plain layers; ONNX export;
- :mod:`~norm_det.weights.conversion`: the steps of one conversion (read, convert between
  schemes, fuse, write), as the command line runs them.

``tools/convert_weights.py`` is the command line over :mod:`~norm_det.weights.conversion`;
docs/weights.md and docs/deploy.md say what each conversion preserves, with measurements.
"""

from norm_det.weights.backbones import find_backbone, infer_scheme, load_backbone_tensors
from norm_det.weights.deploy import (
    deploy_config,
    export_onnx,
    fuse_weights,
    inexact_layers,
    run_onnx,
)
from norm_det.weights.formats import (
    BackboneWeights,
    read_checkpoint,
    read_state_dict,
    to_framework,
    write_checkpoint,
)
from norm_det.weights.io import load_file, save_file
from norm_det.weights.keymaps import FRAMEWORKS
from norm_det.weights.warm_start import (
    calibrate,
    convert_weights,
    load_pretrained_backbone,
    output_agreement,
    pretrained_reference,
    warm_start,
)

__all__ = [
    "FRAMEWORKS",
    "BackboneWeights",
    "calibrate",
    "convert_weights",
    "deploy_config",
    "export_onnx",
    "find_backbone",
    "fuse_weights",
    "inexact_layers",
    "infer_scheme",
    "load_backbone_tensors",
    "load_file",
    "load_pretrained_backbone",
    "output_agreement",
    "pretrained_reference",
    "read_checkpoint",
    "read_state_dict",
    "run_onnx",
    "save_file",
    "to_framework",
    "warm_start",
    "write_checkpoint",
]
