"""BN vs CZMIG (mean-shift rejection) on a small ResNet, on textures and shapes made in code.

Ruff, Beck & Bach, "Mean Shift Rejection", 2019, section 4 in miniature: a CIFAR-style ResNet
(:class:`SmallResNet`) trained with SGD (momentum 0.9, the learning rate divided by 10 at 50%
and 75% of training) with a scheme's layers (:func:`train`), on a data set generated in memory
(:func:`make_shapes_dataset`: 8 classes of stripes and shapes with random colours, contrast,
brightness offsets and noise). ``tools/czm_experiment.py`` runs BN and CZMIG at two learning
rates and writes docs/czm.md's table (:func:`results_table`, :func:`write_results`) and curves
(:func:`plot_curves`).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from norm_det.layers import (
    CZMConv2d,
    czm_param_groups,
)
from norm_det.schemes import Scheme, build_conv_norm, get_scheme
from norm_det.surgery import insert_residual_inputs

CLASSES = (
    "vertical stripes",
    "horizontal stripes",
    "diagonal stripes",
    "anti-diagonal stripes",
    "disc",
    "ring",
    "square outline",
    "cross",
)
RESULTS_BEGIN = "<!-- czm-results:begin -->"
RESULTS_END = "<!-- czm-results:end -->"


# ---------------------------------------------------------------------------------------------
# Data: textures and shapes drawn with torch, one generator per split.


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def make_shapes_dataset(num_images: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_images`` images ``(N, 3, size, size)`` and labels ``(N,)`` in ``0..7`` (CLASSES).

    Each image is ``background + contrast * (foreground - background) * pattern + offset +
    noise``; the per-image brightness offset is a mean shift of all three input channels.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(CLASSES), (num_images,), generator=g)
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    yy, xx = yy.expand(num_images, -1, -1), xx.expand(num_images, -1, -1)

    def per_image(t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, 1, 1)

    # Stripes: the wave vector at 0/90/45/135 degrees (+- 12), 0.1-0.3 cycles per pixel.
    angle = torch.tensor([0.0, 90.0, 45.0, 135.0])[labels.clamp(max=3)]
    theta = per_image(torch.deg2rad(angle + _uniform(num_images, -12, 12, g)))
    frequency = per_image(_uniform(num_images, 0.1, 0.3, g))
    phase = per_image(_uniform(num_images, 0, 2 * math.pi, g))
    along = xx * torch.cos(theta) + yy * torch.sin(theta)
    grating = 0.5 + 0.5 * torch.sin(2 * math.pi * frequency * along + phase)
    # Shapes: random centre and radius.
    radius = per_image(_uniform(num_images, 0.18, 0.32, g) * size)
    dy = yy - per_image(_uniform(num_images, -0.15, 0.15, g) * size)
    dx = xx - per_image(_uniform(num_images, -0.15, 0.15, g) * size)
    distance = torch.sqrt(dx**2 + dy**2)
    box = torch.maximum(dx.abs(), dy.abs())
    shapes = torch.stack(
        [
            torch.sigmoid((radius - distance) / 0.5),  # disc
            torch.exp(-((distance - radius) ** 2) / 0.8),  # ring
            torch.exp(-((box - radius) ** 2) / 0.8),  # square outline
            torch.sigmoid((1.2 - torch.minimum(dx.abs(), dy.abs())) / 0.4)
            * torch.sigmoid((radius - box) / 0.5),  # cross
        ]
    )
    shape_index = (labels - 4).clamp(min=0)
    shape = shapes[shape_index, torch.arange(num_images)]
    pattern = torch.where(per_image(labels < 4), grating, shape).unsqueeze(1)

    background = torch.rand(num_images, 3, 1, 1, generator=g)
    # The foreground differs from the background by 0.3-0.7 in every channel, either sign.
    sign = torch.randint(2, (num_images, 3, 1, 1), generator=g) * 2 - 1
    foreground = background + sign * (torch.rand(num_images, 3, 1, 1, generator=g) * 0.4 + 0.3)
    contrast = _uniform(num_images, 0.6, 1.0, g).view(-1, 1, 1, 1)
    offset = _uniform(num_images, -0.5, 0.5, g).view(-1, 1, 1, 1)
    noise = torch.randn(num_images, 3, size, size, generator=g) * 0.1
    images = background + contrast * (foreground - background) * pattern + offset + noise
    return images, labels


# ---------------------------------------------------------------------------------------------
# Model: a CIFAR-style ResNet whose every layer comes from the scheme registry.


class ZeroPadShortcut(nn.Module):
    """He et al.'s CIFAR shortcut (option A): subsample by ``stride``, zero-pad new channels.

    ``x: (N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride))``; no parameters,
    so the identity path keeps unit gain in every scheme, as in the paper's ResNet110.
    """

    def __init__(self, out_channels: int, stride: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[..., :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - x.shape[1]))


class BasicBlock(nn.Module):
    """Two 3x3 conv+norm pairs and a shortcut (option A when the shape changes).

    ``x: (N, C_in, H, W) -> (N, C_out, H/stride, W/stride)``. The ``downsample`` attribute marks
    it as a residual unit for :func:`norm_det.surgery.insert_residual_inputs`.
    """

    def __init__(self, scheme: Scheme, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = build_conv_norm(scheme, in_channels, out_channels, 3, stride, 1)
        self.conv2, self.bn2 = build_conv_norm(scheme, out_channels, out_channels, 3, 1, 1)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = ZeroPadShortcut(out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + shortcut)


class SmallResNet(nn.Module):
    """ResNet-(6n+2) for small images: a 3x3 stem and three stages of ``n`` blocks.

    ``x: (N, 3, H, W) -> logits (N, num_classes)``. The stem is a plain convolution (with
    bias, no norm) when the scheme keeps the first convolution on the image plain (CZM).
    """

    def __init__(
        self,
        scheme: Scheme,
        num_classes: int,
        blocks_per_stage: int = 1,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if scheme.keep_first_conv_plain:
            self.conv1: nn.Module = nn.Conv2d(3, widths[0], 3, padding=1, bias=True)
            self.bn1: nn.Module = nn.Identity()
        else:
            self.conv1, self.bn1 = build_conv_norm(scheme, 3, widths[0], 3, 1, 1)
        blocks, channels = [], widths[0]
        for stage, width in enumerate(widths):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BasicBlock(scheme, channels, width, stride))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, num_classes)
        if scheme.residual_input is not None:
            insert_residual_inputs(self, scheme.residual_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(-2, -1)))


def spatial_filter_stats(model: nn.Module) -> tuple[float, float]:
    """Mean L2 norm of the 3x3 filters past the stem (``V`` for CZM, ``W`` otherwise) and the
    mean fraction of a filter's norm off the CZM isocline (``||spatial means|| / ||filter||``,
    the means broadcast over their slices; 0 on the isocline, about 1/3 for random filters)."""
    norms, off_isocline = [], []
    for module in model.modules():
        if not isinstance(module, nn.Conv2d) or module.kernel_size == (1, 1):
            continue
        if module is getattr(model, "conv1", None):
            continue  # the stem sees the image and is plain in every scheme
        weight = (module.v if isinstance(module, CZMConv2d) else module.weight).detach()
        filter_norms = weight.flatten(1).norm(dim=1)
        normal = weight.mean(dim=(-2, -1), keepdim=True).expand_as(weight)
        norms.append(filter_norms)
        off_isocline.append(normal.flatten(1).norm(dim=1) / filter_norms)
    return torch.cat(norms).mean().item(), torch.cat(off_isocline).mean().item()


# ---------------------------------------------------------------------------------------------
# Training.


@dataclass
class Run:
    """One training run and its per-epoch history."""

    label: str
    scheme: str
    lr: float
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    def log(self, **values: float) -> None:
        for key, value in values.items():
            self.history.setdefault(key, []).append(value)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (%) in eval mode."""
    model.eval()
    logits = torch.cat([model(chunk) for chunk in images.split(500)])
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item() * 100


