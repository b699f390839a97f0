"""norm_det's schemes inside mmdet and mmsegmentation configs (OpenMMLab 2.x, mmengine).

Importing this module registers, for every scheme of :mod:`norm_det.schemes`, a norm type (and,
when the scheme has its own convolution, a conv type) in mmengine's root ``MODELS`` registry,
which mmcv's ``build_norm_layer`` / ``build_conv_layer`` and every mmdet / mmseg scope reach, and
installs a build hook. One word in a config is then enough::

    norm_cfg = dict(type="NormDetNDPP")     # where the config said dict(type="BN") or "GN"

How the word reaches the convolution: ``NormDet<X>`` builds a :class:`PendingSchemeNorm`, a norm
slot that marks the convolution it follows. When the module built from the config that holds the
``norm_cfg`` (the backbone, the neck, a head) comes out of mmengine's ``Registry.build``, the hook
(:func:`install_build_hook`) runs :func:`norm_det.surgery.convert` on it: every conv+slot pair
becomes the scheme's convolution and norm, and the rest of the module follows the scheme's rule
(lone convolutions, predictors, CZM's plain image convolution and its noise at residual inputs)
— the same network ``convert`` makes of that part, module paths and mmdet's names (``bn1``,
``gn1``) kept. Modules of nested builds are left to their own config. :func:`remove_build_hook`
gives mmengine its method back; :func:`apply_norm_types` converts a module built without it.

Names: scheme ``X`` gives ``NormDet<X>`` and ``<X>Conv``, ``X`` the scheme's name without
separators (``GN+WS`` -> ``NormDetGNWS``, ``GNWSConv``). They never reuse mmdet's or mmcv's names
(``FrozenBN``, ``ConvWS``, ``GN``...). Keyword arguments are the scheme's options
(``dict(type="NormDetPWS", gamma=1e-3)``; ``num_groups`` is read as GN's ``groups``, and ignored
at mmdet's 32 by schemes without groups, as mmcv's ``eps=1e-5``). ``<X>Conv`` (a
``conv_cfg``) builds the scheme's convolution alone, for a convolution no norm follows; a
scheme's conv without a norm always has a bias: it replaces the norm's shift.

``NormDetConvert`` builds any model config and converts it, for parts that name no norm (SSD's
VGG)::

    backbone = dict(type="NormDetConvert", scheme="PWS", model=dict(type="SSDVGG", ...))

The hook also gives mmdet 3.3.0's ``SSDHead`` the ``loss_cls`` its predict reads
(:func:`_fix_ssd_head_predict`). Schemes registered after this import are added by calling
:func:`register_schemes` again. mmengine and mmcv are needed (the ``mmdet`` extra); mmdet itself
is imported only by its models.
"""

from __future__ import annotations

import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from norm_det.schemes import (
    Scheme,
    available_schemes,
    build_norm,
    get_scheme,
    scheme_options,
)
from norm_det.surgery import convert, is_conv, is_norm

CONVERT_TYPE = "NormDetConvert"
# Values that read as "not given": the eps that mmcv's build_norm_layer always passes (a scheme
# whose paper has another eps, FRN's 1e-6, keeps it; one without an eps ignores it), and the
# num_groups of mmdet's own GN configs (`dict(type="GN", num_groups=32)`), so that changing
# the type word alone is enough.
_IGNORED_DEFAULTS = {"eps": 1e-5, "num_groups": 32}
# mmcv spells GroupNorm's group count num_groups; norm_det's GN schemes call it groups.
_OPTION_ALIASES = {"num_groups": "groups"}


def type_names(scheme: str) -> tuple[str | None, str]:
    """``(conv type, norm type)`` of a scheme in OpenMMLab configs; conv is None when plain.

    >>> type_names("GN+WS")
    ('GNWSConv', 'NormDetGNWS')
    """
    resolved = get_scheme(scheme)
    ident = _identifier(resolved.name)
    conv = f"{ident}Conv" if _has_own_conv(resolved) else None
    return conv, f"NormDet{ident}"


def _identifier(name: str) -> str:
    ident = re.sub(r"[^0-9A-Za-z]", "", name.replace("++", "PP"))
    return ident[:1].upper() + ident[1:]


def _has_own_conv(scheme: Scheme) -> bool:
    return scheme.conv is not nn.Conv2d


