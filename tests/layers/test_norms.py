import warnings

import torch
from torch import nn

from norm_det.layers import GroupNorm, SyncBatchNorm


def test_sync_bn_without_process_group_is_batchnorm():
    # With one process SyncBatchNorm runs BatchNorm2d's own forward on the same values, so it
    # is BatchNorm2d bit for bit on any machine (the order of its sums is BatchNorm2d's).
    sync, bn = SyncBatchNorm(6), nn.BatchNorm2d(6)
    x = torch.randn(4, 6, 5, 5) * 2 + 3
    assert torch.equal(sync(x), bn(x))
    assert torch.equal(sync.running_mean, bn.running_mean)
    assert torch.equal(sync.running_var, bn.running_var)
    sync.eval(), bn.eval()
    assert torch.equal(sync(x), bn(x))
    assert type(sync.fuse()) is nn.BatchNorm2d


def test_group_norm_takes_channels_first():
    norm = GroupNorm(64, num_groups=16)
    assert (norm.num_channels, norm.num_groups) == (64, 16)
    x = torch.randn(2, 64, 3, 3)
    # The subclass runs nn.GroupNorm's forward: equal bit for bit on any machine.
    assert torch.equal(norm(x), nn.GroupNorm(16, 64)(x))


def test_group_norm_falls_back_to_gcd_with_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        norm = GroupNorm(24)
    assert norm.num_groups == 8
    assert any("24 channels" in str(w.message) for w in caught)
