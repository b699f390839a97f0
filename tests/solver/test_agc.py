"""Adaptive gradient clipping (Brock et al., ICML 2021): unit-wise ratio, exclusions, config."""

import math
import re
import warnings

import pytest
import torch
from torch import nn

from norm_det.config import get_cfg
from norm_det.modeling import build_model
from norm_det.solver import build_gradient_clipper
from norm_det.solver.agc import AdaptiveGradientClipper, adaptive_clip_grad_, output_unit_dims


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.GroupNorm(2, 4)
        self.up = nn.ConvTranspose2d(4, 5, 2, stride=2)
        self.fc = nn.Linear(6, 3)
        self.predictor = nn.Linear(3, 2)


def _net(seed: int = 0) -> _Net:
    torch.manual_seed(seed)
    net = _Net().double()
    for index, p in enumerate(net.parameters()):
        # Gradients from tiny to large relative to the weights, so that some units clip.
        p.grad = torch.randn_like(p) * 10.0 ** (index % 4 - 3)
    with torch.no_grad():
        net.fc.weight[0].zero_()  # a unit at the eps floor
    return net


def _reference(param: torch.Tensor, grad: torch.Tensor, axis, clipping, eps):
    """The paper's rule unit by unit, in a plain loop: (clipped gradient, clipped units, ratios)."""
    if sum(size > 1 for size in param.shape) <= 1:
        units = [(slice(None),)]
    else:
        units = [(slice(None),) * axis + (i,) for i in range(param.shape[axis])]
    out, clipped, ratios = grad.clone(), 0, []
    for index in units:
        w_norm = max(math.sqrt(float((param[index] ** 2).sum())), eps)
        g_norm = math.sqrt(float((grad[index] ** 2).sum()))
        ratios.append(g_norm / w_norm)
        if g_norm / w_norm > clipping:
            out[index] = grad[index] * (clipping * w_norm / g_norm)
            clipped += 1
    return out, clipped, ratios


def test_equals_the_per_unit_rule() -> None:
    net = _net()
    axes = {"up.weight": 1}
    expected = {
        name: _reference(p.detach(), p.grad, axes.get(name, 0), 0.05, 1e-3)
        for name, p in net.named_parameters()
    }
    before = {name: p.grad.clone() for name, p in net.named_parameters()}
    stats = adaptive_clip_grad_(
        net.named_parameters(), 0.05, 1e-3, output_dims=output_unit_dims(net)
    )
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, expected[name][0], rtol=1e-12, atol=0, msg=name)
    clipped = sum(count for _, count, _ in expected.values())
    assert clipped > 0 and int(stats.clipped_units) == clipped
    largest = max(max(ratios) for _, _, ratios in expected.values())
    assert float(stats.max_ratio) == pytest.approx(largest, rel=1e-12)
    total = torch.sqrt(sum(g.square().sum() for g in before.values()))
    torch.testing.assert_close(stats.total_norm, total, rtol=1e-12, atol=0)
    assert output_unit_dims(net) == {"up.weight": 1}


def test_units_under_the_threshold_and_excluded_parameters_are_untouched() -> None:
    net = _net()
    before = {name: p.grad.clone() for name, p in net.named_parameters()}
    adaptive_clip_grad_(net.named_parameters(), 0.05, 1e-3, exclude=[r"^predictor\."])
    for name, p in net.named_parameters():
        if name.startswith("predictor."):
            assert torch.equal(p.grad, before[name])
            continue
        w = p.detach()
        dims = tuple(range(1, p.dim())) if sum(s > 1 for s in p.shape) > 1 else None
        if dims is None or name == "up.weight":
            continue
        norm = torch.linalg.vector_norm
        ratio = norm(before[name], dim=dims) / norm(w, dim=dims).clamp_min(1e-3)
        kept = ratio <= 0.05
        assert torch.equal(p.grad[kept], before[name][kept])  # bit for bit
        assert not torch.equal(p.grad[~kept], before[name][~kept]) or not (~kept).any()
    # A large enough lambda clips nothing.
    net = _net()
    before = [p.grad.clone() for p in net.parameters()]
    stats = adaptive_clip_grad_(net.named_parameters(), 1e9, 1e-3)
    assert all(torch.equal(p.grad, b) for p, b in zip(net.parameters(), before))
    assert int(stats.clipped_units) == 0


