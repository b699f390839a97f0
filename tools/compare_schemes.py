#!/usr/bin/env python
"""Train the quick configs of several schemes alike and plot their loss and AP curves together.

Every run gets the same seed (so the same data order and augmentation draws), the same number
of iterations and the same evaluation period; each trains in its own ``tools/train_net.py``
process, writing ``OUTPUT_DIR/<config name>/metrics.jsonl``. The curves of all runs are then
drawn into one PNG (total loss and each headline metric, e.g. bbox AP and mask AP, against the
iteration) and summarised in a markdown table.

    python tools/compare_schemes.py --schemes NDPP GN GN+WS PWS BN --iters 200 --eval-period 50 \
        --plot docs/images/compare_mask_rcnn.png
    python tools/compare_schemes.py --configs mask_rcnn_ndpp.yaml my_config.yaml --iters 100
    python tools/compare_schemes.py --schemes NDPP GN --no-train      # re-plot finished runs

A scheme name picks ``configs/quick/<arch>_<scheme>.yaml`` (``--arch``, default ``mask_rcnn``);
``--iters`` rescales the config's LR steps and warmup to the new length; ``--opts KEY VALUE ...``
overrides every run's config. docs/compare_schemes.md shows a result.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from norm_det.config import find_config_file, load_config
from norm_det.schemes import get_scheme
from norm_det.studies import comparison


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--schemes", nargs="+", help="scheme names: configs/quick/<arch>_<s>.yaml")
    which.add_argument("--configs", nargs="+", help="config files (paths or bare names)")
    parser.add_argument("--arch", default="mask_rcnn", help="quick config prefix for --schemes")
    parser.add_argument(
        "--base",
        default=None,
        help="one config for every scheme, the scheme set in its --norm-keys (--schemes)",
    )
    parser.add_argument(
        "--norm-keys",
        nargs="+",
        default=["RESNETS"],
        metavar="KEY",
        help="with --base: the MODEL.<KEY>.NORM keys set to the scheme (default: RESNETS)",
    )
    parser.add_argument("--iters", type=int, default=None, help="iterations (default: config's)")
    parser.add_argument("--eval-period", type=int, default=50, help="0: evaluate at the end only")
    parser.add_argument("--seed", type=int, default=42, help="the seed of a one-seed comparison")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="K (seeds 1..K) or the seeds to run"
    )
    parser.add_argument(
        "--sweep", nargs="+", default=None, metavar=("KEY", "VALUE"), help="a key and its values"
    )
    parser.add_argument("--baseline", default=None, help="scheme the others are compared with")
    parser.add_argument(
        "--metrics", nargs="+", default=None, help="metrics of the table (default: headline)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (threads split)")
    parser.add_argument("--log-period", type=int, default=10, help="iterations per loss point")
    parser.add_argument("--output-dir", default="output/compare_schemes")
    parser.add_argument("--plot", default=None, help="PNG path (default: OUTPUT_DIR/curves.png)")
    parser.add_argument("--json", default=None, help="also write the table rows as JSON here")
    parser.add_argument("--no-train", action="store_true", help="only read finished runs")
    parser.add_argument(
        "--opts", nargs="+", default=[], metavar="KEY VALUE", help="overrides for every run"
    )
    args = parser.parse_args(argv)
    if len(args.opts) % 2:
        parser.error(f"--opts: KEY VALUE overrides come in pairs; got {args.opts}")
    if args.sweep is not None and len(args.sweep) < 2:
        parser.error("--sweep: give a config key and at least one value")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1; got {args.jobs}")
    try:
        seeds = comparison.seed_list(args.seeds, args.seed)
    except ValueError as error:
        parser.error(str(error))

    if args.base and args.schemes:
        base = find_config_file(args.base)
        load_config(base, [o for k in args.norm_keys for o in (f"MODEL.{k}.NORM", "GN")])
        configs = [(base, get_scheme(s).name) for s in args.schemes]
    elif args.schemes:
        configs = [
            (c, comparison.run_label(c))
            for c in (comparison.quick_config_for(s, args.arch) for s in args.schemes)
        ]
    else:
        configs = [
            (c, comparison.run_label(c)) for c in (find_config_file(c) for c in args.configs)
        ]
    if args.baseline and get_scheme(args.baseline).name not in {label for _, label in configs}:
        parser.error(f"--baseline {args.baseline!r} is none of the compared schemes")
    if args.sweep is None and args.seeds is None and not args.base:
        return _one_seed(args, [c for c, _ in configs])

    output_dir = Path(args.output_dir)
    sweep_key, sweep_values = (args.sweep[0], args.sweep[1:]) if args.sweep else (None, [])
    if sweep_key == comparison.IMAGES_PER_PASS:
        for value in sweep_values:  # a value that does not divide fails here
            comparison.accumulate_steps(configs[0][0], value)
    elif sweep_key:
        load_config(configs[0][0], [sweep_key, sweep_values[0]])  # an unknown key fails here
    folders = [
        (
            config,
            label,
            f"{config.stem}_{comparison.scheme_slug(label)}" if args.base else config.stem,
        )
        for config, label in configs
    ]
    runs = comparison.plan_runs(folders, seeds, output_dir, sweep_key, sweep_values)

    def opts_of(run: comparison.Run) -> list[str]:
        keys = args.norm_keys if args.base else ()
        schedule = (args.iters, args.eval_period, args.log_period)
        return comparison.run_overrides(run, schedule, keys, sweep_key, args.opts)

    if args.no_train:
        states = {run: state for run in runs if (state := comparison.run_state(run)) is not None}
    else:
        states = comparison.run_sweep(runs, opts_of, jobs=args.jobs, sweep_key=sweep_key)
    metrics = args.metrics or comparison.present_metrics(runs, states)
    groups = comparison.collect(runs, states, metrics)
    baseline = get_scheme(args.baseline).name if args.baseline else None
    table, rows = comparison.interval_table(groups, metrics, baseline, sweep_key)
    plot_path = Path(args.plot) if args.plot else output_dir / "curves.png"
    what = f"{len(seeds)} seeds ({', '.join(map(str, seeds))})"
    if sweep_key:
        comparison.plot_sweep(groups, metrics[0], sweep_key, plot_path, title=what)
    else:
        comparison.plot_mean_curves(
            runs, states, plot_path, title=f"{what}: same data and schedule", metrics=metrics
        )
    print(table)
    print(f"plot: {plot_path}")
    failed = [run for run in runs if states.get(run, {}).get("status") == "failed"]
    for run in failed:
        print(f"failed: {run.describe(sweep_key)} ({states[run]['error']})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return 1 if failed else 0


def _one_seed(args: argparse.Namespace, configs: Sequence[Path]) -> int:
    """The one-seed comparison: each config once, curves and the table of final values."""
    output_dir = Path(args.output_dir)
    runs: dict[str, list[dict]] = {}
    rows = []
    for index, config in enumerate(configs, start=1):
        label = comparison.run_label(config)
        if label in runs:  # two configs of one scheme: tell them apart by file
            label = config.stem
        run_dir = output_dir / config.stem
        wall = None
        if not args.no_train:
            opts = comparison.schedule_overrides(
                config, args.iters, args.eval_period, args.seed, args.log_period
            )
            print(f"[{index}/{len(configs)}] training {config.name} -> {run_dir}", flush=True)
            wall = comparison.runs.train(config, run_dir, [*opts, *args.opts])
            print(f"    done in {wall / 60:.1f} min", flush=True)
        records = comparison.read_metrics(run_dir / "metrics.jsonl")
        runs[label] = records
        rows.append(comparison.summarize(label, records, wall))

    plot_path = Path(args.plot) if args.plot else output_dir / "curves.png"
    what = f"quick {args.arch} configs" if args.schemes else "configs"
    comparison.plot_curves(
        runs, plot_path, title=f"{what}, seed {args.seed}: same data and schedule"
    )
    table = comparison.markdown_table(rows)
    print(table)
    print(f"curves: {plot_path}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
