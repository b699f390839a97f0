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
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from norm_det.activation_blocks import activated_children, knows_block, leave_out_carried_relus
from norm_det.layers.protocol import ActivationInNorm, track_step_layers
from norm_det.schemes import (
    Scheme,
    carries_activation,
    get_scheme,
    image_conv_scheme,
    pair_norm,
    predictor_scheme,
)

_PLAIN_TYPES = (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)
# Layers `convert` must not silently skip when the user asked for them with `include`.
_UNSUPPORTED_TYPES = (
    nn.Conv1d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose3d,
    nn.BatchNorm1d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)
# The image convolution has at most this many input channels (an RGB or a grayscale image).
_IMAGE_CHANNELS = 3


# ---------------------------------------------------------------------------------------------
# What a module is.


def is_conv(module: nn.Module) -> bool:
    """A 2-d convolution: ``nn.Conv2d`` or any subclass (norm_det's reparametrized convs)."""
    return isinstance(module, nn.Conv2d)


def _is_frozen_bn_like(module: nn.Module) -> bool:
    # torchvision's and detectron2's FrozenBatchNorm2d hold the four tensors as buffers.
    return "BatchNorm" in type(module).__name__ and all(
        isinstance(getattr(module, name, None), torch.Tensor)
        for name in ("weight", "bias", "running_mean", "running_var")
    )


def is_norm(module: nn.Module) -> bool:
    """A 2-d norm layer that follows a convolution: BN, SyncBN, FrozenBN, GN, IterNorm, ..."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm3d)):
        return False
    return (
        isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
        or hasattr(module, "folded_affine")
        or _is_frozen_bn_like(module)
    )


def norm_channels(module: nn.Module) -> int | None:
    """Channels a norm layer normalizes."""
    for attribute in ("num_features", "num_channels"):
        value = getattr(module, attribute, None)
        if isinstance(value, int):
            return value
    return None


def attached_norm(conv: nn.Module) -> nn.Module | None:
    """The norm that convolution ``conv`` holds as its child ``norm`` and applies itself.

    detectron2's ``Conv2d`` computes ``activation(norm(conv(x)))`` with ``conv.norm`` and
    ``conv.activation``; such a convolution is a conv+norm pair on its own. None when ``conv``
    holds no norm over its output channels.
    """
    norm = conv._modules.get("norm")
    if norm is not None and is_norm(norm) and norm_channels(norm) == conv.out_channels:
        return norm
    return None


def folded_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale, shift)`` of a norm's eval transform, or None when it depends on the sample.

    ``scale`` is ``(C,)`` (per channel) or ``(C, C)`` (mixing channels, IterNorm).
    """
    if hasattr(norm, "folded_affine"):
        return norm.folded_affine()
    stats = getattr(norm, "running_var", None)
    if stats is None or not (
        isinstance(norm, nn.modules.batchnorm._BatchNorm) or _is_frozen_bn_like(norm)
    ):
        return None
    weight = norm.weight if norm.weight is not None else torch.ones_like(stats)
    bias = norm.bias if norm.bias is not None else torch.zeros_like(stats)
    scale = weight * torch.rsqrt(norm.running_var + norm.eps)
    return scale, bias - norm.running_mean * scale


def effective_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias of the plain layer that ``layer`` computes in eval mode."""
    plain = layer.fuse() if hasattr(layer, "fuse") else layer
    return plain.weight.detach(), None if plain.bias is None else plain.bias.detach()


def fold_affine_into(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``affine(conv(x))`` for a conv ``(C_out, ...)`` and a norm's affine."""
    bias = torch.zeros_like(shift) if bias is None else bias
    if scale.dim() == 1:
        return weight * scale.view(-1, *([1] * (weight.dim() - 1))), bias * scale + shift
    return torch.einsum("oc,c...->o...", scale, weight), scale @ bias + shift


