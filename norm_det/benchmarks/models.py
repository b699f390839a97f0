"""Training-step time and peak memory of every scheme in the published models, and the
inference time of each fused model against its plain twin (``tools/benchmark.py`` is the
command line; docs/benchmarks.md the measured tables).

A workload is one architecture at one input size (:data:`PRESETS`). For each scheme the model
has every norm key of the architecture set to it (:func:`scheme_config`) and trains on a fixed
synthetic batch (:func:`synthetic_batch`); :func:`measure_training` times the steps of all
schemes in alternating rounds and reports each one's median ratio to the baseline's in the same
round (:mod:`norm_det.utils.benchmark`). :func:`measure_inference` times each fused model
against the model built with plain convolutions holding the fused weights
(:func:`plain_twin`). :func:`training_rows` / :func:`inference_rows` add the targets and
verdicts, :func:`training_markdown` / :func:`inference_markdown` the tables.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from norm_det.config import CONFIGS_DIR, CfgNode, load_config
from norm_det.modeling import build_model
from norm_det.schemes import get_scheme
from norm_det.solver import build_gradient_clipper, build_optimizer
from norm_det.surgery import fuse
from norm_det.utils.benchmark import (
    FIELD_SCHEMES,
    interleaved_times,
    peak_allocated,
    peak_resident,
    ratio_summary,
)
from norm_det.weights.deploy import inexact_layers

ALL_SCHEMES = (
    "none",
    "BN",
    "SyncBN",
    "FrozenBN",
    "GN",
    "GN+WS",
    "PWS",
    "ND",
    "NDPP",
    "IterNorm",
    "CZM",
    *FIELD_SCHEMES,
)
# A candidate "<scheme> +AGC" trains with adaptive gradient clipping (--agc).
AGC_SUFFIX = " +AGC"
# Upper bounds on the training-step time ratio, on CPU (the project's targets).
TRAINING_TARGETS = {("mask_rcnn", "NDPP"): 1.15, ("mask_rcnn", "PWS"): 1.05}
# Objects per synthetic image; Mask R-CNN samples exactly this many positive RoIs per image.
OBJECTS = 16
# A fused model's inference time over the plain model's: 1.00 within this.
INFERENCE_TOLERANCE = 0.03
# glibc: blocks above 64 KiB are mmap'ed and unmapped when freed (no dynamic threshold), so the
# resident set follows live memory and a step's peak is not hidden by memory kept from the last.
MEMORY_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


@dataclass(frozen=True)
class Workload:
    """One architecture at one input size.

    Args:
        arch: ``"mask_rcnn"`` or ``"deeplab"``.
        config: the base config file (its norm keys are overwritten per scheme).
        norm_keys: the ``MODEL.<KEY>.NORM`` keys set to the scheme.
        baseline: the scheme training ratios divide by.
        size: images are ``size x size``.
        images: images per training step (and per inference call).
        title: the architecture in words, for tables.
    """

    arch: str
    config: Path
    norm_keys: tuple[str, ...]
    baseline: str
    size: int
    images: int
    title: str


_MASK_KEYS = ("RESNETS", "FPN", "RPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD")
_DEEPLAB_KEYS = ("RESNETS", "SEM_SEG_HEAD")
PRESETS: dict[str, dict[str, Workload]] = {
    # The published architectures (ResNet-50) at a small input.
    "r50": {
        "mask_rcnn": Workload(
            "mask_rcnn",
            CONFIGS_DIR / "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_frozenbn.yaml",
            _MASK_KEYS,
            "FrozenBN",
            320,
            2,
            "Mask R-CNN R-50-FPN",
        ),
        "deeplab": Workload(
            "deeplab",
            CONFIGS_DIR / "Cityscapes-SemanticSegmentation/deeplabv3_R_50_syncbn.yaml",
            _DEEPLAB_KEYS,
            "BN",
            256,
            2,
            "DeepLabv3 R-50 (dilated, output stride 8)",
        ),
    },
    # The narrow ResNet-18 models of configs/quick (trained on the synthetic data).
    "quick": {
        "mask_rcnn": Workload(
            "mask_rcnn",
            CONFIGS_DIR / "quick/mask_rcnn_ndpp.yaml",
            _MASK_KEYS,
            "FrozenBN",
            192,
            4,
            "quick Mask R-CNN (narrow R-18-FPN)",
        ),
        "deeplab": Workload(
            "deeplab",
            CONFIGS_DIR / "quick/deeplabv3_ndpp.yaml",
            _DEEPLAB_KEYS,
            "BN",
            128,
            4,
            "quick DeepLabv3 (narrow dilated R-18)",
        ),
    },
}


def scheme_config(workload: Workload, scheme: str, device: str, *, inference: bool) -> CfgNode:
    """The workload's config with every norm key set to ``scheme``, all layers trainable.

    For inference, Mask R-CNN keeps every proposal and detection (no score threshold, no NMS):
    the heads' work is then the same for every model, whatever its weights.
    """
    cfg = load_config(workload.config)
    cfg.defrost()
    if scheme.endswith(AGC_SUFFIX):
        scheme = scheme.removesuffix(AGC_SUFFIX)
        clip = cfg.SOLVER.CLIP_GRADIENTS
        clip.ENABLED, clip.CLIP_TYPE, clip.CLIP_VALUE = True, "agc", 0.01
    for key in workload.norm_keys:
        cfg.MODEL[key].NORM = scheme
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.DEVICE = device
    # Tiny steps: the models stay near their initialisation, so every round does the same work.
    cfg.SOLVER.BASE_LR = 1e-5
    if workload.arch == "mask_rcnn":
        # Exactly OBJECTS positive RoIs per image (every ground-truth box is a proposal too), so
        # the mask head, which runs on the positives only, does the same work for every model.
        cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION = OBJECTS / cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE
        # RoIAlign with an adaptive sampling ratio costs more for larger proposals, whose sizes
        # depend on the weights: a fixed 2x2 samples per bin makes its cost the same for all.
        cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 2
        cfg.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO = 2
    if inference and workload.arch == "mask_rcnn":
        cfg.MODEL.RPN.NMS_THRESH = 1.0
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
        cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = 1.0
        cfg.TEST.DETECTIONS_PER_IMAGE = 100
    return cfg


def synthetic_batch(
    workload: Workload, num_classes: int, device: torch.device, seed: int = 0
) -> tuple[list[torch.Tensor], list[dict]]:
    """``images`` noise with :data:`OBJECTS` filled rectangles each, and their targets.

    Detection targets: ``boxes``, ``labels`` (cycling through the ``num_classes`` classes),
    ``masks``; segmentation targets: ``sem_seg`` with the rectangles' class ids on background 0.
    """
    generator = torch.Generator().manual_seed(seed)
    size = workload.size
    images, targets = [], []
    for _ in range(workload.images):
        image = torch.rand(3, size, size, generator=generator)
        boxes, masks = [], []
        sem_seg = torch.zeros(size, size, dtype=torch.int64)
        # Detection labels are 1..K (background apart); segmentation ids 1..K-1 (0: background).
        foreground = num_classes - 1 if workload.arch == "deeplab" else num_classes
        labels = [1 + i % foreground for i in range(OBJECTS)]
        for label in labels:
            h, w = (int(v) for v in torch.randint(size // 8, size // 3, (2,), generator=generator))
            y, x = (int(v) for v in torch.randint(0, size - max(h, w), (2,), generator=generator))
            image[label % 3, y : y + h, x : x + w] = 1.0
            mask = torch.zeros(size, size, dtype=torch.uint8)
            mask[y : y + h, x : x + w] = 1
            sem_seg[mask.bool()] = label
            boxes.append([x, y, x + w, y + h])
            masks.append(mask)
        images.append(image.to(device))
        if workload.arch == "deeplab":
            targets.append({"sem_seg": sem_seg.to(device)})
        else:
            targets.append(
                {
                    "boxes": torch.tensor(boxes, dtype=torch.float32, device=device),
                    "labels": torch.tensor(labels, dtype=torch.int64, device=device),
                    "masks": torch.stack(masks).to(device),
                }
            )
    return images, targets


def _num_classes(cfg: CfgNode, arch: str) -> int:
    heads = cfg.MODEL.SEM_SEG_HEAD if arch == "deeplab" else cfg.MODEL.ROI_HEADS
    return heads.NUM_CLASSES


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: list[torch.Tensor],
    targets: list[dict],
    clipper: Callable[..., object] | None = None,
) -> Callable[[], None]:
    """One training iteration as the trainer runs it, on a fixed batch (clipped by
    ``clipper`` between backward and step, when given)."""

    def step() -> None:
        # The same proposal and pixel sampling in every call.
        torch.manual_seed(0)
        optimizer.zero_grad(set_to_none=True)
        sum(dict(model(images, targets)).values()).backward()
        if clipper is not None:
            clipper(model.parameters())
        optimizer.step()  # CZM's CZMG and LUMA act here, from torch's optimizer-step hook

    return step


def inference_step(model: nn.Module, images: list[torch.Tensor]) -> Callable[[], list[dict]]:
    """One eval-mode forward on a fixed batch; returns the outputs."""

    def step() -> list[dict]:
        with torch.inference_mode():
            return model(images)

    return step


def build_training(
    workload: Workload, scheme: str, device: torch.device
) -> tuple[nn.Module, Callable[[], None]]:
    """The scheme's model in training mode and its training step."""
    cfg = scheme_config(workload, scheme, str(device), inference=False)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    images, targets = synthetic_batch(workload, _num_classes(cfg, workload.arch), device)
    clipper = build_gradient_clipper(cfg, model)
    return model, training_step(model, optimizer, images, targets, clipper)


