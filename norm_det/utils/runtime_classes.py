"""Classes made at run time: a mixin in front of a class known only once a model is built.

:func:`norm_det.surgery.convert` changes layers in place by giving them a new class, and some of
those classes are "this framework's class, with norm_det's behaviour first": a detectron2
``Conv2d`` that runs a scheme's convolution, a torchvision ``Bottleneck`` that leaves out a ReLU.
:func:`made_class` makes such a subclass, once per (mixin, class, attributes), and makes its
instances picklable (and deep-copyable): pickle names the mixin, the class and the attributes,
not the made class, which no module holds.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

__all__ = ["made_class", "rebuild"]

_MADE: dict[tuple[type, type, tuple[tuple[str, Hashable], ...]], type] = {}


def made_class(mixin: type, base: type, **attributes: Hashable) -> type:
    """The subclass of ``base`` with ``mixin`` first in its MRO and ``attributes`` on the class.

    The class is named and documented as ``base`` and lives in ``mixin``'s module; asking again
    with the same arguments returns the same class.

    Args:
        mixin: the behaviour put in front of ``base``'s (its methods call ``super()``).
        base: the class of the layer or block being changed.
        attributes: class attributes the mixin reads (hashable: they are part of the key).
    """
    key = (mixin, base, tuple(sorted(attributes.items())))
    made = _MADE.get(key)
    if made is None:
        made = _MADE[key] = type(
            base.__name__,
            (mixin, base),
            {
                "__module__": mixin.__module__,
                "__doc__": base.__doc__,
                "__reduce_ex__": _reduce_made,
                "_made_from": (mixin, base, attributes),
                **attributes,
            },
        )
    return made


def rebuild(mixin: type, base: type, attributes: dict[str, Hashable]) -> Any:
    """An empty instance of ``made_class(mixin, base, **attributes)``; pickle fills its state."""
    cls = made_class(mixin, base, **attributes)
    return cls.__new__(cls)


def _reduce_made(self: Any, protocol: int) -> tuple[Any, ...]:
    # The class is made at run time, so pickle (and deepcopy) name what it is made of.
    mixin, base, attributes = type(self)._made_from
    return rebuild, (mixin, base, dict(attributes)), self.__dict__
