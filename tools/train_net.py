#!/usr/bin/env python
"""Train or evaluate a norm_det model from a config.

    python tools/train_net.py --config-file mask_rcnn_ndpp.yaml [--num-gpus N] [--resume]
        [--eval-only] [KEY VALUE ...]

See ``--help`` for examples, and docs/training.md.
"""

from __future__ import annotations

from datetime import timedelta

from norm_det.config import load_config
from norm_det.engine import (
    Checkpointer,
    Trainer,
    default_argument_parser,
    default_setup,
    launch,
)


def setup(args):
    """The config of this run: defaults, the config file, then the KEY VALUE overrides."""
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    cfg.freeze()
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = Checkpointer(model, cfg.OUTPUT_DIR)
        if not cfg.MODEL.WEIGHTS and not (args.resume and checkpointer.last_checkpoint()):
            raise ValueError(
                "--eval-only needs weights: pass MODEL.WEIGHTS path/to/model.pth, or --resume "
                f"with a checkpoint in OUTPUT_DIR ({cfg.OUTPUT_DIR})"
            )
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        dist_url=args.dist_url,
        backend=args.dist_backend,
        timeout=timedelta(seconds=args.dist_timeout),
        args=(args,),
    )
