"""BN vs CZMIG (mean-shift rejection) on a small ResNet, on textures and shapes made in code.

Ruff, Beck & Bach, "Mean Shift Rejection", 2019, section 4 in miniature: a CIFAR-style ResNet
trained with SGD (momentum 0.9, the learning rate divided by 10 at 50% and 75% of training) once
with BatchNorm and L2 weight decay, once with the ``CZM`` scheme (CZM init, CZMG z = 0.85, LUMA
with lambda = the weight decay, noise 0.1 at residual-unit inputs), each at learning rates 0.1
and 0.4. The data set is generated in memory (8 classes: stripes at four orientations, disc,
ring, square outline, cross; random colours, contrast, brightness offset and noise), so the
experiment needs no download and runs in a few minutes on two CPU cores.

Writes the training curves to ``docs/images/czm_curves.png`` and the results table into
``docs/czm.md`` (between the ``czm-results`` markers)::

    python tools/czm_experiment.py                 # the documented run
    python tools/czm_experiment.py --epochs 2 --no-docs   # a quick look
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from norm_det.studies.czm import (
    Run,
    make_shapes_dataset,
    plot_curves,
    results_table,
    train,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--blocks-per-stage", type=int, default=1, help="n of ResNet-(6n+2)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="= the LUMA weight")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--plot", type=Path, default=REPO / "docs/images/czm_curves.png")
    parser.add_argument("--doc", type=Path, default=REPO / "docs/czm.md")
    parser.add_argument("--no-docs", action="store_true", help="print only; write no files")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    train_data = make_shapes_dataset(args.train_size, args.image_size, seed=args.seed)
    test_data = make_shapes_dataset(args.test_size, args.image_size, seed=args.seed + 1)
    # Per-channel standardization with the training set's statistics (CIFAR practice); the
    # per-image brightness offsets remain, as mean shifts of the input.
    mean = train_data[0].mean(dim=(0, 2, 3), keepdim=True)
    std = train_data[0].std(dim=(0, 2, 3), keepdim=True)
    data = ((train_data[0] - mean) / std, train_data[1], (test_data[0] - mean) / std, test_data[1])
    schemes = {
        "BN": "BN",
        "CZMIG": f"CZM(zmg=0.85, noise=0.1, luma={args.weight_decay})",
    }
    runs = [
        Run(label=f"{name} lr={lr}", scheme=spec, lr=lr)
        for name, spec in schemes.items()
        for lr in args.lrs
    ]
    for run in runs:
        train(
            run,
            data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            weight_decay=args.weight_decay,
            blocks_per_stage=args.blocks_per_stage,
            seed=args.seed,
        )
    settings = (
        f"ResNet-{6 * args.blocks_per_stage + 2} (widths 16/32/64), {args.train_size} train / "
        f"{args.test_size} test images of {args.image_size}x{args.image_size}, {args.epochs} "
        f"epochs, batch {args.batch_size}, SGD momentum 0.9, LR / 10 at epochs "
        f"{args.epochs // 2} and {(3 * args.epochs) // 4}, weight decay (BN) = LUMA weight "
        f"(CZMIG) = {args.weight_decay}, seed {args.seed}, {args.threads} CPU threads, "
        f"torch {torch.__version__}."
    )
    table = results_table(runs, settings)
    print(table)
    if not args.no_docs:
        plot_curves(runs, args.plot)
        write_results(args.doc, table)
        print(f"wrote {args.plot} and the table in {args.doc}")


if __name__ == "__main__":
    main()