def _scheme_for(scheme_name: str, type_name: str, options: Mapping[str, Any]) -> Scheme:
    """The scheme with the options an mmcv config gave to ``type_name``."""
    valid = scheme_options(scheme_name)
    resolved: dict[str, Any] = {}
    for key, value in options.items():
        alias = _OPTION_ALIASES.get(key)
        if key not in valid and alias in valid:
            key = alias
        if key == "eps" and value == _IGNORED_DEFAULTS["eps"]:
            continue
        if key in valid:
            resolved[key] = value
        elif _IGNORED_DEFAULTS.get(key, object()) != value:
            described = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "none"
            raise ValueError(
                f"{type_name} (norm_det scheme {scheme_name!r}): unknown option {key}={value!r}; "
                f"valid options (with defaults): {described}"
            )
    return get_scheme(scheme_name, **resolved)


class PendingSchemeNorm(nn.BatchNorm2d):
    """What a ``NormDet<X>`` type builds: a norm slot marking its convolution for scheme X.

    The model build that created it converts it (see :func:`install_build_hook`): the module built
    from the config with the ``norm_cfg`` goes through :func:`norm_det.surgery.convert`, which
    turns every conv+slot pair into the scheme's convolution and norm. Until then it is a BN with
    identity statistics, so that mmdet code written for BN (``norm_eval``, frozen stages, init
    configs naming ``_BatchNorm``) treats it as the norm; it refuses to run, so that a model built
    outside the hook cannot silently train the wrong layers.

    Args:
        num_features: channels of the convolution it follows.
        scheme: the scheme, with the options the config gave.
        type_name: the registered type that built it (for messages).
    """

    def __init__(self, num_features: int, scheme: Scheme, type_name: str) -> None:
        super().__init__(num_features)
        self.normdet_scheme = scheme
        self.normdet_type = type_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError(
            f"{self.normdet_type} (norm_det scheme {self.normdet_scheme}): this norm slot was "
            "never converted to the scheme's layers, because the model holding it was not built "
            "by mmengine's MODELS.build with norm_det's build hook installed; call "
            "norm_det.integrations.mmdet.apply_norm_types(model) after building it"
        )


class _SchemeNormType:
    """Base of the registered norm types: ``T(num_features, **options)`` is a norm slot.

    Calling the type returns a :class:`PendingSchemeNorm` (``__new__`` returns another class's
    instance), recorded with the innermost model build in progress, which converts it.
    """

    scheme: str = ""

    def __new__(cls, num_features: int, **options: Any) -> nn.Module:
        slot = PendingSchemeNorm(
            num_features, _scheme_for(cls.scheme, cls.__name__, options), cls.__name__
        )
        builds = _open_builds()
        if builds:
            builds[-1].pending.append(slot)
        return slot


class _SchemeConvType:
    """Base of the registered conv types, called with ``nn.Conv2d``'s arguments."""

    scheme: str = ""

    def __new__(
        cls,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        **options: Any,
    ) -> nn.Module:
        scheme = _scheme_for(cls.scheme, cls.__name__, options)
        extra = {} if padding_mode == "zeros" else {"padding_mode": padding_mode}
        return scheme.conv(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            # A norm-free scheme's conv takes over the shift of the norm it replaces.
            bias=bool(bias) or bool(scheme.conv_bias),
            **extra,
        )


def _norm_type(scheme_name: str, type_name: str) -> type:
    probe = build_norm(scheme_name, 64)
    # mmcv names the layer attribute <abbr><postfix>; BN-like layers give mmdet's `bn1` keys.
    abbr = getattr(type(probe), "_abbr_", None)
    if abbr is None:
        abbr = "gn" if isinstance(probe, nn.GroupNorm) else "bn"
    doc = f"norm_det scheme {scheme_name!r} as an mmcv norm type (builds {type(probe).__name__})"
    namespace = {"scheme": scheme_name, "_abbr_": abbr, "__module__": __name__, "__doc__": doc}
    return type(type_name, (_SchemeNormType,), namespace)


def _conv_type(scheme_name: str, type_name: str) -> type:
    doc = f"norm_det scheme {scheme_name!r}'s convolution as an mmcv conv type"
    namespace = {"scheme": scheme_name, "__module__": __name__, "__doc__": doc}
    return type(type_name, (_SchemeConvType,), namespace)


# ---------------------------------------------------------------------------------------------
# The build hook: the module built from a config converts the norm slots its build created.


