"""Frozen batch normalization: BatchNorm2d's eval arithmetic with buffers only.

Detection models fine-tuned at one or two images per GPU keep the ImageNet statistics and affine
parameters of their backbone fixed (Wu & He, "Group Normalization", ECCV 2018, §1; Girshick et
al., Detectron). Nothing here is trainable, so it also folds into the preceding convolution.
"""

from __future__ import annotations

import torch
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` with fixed buffers.

    Args:
        num_features: number of channels ``C`` of the input ``(N, C, H, W)``.
        eps: added to the variance, as in ``nn.BatchNorm2d``.
    """

    _abbr_ = "bn"

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def folded_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(scale, shift)`` with ``y = scale * x + shift``."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Evaluated like BatchNorm2d in eval mode (same order of operations), so the two agree
        # to rounding; F.batch_norm with training=False computes exactly that.
        return nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def fuse(self) -> nn.BatchNorm2d:
        """An ``nn.BatchNorm2d`` in eval mode computing the same function."""
        bn = nn.BatchNorm2d(self.num_features, eps=self.eps).to(self.weight)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(getattr(self, name))
        bn.weight.requires_grad_(False)
        bn.bias.requires_grad_(False)
        return bn.eval()

    @classmethod
    def from_batchnorm(cls, bn: nn.Module) -> FrozenBatchNorm2d:
        """Copy statistics and affine parameters of any BatchNorm-like module exactly.

        The buffers take the dtype and device of ``bn.running_mean``, so a float64 BN converts
        without a rounding to float32.

        Raises:
            ValueError: ``bn`` keeps no running statistics (``track_running_stats=False``).
        """
        if not isinstance(getattr(bn, "running_mean", None), torch.Tensor):
            raise ValueError(
                f"FrozenBatchNorm2d.from_batchnorm: {type(bn).__name__} has no running statistics "
                f"(running_mean is {getattr(bn, 'running_mean', None)!r}); expected a "
                "BatchNorm-like module with track_running_stats=True"
            )
        frozen = cls(bn.num_features, eps=bn.eps).to(bn.running_mean)
        with torch.no_grad():
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if getattr(bn, "weight", None) is not None:
                frozen.weight.copy_(bn.weight)
            if getattr(bn, "bias", None) is not None:
                frozen.bias.copy_(bn.bias)
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints of BatchNorm2d carry a step counter that has no meaning here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d / SyncBatchNorm in ``module`` by an exact FrozenBatchNorm2d.

    Returns the converted module (a new object when ``module`` itself is a BatchNorm).
    """
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        return FrozenBatchNorm2d.from_batchnorm(module)
    for name, child in module.named_children():
        converted = convert_frozen_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module