def load_plain_weights(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Make ``layer`` reproduce a plain layer with ``weight`` and ``bias`` (see layer protocol)."""
    if hasattr(layer, "load_plain_weights"):
        layer.load_plain_weights(weight, bias)
        return
    with torch.no_grad():
        layer.weight.copy_(weight)
        if layer.bias is not None:
            if bias is None:
                layer.bias.zero_()
            else:
                layer.bias.copy_(bias)


def _first_tensor(module: nn.Module) -> torch.Tensor | None:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor
    return None


def _is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` has parameters and none of them is trained."""
    parameters = list(module.parameters())
    return bool(parameters) and not any(p.requires_grad for p in parameters)


def _place_like(new: nn.Module, old: nn.Module, frozen: bool | None = None) -> nn.Module:
    """``new`` on ``old``'s device and dtype and in its mode; frozen as ``old`` (or ``frozen``)."""
    reference = _first_tensor(old)
    if reference is not None:
        new = new.to(device=reference.device, dtype=reference.dtype)
    if frozen is None:
        frozen = _is_frozen(old)
    if frozen:
        new.requires_grad_(False)
    return new.train(old.training)


def _become(old: nn.Module, new: nn.Module) -> None:
    """Turn the module object ``old`` into ``new``: ``new``'s class and state, ``old``'s identity.

    Every reference to ``old`` (its parents, and plain Python lists and attributes such as
    detectron2's ``FPN.lateral_convs`` or ``FastRCNNConvFCHead.fcs``) then reaches the new layer,
    where assigning the parent's attribute would leave those on the old one. ``new`` must not be
    used afterwards.
    """
    if new is not old:
        old.__class__ = type(new)
        old.__dict__ = new.__dict__


# ---------------------------------------------------------------------------------------------
# A scheme's convolution in the place of a convolution that applies its own norm and activation.


def _applies_own_extras(conv: nn.Conv2d) -> bool:
    # detectron2's Conv2d sets both attributes (None when unused) and applies them; nn.Conv2d
    # applies neither, whatever a model stores on it.
    return _model_conv_class(conv) is not nn.Conv2d and any(
        name in conv.__dict__ or name in conv._modules for name in ("norm", "activation")
    )


def _applies_activation(conv: nn.Module) -> bool:
    return getattr(conv, "activation", None) is not None


def _model_conv_class(conv: nn.Conv2d) -> type[nn.Conv2d]:
    """The model's own class behind convolution ``conv``: what :func:`fuse` makes it again.

    ``nn.Conv2d`` for norm_det's layers; the framework's class (detectron2's ``Conv2d``) for a
    scheme convolution :func:`convert` put in its place.
    """
    if isinstance(conv, _AppliesNormActivation):
        return type(conv)._model_class
    return nn.Conv2d if hasattr(conv, "fuse") else type(conv)


class _AppliesNormActivation:
    """Mixin: a scheme's convolution followed by ``self.norm`` and ``self.activation``.

    :func:`convert` gives a scheme's convolution this behaviour where it replaces a convolution
    whose class (``_model_class``, detectron2's ``Conv2d``) applied both in its forward; either
    may be None. The classes are made on demand, one per (scheme conv class, model class).
    """

    _model_class: type[nn.Conv2d] = nn.Conv2d
    _conv_class: type[nn.Conv2d] = nn.Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (N, C_in, H, W) -> activation(norm(conv(x))): (N, C_out, H', W')``."""
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def fuse(self) -> nn.Conv2d:
        """The model's convolution class with the plain weights, the fused norm, the activation.

        The norm is not folded into the weights here (the layer protocol's ``fuse`` keeps the
        convolution's own weights); :func:`fuse` folds it.
        """
        plain = super().fuse()
        norm = self.norm.fuse() if hasattr(self.norm, "fuse") else self.norm
        return _in_model_class(plain, self._model_class, norm, self.activation)

    def __reduce_ex__(self, protocol: int) -> tuple[Any, ...]:
        # The class is made at run time, so pickle (and deepcopy) name the classes it is made of.
        return _rebuild, (self._conv_class, self._model_class), self.__dict__


_FORMS: dict[tuple[type, type], type] = {}


def _applying_norm_activation(
    conv_class: type[nn.Conv2d], model_class: type[nn.Conv2d]
) -> type[nn.Conv2d]:
    """``conv_class`` that also applies ``norm`` and ``activation``, fused to ``model_class``."""
    key = (conv_class, model_class)
    if key not in _FORMS:
        _FORMS[key] = type(
            conv_class.__name__,
            (_AppliesNormActivation, conv_class),
            {
                "__module__": __name__,
                "__doc__": conv_class.__doc__,
                "_conv_class": conv_class,
                "_model_class": model_class,
            },
        )
    return _FORMS[key]


def _rebuild(conv_class: type[nn.Conv2d], model_class: type[nn.Conv2d]) -> nn.Module:
    cls = _applying_norm_activation(conv_class, model_class)
    return cls.__new__(cls)


def _in_model_class(
    conv: nn.Conv2d,
    model_class: type[nn.Conv2d],
    norm: nn.Module | None,
    activation: Any,
) -> nn.Conv2d:
    """A new convolution ``conv`` (plain or a scheme's) in the contract of ``model_class``.

    ``model_class`` needs no state but ``nn.Conv2d``'s, ``norm`` and ``activation`` (as
    detectron2's ``Conv2d``): a plain ``conv`` becomes an instance of it.
    """
    if type(conv) is nn.Conv2d:
        conv.__class__ = model_class
    else:
        conv.__class__ = _applying_norm_activation(type(conv), model_class)
    conv.norm = norm
    conv.activation = activation
    return conv


# ---------------------------------------------------------------------------------------------
# Predictors: the last layer of a head, kept plain unless the scheme replaces predictors.

# (root package, class name) -> attributes that hold predictors (a layer, or a container of
# them). A class matches through its MRO, so subclasses (mmdet's Shared2FCBBoxHead of BBoxHead)
# are covered; names, not imports, so no framework is imported.
_PREDICTORS: dict[tuple[str, str], tuple[str, ...]] = {}


def register_predictor(owner: type | str, *attributes: str) -> None:
    """Declare that ``owner``'s children ``attributes`` are predictors.

    Args:
        owner: a head class, or ``"package.ClassName"`` with the class's top-level package
            (``"mmdet.BBoxHead"``), which spares importing the framework.
        attributes: child names; a child that is a container makes every layer in it a
            predictor (SSD's per-level classifiers).

    Raises:
        ValueError: ``owner`` is a string without a package, or no attribute is given.
    """
    if isinstance(owner, type):
        key = (owner.__module__.split(".")[0], owner.__name__)
    else:
        package, _, name = str(owner).rpartition(".")
        if not package or not name:
            raise ValueError(
                f"register_predictor: owner must be a class or 'package.ClassName'; got {owner!r}"
            )
        key = (package.split(".")[0], name)
    if not attributes or not all(isinstance(a, str) and a for a in attributes):
        raise ValueError(
            f"register_predictor({owner!r}): give the names of the predictor children; "
            f"got {attributes!r}"
        )
    _PREDICTORS[key] = tuple(dict.fromkeys((*_PREDICTORS.get(key, ()), *attributes)))


for _owner, _attributes in (
    # torchvision
    ("torchvision.FastRCNNPredictor", ("cls_score", "bbox_pred")),
    ("torchvision.MaskRCNNPredictor", ("mask_fcn_logits",)),
    ("torchvision.KeypointRCNNPredictor", ("kps_score_lowres",)),
    ("torchvision.RPNHead", ("cls_logits", "bbox_pred")),
    ("torchvision.SSDScoringHead", ("module_list",)),
    ("torchvision.RetinaNetClassificationHead", ("cls_logits",)),
    ("torchvision.RetinaNetRegressionHead", ("bbox_reg",)),
    ("torchvision.FCOSClassificationHead", ("cls_logits",)),
    ("torchvision.FCOSRegressionHead", ("bbox_reg", "bbox_ctrness")),
    ("torchvision.DeepLabHead", ("4",)),
    ("torchvision.FCNHead", ("4",)),
    # detectron2
    ("detectron2.FastRCNNOutputLayers", ("cls_score", "bbox_pred")),
    ("detectron2.BaseMaskRCNNHead", ("predictor",)),
    ("detectron2.StandardRPNHead", ("objectness_logits", "anchor_deltas")),
    ("detectron2.RetinaNetHead", ("cls_score", "bbox_pred")),
    ("detectron2.SemSegFPNHead", ("predictor",)),
    ("detectron2.KRCNNConvDeconvUpsampleHead", ("score_lowres",)),
    # mmdet / mmseg
    ("mmdet.BBoxHead", ("fc_cls", "fc_reg")),
    ("mmdet.FCNMaskHead", ("conv_logits",)),
    ("mmdet.AnchorHead", ("conv_cls", "conv_reg")),
    ("mmdet.RPNHead", ("rpn_cls", "rpn_reg")),
    ("mmdet.RetinaHead", ("retina_cls", "retina_reg")),
    ("mmdet.SSDHead", ("cls_convs", "reg_convs")),
    ("mmseg.BaseDecodeHead", ("conv_seg",)),
    # norm_det's own heads (norm_det.modeling.heads); its SSD head holds torchvision's
    # SSDScoringHead, covered above.
    ("norm_det.FastRCNNPredictor", ("cls_score", "bbox_pred")),
    ("norm_det.MaskRCNNPredictor", ("mask_fcn_logits",)),
    ("norm_det.RPNHead", ("cls_logits", "bbox_pred")),
    ("norm_det.DeepLabV3Head", ("predictor",)),
):
    register_predictor(_owner, *_attributes)


def is_predictor(parent: nn.Module, name: str) -> bool:
    """Whether ``parent``'s child ``name`` is (or holds) a registered predictor."""
    for cls in type(parent).__mro__:
        attributes = _PREDICTORS.get((cls.__module__.split(".")[0], cls.__name__))
        if attributes is not None and name in attributes:
            return True
    return False


def predictor_paths(model: nn.Module) -> list[str]:
    """Module paths of the predictors in ``model`` (containers of predictors included)."""
    return [
        f"{path}.{name}" if path else name
        for path, parent in model.named_modules()
        for name, _ in parent.named_children()
        if is_predictor(parent, name)
    ]


def _layer_class(layer: nn.Module) -> type:
    """The class ``layer`` is an instance of, seen through a norm-and-activation form."""
    return layer._conv_class if isinstance(layer, _AppliesNormActivation) else type(layer)


def _same_layer(old: nn.Module, new: nn.Module) -> bool:
    """``old`` already is what ``new`` would be: the same class with the same options."""
    return _layer_class(old) is type(new) and old.extra_repr() == new.extra_repr()


# ---------------------------------------------------------------------------------------------
# convert


class _Selection:
    """Which module paths the user asked to convert (glob patterns; a prefix selects a subtree)."""

    def __init__(self, include: Sequence[str] | None, exclude: Sequence[str] | None) -> None:
        self.include = None if include is None else _as_patterns(include, "include")
        self.exclude = _as_patterns(exclude or (), "exclude")

    @staticmethod
    def _matches(path: str, patterns: Iterable[str]) -> bool:
        return any(
            fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p + ".*") for p in patterns
        )

    def explicitly_included(self, path: str) -> bool:
        return self.include is not None and self._matches(path, self.include)

    def __call__(self, path: str) -> bool:
        if self._matches(path, self.exclude):
            return False
        return self.include is None or self._matches(path, self.include)


def _as_patterns(patterns: str | Sequence[str], argument: str) -> tuple[str, ...]:
    if isinstance(patterns, str):
        return (patterns,)
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(
            f"convert: {argument} must be module-path patterns (strings); got {patterns!r}"
        )
    return tuple(patterns)


def _conv_kwargs(conv: nn.Conv2d) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups
    )
    if conv.padding_mode != "zeros":
        kwargs["padding_mode"] = conv.padding_mode
    return kwargs


def _new_conv(factory: Callable[..., nn.Module], conv: nn.Conv2d, bias: bool) -> nn.Module:
    """``factory``'s convolution with ``conv``'s geometry (a fresh layer, not placed)."""
    return factory(
        conv.in_channels, conv.out_channels, conv.kernel_size, bias=bias, **_conv_kwargs(conv)
    )


def _built_norm(factory: Callable[[int], nn.Module], channels: int, where: str) -> nn.Module:
    """``factory(channels)``; its ValueError (GN groups that do not divide) names ``where``."""
    try:
        return factory(channels)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error


def _transfer_norm(source: nn.Module, target: nn.Module) -> None:
    """Copy the tensors the two norms share (affine parameters, statistics) with equal shapes."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src, dst = getattr(source, name, None), getattr(target, name, None)
            if (
                isinstance(src, torch.Tensor)
                and isinstance(dst, torch.Tensor)
                and src.shape == dst.shape
            ):
                dst.copy_(src)


# Containers whose forward runs their children in registration order, besides nn.Sequential:
# torchvision's IntermediateLayerGetter (a ResNet trunk's stem), mmcv's ConvModule (conv, norm,
# activate in its default order).
_IN_ORDER_CONTAINERS = ("IntermediateLayerGetter", "ConvModule")


def _runs_in_order(parent: nn.Module) -> bool:
    """Whether ``parent``'s forward applies its children one after another in their order."""
    if type(parent).__name__ == "ConvModule":
        return tuple(getattr(parent, "order", ())) == ("conv", "norm", "act")
    return isinstance(parent, nn.Sequential) or type(parent).__name__ in _IN_ORDER_CONTAINERS


def _activation_slot(children: list[tuple[str, nn.Module]], index: int) -> nn.Module | None:
    """The ReLU (or :class:`ActivationInNorm`) at ``children[index]``, in a parent that runs its
    children in order, so that it is applied to the output of the child before it."""
    slot = children[index][1] if index < len(children) else None
    return slot if isinstance(slot, (nn.ReLU, ActivationInNorm)) else None


def _own_relu(conv: nn.Module) -> bool:
    """Whether ``conv`` applies a ReLU after its own norm (detectron2's ``Conv2d`` with an
    ``activation``), or keeps the place of one that its norm now carries."""
    activation = getattr(conv, "activation", None)
    return activation in (F.relu, F.relu_, torch.relu, torch.relu_) or isinstance(
        activation, (nn.ReLU, ActivationInNorm)
    )


def _is_sibling_pair(conv: nn.Module, following: nn.Module | None) -> bool:
    """``conv`` followed by the norm ``following`` in their parent: one conv+norm pair."""
    return (
        is_conv(conv)
        and following is not None
        and is_norm(following)
        and norm_channels(following) == conv.out_channels
        # A convolution with a norm or activation of its own is not directly followed by it.
        and attached_norm(conv) is None
        and not _applies_activation(conv)
    )


def _is_empty_norm_unit(
    children: list[tuple[str, nn.Module]], index: int, scheme: Scheme, in_order: bool
) -> bool:
    """``children[index]`` is the ``conv`` of a norm-free scheme's conv+norm unit (norm_det's
    ``ConvNormAct``: ``conv``, then an empty ``norm`` slot) and ``scheme`` puts a norm there."""
    if not in_order or scheme.norm is None or index + 1 >= len(children):
        return False
    (name, conv), (next_name, following) = children[index], children[index + 1]
    return (
        (name, next_name) == ("conv", "norm")
        and type(following) is nn.Identity
        and is_conv(conv)
        and attached_norm(conv) is None
    )


def _take_shift(norm: nn.Module, shift: torch.Tensor) -> None:
    """Give the new ``norm`` the bias ``shift`` its convolution gave up.

    A norm with running statistics in eval computes ``(y - mean) / sqrt(var + eps)`` (then its
    affine transform): with ``mean = -shift``, ``var = 1 - eps`` and the identity affine it
    computes ``y + shift``, exactly what the convolution's bias did. A norm without statistics
    (GN) cannot reproduce it; its affine shift takes the bias.
    """
    with torch.no_grad():
        mean = getattr(norm, "running_mean", None)
        if isinstance(mean, torch.Tensor) and mean.numel() == shift.numel():
            mean.copy_(-shift.reshape(mean.shape))
            variance = getattr(norm, "running_var", None)
            if isinstance(variance, torch.Tensor):
                variance.fill_(1.0 - float(getattr(norm, "eps", 0.0)))
            return
        bias = getattr(norm, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.numel() == shift.numel():
            bias.copy_(shift.reshape(bias.shape))


class _Converter:
    """One walk of :func:`convert`; its predictors are converted by ``self.predictors``."""

    def __init__(
        self,
        scheme: Scheme,
        selection: _Selection,
        image_conv: str | None,
        keep_weights: bool,
        seen: set[int] | None = None,
        predictor_walk: bool = False,
    ) -> None:
        self.scheme = scheme
        self.selection = selection
        self.image_conv = image_conv
        self.keep_weights = keep_weights
        self.seen: set[int] = set() if seen is None else seen
        # Conv+norm pairs where the model's own forward decides whether a ReLU follows, so a
        # scheme's norm_act cannot replace norm and ReLU together (convert warns).
        self.unplaced_activations: list[str] = []
        # Predictors keep the model's weights whatever keep_weights says: a detector starts them
        # near zero output, a property of the detector, not of the normalization.
        self.predictors = (
            self
            if predictor_walk
            else _Converter(
                predictor_scheme(scheme), selection, None, True, self.seen, predictor_walk=True
            )
        )

    def conv(
        self, conv: nn.Conv2d, norm: nn.Module | None, path: str, activated: bool = False
    ) -> tuple[nn.Module, nn.Module | None]:
        """Convert convolution ``conv`` followed by ``norm`` (None: a lone convolution).

        Args:
            activated: a ReLU that :func:`convert` can replace follows ``norm`` (its slot in a
                container that runs its children in order, or a norm that carries it): a
                scheme's ``norm_act`` goes there.

        Returns:
            ``(conv's replacement, norm's replacement)``. The first is ``conv`` itself where the
            scheme keeps a plain convolution: the model's own is kept, its weights changed in
            place. The second is the scheme's norm, or None where the scheme has none; when
            ``norm`` is the one ``conv`` holds (:func:`attached_norm`), the replacement holds it.
        """
        lone = norm is None
        empty_slot = type(norm) is nn.Identity  # a norm-free scheme's unit
        attached = not lone and norm is attached_norm(conv)
        scheme = image_conv_scheme(self.scheme) if path == self.image_conv else self.scheme
        factory = nn.Conv2d if lone and not scheme.replaces_lone_convs else scheme.conv
        if lone and factory is nn.Conv2d and not hasattr(conv, "fuse"):
            return conv, None
        carried = activated and scheme.norm_act is not None
        norm_factory = None if lone else scheme.norm_act if carried else scheme.norm
        weight, bias = effective_weights(conv)
        shift = None
        if empty_slot and bias is not None and not scheme.conv_bias:
            shift, bias = bias, None  # the new norm takes it (_take_shift)
        if lone or scheme.norm is not None:
            # The scheme's own convolutions carry a bias where it says so (ND's, lone or not).
            own_bias = bool(scheme.conv_bias) and (not lone or factory is not nn.Conv2d)
            with_bias = bias is not None or own_bias
        else:
            # The norm goes: the convolution takes over its eval transform, shift included.
            with_bias = True
            affine = folded_affine(norm)
            if affine is not None and self.keep_weights:
                weight, bias = fold_affine_into(weight, bias, *affine)

        replacement = None if factory is nn.Conv2d else _new_conv(factory, conv, with_bias)
        plain = replacement is None or type(replacement) is nn.Conv2d
        kept_plain = plain and not hasattr(conv, "fuse")
        new_norm = None
        if norm_factory is not None:
            where = f"the norm after convolution '{path}'"
            new_norm = _built_norm(norm_factory, conv.out_channels, where)
        if self._already_built(conv, norm, kept_plain, replacement, new_norm):
            return conv, norm
        if new_norm is not None:
            new_norm = self._placed_norm(new_norm, norm, conv)
            if shift is not None and self.keep_weights:
                _take_shift(new_norm, shift)
        if kept_plain:
            self._set_plain_weights(conv, weight, bias, with_bias)
            replacement = conv
        else:
            if replacement is None:
                replacement = _new_conv(nn.Conv2d, conv, with_bias)
            replacement = _place_like(replacement, conv)
            if self.keep_weights:
                load_plain_weights(replacement, weight, bias)
            if _applies_own_extras(conv):
                replacement = _in_model_class(
                    replacement,
                    _model_conv_class(conv),
                    getattr(conv, "norm", None),
                    getattr(conv, "activation", None),
                )
        if attached:
            replacement.norm = new_norm
            if activated and _own_relu(conv):
                # detectron2's Conv2d applying norm and ReLU: the ReLU's place is kept.
                carried = new_norm is not None and carries_activation(new_norm)
                activation = getattr(conv, "activation", None)
                if carried:
                    replacement.activation = ActivationInNorm()
                elif activation is None or isinstance(activation, ActivationInNorm):
                    replacement.activation = nn.ReLU()
        pair_norm(new_norm, replacement)
        return replacement, new_norm

    @staticmethod
    def _already_built(
        conv: nn.Module,
        norm: nn.Module | None,
        kept_plain: bool,
        replacement: nn.Module | None,
        new_norm: nn.Module | None,
    ) -> bool:
        """Whether ``conv`` (and ``norm``) already are the layers the scheme builds there."""
        if not (kept_plain or (replacement is not None and _same_layer(conv, replacement))):
            return False
        if norm is None:
            return True
        return new_norm is not None and _same_layer(norm, new_norm)

    def _set_plain_weights(
        self,
        conv: nn.Conv2d,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        with_bias: bool,
    ) -> None:
        if with_bias and conv.bias is None:
            conv.bias = nn.Parameter(
                conv.weight.new_zeros(conv.out_channels),
                requires_grad=conv.weight.requires_grad,
            )
        elif not with_bias and conv.bias is not None:
            conv.register_parameter("bias", None)  # its bias went to the new norm
        if self.keep_weights:
            load_plain_weights(conv, weight, bias)

    def _placed_norm(self, new: nn.Module, old: nn.Module, conv: nn.Module) -> nn.Module:
        """The scheme's norm ``new`` in the place of ``old``, the norm after ``conv``."""
        # A norm without parameters (FrozenBN) is frozen when its convolution is.
        frozen = _is_frozen(old) or (not any(True for _ in old.parameters()) and _is_frozen(conv))
        new = _place_like(new, old, frozen=frozen)
        if self.keep_weights:
            _transfer_norm(old, new)
        return new

    def lone(self, module: nn.Module, path: str, activated: bool = False) -> nn.Module:
        """The replacement of a layer that is no conv+norm pair (``module`` itself: kept).

        ``activated``: the parent's forward follows the layer (a convolution with the norm it
        applies itself, or a norm) by a ReLU: a scheme's ``norm_act`` goes there.
        """
        if is_conv(module):
            norm = attached_norm(module)
            activated = norm is not None and (activated or _own_relu(module))
            return self.conv(module, norm, path, activated)[0]
        if isinstance(module, nn.Linear) and (type(module) is nn.Linear or hasattr(module, "fuse")):
            if self.scheme.linear is nn.Linear and type(module) is nn.Linear:
                return module
            weight, bias = effective_weights(module)
            new = self.scheme.linear(module.in_features, module.out_features, bias=bias is not None)
            return module if _same_layer(module, new) else self._placed(new, module, weight, bias)
        if isinstance(module, nn.ConvTranspose2d):
            if (
                self.scheme.conv_transpose is nn.ConvTranspose2d
                and type(module) is nn.ConvTranspose2d
            ):
                return module
            weight, bias = effective_weights(module)
            new = self.scheme.conv_transpose(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                output_padding=module.output_padding,
                groups=module.groups,
                bias=bias is not None,
                dilation=module.dilation,
            )
            return module if _same_layer(module, new) else self._placed(new, module, weight, bias)
        carried = activated and self.scheme.norm_act is not None
        factory = self.scheme.norm_act if carried else self.scheme.norm
        if activated and is_norm(module) and factory is None:
            # A pre-activation unit's norm (no convolution before it, a ReLU after it): a
            # norm-free scheme's own networks have none there, and nothing can hold it.
            return nn.Identity()
        if is_norm(module) and factory is not None:
            channels = norm_channels(module)
            if channels is None:
                return module
            new = _built_norm(factory, channels, f"norm '{path}'")
            if _same_layer(module, new):
                return module
            new = _place_like(new, module)
            if self.keep_weights:
                _transfer_norm(module, new)
            return new
        return module

    def _placed(
        self, new: nn.Module, old: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> nn.Module:
        new = _place_like(new, old)
        if self.keep_weights:
            load_plain_weights(new, weight, bias)
        return new

    def walk(self, parent: nn.Module, prefix: str) -> None:
        children = list(parent.named_children())
        # The children a framework block's own forward follows by a ReLU, where it is known.
        activated_names = activated_children(parent)
        in_order = _runs_in_order(parent)
        known = in_order or knows_block(parent)
        index = 0
        while index < len(children):
            name, child = children[index]
            path = f"{prefix}{name}"
            following = children[index + 1][1] if index + 1 < len(children) else None
            if id(child) in self.seen:  # a module registered twice is converted once
                index += 1
                continue
            self.seen.add(id(child))
            if self.predictors is not self and is_predictor(parent, name):
                self.predictors.visit(child, path)
                index += 1
                continue
            pair = _is_sibling_pair(child, following) or _is_empty_norm_unit(
                children, index, self.scheme, in_order
            )
            if pair and self.selection(path):
                self.seen.add(id(following))
                slot = _activation_slot(children, index + 2) if in_order else None
                activated = (
                    slot is not None
                    or carries_activation(following)
                    or children[index + 1][0] in activated_names
                )
                replacement, new_norm = self.conv(child, following, path, activated)
                _become(child, replacement)
                _become(following, nn.Identity() if new_norm is None else new_norm)
                if slot is not None:
                    self._update_slot(slot, new_norm)
                    index += 1
                elif not known and not activated and self.scheme.norm_act is not None:
                    self.unplaced_activations.append(path)
                index += 2
                continue
            # A norm with no convolution before it (a pre-activation unit's), then a ReLU.
            slot = _activation_slot(children, index + 1) if in_order and is_norm(child) else None
            self.visit(child, path, activated=slot is not None or name in activated_names)
            if slot is not None and self.selection(path):
                self._update_slot(slot, child)
                index += 1
            index += 1
        if activated_names and any(
            carries_activation(getattr(m, "norm", m)) for m in parent.children()
        ):
            leave_out_carried_relus(parent)

    def _update_slot(self, slot: nn.Module, norm: nn.Module | None) -> None:
        """The ReLU slot after ``norm``: an :class:`ActivationInNorm` where it carries the
        activation, a ReLU otherwise."""
        carried = norm is not None and carries_activation(norm)
        if carried != isinstance(slot, ActivationInNorm):
            _become(slot, ActivationInNorm() if carried else nn.ReLU(inplace=True))
        if type(norm) is nn.Identity and isinstance(slot, nn.ReLU):
            # A pre-activation norm that went: the ReLU now sees the unit's input itself, which
            # the identity path still needs.
            slot.inplace = False
        self.seen.add(id(slot))

    def visit(self, module: nn.Module, path: str, activated: bool = False) -> None:
        """Convert ``module`` (a layer or a subtree), not paired with a following norm."""
        if self._is_leaf(module):
            if self.selection(path):
                _become(module, self.lone(module, path, activated))
        elif isinstance(module, _UNSUPPORTED_TYPES) or not any(True for _ in module.children()):
            self._check_supported(module, path)
        else:
            self.walk(module, path + ".")

    @staticmethod
    def _is_leaf(module: nn.Module) -> bool:
        return is_conv(module) or is_norm(module) or isinstance(module, _PLAIN_TYPES)

    def _check_supported(self, module: nn.Module, path: str) -> None:
        if isinstance(module, _UNSUPPORTED_TYPES) and self.selection.explicitly_included(path):
            raise ValueError(
                f"convert: cannot convert layer {path!r} of type {type(module).__name__} to scheme "
                f"{self.scheme}; supported layers are Conv2d (+ a following 2-d norm), Linear, "
                "ConvTranspose2d and 2-d norms. Remove it from `include` or add it to `exclude`."
            )


def _image_conv_path(model: nn.Module) -> str | None:
    """The path of the convolution that sees the image, for ``keep_first_conv_plain``.

    The first convolution in registration order with at most 3 input channels (an RGB or
    grayscale image). Registration order alone is not enough: detectron2's FPN registers its
    lateral convolutions before its ResNet. None for a part of a network that takes no image
    (a head, a neck).
    """
    for name, module in model.named_modules():
        if is_conv(module) and module.in_channels <= _IMAGE_CHANNELS:
            return name
    return None


def _apply_residual_input(unit: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (unit.residual_input(args[0]), *args[1:])


def insert_residual_inputs(
    model: nn.Module,
    factory: Callable[[], nn.Module],
    selected: Callable[[str], bool] | None = None,
) -> int:
    """Apply ``factory()`` to the input of every residual unit (a scheme's ``residual_input``).

    A residual unit is a module with a ``downsample`` or ``shortcut`` attribute that is None or
    a module: the BasicBlock / Bottleneck of torchvision, timm and mmdet, detectron2's blocks.
    The new module becomes the unit's child ``residual_input`` and a forward pre-hook applies it
    to the unit's input, so the shortcut and the residual branch both see it and no state-dict
    key changes. Inserting again replaces the module; it does not add a second hook.

    Args:
        selected: ``selected(path)`` says whether the unit at ``path`` gets one (default: all).

    Returns:
        The number of residual units given the module.
    """
    units = [
        (path, unit)
        for path, unit in model.named_modules()
        if any(
            isinstance(getattr(unit, name, False), (nn.Module, type(None)))
            for name in ("downsample", "shortcut")
        )
        and (selected is None or selected(path))
    ]
    for _, unit in units:
        if not isinstance(getattr(unit, "residual_input", None), nn.Module):
            unit.register_forward_pre_hook(_apply_residual_input)
        unit.residual_input = _place_like(factory(), unit)
    return len(units)


def convert(
    model: nn.Module,
    scheme: str | Mapping[str, Any] | Scheme | None,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    keep_weights: bool = True,
) -> nn.Module:
    """Convert ``model`` in place to ``scheme`` and return it.

    Args:
        model: any module (a torchvision ResNet, a whole Mask R-CNN, an mmdet or detectron2
            model, ...).
        scheme: a scheme name, ``NAME(option=value)`` string, dict or :class:`Scheme`.
        include: glob patterns of module paths (``"backbone.*"``; a path also selects its
            subtree); only matching layers are converted. ``None`` converts everything.
        exclude: patterns of module paths left untouched.
        keep_weights: carry the model's weights over (see the module docstring). False: every
            layer ``convert`` builds keeps its own initialisation, as in a model built with the
            scheme (for training from scratch: CZM's and PWS's initialisations are part of the
            methods); convolutions kept in place keep their weights, and so do the predictors
            (the detector's near-zero start, which a scheme's predictor takes through
            ``load_plain_weights``). Layers that already are what the scheme builds in their
            place are kept as they are either way.

    Returns:
        The converted model (a new module only when ``model`` itself is a single layer that
        changes class).

    Raises:
        ValueError: a layer that ``include`` names explicitly cannot be converted (its path and
            type are in the message), or the scheme is unknown.
    """
    resolved = get_scheme(scheme)
    converter = _Converter(
        resolved, _Selection(include, exclude), _image_conv_path(model), keep_weights
    )
    if converter._is_leaf(model):
        model = converter.lone(model, "")
    else:
        converter.walk(model, "")
        _warn_unplaced_activations(resolved, converter.unplaced_activations)
        if resolved.residual_input is not None:
            insert_residual_inputs(model, resolved.residual_input, converter.selection)
        if resolved.post_convert is not None:
            resolved.post_convert(model)
    # Layers that took a new class in place were made as other objects: they act at optimizer
    # steps (CZM's gradient correction) once tracked under their new identity.
    track_step_layers(model)
    return model


def _warn_unplaced_activations(scheme: Scheme, paths: list[str]) -> None:
    if not paths:
        return
    shown = ", ".join(repr(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
    warnings.warn(
        f"convert to {scheme}: after {len(paths)} conv+norm pair(s) ({shown}) the model's own "
        "forward decides whether a ReLU follows, which convert cannot see or replace; there the "
        "norm is the scheme's norm without its activation, followed by the model's ReLU where it "
        "applies one, not the paper's normalization-activation layer. norm_det's own models "
        "(and containers that run their children in order) get the paper's layer.",
        stacklevel=3,
    )


# ---------------------------------------------------------------------------------------------
# fuse


def _fold_into(conv: nn.Conv2d, norm: nn.Module) -> bool:
    """Fold ``norm``'s eval transform into the plain convolution ``conv``, in place.

    Returns:
        False (``conv`` unchanged) when ``norm``'s transform depends on the sample (GN) or mixes
        channels across the groups of a grouped convolution.
    """
    affine = folded_affine(norm)
    if affine is None or (affine[0].dim() == 2 and conv.groups != 1):
        return False
    weight, bias = fold_affine_into(
        conv.weight, None if conv.bias is None else conv.bias, *(t.detach() for t in affine)
    )
    conv.weight.copy_(weight)
    if conv.bias is None:
        conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(bias)
    return True


def _fused_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` as the model's plain class, its own norm folded in where the math allows."""
    fused = conv.fuse() if hasattr(conv, "fuse") else conv
    norm = attached_norm(fused)
    if norm is not None and _fold_into(fused, norm):
        fused.norm = None
    _fuse_children(fused)  # what it still applies: a sample-dependent norm, the activation
    return fused


def _fuse_children(parent: nn.Module) -> None:
    children = [child for _, child in parent.named_children()]
    index = 0
    while index < len(children):
        child = children[index]
        if is_conv(child):
            _become(child, _fused_conv(child))
            following = children[index + 1] if index + 1 < len(children) else None
            if _is_sibling_pair(child, following) and _fold_into(child, following):
                _become(following, nn.Identity())
                index += 1
        elif hasattr(child, "fuse") and not any(True for _ in child.children()):
            _become(child, child.fuse())
        else:
            _fuse_children(child)
        index += 1


@torch.no_grad()
def fuse(model: nn.Module) -> nn.Module:
    """Fold every norm and reparametrization of ``model`` into plain layers, for inference.

    The model is put in eval mode; conv+norm pairs whose norm has a fixed eval transform
    (BN, FrozenBN, IterNorm) become one convolution, also where the convolution holds the norm
    itself (detectron2's ``Conv2d``: its ``norm`` becomes None); reparametrized layers (WS, PWS,
    ND, CZM) become the plain layer they compute, in the model's own convolution class;
    sample-dependent norms (GN) become torch's own class. Outputs in eval mode are unchanged up
    to rounding, and no norm_det class or hook is left (the fused ND++ convolution keeps the
    standardization of its input, a picklable pre-hook of norm_det's own, which it needs).

    Returns:
        The fused model (a new module only when ``model`` itself is a single layer).
    """
    model.eval()
    if is_conv(model):
        return _fused_conv(model).eval()
    if hasattr(model, "fuse") and not any(True for _ in model.children()):
        return model.fuse().eval()
    _fuse_children(model)
    _remove_residual_input_hooks(model)
    # Layers' fuse() may build modules in training mode (a FrozenBN's BatchNorm2d included).
    return model.eval()


def _remove_residual_input_hooks(model: nn.Module) -> None:
    """Drop the pre-hooks of :func:`insert_residual_inputs` once their module is the identity.

    A fused model must run, pickle and export without norm_det.
    """
    for unit in model.modules():
        hooks = unit._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if hook is _apply_residual_input]:
            if isinstance(getattr(unit, "residual_input", None), nn.Identity):
                del hooks[key]
                del unit.residual_input