@dataclass
class _Build:
    """One model build in progress: the slots it created and what its nested builds returned."""

    pending: list[PendingSchemeNorm] = field(default_factory=list)
    nested: list[Any] = field(default_factory=list)


_STATE = threading.local()
_ORIGINAL_BUILD: Callable[..., Any] | None = None
# mmengine and every OpenMMLab project name their model registries "model".
_MODEL_REGISTRY = "model"


def _open_builds() -> list[_Build]:
    builds = getattr(_STATE, "builds", None)
    if builds is None:
        builds = _STATE.builds = []
    return builds


def _build_converting_norm_slots(registry: Any, cfg: Any, *args: Any, **kwargs: Any) -> Any:
    """mmengine's ``Registry.build``, then the conversion of the norm slots the build created."""
    assert _ORIGINAL_BUILD is not None  # only installed by install_build_hook
    if getattr(registry, "name", None) != _MODEL_REGISTRY:
        return _ORIGINAL_BUILD(registry, cfg, *args, **kwargs)
    builds = _open_builds()
    build = _Build()
    builds.append(build)
    try:
        built = _ORIGINAL_BUILD(registry, cfg, *args, **kwargs)
    finally:
        builds.pop()
    left = build.pending
    named = _named_scheme(cfg, kwargs.get("default_args"))
    if (left or named is not None) and isinstance(built, nn.Module):
        built, left = _convert_slots(built, left, build.nested, named)
    if builds:
        # Slots that ended up outside this module belong to the module the parent builds.
        builds[-1].pending.extend(left)
        if build.pending or _names_a_norm(cfg, kwargs.get("default_args")):
            # A part of its own: the parent's scheme leaves it alone. A nested build that names
            # no norm (mmdet's Linear predictors, losses) is part of the parent's part.
            builds[-1].nested.append(built)
    elif isinstance(built, nn.Module):
        _fix_ssd_head_predict(built)
    return built


def _named_scheme(cfg: Any, default_args: Any) -> tuple[str, Scheme] | None:
    """``(type name, scheme)`` when a model config's ``norm_cfg`` names one of norm_det's types.

    A module can name a norm and build none (mmdet's ``Shared2FCBBoxHead`` has only linear
    layers): it still follows the scheme its config names.
    """
    from mmengine.registry import MODELS

    for node in (cfg, default_args):
        norm = node.get("norm_cfg") if isinstance(node, Mapping) else None
        type_name = norm.get("type") if isinstance(norm, Mapping) else None
        norm_type = MODELS.module_dict.get(type_name) if isinstance(type_name, str) else None
        if isinstance(norm_type, type) and issubclass(norm_type, _SchemeNormType):
            # requires_grad is mmcv's, not the scheme's (build_norm_layer takes it off too).
            options = {k: v for k, v in norm.items() if k not in ("type", "requires_grad")}
            return type_name, _scheme_for(norm_type.scheme, type_name, options)
    return None


def _names_a_norm(cfg: Any, default_args: Any) -> bool:
    """Whether a model config says which norm its module uses (mmcv's ``norm_cfg`` key)."""
    return any(
        isinstance(node, Mapping) and node.get("norm_cfg") is not None
        for node in (cfg, default_args)
    )


def install_build_hook() -> bool:
    """Make every model build of mmengine's registries convert the norm slots it creates.

    mmengine's ``Registry.build`` is wrapped (for registries named ``"model"``: mmengine's,
    mmdet's, mmseg's ``MODELS``): when a build returns a module that holds norm slots created
    while it was built (and not by a nested build), or whose config's ``norm_cfg`` names one of
    norm_det's types, that module goes through :func:`norm_det.surgery.convert` to the scheme.
    Modules that nested builds returned from configs naming a norm of their own (a
    ``norm_cfg``) are left to it; those naming none (mmdet builds its ``Linear`` predictors and
    losses from configs) belong to the module being built.
    Importing this module installs it. Idempotent.

    Returns:
        False when it was already installed.
    """
    global _ORIGINAL_BUILD
    from mmengine.registry import Registry

    if _ORIGINAL_BUILD is not None:
        return False
    _ORIGINAL_BUILD = Registry.build
    Registry.build = _build_converting_norm_slots
    return True


