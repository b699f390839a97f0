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
- ``carries_activation: bool`` (normalization-activation layers: FRN + TLU, EvoNorm, NF's
  scaled activation): the layer applies the activation that follows the norm, so the model
  puts it in place of "norm, then ReLU" and keeps an
  :class:`~norm_det.layers.protocol.ActivationInNorm` in the ReLU's slot.
- ``pair_with(conv)`` (optional, norms whose statistics depend on the preceding convolution's
  weights: CBN): the builders and :func:`norm_det.surgery.convert` tell the norm its convolution.
- A norm whose eval transform is no affine map (per-sample statistics: GN-like layers, FRN,
  EvoNorm with its activation, BCN) has ``folded_affine()`` return None; that is also how model
  surgery recognises it as the norm after a convolution.
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
from norm_det.layers.bcn import BatchChannelNorm2d
from norm_det.layers.cbn import CrossIterationBatchNorm2d
from norm_det.layers.czm import CZMConv2d, MultiplicativeNoise, czm_conv2d, czm_param_groups
from norm_det.layers.deconv import DeconvConv2d, DeconvConvTranspose2d, DeconvLinear
from norm_det.layers.evonorm import EvoNormB0, EvoNormS0
from norm_det.layers.frn import FilterResponseNorm2d
from norm_det.layers.frozen_bn import FrozenBatchNorm2d, convert_frozen_batchnorm
from norm_det.layers.group_norm import GroupNorm
from norm_det.layers.isqrt import inverse_sqrt
from norm_det.layers.iternorm import IterNorm
from norm_det.layers.mabn import CenteredConv2d, MovingAverageBatchNorm2d
from norm_det.layers.nf import ScaledActivation, ScaledStdConv2d
from norm_det.layers.protocol import (
    collect_step_losses,
    no_weight_decay_parameters,
    prepare_optimizer_step,
    track_step_layers,
)
from norm_det.layers.pws import PWSConv2d
from norm_det.layers.weight_std import WSConv2d

__all__ = [
    "BatchChannelNorm2d",
    "CZMConv2d",
    "CenteredConv2d",
    "CrossIterationBatchNorm2d",
    "DeconvConv2d",
    "DeconvConvTranspose2d",
    "DeconvLinear",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm2d",
    "FrozenBatchNorm2d",
    "GroupNorm",
    "IterNorm",
    "MovingAverageBatchNorm2d",
    "MultiplicativeNoise",
    "PWSConv2d",
    "ScaledActivation",
    "ScaledStdConv2d",
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
