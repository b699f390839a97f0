"""norm_det's schemes in detectron2's own configs: one import, then any scheme in any norm key.

detectron2 (installed from source; see docs/integrations.md) turns the norm names of its configs
into layers with ``detectron2.layers.get_norm``, and knows only its own few. After::

    import norm_det.integrations.detectron2

every norm key of detectron2's own YAML configs (``MODEL.RESNETS.NORM``, ``MODEL.FPN.NORM``,
``MODEL.ROI_BOX_HEAD.NORM``, ``MODEL.ROI_MASK_HEAD.NORM``, ``MODEL.SEM_SEG_HEAD.NORM``,
``MODEL.RETINANET.NORM`` ...) and every ``norm`` / ``conv_norm`` argument of its LazyConfigs
(``model.backbone.bottom_up.stages.norm = "NDPP"``) takes any norm_det scheme, with no other key
changed: detectron2's own ResNet, FPN and heads build the scheme's layers.

How (the import calls :func:`enable`; :func:`disable` undoes it, :func:`enabled` is the same as a
context manager):

1. detectron2's ``get_norm`` learns the registry's names. For a scheme name it returns a
   :class:`SchemeMarker`: detectron2 builds its network as it always does, and the marker it
   puts where the norm goes (``Conv2d(norm=...)``, or after a convolution in a ``Sequential``)
   records which convolutions the key covers and the scheme. detectron2's own names (``BN``,
   ``SyncBN``, ``FrozenBN``, ``GN``, ``naiveSyncBN``, ``LN`` ...) keep detectron2's layers; any
   other spelling or options (``GN(groups=16)``, ``frozen_bn``) is norm_det's scheme.
2. Right after a model is built — detectron2's ``build_model`` and, for LazyConfigs, the outermost
   ``detectron2.config.instantiate`` — :func:`convert_marked` turns each marked convolution into
   the scheme's (PWS, WS, ND, CZM ...) with the scheme's norm (or none) with
   :func:`norm_det.surgery.convert`, in place and with ``keep_weights=False`` (the layers start
   from the scheme's own initialisation); parameter names, hence detectron2 checkpoint keys
   (``res2.0.conv1.norm.weight``), stay. Within the detectron2 part that holds marked convolutions
   of one scheme only (a backbone, a registered head), the part's other convolutions, linear and
   transposed convolutions become the scheme's where ``convert`` replaces them. Stages that
   ``MODEL.BACKBONE.FREEZE_AT`` froze stay frozen (BN-type schemes become FrozenBN there, as in
   detectron2).

detectron2 binds ``get_norm``, ``build_model`` and ``instantiate`` by name in many modules
(``from detectron2.layers import get_norm`` in its ResNet, FPN, heads ...), so the hook rebinds
every such name in every loaded module (and modules imported later find the hooked functions
where they import them from); detectron2's files are not changed. A model built any other way
(``GeneralizedRCNN(cfg)``, ``build_backbone(cfg)``) still holds markers: call
:func:`convert_marked` on it before training; a marker run in a forward raises an error that says
so.

``MODEL.NORMDET`` (:func:`add_normdet_config`) and the builders it names
(``build_normdet_backbone``, ``NormDetBoxHead``, ``NormDetMaskHead``, ``NormDetSemSegHead``) are
kept so that older configs load; they build the same networks and are not needed.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from norm_det.layers import FrozenBatchNorm2d
from norm_det.schemes import Scheme, available_schemes, get_scheme, predictor_scheme
from norm_det.surgery import attached_norm, convert, is_conv, is_norm

try:
    import detectron2  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without detectron2
    raise ImportError(
        "norm_det.integrations.detectron2 needs detectron2, which is installed from source; "
        "see docs/integrations.md"
    ) from error

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, SEM_SEG_HEADS_REGISTRY, Backbone
from detectron2.modeling.proposal_generator import RPN_HEAD_REGISTRY
from detectron2.modeling.roi_heads import (
    ROI_BOX_HEAD_REGISTRY,
    ROI_KEYPOINT_HEAD_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
)

# The names detectron2's get_norm knows: they keep detectron2's layers.
DETECTRON2_NORMS = (
    "BN",
    "SyncBN",
    "FrozenBN",
    "GN",
    "nnSyncBN",
    "naiveSyncBN",
    "naiveSyncBN_N",
    "LN",
)


# ---------------------------------------------------------------------------------------------
# The marker get_norm returns for a scheme.


class SchemeMarker(nn.Module):
    """Where detectron2 put the norm of a scheme: a placeholder, converted, never run.

    :func:`convert_marked` replaces the convolution that holds (or precedes) it by the scheme's
    convolution and the marker by the scheme's norm, or by nothing. For
    :func:`norm_det.surgery.convert` it is a norm over ``num_features`` channels whose transform
    depends on the sample (``folded_affine`` is None): nothing of it is folded or carried over.

    Args:
        num_features: the channels of the convolution's output.
        scheme: the scheme, as the config names it (``"NDPP"``, ``"GN(groups=16)"``).
    """

    def __init__(self, num_features: int, scheme: str) -> None:
        super().__init__()
        self.num_features = num_features
        self.scheme = scheme
        # Lets surgery place the layer it builds here on the model's device and dtype.
        self.register_buffer("placement", torch.empty(0), persistent=False)

    def folded_affine(self) -> None:
        """None: a placeholder has no transform to fold (norm_det's layer protocol)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            f"a norm_det scheme marker ({self.scheme!r} over {self.num_features} channels) ran in "
            "a forward: the model was built by detectron2 while norm_det's get_norm hook was "
            "enabled but never converted. detectron2's build_model and LazyConfig instantiate "
            "convert it; a model built another way needs "
            "norm_det.integrations.detectron2.convert_marked(model) before training"
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, scheme={self.scheme!r}"


def _is_detectron2_norm(name: str) -> bool:
    """Whether detectron2's own ``get_norm`` knows ``name`` (its list may grow)."""
    if name in DETECTRON2_NORMS:
        return True
    try:
        _ORIGINALS["get_norm"](name, 32)
    except KeyError:
        return False
    return True


def scheme_of(value: str, key: str) -> Scheme | None:
    """The scheme a norm key names; None for ``""`` and detectron2's own names.

    Raises:
        ValueError: ``value`` is neither a scheme nor one of detectron2's names; the message
            names ``key``.
    """
    if not value or value in DETECTRON2_NORMS:
        return None
    try:
        return get_scheme(value)
    except ValueError as error:
        if _is_detectron2_norm(value):
            return None
        raise ValueError(
            f"{key}: {value!r} is no norm_det scheme ({', '.join(available_schemes())}) nor one "
            f"of detectron2's norms ({', '.join(DETECTRON2_NORMS)}); {error}"
        ) from None


def _norm_entries(node: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(dotted key, value)`` of every string under a key named ``*norm`` / ``*NORM``.

    ``node`` is a yacs ``CfgNode`` (a dict) or a plain container of a LazyConfig; interpolations
    (``"${..norm}"``) are skipped, they name another key.
    """
    if isinstance(node, Mapping):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, str):
                if str(key).lower().endswith("norm") and not value.startswith("${"):
                    yield path, value
            else:
                yield from _norm_entries(value, path + ".")
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _norm_entries(value, f"{prefix}{index}.")


def check_norm_names(config: Any) -> None:
    """Check every norm key of a detectron2 config before a model is built from it.

    Args:
        config: a YAML ``CfgNode``, or a LazyConfig (``omegaconf`` node) or part of one.

    Raises:
        ValueError: a norm key names neither a scheme nor one of detectron2's norms; the message
            names the key (``MODEL.FPN.NORM``, ``backbone.bottom_up.stages.norm``).
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.to_container(config, resolve=False)
    for key, value in _norm_entries(config):
        scheme_of(value, key)


# ---------------------------------------------------------------------------------------------
# The hooks.

# detectron2's own functions, by the name they have in their defining module (a module, not
# the attribute of its package: `detectron2.config.instantiate` is the function there).
_SOURCES = {
    "get_norm": importlib.import_module("detectron2.layers.batch_norm"),
    "build_model": importlib.import_module("detectron2.modeling.meta_arch.build"),
    "instantiate": importlib.import_module("detectron2.config.instantiate"),
}
_ORIGINALS: dict[str, Callable[..., Any]] = {
    name: getattr(module, name) for name, module in _SOURCES.items()
}
_STATE = threading.local()  # depth of nested instantiate calls, per thread


def _get_norm(norm: Any, out_channels: int) -> nn.Module | None:
    """detectron2's ``get_norm`` that also knows norm_det's schemes (a :class:`SchemeMarker`)."""
    if isinstance(norm, str) and scheme_of(norm, "detectron2 get_norm") is not None:
        return SchemeMarker(out_channels, norm)
    return _ORIGINALS["get_norm"](norm, out_channels)


# Heads whose YAML norm key names their scheme even where they build no norm (a box head of
# fully connected layers only): module path -> key under cfg.MODEL.
YAML_PART_KEYS = {
    "roi_heads.box_head": "ROI_BOX_HEAD",
    "roi_heads.mask_head": "ROI_MASK_HEAD",
    "sem_seg_head": "SEM_SEG_HEAD",
}


def _yaml_part_norms(cfg: CfgNode) -> dict[str, str]:
    return {
        path: cfg.MODEL[key].NORM
        for path, key in YAML_PART_KEYS.items()
        if key in cfg.MODEL and "NORM" in cfg.MODEL[key]
    }


def _lazy_part_norms(node: Any, prefix: str = "") -> dict[str, str]:
    """Module path -> norm of every object a LazyConfig builds with a ``*norm`` argument.

    The path is the object's path in the config (``roi_heads.box_head``), which is its path in
    the model wherever detectron2's constructors keep their arguments as attributes of the same
    name (they do in its meta-architectures and ROI heads); a path the model lacks is skipped.
    """
    found: dict[str, str] = {}
    if not isinstance(node, Mapping):
        return found
    if "_target_" in node:
        own = {k: v for k, v in node.items() if not isinstance(v, (Mapping, list, tuple))}
        found.update((prefix.rstrip("."), value) for _, value in _norm_entries(own) if value)
    for key, value in node.items():
        if isinstance(value, Mapping):
            found.update(_lazy_part_norms(value, f"{prefix}{key}."))
    return found


def _build_model(cfg: CfgNode) -> nn.Module:
    """detectron2's ``build_model``, then :func:`convert_marked`."""
    check_norm_names(cfg)
    return convert_marked(_ORIGINALS["build_model"](cfg), part_norms=_yaml_part_norms(cfg))


def _instantiate(cfg: Any) -> Any:
    """detectron2's ``instantiate``; the outermost call converts the module it returns."""
    depth = getattr(_STATE, "depth", 0)
    if depth == 0:
        check_norm_names(cfg)
    # instantiate calls itself for every nested config: the whole model converts once, built.
    _STATE.depth = depth + 1
    try:
        result = _ORIGINALS["instantiate"](cfg)
    finally:
        _STATE.depth = depth
    if depth == 0 and isinstance(result, nn.Module):
        from omegaconf import DictConfig, OmegaConf

        plain = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
        convert_marked(result, part_norms=_lazy_part_norms(plain))
    return result


_HOOKS = {"get_norm": _get_norm, "build_model": _build_model, "instantiate": _instantiate}


def _rebind(replacements: Mapping[int, Callable[..., Any]]) -> None:
    """Replace, in every loaded module, each global that is a key's object by its value.

    This module's own names of the hooks stay: they are what :func:`enable` installs.
    """
    this = sys.modules[__name__]
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if module is this or not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            replacement = replacements.get(id(value))
            if replacement is not None:
                namespace[name] = replacement


def enable() -> None:
    """Hook norm_det's schemes into detectron2 (done on import; doing it again changes nothing).

    Every module's binding of detectron2's ``get_norm``, ``build_model`` and ``instantiate``
    becomes norm_det's (see the module docstring); modules imported later import the hooked
    functions.
    """
    _rebind({id(_ORIGINALS[name]): hook for name, hook in _HOOKS.items()})


def disable() -> None:
    """Undo :func:`enable`: every binding is detectron2's own function again.

    Models built meanwhile keep their layers; models built afterwards know only detectron2's
    norm names.
    """
    _rebind({id(hook): _ORIGINALS[name] for name, hook in _HOOKS.items()})


def is_enabled() -> bool:
    """Whether detectron2's ``get_norm`` knows norm_det's schemes now."""
    return _SOURCES["get_norm"].get_norm is _HOOKS["get_norm"]


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """The hook for the duration of a ``with`` block; the state before it is restored after."""
    was_enabled = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was_enabled:
            disable()


# ---------------------------------------------------------------------------------------------
# Converting what detectron2 built.


def apply_scheme(
    module: nn.Module,
    scheme: Scheme,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> nn.Module:
    """Make the detectron2 part ``module`` follow ``scheme``: :func:`norm_det.surgery.convert`.

    ``convert`` reads detectron2's ``Conv2d`` (its ``norm`` and ``activation``), finds the ResNet
    stem's convolution on the image (CZM keeps it plain) and replaces layers in place. The layers
    it builds keep their own initialisation, as the part is about to be trained; convolutions the
    scheme keeps plain stay detectron2's, with detectron2's initialisation.

    Args:
        module: a backbone, FPN or head.
        scheme: the scheme.
        include, exclude: module paths within ``module``, as for ``convert``.

    Returns:
        ``module``, changed in place.
    """
    convert(module, scheme, include=include, exclude=list(exclude), keep_weights=False)
    for conv in module.modules():
        norm = attached_norm(conv) if is_conv(conv) else None
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in conv.parameters(recurse=False)
        ):
            # A stage MODEL.BACKBONE.FREEZE_AT froze: detectron2 freezes BN into FrozenBN there.
            conv.norm = FrozenBatchNorm2d.from_batchnorm(norm)
    return module


def _part_classes() -> tuple[type[nn.Module], ...]:
    """The classes of detectron2's parts: backbones and the heads of its head registries.

    Read when a model is converted, so heads registered later (a project's) count too.
    """
    classes: list[type[nn.Module]] = [Backbone]
    for registry in (
        ROI_BOX_HEAD_REGISTRY,
        ROI_MASK_HEAD_REGISTRY,
        ROI_KEYPOINT_HEAD_REGISTRY,
        SEM_SEG_HEADS_REGISTRY,
        RPN_HEAD_REGISTRY,
    ):
        classes += [
            obj for _, obj in registry if isinstance(obj, type) and issubclass(obj, nn.Module)
        ]
    return tuple(classes)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _within(path: str, ancestor: str) -> bool:
    return ancestor == "" or path == ancestor or path.startswith(ancestor + ".")


def _relative(path: str, ancestor: str) -> str:
    return path[len(ancestor) + 1 :] if ancestor else path


def _markers(model: nn.Module) -> Iterator[tuple[SchemeMarker, tuple[str, ...]]]:
    """Every marker with the paths to convert for it: its convolution's (if any), its own.

    The convolution holds the marker as its ``norm`` (detectron2's ``Conv2d``) or precedes it in
    its parent (the subnets of detectron2's RetinaNet head).
    """
    for parent_path, parent in model.named_modules():
        children = list(parent.named_children())
        for index, (name, child) in enumerate(children):
            if not isinstance(child, SchemeMarker):
                continue
            path = _join(parent_path, name)
            if is_conv(parent) and attached_norm(parent) is child:
                yield child, (parent_path, path)
            elif index > 0 and is_conv(children[index - 1][1]):
                yield child, (_join(parent_path, children[index - 1][0]), path)
            else:
                yield child, (path,)


# Predictors detectron2 builds as a part of their own, and the head whose scheme they follow
# (its predictor_scheme: plain unless the scheme replaces predictors).
PREDICTOR_LEADERS = {"roi_heads.box_predictor": "roi_heads.box_head"}


def convert_marked(model: nn.Module, part_norms: Mapping[str, str] | None = None) -> nn.Module:
    """Convert every convolution detectron2 built with a :class:`SchemeMarker`, in place.

    The marked convolutions are grouped by their part: the nearest enclosing detectron2
    backbone or registered head (a ResNet, its FPN without it, ``FastRCNNConvFCHead``,
    ``MaskRCNNConvUpsampleHead`` ...), or the convolution's parent where there is none. A part
    whose norms are all markers of one scheme is converted as a whole with :func:`apply_scheme`
    (its unmarked convolutions, linear and transposed convolutions included, where ``convert``
    replaces them), parts nested in it excepted; in a part that mixes schemes or keeps
    detectron2's own norms, only the marked convolutions change.

    A part that holds no marker follows the scheme ``part_norms`` names for its path, if any (a
    box head of fully connected layers only, whose ``ROI_BOX_HEAD.NORM`` detectron2 never
    reads; ND / ND++ replace its layers), and ``roi_heads.box_predictor`` follows its box head.
    Parts no norm key reaches (the RPN head) stay detectron2's, as norm_det's own RPN head with
    its ``MODEL.RPN.NORM`` at the default ``""``; :func:`apply_scheme` converts one explicitly.

    Args:
        model: the model detectron2 built.
        part_norms: module path -> the norm its config key names (detectron2's ``build_model``
            and ``instantiate`` pass the model's ``ROI_BOX_HEAD.NORM`` ... or LazyConfig
            ``norm`` arguments); detectron2's own names and ``""`` are skipped.

    Returns:
        ``model``.

    Raises:
        ValueError: a marker of a scheme without a norm follows no convolution (its path is in
            the message).
    """
    part_types = _part_classes()
    parts = [path for path, module in model.named_modules() if isinstance(module, part_types)]
    grouped: dict[str, dict[str, tuple[Scheme, list[str]]]] = {}
    for marker, paths in _markers(model):
        owners = [part for part in parts if _within(paths[-1], part)]
        owner = max(owners, key=len) if owners else _parent(paths[0])
        scheme = get_scheme(marker.scheme)
        entry = grouped.setdefault(owner, {}).setdefault(str(scheme), (scheme, []))
        entry[1].extend(_relative(path, owner) for path in paths)
    modules = dict(model.named_modules())
    for path, norm in (part_norms or {}).items():
        scheme = scheme_of(norm, path) if path in modules else None
        if scheme is not None and path not in grouped:
            grouped[path] = {str(scheme): (scheme, [])}
    converted: dict[str, Scheme] = {}  # parts converted whole, with their scheme
    for owner, by_scheme in grouped.items():
        part = model.get_submodule(owner)
        nested = [_relative(p, owner) for p in parts if p != owner and _within(p, owner)]
        foreign_norms = any(
            is_norm(module) and not isinstance(module, SchemeMarker)
            for path, module in part.named_modules()
            if not any(_within(path, n) for n in nested)
        )
        whole = len(by_scheme) == 1 and not foreign_norms
        for scheme, paths in by_scheme.values():
            apply_scheme(part, scheme, include=None if whole else paths, exclude=nested)
            if whole:
                converted[owner] = scheme
    for predictor, head in PREDICTOR_LEADERS.items():
        scheme = converted.get(head)
        replaced = scheme is not None and scheme.replaces_predictors
        if replaced and predictor in modules and predictor not in grouped:
            apply_scheme(model.get_submodule(predictor), predictor_scheme(scheme))
    left = [path for path, module in model.named_modules() if isinstance(module, SchemeMarker)]
    if left:
        raise ValueError(
            f"convert_marked: detectron2 put the norm of a norm_det scheme at {', '.join(left)} "
            "after no convolution that norm_det can convert, and the scheme has no norm to put "
            "there; name a scheme with a norm (or detectron2's own) in that config key"
        )
    return model


# ---------------------------------------------------------------------------------------------
# MODEL.NORMDET: the builders of older configs (not needed: detectron2's own names work).


def add_normdet_config(cfg: CfgNode) -> None:
    """Add ``MODEL.NORMDET``: the detectron2 parts that norm_det's older builders wrap."""
    cfg.MODEL.NORMDET = CfgNode()
    # The detectron2 backbone builder that build_normdet_backbone builds.
    cfg.MODEL.NORMDET.BACKBONE = "build_resnet_fpn_backbone"
    # The detectron2 heads that NormDetBoxHead / NormDetMaskHead / NormDetSemSegHead build.
    cfg.MODEL.NORMDET.ROI_BOX_HEAD = "FastRCNNConvFCHead"
    cfg.MODEL.NORMDET.ROI_MASK_HEAD = "MaskRCNNConvUpsampleHead"
    cfg.MODEL.NORMDET.SEM_SEG_HEAD = "SemSegFPNHead"


def _normdet_cfg(cfg: CfgNode, key: str) -> str:
    node = cfg.MODEL.get("NORMDET")
    if node is None or key not in node:
        raise ValueError(
            f"MODEL.NORMDET.{key} is missing from the config: call "
            "norm_det.integrations.detectron2.add_normdet_config(cfg) before merging the YAML"
        )
    return node[key]


def _built_and_converted(cfg: CfgNode, build: Callable[[], nn.Module]) -> nn.Module:
    check_norm_names(cfg)
    with enabled():
        part = build()
    return convert_marked(part)


@BACKBONE_REGISTRY.register()
def build_normdet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """The backbone ``MODEL.NORMDET.BACKBONE``, converted (as detectron2's own builds it)."""
    inner = _normdet_cfg(cfg, "BACKBONE")
    if inner == "build_normdet_backbone":
        raise ValueError("MODEL.NORMDET.BACKBONE must name a detectron2 backbone, not itself")
    return _built_and_converted(cfg, lambda: BACKBONE_REGISTRY.get(inner)(cfg, input_shape))


class _SchemeHead:
    """Base of the registered heads: calling one builds the inner detectron2 head, converted.

    ``__new__`` returns the inner head itself (``FastRCNNConvFCHead``, ...), so the model holds
    detectron2's own head class.
    """

    registry: Any = None
    inner_key = ""  # MODEL.NORMDET.<inner_key> names the inner head

    def __new__(cls, cfg: CfgNode, input_shape: Any) -> nn.Module:
        inner = _normdet_cfg(cfg, cls.inner_key)
        if inner == cls.__name__:
            raise ValueError(
                f"MODEL.NORMDET.{cls.inner_key} must name a detectron2 head, not {inner!r}"
            )
        return _built_and_converted(cfg, lambda: cls.registry.get(inner)(cfg, input_shape))


class NormDetBoxHead(_SchemeHead):
    """``MODEL.NORMDET.ROI_BOX_HEAD`` following ``MODEL.ROI_BOX_HEAD.NORM``."""

    registry = ROI_BOX_HEAD_REGISTRY
    inner_key = "ROI_BOX_HEAD"


class NormDetMaskHead(_SchemeHead):
    """``MODEL.NORMDET.ROI_MASK_HEAD`` following ``MODEL.ROI_MASK_HEAD.NORM``."""

    registry = ROI_MASK_HEAD_REGISTRY
    inner_key = "ROI_MASK_HEAD"


class NormDetSemSegHead(_SchemeHead):
    """``MODEL.NORMDET.SEM_SEG_HEAD`` following ``MODEL.SEM_SEG_HEAD.NORM``."""

    registry = SEM_SEG_HEADS_REGISTRY
    inner_key = "SEM_SEG_HEAD"


for _head in (NormDetBoxHead, NormDetMaskHead, NormDetSemSegHead):
    _head.registry.register(_head)

enable()