def test_clipper_from_config_clips_as_the_function_does() -> None:
    cfg = get_cfg()
    cfg.merge_from_list(
        [
            "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
            "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "agc",
            "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.05",
            "SOLVER.CLIP_GRADIENTS.AGC_EXCLUDE", r"['^predictor\\.']",
        ]
    )  # fmt: skip
    net, twin = _net(), _net()
    clipper = build_gradient_clipper(cfg, net)
    assert clipper.excluded_names == ("predictor.weight", "predictor.bias")
    total = clipper(net.parameters())
    stats = adaptive_clip_grad_(
        twin.named_parameters(), 0.05, 1e-3, [r"^predictor\."], output_dims={"up.weight": 1}
    )
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert torch.equal(total, stats.total_norm)
    assert torch.equal(clipper.last_stats.clipped_units, stats.clipped_units)
    with pytest.raises(ValueError, match=r"not parameters of the model it was built with"):
        stranger = nn.Parameter(torch.zeros(2))
        stranger.grad = torch.ones(2)
        clipper([stranger, *net.parameters()])
    for p in net.parameters():
        p.grad = None
    assert clipper(net.parameters()) is None


def test_default_exclusions_are_the_predictors_of_every_model() -> None:
    expected = {
        "mask_rcnn_gn": r"^(rpn\.head\.(cls_logits|bbox_pred)|roi_heads\.box_predictor\.)"
        r"|^roi_heads\.mask_predictor\.mask_fcn_logits\.",
        "faster_rcnn_ndpp": r"^(rpn\.head\.(cls_logits|bbox_pred)|roi_heads\.box_predictor\.)",
        "ssd300_ndpp": r"^head\.(classification|regression)_head\.",
        "deeplabv3_syncbn": r"^classifier\.predictor\.",
    }
    for config, pattern in expected.items():
        cfg = get_cfg()
        cfg.merge_from_file(f"configs/quick/{config}.yaml")
        cfg.merge_from_list(["MODEL.DEVICE", "cpu"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # narrow quick models: group fallbacks
            model = build_model(cfg)
        names = [name for name, _ in model.named_parameters()]
        wanted = tuple(name for name in names if re.search(pattern, name))
        excluded = AdaptiveGradientClipper(model).excluded_names
        assert excluded == wanted and len(wanted) >= 2, config
        # DDP's prefix changes nothing.
        wrapped = nn.Module()
        wrapped.module = model
        assert AdaptiveGradientClipper(wrapped).excluded_names == tuple(
            "module." + n for n in wanted
        )


def _agc_cfg(*options: str):
    cfg = get_cfg()
    cfg.merge_from_list(
        [
            "SOLVER.CLIP_GRADIENTS.ENABLED",
            "True",
            "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
            "agc",
            *options,
        ]
    )
    return cfg


def test_bad_options_name_their_keys() -> None:
    net = _net()
    with pytest.raises(
        ValueError, match=r"'agc'.*with the model, build_gradient_clipper\(cfg, model\)"
    ):
        build_gradient_clipper(_agc_cfg())
    for value in ("0.0", "-0.01"):
        with pytest.raises(ValueError, match=r"SOLVER\.CLIP_GRADIENTS\.CLIP_VALUE.*expected > 0"):
            build_gradient_clipper(_agc_cfg("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", value), net)
    with pytest.raises(
        ValueError, match=r"eps \(SOLVER\.CLIP_GRADIENTS\.AGC_EPS\) is -0\.001; expected >= 0"
    ):
        build_gradient_clipper(_agc_cfg("SOLVER.CLIP_GRADIENTS.AGC_EPS", "-1e-3"), net)
    with pytest.raises(
        ValueError, match=r"AGC_EXCLUDE\): '\(unclosed' is not a regular expression"
    ):
        build_gradient_clipper(_agc_cfg("SOLVER.CLIP_GRADIENTS.AGC_EXCLUDE", "['(unclosed']"), net)
    with pytest.raises(ValueError, match=r"AGC_EXCLUDE\): none of \['\^nothing'\] matches"):
        build_gradient_clipper(_agc_cfg("SOLVER.CLIP_GRADIENTS.AGC_EXCLUDE", "['^nothing']"), net)
    with pytest.raises(ValueError, match=r"CLIP_VALUE"):
        adaptive_clip_grad_(net.named_parameters(), 0.0)
    # [] clips every parameter, on purpose.
    clipper = build_gradient_clipper(_agc_cfg("SOLVER.CLIP_GRADIENTS.AGC_EXCLUDE", "[]"), net)
    assert clipper.excluded_names == ()
