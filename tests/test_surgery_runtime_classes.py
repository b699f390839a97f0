"""The classes convert makes at run time: one per (mixin, class, attributes), picklable, and
pickles written before norm_det.utils.runtime_classes (naming the modules' ``_rebuild``) load."""

from __future__ import annotations

import copy
import io
import pickle

import torch
import torchvision
from torch import nn

from norm_det import activation_blocks, convert, surgery
from norm_det.activation_blocks import _LeavesOutCarriedReLUs
from norm_det.layers import PWSConv2d
from norm_det.surgery.framework_convs import _AppliesNormActivation, _applying_norm_activation
from norm_det.utils.runtime_classes import made_class
from tests.model_utils import randomize_norms
from tests.test_surgery import _NormActConv


class _Greeting:
    def greet(self) -> str:
        return f"{type(self).__name__} says {self.word}"


class _Plain:
    """A plain class."""


def test_made_class_is_one_class_per_arguments_named_as_its_base() -> None:
    made = made_class(_Greeting, _Plain, word="hello")
    assert made is made_class(_Greeting, _Plain, word="hello")
    assert made is not made_class(_Greeting, _Plain, word="bye")
    assert made.__mro__[1:3] == (_Greeting, _Plain)
    assert made.__name__ == "_Plain" and made.__doc__ == _Plain.__doc__
    assert made.__module__ == _Greeting.__module__
    instance = made()
    instance.state = [1, 2]
    for clone in (copy.deepcopy(instance), pickle.loads(pickle.dumps(instance))):
        assert (
            type(clone) is made and clone.state == [1, 2] and clone.greet() == "_Plain says hello"
        )


def _old_style_pickle(obj: object, rebuild: object, arguments: tuple) -> bytes:
    """``obj`` pickled as before: a call of a module's ``_rebuild`` with ``arguments``."""

    class _OldPickler(pickle.Pickler):
        def reducer_override(self, candidate):
            if candidate is obj:
                return rebuild, arguments, obj.__dict__
            return NotImplemented

    buffer = io.BytesIO()
    _OldPickler(buffer).dump(obj)
    return buffer.getvalue()


def test_old_pickles_of_converted_layers_still_load() -> None:
    torch.manual_seed(0)
    conv = _NormActConv(3, 8, 3, padding=1, bias=False, norm=nn.BatchNorm2d(8), activation=None)
    model = convert(randomize_norms(nn.Sequential(conv)), "PWS").eval()
    layer = model[0]
    assert type(layer) is _applying_norm_activation(PWSConv2d, _NormActConv)
    assert isinstance(layer, _AppliesNormActivation) and type(layer).__name__ == "PWSConv2d"
    x = torch.randn(2, 3, 8, 8)
    data = _old_style_pickle(layer, surgery._rebuild, (PWSConv2d, _NormActConv))
    restored = pickle.loads(data)
    assert type(restored) is type(layer)
    torch.testing.assert_close(restored(x), layer(x), rtol=0, atol=0)


def test_old_pickles_of_blocks_leaving_out_relus_still_load() -> None:
    torch.manual_seed(0)
    block = torchvision.models.resnet.BasicBlock(32, 32)
    convert(nn.Sequential(block), "EvoNorm-S0")
    assert isinstance(block, _LeavesOutCarriedReLUs)
    block.eval()
    data = _old_style_pickle(
        block, activation_blocks._rebuild, (torchvision.models.resnet.BasicBlock,)
    )
    restored = pickle.loads(data)
    assert type(restored) is type(block)
    x = torch.randn(2, 32, 8, 8)
    torch.testing.assert_close(restored(x), block(x), rtol=0, atol=0)
