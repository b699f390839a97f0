"""Predictors: the last layer of a head, kept plain unless the scheme replaces predictors.

A registry of heads of torchvision, detectron2, mmdet, mmseg and norm_det (by package and class
name: no framework is imported), which :func:`norm_det.surgery.convert` asks; its predictors
follow :func:`~norm_det.schemes.predictor_scheme` and keep the model's weights.
"""

from __future__ import annotations

from torch import nn

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
