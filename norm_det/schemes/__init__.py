"""The scheme registry: one name says how every linear operator of a network is built.

A *scheme* answers four questions — which convolution class, which linear class, which
transposed-convolution class, and which norm (or none) follows a convolution. Model builders,
integrations and :mod:`norm_det.surgery` ask this registry; none of them names a layer class.

It also says *where* its layers go, the same for every route that builds a network (norm_det's
model builders, :func:`norm_det.surgery.convert`, the detectron2 and mmdet integrations): every
convolution of the backbone, neck and heads (lone ones too when ``replaces_lone_convs``), every
linear and transposed convolution; the convolution on the image plain when
``keep_first_conv_plain`` (:func:`image_conv_scheme`); the predictors — class scores, box
deltas, objectness, mask and segmentation logits — plain unless the scheme's paper puts its
layers there too (``replaces_predictors``, :func:`predictor_scheme`); its ``residual_input`` at
the input of every residual unit.

The package reads in that order: :mod:`.registry` (the :class:`Scheme` type, the registry, names
and options), :mod:`.builders` (what model code calls, and where a scheme's layers go) and
:mod:`.builtin` (the built-in schemes, registered when this package is imported).

Names forgive case and separators (``"GN+WS"`` == ``"gn_ws"`` == ``"gnws"``, ``"ND++"`` ==
``"NDPP"``) and carry options, in a string (``"GN(groups=16)"``) or a dict
(``{"name": "GN", "groups": 16}``). A new scheme is one decorated function::

    @register_scheme("MyNorm", paper="Me et al., 2026")
    def my_norm(eps: float = 1e-5) -> Scheme:
        return Scheme(conv=nn.Conv2d, norm=partial(MyNorm, eps=eps))
"""

from __future__ import annotations

from norm_det.schemes import builtin as _builtin  # noqa: F401  (registers the built-in schemes)
from norm_det.schemes.builders import (
    build_conv,
    build_conv_norm,
    build_conv_transpose,
    build_linear,
    build_norm,
    carries_activation,
    image_conv_scheme,
    pair_norm,
    predictor_scheme,
)
from norm_det.schemes.registry import _REGISTRY as _REGISTRY
from norm_det.schemes.registry import (
    NormFactory,
    Scheme,
    available_schemes,
    get_scheme,
    normalize_scheme_name,
    parse_scheme_spec,
    register_scheme,
    scheme_options,
    scheme_papers,
)

__all__ = [
    "NormFactory",
    "Scheme",
    "available_schemes",
    "build_conv",
    "build_conv_norm",
    "build_conv_transpose",
    "build_linear",
    "build_norm",
    "carries_activation",
    "get_scheme",
    "image_conv_scheme",
    "normalize_scheme_name",
    "pair_norm",
    "parse_scheme_spec",
    "predictor_scheme",
    "register_scheme",
    "scheme_options",
    "scheme_papers",
]