def _progress(label: str, repeats: int) -> Callable[[int], None]:
    def report(round_index: int) -> None:
        print(f"  {label}: round {round_index + 1}/{repeats}", file=sys.stderr, flush=True)

    return report


def measure_training(
    workload: Workload, schemes: Sequence[str], repeats: int, warmup: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """Scheme -> training-step ``{"ms", "cpu_ms", "ratio", "cpu_ratio"}`` against the baseline."""
    steps = {}
    for scheme in schemes:
        steps[scheme] = build_training(workload, scheme, device)[1]
    times = interleaved_times(
        steps, repeats, warmup, device, on_round=_progress(f"{workload.arch} training", repeats)
    )
    return ratio_summary(times, workload.baseline)


def plain_twin(workload: Workload, fused: nn.Module, device: torch.device) -> nn.Module:
    """The model with plain convolutions everywhere (scheme ``none``), holding ``fused``'s weights
    when they fit it exactly.

    Every fused scheme but GN and GN+WS loads exactly: the twin computes the same function (ND++
    without its input standardization), with the same proposals and values. A fused GN model
    keeps its GN layers, and its weights without them would let the activations blow up (a
    Mask R-CNN then drops its non-finite boxes and does less work): its twin keeps the plain
    model's own initialisation.
    """
    cfg = scheme_config(workload, "none", str(device), inference=True)
    torch.manual_seed(0)
    twin = build_model(cfg).eval()
    state = fused.state_dict()
    if set(state) == set(twin.state_dict()):
        twin.load_state_dict(state)
    return twin


def kept_normalization(fused: nn.Module) -> str | None:
    """What per-sample normalization a fused model still computes, or ``None`` if it is plain.

    GroupNorm and ND++'s per-sample input standardization depend on each input, so no weights
    can hold them: their fused models cannot reach the plain model's time, and the 1.00 target
    does not apply to them (their rows report the cost of what is kept).
    """
    kept = []
    if any(isinstance(m, nn.GroupNorm) for m in fused.modules()):
        kept.append("GroupNorm")
    if inexact_layers(fused):  # after fuse: ND++'s standardizing pre-hooks
        kept.append("per-sample input standardization")
    return " and ".join(kept) or None


def work_done(outputs: list[dict]) -> int:
    """Detections (or output pixels) a model returned: equal work for equal counts."""
    return sum(int(next(iter(o.values())).shape[0]) for o in outputs)


def measure_inference(
    workload: Workload, schemes: Sequence[str], repeats: int, warmup: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """Scheme -> fused-model inference ``{"ms", "cpu_ms", "ratio", "cpu_ratio", "plain_ms"}``.

    Each fused model runs against its :func:`plain_twin` (same weights, so the same proposals
    and values), all of them in alternating rounds; the ratio is the fused model's time over its
    twin's in the same round.
    """
    steps, kept = {}, {}
    for scheme in schemes:
        cfg = scheme_config(workload, scheme, str(device), inference=True)
        torch.manual_seed(0)
        fused = fuse(build_model(cfg))
        kept[scheme] = kept_normalization(fused)
        images, _ = synthetic_batch(workload, _num_classes(cfg, workload.arch), device)
        steps[scheme] = inference_step(fused, images)
        steps[(scheme, "plain")] = inference_step(plain_twin(workload, fused, device), images)
        fused_work, plain_work = work_done(steps[scheme]()), work_done(steps[(scheme, "plain")]())
        if fused_work != plain_work:
            print(
                f"warning: {workload.arch} / {scheme}: the fused model returned {fused_work} "
                f"detections, its plain twin {plain_work}; their times are not comparable",
                file=sys.stderr,
            )
    times = interleaved_times(
        steps, repeats, warmup, device, on_round=_progress(f"{workload.arch} inference", repeats)
    )
    results = {}
    for scheme in schemes:
        pair = {scheme: times[scheme], "plain": times[(scheme, "plain")]}
        summary = ratio_summary(pair, "plain")
        results[scheme] = {
            **summary[scheme],
            "plain_ms": summary["plain"]["ms"],
            "kept": kept[scheme],
        }
    return results


def memory_of_step(workload: Workload, scheme: str, device: torch.device) -> float:
    """Peak bytes of one training step beyond the memory held before it (after a warm-up step).

    CPU: resident-set high-water mark growth (run this in a fresh process); CUDA: peak tensor
    memory allocated.
    """
    _, step = build_training(workload, scheme, device)
    step()  # one-time allocations: optimizer state, kernels' caches
    if device.type == "cuda":
        return peak_allocated(step, device)
    return peak_resident(step)


def training_rows(
    workload: Workload,
    timings: dict[str, dict[str, float]],
    memory: dict[str, float | None],
) -> list[dict]:
    """Table rows: timings, peak MiB and its ratio to the baseline's, the target and verdict."""
    base_memory = memory.get(workload.baseline)
    rows = []
    for scheme, timing in timings.items():
        peak = memory.get(scheme)
        target = TRAINING_TARGETS.get((workload.arch, scheme))
        rows.append(
            {
                "scheme": scheme,
                **timing,
                "peak_mib": None if peak is None else peak / 2**20,
                "memory_ratio": None if peak is None or not base_memory else peak / base_memory,
                "target": target,
                "passed": None if target is None else timing["ratio"] <= target,
            }
        )
    return rows


def inference_rows(timings: dict[str, dict]) -> list[dict]:
    """Table rows with the verdict ``|ratio - 1| <= 0.03``; ``None`` where the fused model keeps
    a per-sample normalization (``timing["kept"]``, see :func:`kept_normalization`)."""
    return [
        {
            "scheme": scheme,
            **timing,
            "passed": None
            if timing.get("kept")
            else abs(timing["ratio"] - 1.0) <= INFERENCE_TOLERANCE,
        }
        for scheme, timing in timings.items()
    ]


def _number(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _verdict(row: dict, target: str) -> str:
    if row["passed"] is None:
        return "—"
    return f"{'pass' if row['passed'] else 'FAIL'} ({target})"


def training_markdown(workload: Workload, rows: Sequence[dict]) -> str:
    """A markdown table of :func:`training_rows`."""
    lines = [
        f"{workload.title}, {workload.images} images of {workload.size}x{workload.size}, "
        f"relative to {workload.baseline}:",
        "",
        "| scheme | step ms | time ratio | CPU-time ratio | peak MiB | memory ratio | target |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        target = "—" if row["target"] is None else f"≤ {row['target']:.2f}×"
        lines.append(
            f"| {row['scheme']} | {row['ms']:.0f} | {row['ratio']:.2f}× | "
            f"{row['cpu_ratio']:.2f}× | {_number(row['peak_mib'], '.0f')} | "
            f"{_number(row['memory_ratio'], '.2f')}{'×' if row['memory_ratio'] else ''} | "
            f"{_verdict(row, target) if row['target'] else '—'} |"
        )
    return "\n".join(lines)


def _inference_verdict(row: dict) -> str:
    if row["passed"] is None:
        return f"— (keeps {row['kept']})"
    return "pass" if row["passed"] else "FAIL"


def inference_markdown(workload: Workload, rows: Sequence[dict]) -> str:
    """A markdown table of :func:`inference_rows`."""
    lines = [
        f"{workload.title}, {workload.images} images of {workload.size}x{workload.size}, eval "
        "mode: each scheme's fused model relative to the plain-convolution model holding its "
        "weights:",
        "",
        "| scheme | fused ms | plain ms | time ratio | CPU-time ratio | 1.00 ± 0.03 |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['scheme']} | {row['ms']:.0f} | {row['plain_ms']:.0f} | {row['ratio']:.3f}× | "
            f"{row['cpu_ratio']:.3f}× | {_inference_verdict(row)} |"
        )
    return "\n".join(lines)


def _processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device) -> dict:
    """Versions, threads, load and processor, recorded with the results."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    info = {
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_at_start": round(load, 2),
        "processor": _processor_name(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def select_workloads(
    preset: str, archs: Sequence[str], size: int | None = None, images: int | None = None
) -> list[Workload]:
    """The ``preset``'s workloads of ``archs``, at another ``size`` / ``images`` when given.

    Raises:
        ValueError: an unknown preset or architecture (naming the known ones).
    """
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}; got {preset!r}")
    chosen = []
    for arch in archs:
        if arch not in PRESETS[preset]:
            raise ValueError(
                f"--archs: unknown architecture {arch!r}; expected {sorted(PRESETS[preset])}"
            )
        workload = PRESETS[preset][arch]
        if size is not None:
            workload = replace(workload, size=size)
        if images is not None:
            workload = replace(workload, images=images)
        chosen.append(workload)
    return chosen


def candidate_schemes(
    specs: Sequence[str] | None, workload: Workload, agc: bool = False
) -> list[str]:
    """The requested schemes (canonical names, options kept as written; all when None),
    baseline first; with ``agc`` each also as ``"<scheme> +AGC"``."""
    names = []
    for spec in specs or ALL_SCHEMES:
        scheme = get_scheme(spec)  # raises on an unknown name or option
        names.append(spec.strip() if scheme.options else scheme.name)
    names = [workload.baseline] + [n for n in names if n != workload.baseline]
    names = list(dict.fromkeys(names))
    if agc:
        names = [m for n in names for m in (n, n + AGC_SUFFIX)]
    return names
