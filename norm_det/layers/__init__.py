"""Pure-torch normalization and reparametrized layers.

Nothing in this package imports torchvision, detectron2, mmcv or a config object.

Every layer follows a small duck-typed protocol, so that the optimizer, the trainer and the model
surgery can treat all schemes alike without knowing any of them:

- ``_no_weight_decay: tuple[str, ...]`` (class attribute): names of the layer's own parameters
  that must not be weight-decayed (PWS ``alpha``, norm affine parameters, CZM ``g``/``v``).
- ``fuse() -> nn.Module``: a plain torch module (``nn.Conv2d``, ``nn.Linear``,
  ``nn.ConvTranspose2d``, ``nn.BatchNorm2d``, ``nn.GroupNorm``) computing the same function in
  eval mode, holding no norm_det class.
- ``folded_affine() -> (scale, shift)`` (norms whose eval output is affine per position): the
  norm computes ``y = scale * x + shift`` per channel when ``scale`` is ``(C,)``, or
  ``y = scale @ x + shift`` over channels when ``scale`` is ``(C, C)``; used to fold the norm
  into the preceding convolution.
- ``load_plain_weights(weight, bias)`` (optional, reparametrized layers): set the layer's
  parameters so that it reproduces a plain layer with these weights as closely as the
  reparametrization allows.
- ``before_optimizer_step() -> dict[str, Tensor] | None`` (optional): the layer's own work at
  every optimizer step, on the step's complete gradients (CZM: LUMA's gradient, then CZMG). The
  layer calls :func:`~norm_det.layers.protocol.track_step_layers` on itself when it is made;
  torch's global optimizer step pre-hook then runs it once per ``optimizer.step()`` of any
  optimizer that holds one of its parameters, in any training loop, with no call from the loop.
  It returns the values of the penalties whose gradients it added (``{"loss_luma": ...}``),
  which are kept in the layer's ``step_losses`` for logging.

  No layer asks the training loop for anything (an extra loss term to add, a call after
  backward): detectron2's and mmengine's loops would not make it.

:mod:`norm_det.layers.protocol` holds the helpers that walk a model for these.
"""

from norm_det.layers.batch_norm import SyncBatchNorm
from norm_det.layers.czm import CZMConv2d, MultiplicativeNoise, czm_conv2d, czm_param_groups
from norm_det.layers.deconv import DeconvConv2d, DeconvConvTranspose2d, DeconvLinear
from norm_det.layers.frozen_bn import FrozenBatchNorm2d, convert_frozen_batchnorm
from norm_det.layers.group_norm import GroupNorm
from norm_det.layers.isqrt import inverse_sqrt
from norm_det.layers.iternorm import IterNorm
from norm_det.layers.protocol import (
    collect_step_losses,
    no_weight_decay_parameters,
    prepare_optimizer_step,
    track_step_layers,
)
from norm_det.layers.pws import PWSConv2d
from norm_det.layers.weight_std import WSConv2d

__all__ = [
    "CZMConv2d",
    "DeconvConv2d",
    "DeconvConvTranspose2d",
    "DeconvLinear",
    "FrozenBatchNorm2d",
    "GroupNorm",
    "IterNorm",
    "MultiplicativeNoise",
    "PWSConv2d",
    "SyncBatchNorm",
    "WSConv2d",
    "collect_step_losses",
    "convert_frozen_batchnorm",
    "czm_conv2d",
    "czm_param_groups",
    "inverse_sqrt",
    "no_weight_decay_parameters",
    "prepare_optimizer_step",
    "track_step_layers",
]
