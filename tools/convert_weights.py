"""Convert backbone weights between frameworks and normalization schemes, or fold them for
deployment.

    python tools/convert_weights.py SRC DST --to detectron2|mmdet|torchvision|norm_det
        [--scheme PWS] [--calibration-images images.pt] [--fuse] [--allow-pickle]

SRC's format (torchvision, norm_det, detectron2 .pkl / .pth, mmdet / mmseg .pth, and the source
formats of the papers' releases and the zoos: docs/weights.md) is recognised from its keys;
``--from FORMAT`` names it where the keys cannot tell. Examples::

    # the ND++ release's ImageNet ResNet-50, or BiT's GN+WS ResNet-V2 from timm, for norm_det
    python tools/convert_weights.py model_best.pth.tar r50_ndpp.pth --to norm_det
    python tools/convert_weights.py resnetv2_50x1_bit.pth bit.pth --to norm_det
    # a torchvision ImageNet ResNet-50 for detectron2 / mmdet
    python tools/convert_weights.py resnet50.pth R-50.pkl --to detectron2
    python tools/convert_weights.py resnet50.pth r50.pth --to mmdet
    # start a PWS (or GN+WS, NDPP, CZM ...) backbone from it, for MODEL.WEIGHTS
    python tools/convert_weights.py resnet50.pth r50_pws.pth --to norm_det --scheme PWS
    # fold a trained PWS backbone into plain layers that torchvision's resnet50 loads
    python tools/convert_weights.py r50_pws.pth r50_plain.pth --to torchvision --fuse
    # the initialization of a whole PWS detector (MODEL.WEIGHTS), its backbone warm-started
    python tools/convert_weights.py resnet50.pth init.pth --to norm_det \\
        --config-file configs/COCO-Detection/faster_rcnn_R_50_FPN_1x_pws.yaml
    # a whole trained model from its config: fused weights and an ONNX file
    python tools/convert_weights.py model_final.pth fused.pth --to norm_det --fuse \\
        --config-file configs/COCO-Detection/faster_rcnn_R_50_FPN_1x_pws.yaml --onnx model.onnx

docs/weights.md says what each scheme conversion preserves; docs/deploy.md covers deployment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from norm_det.weights import FRAMEWORKS, read_checkpoint, write_checkpoint
from norm_det.weights.conversion import (
    describe_checkpoint,
    export_model_onnx,
    finish_backbone,
    model_from_config,
    read_calibration_images,
    save_model,
    warm_start_backbone,
    warm_start_model_backbone,
)
from norm_det.weights.formats import known_formats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help="checkpoint to read (format recognised from its keys)")
    parser.add_argument("dst", help="checkpoint to write (.pkl: a detectron2 pickle)")
    parser.add_argument("--to", required=True, choices=FRAMEWORKS, help="format of DST")
    parser.add_argument(
        "--from",
        dest="source_format",
        metavar="FORMAT",
        help="format of SRC (default: recognised from its keys): " + ", ".join(known_formats()),
    )
    parser.add_argument(
        "--scheme", help="warm-start the backbone in this scheme (PWS, 'GN+WS', NDPP, CZM ...)"
    )
    parser.add_argument(
        "--source-scheme",
        help="the scheme SRC was saved with, where its tensors do not tell (GN vs GN+WS, ND vs "
        "NDPP, options such as GN groups)",
    )
    parser.add_argument(
        "--calibration-images",
        help="a torch file holding an (N, 3, H, W) tensor of normalized images: fit the "
        "warm-started units to the BN network's activations on them",
    )
    parser.add_argument("--fuse", action="store_true", help="fold everything into plain layers")
    parser.add_argument(
        "--allow-inexact",
        action="store_true",
        help="with --fuse: write NDPP weights without their per-sample input standardization",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read SRC even if it is a pickle (.pkl) or holds Python objects: only for files "
        "you trust",
    )
    parser.add_argument(
        "--drop-unmapped",
        action="store_true",
        help="leave out tensors DST's format has no place for (a detector's FPN and heads, "
        "SSD's layers in torchvision's VGG)",
    )
    parser.add_argument(
        "--config-file",
        help="write the whole norm_det model of this config: SRC is its trained checkpoint, or a "
        "backbone checkpoint to warm-start its backbone from (for MODEL.WEIGHTS); --fuse writes "
        "it fused (with the config that builds it), --onnx exports it",
    )
    parser.add_argument("--onnx", help="with --config-file: also export the fused model here")
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=(320, 320),
        metavar=("H", "W"),
        help="example image size for --onnx (height and width stay dynamic)",
    )
    parser.add_argument(
        "opts", nargs="*", help="config overrides KEY VALUE ... (with --config-file)"
    )
    return parser


def _calibration_images(path: str | None):
    return read_calibration_images(path, source=f"--calibration-images '{path}'")


def convert_backbone(args: argparse.Namespace) -> None:
    weights = read_checkpoint(args.src, allow_pickle=args.allow_pickle, fmt=args.source_format)
    print(f"read {describe_checkpoint(weights, args.src)}")
    if args.scheme:
        images = _calibration_images(args.calibration_images)
        started = warm_start_backbone(
            weights, args.scheme, source_scheme=args.source_scheme, calibration_images=images
        )
        print(f"warm start {started.source_scheme} -> {args.scheme}: {started.describe()}")
        weights = started.weights
        args.source_scheme = None  # the converted weights record their scheme
    elif args.calibration_images:
        raise ValueError("--calibration-images calibrates a --scheme conversion; give --scheme")
    weights = finish_backbone(
        weights, fuse=args.fuse, source_scheme=args.source_scheme, allow_inexact=args.allow_inexact
    )
    if args.fuse:
        print(f"fused into plain layers (norm_det models load them with {weights.scheme})")
        if weights.others and args.to == weights.framework:
            print(
                f"note: the {len(weights.others)} tensors outside the backbone are written "
                "unchanged, not fused; --config-file fuses a whole norm_det model"
            )
    path = write_checkpoint(weights, args.dst, args.to, drop_unmapped=args.drop_unmapped)
    print(f"wrote {path} ({args.to})")


def convert_model(args: argparse.Namespace) -> None:
    """A whole model from its config: fused weights, an ONNX file, or (from a backbone
    checkpoint) the model's initialization with its backbone warm-started."""
    from norm_det.engine.checkpointer import Checkpointer

    if args.scheme or args.to != "norm_det":
        raise ValueError(
            "--config-file writes a whole norm_det model (--to norm_det) in the config's schemes; "
            "to convert a backbone to another scheme or framework leave --config-file out"
        )
    cfg, model = model_from_config(args.config_file, args.opts)
    weights = read_checkpoint(args.src, allow_pickle=args.allow_pickle, fmt=args.source_format)
    if weights.framework == "norm_det" and weights.others:
        Checkpointer(model, Path(args.dst).parent).load(args.src, full=False)
        print(f"loaded the whole model from {args.src}")
    else:
        images = _calibration_images(args.calibration_images)
        report, scheme = warm_start_model_backbone(
            model, cfg, weights, source_scheme=args.source_scheme, calibration_images=images
        )
        print(
            f"warm-started {report['backbone']} ({scheme or 'none'}) from the {weights.framework} "
            f"backbone in {args.src}; the other layers keep their initialization"
        )
    inexact = save_model(model, cfg, args.dst, fuse=args.fuse, allow_inexact=args.allow_inexact)
    if args.fuse:
        note = f" ({len(inexact)} layers keep input standardization)" if inexact else ""
        print(f"wrote the fused model's weights to {args.dst}{note}; meta['config'] builds it")
    else:
        print(f"wrote the model's weights to {args.dst} (for MODEL.WEIGHTS)")
    if args.onnx:
        path, names = export_model_onnx(model, args.onnx, tuple(args.image_size))
        print(f"exported {path} (outputs: {', '.join(names)})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        if args.config_file:
            convert_model(args)
        else:
            if args.onnx:
                raise ValueError("--onnx exports a whole model: give its --config-file")
            convert_backbone(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