def remove_build_hook() -> bool:
    """Give mmengine's ``Registry.build`` back; slots built afterwards stay unconverted.

    Returns:
        False when the hook was not installed.
    """
    global _ORIGINAL_BUILD
    from mmengine.registry import Registry

    if _ORIGINAL_BUILD is None:
        return False
    Registry.build = _ORIGINAL_BUILD
    _ORIGINAL_BUILD = None
    return True


def apply_norm_types(module: nn.Module) -> nn.Module:
    """Convert the norm slots in ``module`` (built without the build hook) to their scheme.

    ``module`` is converted as one part, as the build hook converts the module a config built.

    Returns:
        ``module``, changed in place (a new module only when ``module`` is itself a slot).

    Raises:
        ValueError: the slots name more than one scheme.
    """
    slots = [m for m in module.modules() if isinstance(m, PendingSchemeNorm)]
    converted, _ = _convert_slots(module, slots, [])
    return converted


def _convert_slots(
    part: nn.Module,
    slots: Sequence[PendingSchemeNorm],
    nested: Sequence[Any],
    named: tuple[str, Scheme] | None = None,
) -> tuple[nn.Module, list[PendingSchemeNorm]]:
    """Convert ``part`` to the scheme of the ``slots`` it holds, except ``nested`` modules.

    Args:
        named: ``(type name, scheme)`` its config's ``norm_cfg`` names, if one of norm_det's.

    Returns:
        ``(part or its replacement, the slots that are not inside part)``.

    Raises:
        ValueError: the slots and ``named`` give more than one scheme.
    """
    paths = {id(m): path for path, m in part.named_modules()}
    inside = [slot for slot in slots if id(slot) in paths]
    outside = [slot for slot in slots if id(slot) not in paths]
    schemes = {
        _scheme_key(slot.normdet_scheme): (slot.normdet_type, slot.normdet_scheme)
        for slot in inside
    }
    if named is not None:
        schemes.setdefault(_scheme_key(named[1]), named)
    if not schemes:
        return part, outside
    if len(schemes) > 1:
        found = ", ".join(f"{type_name} ({scheme})" for type_name, scheme in schemes.values())
        raise ValueError(
            f"{type(part).__name__}: the config it is built from gives norm types of several "
            f"schemes: {found}; a module built from one config follows one scheme (give the "
            "backbone, the neck and each head their own norm_cfg)"
        )
    ((_, scheme),) = schemes.values()
    exclude = [
        paths[id(m)] for m in nested if isinstance(m, nn.Module) and paths.get(id(m), "") != ""
    ]
    # The layers convert builds keep their own initialisation: the model is about to be trained.
    part = convert(part, scheme, exclude=exclude, keep_weights=False)
    for slot in inside:
        if isinstance(slot, PendingSchemeNorm):
            # No convolution right before it (or inside a nested build): only the norm changes.
            part = _replace_module(part, paths[id(slot)], _scheme_norm_like(slot))
    return part, outside


