"""Model surgery: convert any ``nn.Module`` to a scheme, and fuse a model for inference.

:func:`convert` walks a model the way its own code registers layers. A convolution is a
conv+norm pair with

- the norm directly after it in its parent's registration order, over the same channels, as in
  torchvision's ResNet (``conv1``, ``bn1``), ``Conv2dNormActivation``, ``downsample`` and mmdet's
  blocks;
- or the norm it holds as its attribute ``norm`` and applies itself, together with its
  ``activation``, as detectron2's ``Conv2d`` does.

Each pair becomes the scheme's pair; lone convolutions, linear and transposed-convolution layers
become the scheme's where the scheme replaces them. Where a scheme's layers go is the rule of
:mod:`norm_det.schemes`, the one every route follows (norm_det's builders, the detectron2 and
mmdet integrations call :func:`convert`): the convolution on the image follows
:func:`~norm_det.schemes.image_conv_scheme`, the predictors (found by :func:`is_predictor`, a
registry of heads of torchvision, detectron2, mmdet, mmseg and norm_det) follow
:func:`~norm_det.schemes.predictor_scheme` and keep the model's weights, and the scheme's
``residual_input`` goes in front of every residual unit. A layer that already is what the scheme
builds in its place is left as it is, so converting a model built with the scheme (through
mmdet's registry types, say) changes only what its builder could not reach. Weights are carried
over as far as the math allows:

- norm -> same-statistics norm (BN -> FrozenBN, BN -> SyncBN, FrozenBN -> BN): exact;
- norm -> a norm without statistics (GN): the affine parameters are kept, the statistics dropped;
- norm -> no norm (PWS, ND/ND++, ``none``): the norm's eval transform is folded into the
  convolution's weight and bias, which the new layer then reproduces as far as its
  reparametrization allows (exact for ``none``);
- reparametrized convolutions (WS, PWS, ...) are first reduced to their effective plain weight.

Layers are changed in place: a replaced module object takes on the new layer's class and state,
so the model, its module paths, its checkpoint keys and every reference to a layer (detectron2
keeps some in plain Python lists too) stay valid. A convolution that the scheme keeps plain keeps
the model's own class (detectron2's ``Conv2d``, mmcv's wrapper), only its weights change.

:func:`fuse` folds every scheme back into plain torch layers (and the model's own convolution
classes) for deployment. Neither function knows a concrete scheme: they use the protocol of
:mod:`norm_det.layers`.

A norm that is not the scheme's (the PWS release's stem GroupNorm) is marked with
:func:`keep_norm`; ``convert`` leaves it as it is.

The package, one concept a file: :mod:`~norm_det.surgery.queries` (what a module is, its
weights), :mod:`~norm_det.surgery.predictors`, :mod:`~norm_det.surgery.kept_norms`,
:mod:`~norm_det.surgery.pairs` (conv+norm pairs and ReLU slots among a parent's children),
:mod:`~norm_det.surgery.units` (one pair converted), :mod:`~norm_det.surgery.lone_layers`,
:mod:`~norm_det.surgery.framework_convs` (convolutions that apply their own norm),
:mod:`~norm_det.surgery.selection` (``include`` / ``exclude``),
:mod:`~norm_det.surgery.placement` (a new layer in an old one's place),
:mod:`~norm_det.surgery.converter` (the walk, :func:`convert`),
:mod:`~norm_det.surgery.residual` and :mod:`~norm_det.surgery.fusing` (:func:`fuse`).
"""

from norm_det.surgery.converter import convert
from norm_det.surgery.framework_convs import _rebuild as _rebuild
from norm_det.surgery.fusing import fuse
from norm_det.surgery.kept_norms import is_kept_norm, keep_norm
from norm_det.surgery.predictors import is_predictor, predictor_paths, register_predictor
from norm_det.surgery.queries import (
    attached_norm,
    effective_weights,
    fold_affine_into,
    folded_affine,
    is_conv,
    is_norm,
    load_plain_weights,
    norm_channels,
)
from norm_det.surgery.residual import insert_residual_inputs

# _rebuild loads the layers pickled (as norm_det.surgery._rebuild) before
# norm_det.utils.runtime_classes named the classes it makes.
__all__ = [
    "attached_norm",
    "convert",
    "effective_weights",
    "fold_affine_into",
    "folded_affine",
    "fuse",
    "insert_residual_inputs",
    "is_conv",
    "is_kept_norm",
    "is_norm",
    "is_predictor",
    "keep_norm",
    "load_plain_weights",
    "norm_channels",
    "predictor_paths",
    "register_predictor",
]