def train(
    run: Run,
    data: tuple[torch.Tensor, ...],
    *,
    epochs: int,
    batch_size: int,
    weight_decay: float,
    blocks_per_stage: int,
    seed: int,
) -> nn.Module:
    """SGD, momentum 0.9, LR / 10 at 50% and 75% of the epochs (the paper's protocol)."""
    train_images, train_labels, test_images, test_labels = data
    torch.manual_seed(seed)
    scheme = get_scheme(run.scheme)
    model = SmallResNet(scheme, len(CLASSES), blocks_per_stage)
    optimizer = torch.optim.SGD(
        czm_param_groups(model, weight_decay), lr=run.lr, momentum=0.9, weight_decay=weight_decay
    )
    milestones = [epochs // 2, (3 * epochs) // 4]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        total_loss, correct, seen = 0.0, 0, 0
        permutation = torch.randperm(len(train_labels), generator=order)
        for batch in permutation.split(batch_size):
            images, labels = train_images[batch], train_labels[batch]
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()  # CZMG and LUMA act here (torch's optimizer-step hook)
            if not math.isfinite(loss.item()):
                break
            total_loss += loss.item() * len(batch)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(batch)
        scheduler.step()
        test_loss, test_accuracy = evaluate(model, test_images, test_labels)
        filter_norm, isocline_ratio = spatial_filter_stats(model)
        run.log(
            train_loss=total_loss / seen if seen else math.nan,
            train_accuracy=100 * correct / seen if seen else math.nan,
            test_loss=test_loss,
            test_accuracy=test_accuracy,
            filter_norm=filter_norm,
            isocline_ratio=isocline_ratio,
        )
        print(
            f"{run.label:>18s} epoch {len(run.history['train_loss']):3d}: "
            f"train loss {run.history['train_loss'][-1]:.4f}, test acc {test_accuracy:5.2f}%, "
            f"filter norm {filter_norm:.3f}",
            flush=True,
        )
        if seen < len(train_labels):
            print(f"{run.label}: the loss diverged; stopping this run", flush=True)
            break
    run.seconds = time.perf_counter() - start
    return model


# ---------------------------------------------------------------------------------------------
# Reporting.


def plot_curves(runs: list[Run], path: Path) -> None:
    """Train loss, test accuracy and mean 3x3 filter norm per epoch, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("train_loss", "train loss (cross-entropy)", True),
        ("test_accuracy", "test accuracy (%)", False),
        ("filter_norm", "mean 3x3 filter norm (W for BN, V for CZM)", False),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(15, 4.2))
    styles = {"BN": "-", "CZM": "--"}
    for axis, (key, title, log_scale) in zip(axes, panels):
        for run in runs:
            values = run.history[key]
            axis.plot(
                range(1, len(values) + 1),
                values,
                styles.get(run.scheme.split("(")[0], "-"),
                marker="o",
                markersize=3,
                label=run.label,
            )
        axis.set_title(title)
        axis.set_xlabel("epoch")
        if log_scale:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[1].legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def results_table(runs: list[Run], settings: str) -> str:
    """The Markdown table written into docs/czm.md."""
    lines = [
        settings,
        "",
        "| method | LR | zmg | noise | final test acc (%) | best test acc (%) | final train loss "
        "| mean 3x3 filter norm | mean off-isocline fraction | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        h = run.history
        options = get_scheme(run.scheme).options
        czm = run.scheme.startswith("CZM")
        zmg = options.get("zmg", 0.85) if czm else 0
        noise = options.get("noise", 0.1) if czm else 0
        lines.append(
            f"| {run.label.split(' ')[0]} | {run.lr} | {zmg} | {noise} "
            f"| {h['test_accuracy'][-1]:.2f} | {max(h['test_accuracy']):.2f} "
            f"| {h['train_loss'][-1]:.4f} | {h['filter_norm'][-1]:.3f} "
            f"| {h['isocline_ratio'][-1]:.3f} | {run.seconds:.0f} |"
        )
    return "\n".join(lines)


def write_results(doc: Path, table: str) -> None:
    """Replace the text between the czm-results markers of ``doc`` with ``table``."""
    if not doc.is_file():
        raise FileNotFoundError(f"{doc}: the results document does not exist")
    text = doc.read_text()
    pattern = re.compile(re.escape(RESULTS_BEGIN) + ".*?" + re.escape(RESULTS_END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{doc}: expected the markers {RESULTS_BEGIN} ... {RESULTS_END}")
    doc.write_text(pattern.sub(lambda _: f"{RESULTS_BEGIN}\n{table}\n{RESULTS_END}", text))
