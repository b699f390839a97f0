"""The scheme type and its registry: a name, with options, resolves to a :class:`Scheme`.

:func:`register_scheme` files a factory under a name and its aliases; :func:`get_scheme` parses
``"GN(groups=16)"`` or ``{"name": "GN", "groups": 16}``, forgiving case and separators
(:func:`normalize_scheme_name`), checks the options against the factory's keyword arguments
(:func:`scheme_options`) and returns the factory's scheme, named. The built-in schemes are
registered by :mod:`norm_det.schemes.builtin`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

NormFactory = Callable[[int], nn.Module]


@dataclass(frozen=True)
class Scheme:
    """How to build the linear operators of a network, and what follows a convolution.

    Args:
        conv: called as ``conv(in_channels, out_channels, kernel_size, stride=, padding=,
            dilation=, groups=, bias=)``.
        norm: called as ``norm(num_channels)``; ``None`` when nothing follows a convolution.
            Where the network applies no activation after it (the last norm of a residual
            branch, FPN), this is the whole norm.
        norm_act: called as ``norm_act(num_channels)``: one layer that is the norm *and* the
            activation after it, for schemes whose paper replaces "norm, then ReLU" by one
            normalization-activation layer (FRN + TLU, EvoNorm; NF's scaled ReLU). It goes
            where the network applies a ReLU after the norm, in place of both; ``None`` (the
            default): ``norm``, then the network's ReLU.
        linear: called as ``linear(in_features, out_features, bias=)``.
        conv_transpose: called like ``nn.ConvTranspose2d``.
        conv_bias: whether the convolution of a conv+norm pair has a bias (default: only when
            there is no norm to provide the shift).
        replaces_lone_convs: whether convolutions that have no norm after them (FPN outputs,
            heads, predictors) also become ``conv`` (default: when the scheme has no norm and
            its conv is not plain).
        keep_first_conv_plain: leave the first convolution on the image a plain ``nn.Conv2d``.
        replaces_predictors: the predictors (the last layer of every head: class scores, box
            deltas, objectness, mask and segmentation logits) are the scheme's layers too.
            False (the default): they are plain ``nn.Conv2d`` / ``nn.Linear`` with bias, as the
            detector's own; a scheme sets it only where its paper normalizes them.
        residual_input: factory of a module applied to the input of every residual unit
            (CZM's multiplicative noise); model builders and :func:`norm_det.surgery.convert`
            insert it. ``None``: nothing is inserted.
        residual_alpha: normalizer-free residual scaling: pre-activation units compute
            ``x + residual_alpha * f(x / beta)``, ``beta`` the expected std of ``x`` (NF-ResNets).
            ``None``: ``x + f(x)``. Post-activation ResNets have no such form and ignore it.
        post_convert: called as ``post_convert(model)`` at the end of
            :func:`norm_det.surgery.convert`, for model-level changes a scheme needs.
        name, options: filled in by the registry.
    """

    conv: Callable[..., nn.Module] = nn.Conv2d
    norm: NormFactory | None = None
    norm_act: NormFactory | None = None
    linear: Callable[..., nn.Module] = nn.Linear
    conv_transpose: Callable[..., nn.Module] = nn.ConvTranspose2d
    conv_bias: bool | None = None
    replaces_lone_convs: bool | None = None
    keep_first_conv_plain: bool = False
    replaces_predictors: bool = False
    residual_input: Callable[[], nn.Module] | None = None
    residual_alpha: float | None = None
    post_convert: Callable[[nn.Module], None] | None = None
    name: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.conv_bias is None:
            object.__setattr__(self, "conv_bias", self.norm is None)
        if self.replaces_lone_convs is None:
            object.__setattr__(
                self, "replaces_lone_convs", self.norm is None and self.conv is not nn.Conv2d
            )

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Callable[..., Scheme]
    paper: str


_REGISTRY: dict[str, _Entry] = {}
_SPEC = re.compile(r"^\s*(?P<name>[^()]*?)\s*(?:\((?P<args>.*)\))?\s*$", re.DOTALL)


def normalize_scheme_name(name: str) -> str:
    """The registry key of a name: lower case, ``++`` read as ``pp``, separators dropped."""
    return re.sub(r"[^a-z0-9]", "", name.strip().lower().replace("++", "pp"))


def register_scheme(
    name: str, *, aliases: tuple[str, ...] = (), paper: str = ""
) -> Callable[[Callable[..., Scheme]], Callable[..., Scheme]]:
    """Register ``factory(**options) -> Scheme`` under ``name`` and ``aliases``.

    The factory's keyword arguments are the scheme's options, their defaults the papers'.
    """

    def decorator(factory: Callable[..., Scheme]) -> Callable[..., Scheme]:
        entry = _Entry(name, factory, paper)
        for key in {normalize_scheme_name(n) for n in (name, *aliases)}:
            existing = _REGISTRY.get(key)
            if existing is not None and existing.name != name:
                raise ValueError(f"scheme name {key!r} is already registered by {existing.name!r}")
            _REGISTRY[key] = entry
        return factory

    return decorator


def available_schemes() -> list[str]:
    """Canonical names of all registered schemes."""
    return sorted({entry.name for entry in _REGISTRY.values()}, key=str.lower)


def scheme_papers() -> dict[str, str]:
    """Canonical name -> the paper it implements (for documentation tables)."""
    return {entry.name: entry.paper for entry in _REGISTRY.values()}


def scheme_options(name: str) -> dict[str, Any]:
    """The options of scheme ``name`` with their default values."""
    factory = _lookup(name).factory
    return {p.name: p.default for p in inspect.signature(factory).parameters.values()}


def _lookup(name: str) -> _Entry:
    entry = _REGISTRY.get(normalize_scheme_name(name) or "none")
    if entry is None:
        known = ", ".join(available_schemes())
        raise ValueError(f"unknown normalization scheme {name!r}; known schemes: {known}")
    return entry


def parse_scheme_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"GN(groups=16, eps=1e-6)"`` into ``("GN", {"groups": 16, "eps": 1e-6})``."""
    match = _SPEC.match(spec)
    if match is None:
        raise ValueError(f"cannot parse scheme {spec!r}; expected NAME or NAME(option=value, ...)")
    name, args = match.group("name"), match.group("args")
    if not args or not args.strip():
        return name, {}
    try:
        call = ast.parse(f"_({args})", mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            raise SyntaxError("options must be given as option=value")
        options = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as error:
        raise ValueError(
            f"cannot parse the options of scheme {spec!r} ({error}); "
            "expected NAME(option=value, ...) with literal values"
        ) from None
    if None in options:
        raise ValueError(f"cannot parse scheme {spec!r}: '**' is not allowed in options")
    return name, options


def get_scheme(spec: str | Mapping[str, Any] | Scheme | None = None, **options: Any) -> Scheme:
    """Resolve a scheme from a name, a ``NAME(option=value)`` string, a dict or a Scheme.

    Args:
        spec: ``"NDPP"``, ``"GN(groups=16)"``, ``{"name": "GN", "groups": 16}`` (``"type"`` is
            accepted for ``"name"``), an existing :class:`Scheme` (returned as is), or
            ``None`` / ``""`` for ``"none"``.
        options: further options; they override those in ``spec``.

    Raises:
        ValueError: an unknown name (listing the known ones) or option (listing the valid ones).
    """
    if isinstance(spec, Scheme):
        if options:
            raise ValueError(f"cannot add options {sorted(options)} to an already built scheme")
        return spec
    if spec is None:
        name, parsed = "none", {}
    elif isinstance(spec, Mapping):
        parsed = dict(spec)
        name = parsed.pop("name", None) or parsed.pop("type", None)
        if not isinstance(name, str):
            raise ValueError(f"a scheme given as a dict needs a 'name' string; got {dict(spec)!r}")
    elif isinstance(spec, str):
        name, parsed = parse_scheme_spec(spec)
    else:
        raise TypeError(f"a scheme is a name, a dict or a Scheme, not {type(spec).__name__}")
    parsed.update(options)
    entry = _lookup(name)
    valid = scheme_options(entry.name)
    unknown = sorted(set(parsed) - set(valid))
    if unknown:
        described = ", ".join(f"{k}={v!r}" for k, v in valid.items()) or "none"
        raise ValueError(
            f"scheme {entry.name!r} has no option {', '.join(map(repr, unknown))}; "
            f"valid options (with defaults): {described}"
        )
    scheme = entry.factory(**parsed)
    return dataclasses.replace(scheme, name=entry.name, options=parsed)
