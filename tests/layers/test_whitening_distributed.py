"""Two gloo processes with half the batch each equal one process with the whole batch."""

import torch
from torch import nn

from norm_det.layers import DeconvConv2d, DeconvConvTranspose2d, DeconvLinear, IterNorm
from tests.dist_utils import run_distributed

SHAPES = {
    "conv3x3": (4, 8, 7, 7),
    # 1x1 sampling takes every s^2-th pixel of N*H*W: 2*6*6 per process is a multiple of 4,
    # so the two halves sample exactly the whole batch's pixels.
    "conv1x1": (4, 8, 6, 6),
    "linear": (6, 16),
    "transposed": (4, 8, 5, 5),
    "iternorm": (4, 8, 5, 5),
}


def build_layers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    options = dict(block=4, sync=True, scale_invariance="layernorm")
    layers = {
        "conv3x3": DeconvConv2d(8, 6, 3, padding=1, sampling_stride=2, **options),
        "conv1x1": DeconvConv2d(8, 6, 1, sampling_stride=2, **options),
        "linear": DeconvLinear(16, 5, **options),
        "transposed": DeconvConvTranspose2d(8, 6, 2, stride=2, sampling_stride=1, **options),
        "iternorm": IterNorm(8, group_channels=4, sync=True),
    }
    with torch.no_grad():
        layers["iternorm"].weight.uniform_(0.5, 1.5)
    return {name: layer.double() for name, layer in layers.items()}


def batch(name: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(len(name))
    return torch.randn(*SHAPES[name], generator=generator, dtype=torch.float64) * 2 + 0.5


def loss(out: torch.Tensor) -> torch.Tensor:
    return (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin()).sum()


def _half_batch_step(rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    results = {}
    for name, layer in build_layers().items():
        local = batch(name).chunk(world_size)[rank].clone().requires_grad_(True)
        out = layer(local)
        loss(out).backward()
        results[name] = {
            "out": out.detach(),
            "grad_x": local.grad,
            "grad_w": layer.weight.grad,
            "buffers": {k: v.clone() for k, v in layer.named_buffers()},
        }
    return results


def test_two_processes_equal_one_process_with_the_whole_batch() -> None:
    results = run_distributed(_half_batch_step, 2)
    for name, layer in build_layers().items():
        whole = batch(name).requires_grad_(True)
        reference = layer(whole)
        # The whole batch's loss is the sum of the per-process losses.
        sum(loss(part) for part in reference.chunk(2)).backward()
        out = torch.cat([r[name]["out"] for r in results])
        grad_x = torch.cat([r[name]["grad_x"] for r in results])
        assert torch.allclose(out, reference.detach(), atol=1e-10), name
        assert torch.allclose(grad_x, whole.grad, atol=1e-10), name
        # Each process holds the gradient of its own loss; DDP sums (averages) them.
        grad_w = sum(r[name]["grad_w"] for r in results)
        assert torch.allclose(grad_w, layer.weight.grad, atol=1e-9), name
        for r in results:
            for key, value in layer.named_buffers():
                assert torch.allclose(r[name]["buffers"][key], value, atol=1e-12), (name, key)


def _moment_exchanges(rank: int, world_size: int) -> dict:
    """The upper-triangle exchange and the full one, on each process's own moments."""
    from norm_det.layers.distributed import all_reduce_mean, all_reduce_mean_moments

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(3, 40, 6, generator=generator, dtype=torch.float64)
    results = {}
    for kind in ("triangle", "full"):
        leaf = x.clone().requires_grad_(True)
        mean, outer = leaf.mean(1), torch.einsum("mnf,mng->mfg", leaf, leaf) / leaf.shape[1]
        if kind == "triangle":
            mean, outer = all_reduce_mean_moments(mean, outer)
        else:
            packed = all_reduce_mean(torch.cat([mean.flatten(), outer.flatten()]))
            mean, outer = (
                packed[: mean.numel()].view_as(mean),
                packed[mean.numel() :].view_as(outer),
            )
        weights = torch.arange(outer.numel(), dtype=outer.dtype).view_as(outer).cos()
        (outer * weights).sum().add((mean * mean).sum()).backward()
        results[kind] = {"mean": mean.detach(), "outer": outer.detach(), "grad": leaf.grad}
    return results


def test_the_upper_triangle_exchange_equals_the_full_one() -> None:
    for result in run_distributed(_moment_exchanges, 2):
        triangle, full = result["triangle"], result["full"]
        for key in ("mean", "outer", "grad"):
            torch.testing.assert_close(triangle[key], full[key], rtol=1e-6, atol=1e-12)
        assert torch.equal(triangle["outer"], triangle["outer"].transpose(-1, -2))


def _counted_step(rank: int, world_size: int, upper: bool) -> tuple[int, int]:
    from norm_det.layers.distributed import send_upper_triangles
    from norm_det.utils.collectives import CollectiveCounter

    torch.set_num_threads(1)
    send_upper_triangles(upper)
    layer = build_layers()["conv3x3"]
    local = batch("conv3x3").chunk(world_size)[rank].clone().requires_grad_(True)
    with CollectiveCounter() as counter:
        loss(layer(local)).backward()
    return counter.calls, counter.bytes


def test_a_synced_layer_makes_one_exchange_each_way_of_upper_triangles() -> None:
    # block 4, 3x3: F = 36 features; the 8 / 4 channel groups are samples of one matrix.
    matrices, features = 1, 36
    triangle = matrices * (features + features * (features + 1) // 2) * 8
    whole = matrices * (features + features * features) * 8
    for upper, expected in ((True, triangle), (False, whole)):
        for calls, sent in run_distributed(_counted_step, 2, upper):
            assert (calls, sent) == (2, 2 * expected)  # forward and backward