def _scheme_key(scheme: Scheme) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The scheme with every option (defaults filled in): equal keys build equal layers."""
    options = {**scheme_options(scheme.name), **scheme.options}
    return scheme.name, tuple(sorted((k, repr(v)) for k, v in options.items()))


def _scheme_norm_like(slot: PendingSchemeNorm) -> nn.Module:
    norm = build_norm(slot.normdet_scheme, slot.num_features)
    frozen = not any(p.requires_grad for p in slot.parameters())
    return norm.requires_grad_(not frozen).train(slot.training)


def _replace_module(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    if not path:
        return new
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path), name, new)
    return root


# ---------------------------------------------------------------------------------------------
# mmdet 3.3.0: SSDHead has no loss_cls, which BaseDenseHead's predict reads.


def _fix_ssd_head_predict(model: nn.Module) -> None:
    """Give each mmdet ``SSDHead`` in ``model`` the ``loss_cls = None`` its predict needs.

    mmdet 3.3.0's ``BaseDenseHead._predict_by_feat_single`` reads
    ``getattr(self.loss_cls, "custom_cls_channels", False)`` (V3Det's custom losses), but
    ``SSDHead.__init__`` skips ``AnchorHead.__init__``, which builds ``loss_cls``: SSD computes its
    cross-entropy itself and has none, so every SSD predict fails with AttributeError
    (open-mmlab/mmdetection#11780). ``None`` reads as "no custom classification channels", what
    SSD's plain softmax scores are. Set on the instance, so a subclass's own ``loss_cls`` stays.
    """
    ssd_head = sys.modules.get("mmdet.models.dense_heads.ssd_head")
    head_class = getattr(ssd_head, "SSDHead", None)
    if head_class is None:  # mmdet's SSD was never imported: no SSDHead can exist
        return
    for module in model.modules():
        if isinstance(module, head_class) and not hasattr(module, "loss_cls"):
            module.loss_cls = None


def _add_norm_slots(model: nn.Module) -> None:
    """Give every convolution in an ``nn.Sequential`` with no norm after it a BN to convert.

    VGG's ``features`` (SSD) has no norm; wrapping each such conv as ``Sequential(conv, norm)`` at
    the same index keeps the container's indices (SSD's ``out_feature_indices``) valid, and the
    fresh BN (identity statistics) becomes the scheme's norm in :func:`convert`.
    """
    for sequential in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(sequential._modules)
        for index, name in enumerate(names):
            child = sequential._modules[name]
            following = sequential._modules[names[index + 1]] if index + 1 < len(names) else None
            if is_conv(child) and not (following is not None and is_norm(following)):
                norm = nn.BatchNorm2d(child.out_channels).to(child.weight)
                sequential._modules[name] = nn.Sequential(OrderedDict(conv=child, norm=norm))


def build_converted(
    model: Mapping[str, Any],
    scheme: str | Mapping[str, Any],
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    add_norms: bool = False,
    **model_args: Any,
) -> nn.Module:
    """Build ``model`` from its config, then :func:`norm_det.surgery.convert` it to ``scheme``.

    Registered as ``NormDetConvert``. The inner config is built in the current default scope
    (mmdet's or mmseg's when their runner or ``register_all_modules`` set it).

    Args:
        model: the config of the model to build (``dict(type="SSDVGG", ...)``).
        scheme: the scheme name / spec.
        include, exclude: module-path patterns, as in :func:`norm_det.surgery.convert`.
        add_norms: when the scheme has a norm, first put a norm after every convolution inside an
            ``nn.Sequential`` that has none (VGG), so that the scheme's norm reaches them.
        model_args: merged into ``model`` (what a parent passes, such as a head's
            ``train_cfg`` / ``test_cfg``).

    Returns:
        The built model, of the inner config's type, converted in place.
    """
    from mmengine.registry import MODELS

    if not isinstance(model, Mapping) or "type" not in model:
        raise ValueError(
            f"{CONVERT_TYPE}: 'model' must be a config dict with a 'type'; got {model!r}"
        )
    inner = MODELS.build({**dict(model), **model_args})
    resolved = get_scheme(scheme)
    if add_norms and resolved.norm is not None:
        _add_norm_slots(inner)
    return convert(inner, resolved, include=include, exclude=exclude)


def register_schemes() -> dict[str, Any]:
    """Register every scheme's conv and norm type, and ``NormDetConvert``, in mmengine's MODELS.

    Idempotent: types already registered by this module are kept; call it again after
    registering a new scheme.

    Returns:
        type name -> registered object, for all of norm_det's names.

    Raises:
        ValueError: a name is already taken in the registry by something else.
    """
    try:
        from mmengine.registry import MODELS
    except ImportError as error:
        raise ImportError(
            "norm_det.integrations.mmdet needs mmengine and mmcv; install norm_det's OpenMMLab "
            "extra: pip install -e '.[mmdet]'"
        ) from error

    # Each name with the function that makes its object, so nothing is built twice.
    wanted: dict[str, Callable[[], Any]] = {CONVERT_TYPE: lambda: build_converted}
    for name in available_schemes():
        conv_name, norm_name = type_names(name)
        wanted[norm_name] = partial(_norm_type, name, norm_name)
        if conv_name is not None:
            wanted[conv_name] = partial(_conv_type, name, conv_name)
    registered: dict[str, Any] = {}
    for type_name, make in wanted.items():
        existing = MODELS.module_dict.get(type_name)
        if existing is not None:
            if getattr(existing, "__module__", None) != __name__:
                raise ValueError(
                    f"cannot register norm_det type {type_name!r} in mmengine's MODELS: the name "
                    f"is already taken by {existing!r}"
                )
            registered[type_name] = existing
            continue
        module = make()
        MODELS.register_module(name=type_name, module=module)
        registered[type_name] = module
    return registered


register_schemes()
install_build_hook()
