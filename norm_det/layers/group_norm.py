"""Group normalization with the channel count first.

Wu & He, "Group Normalization", ECCV 2018. ``nn.GroupNorm`` takes ``(num_groups, num_channels)``,
the reverse of every other norm; builders that call ``norm(channels)`` (torchvision's
``norm_layer``, mmcv's ``build_norm_layer``) need channels first.
"""

from __future__ import annotations

import math
import warnings

from torch import nn

DEFAULT_GROUPS = 32


def resolve_groups(
    num_channels: int,
    num_groups: int,
    strict: bool,
    layer_name: str,
    schemes: tuple[str, ...] = (),
) -> int:
    """The group count a group-wise norm over ``num_channels`` channels uses.

    ``num_groups`` when it divides ``num_channels``. Otherwise only the default 32 groups, not
    asked for (``strict`` False), fall back to their greatest common divisor with
    ``num_channels``, with a warning (narrow test models have fewer than 32 channels).

    Args:
        num_channels: channels ``C`` of the norm.
        num_groups: groups asked for.
        strict: whether the group count was asked for (a scheme's ``groups`` option was given).
        layer_name: names the layer in the messages.
        schemes: scheme names for the example in the error (``("GN", "GN+WS")`` gives
            ``'GN(groups=4)' or 'GN+WS(groups=4)'``); none: ``groups=4``.

    Returns:
        The number of groups, a divisor of ``num_channels``.

    Raises:
        ValueError: ``num_groups`` does not divide ``num_channels`` and was asked for or is not
            the default; the message names both numbers, the option to change and a divisor.
    """
    if num_groups < 1:
        raise ValueError(f"{layer_name}: groups must be >= 1; got {num_groups}")
    if num_channels % num_groups == 0:
        return num_groups
    if strict or num_groups != DEFAULT_GROUPS:
        fitting = max(g for g in range(1, num_groups + 1) if num_channels % g == 0)
        if schemes:
            example = " or ".join(f"'{scheme}(groups={fitting})'" for scheme in schemes)
        else:
            example = f"groups={fitting}"
        raise ValueError(
            f"{layer_name}: {num_groups} groups do not divide {num_channels} channels; "
            f"set the scheme's groups option to a divisor of {num_channels} (e.g. {example})"
        )
    fallback = math.gcd(num_channels, num_groups)
    warnings.warn(
        f"{layer_name}: {num_groups} groups do not divide {num_channels} channels; "
        f"using {fallback} groups",
        stacklevel=3,  # the code that built the layer
    )
    return fallback


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` built as ``GroupNorm(num_channels, num_groups=32)``.

    Args:
        num_channels: ``C`` of the input ``(N, C, H, W)``.
        num_groups: groups of channels normalized together; they must divide ``num_channels``.
        eps, affine: as ``nn.GroupNorm``.
        strict: whether the group count was asked for (a GN scheme's ``groups`` option was
            given). Only the default 32 groups, not asked for, fall back: when they do not divide
            ``num_channels`` their greatest common divisor is used, with a warning (narrow test
            models have fewer than 32 channels).

    Raises:
        ValueError: ``num_groups`` does not divide ``num_channels``, and was asked for or is not
            the default; the message names both and the option to change.
    """

    _abbr_ = "gn"

    def __init__(
        self,
        num_channels: int,
        num_groups: int = DEFAULT_GROUPS,
        eps: float = 1e-5,
        affine: bool = True,
        strict: bool = False,
    ) -> None:
        num_groups = resolve_groups(
            num_channels, num_groups, strict, "GroupNorm", schemes=("GN", "GN+WS")
        )
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)

    def fuse(self) -> nn.GroupNorm:
        """The same layer as a plain ``nn.GroupNorm``."""
        plain = nn.GroupNorm(self.num_groups, self.num_channels, self.eps, self.affine)
        plain.load_state_dict(self.state_dict())
        return plain.to(self.weight) if self.affine else plain
