"""``python -m norm_det.mm train|test CONFIG ...``: mmdet's / mmseg's train and test tools.

The two commands do what ``tools/train.py`` and ``tools/test.py`` of mmdet 3.x and mmseg 1.x do
(read the config, apply ``--cfg-options``, ``--work-dir``, ``--amp``, ``--auto-scale-lr``,
``--resume``, the checkpoint to test; build mmengine's ``Runner``; train or test), with three
differences that make them run with norm_det:

1. norm_det's ``mmcv.ops`` bridge is installed before anything imports mmdet or mmseg (their
   own ``tools/test.py`` imports ``mmdet.engine`` before it reads ``custom_imports``, which fails
   on ``mmcv._ext`` where only mmcv-lite is installed), and ``norm_det.integrations.mmdet``
   registers the scheme types and the build hook, so a config needs no ``custom_imports``;
2. checkpoints are read by torch's ``weights_only`` unpickler with the classes mmengine's
   checkpoints hold allowed (:mod:`norm_det.mm.checkpoint`), so ``--resume`` and testing work on
   torch >= 2.6 without ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``;
3. the framework is read from the config (``default_scope``, else the model type), so one
   command serves both; ``python -m norm_det.mm.det`` / ``norm_det.mm.seg`` force one.

``python -m norm_det.mm synthetic coco|cityscapes ROOT`` writes norm_det's synthetic data in the
layouts mmdet's ``CocoDataset`` and mmseg's ``CityscapesDataset`` read (for the smoke configs
in ``configs/mmdet/synthetic`` and ``configs/mmseg/synthetic``).
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
from collections.abc import Sequence
from typing import Any

from norm_det.mm.checkpoint import allow_mmengine_checkpoints

FRAMEWORKS = ("mmdet", "mmseg")
_PROG = "python -m norm_det.mm"


# ---------------------------------------------------------------------------------------------
# Arguments: those of mmdet's and mmseg's tools/train.py and tools/test.py.


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--work-dir", help="folder for logs and checkpoints (default: ./work_dirs/CONFIG_NAME)"
    )
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=_dict_action(),
        help="override config keys, key=value (mmengine's DictAction syntax)",
    )
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)


def _dict_action() -> type[argparse.Action]:
    from mmengine.config import DictAction

    return DictAction


def build_parser(prog: str = _PROG) -> argparse.ArgumentParser:
    """The parser of ``python -m norm_det.mm``: sub-commands ``train``, ``test``, ``synthetic``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train or test an mmdet / mmseg config with norm_det (mmdet's and mmseg's "
        "tools/train.py and tools/test.py, with the mmcv.ops bridge and checkpoint loading).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a config (mmdet's / mmseg's tools/train.py)")
    train.add_argument("config", help="the config file")
    train.add_argument("--amp", action="store_true", help="automatic mixed precision")
    train.add_argument(
        "--auto-scale-lr",
        action="store_true",
        help="scale the LR by the actual batch size over the config's "
        "auto_scale_lr.base_batch_size",
    )
    train.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        help="resume from this checkpoint, or (no value) from the latest in the work dir",
    )
    _add_common(train)

    test = commands.add_parser("test", help="test a checkpoint (mmdet's / mmseg's tools/test.py)")
    test.add_argument("config", help="the config file")
    test.add_argument("checkpoint", help="the checkpoint file to test")
    test.add_argument(
        "--out",
        help="mmdet: dump the predictions to this .pkl file; mmseg: save the predicted maps in "
        "this folder",
    )
    _add_common(test)

    synthetic = commands.add_parser(
        "synthetic", help="write norm_det's synthetic data in mmdet's / mmseg's layouts"
    )
    synthetic.add_argument("layout", choices=["coco", "cityscapes"])
    synthetic.add_argument("root", help="the dataset folder to write")
    synthetic.add_argument("--num-train", type=int, default=8)
    synthetic.add_argument("--num-val", type=int, default=4)
    synthetic.add_argument(
        "--size",
        type=int,
        default=128,
        help="image size (coco: the largest side; cityscapes: the height, width twice that)",
    )
    synthetic.add_argument("--seed", type=int, default=0)
    return parser


# ---------------------------------------------------------------------------------------------
# Config.


def _prepare_imports() -> None:
    """The bridge first, then norm_det's types and build hook: before mmdet / mmseg load."""
    from norm_det.integrations import mmcv_ops_bridge

    mmcv_ops_bridge.install()
    import norm_det.integrations.mmdet  # noqa: F401  (registers the types and the build hook)


def framework_of(cfg: Any, config_path: str) -> str:
    """``"mmdet"`` or ``"mmseg"``: the config's ``default_scope``, else where its model type is.

    Raises:
        ValueError: neither tells.
    """
    scope = cfg.get("default_scope")
    if scope in FRAMEWORKS:
        return scope
    model = cfg.get("model")
    model_type = model.get("type") if isinstance(model, dict) else None
    owners = [name for name in FRAMEWORKS if _registers(name, model_type)]
    if len(owners) == 1:
        return owners[0]
    raise ValueError(
        f"{config_path}: cannot tell whether it is an mmdet or an mmseg config: default_scope "
        f"is {scope!r} (expected one of {FRAMEWORKS}) and model type {model_type!r} is "
        f"registered by {owners or 'neither'}; set default_scope in the config or run "
        "python -m norm_det.mm.det / python -m norm_det.mm.seg"
    )


def _registers(framework: str, model_type: Any) -> bool:
    if not isinstance(model_type, str):
        return False
    from mmengine.registry import DefaultScope

    registry = _framework_module(framework, "registry").MODELS
    # Looking a name up in a scope imports that framework's models first (its `locations`).
    with DefaultScope.overwrite_default_scope(framework):
        return model_type in registry.module_dict or registry.get(model_type) is not None


def _framework_module(framework: str, name: str) -> Any:
    import importlib

    return importlib.import_module(f"{framework}.{name}")


def load_config(args: argparse.Namespace, framework: str | None) -> tuple[Any, str]:
    """The config with the command line applied (as the tools do), and its framework."""
    from mmengine.config import Config

    if not osp.isfile(args.config):
        raise FileNotFoundError(f"{_PROG} {args.command}: config file {args.config!r} not found")
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    framework = framework or framework_of(cfg, args.config)
    # work_dir: the command line, else the config's, else ./work_dirs/<config name>.
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    return cfg, framework


def _apply_train_options(cfg: Any, args: argparse.Namespace) -> None:
    if args.amp:
        wrapper = cfg.optim_wrapper.get("type", "OptimWrapper")
        if wrapper not in ("OptimWrapper", "AmpOptimWrapper"):
            raise ValueError(
                f"--amp: optim_wrapper.type of {args.config} is {wrapper!r}; mixed precision is "
                "applied by replacing 'OptimWrapper' with 'AmpOptimWrapper'"
            )
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    if args.auto_scale_lr:
        scale = cfg.get("auto_scale_lr")
        if not scale or "base_batch_size" not in scale:
            raise ValueError(
                f"--auto-scale-lr: {args.config} has no auto_scale_lr.base_batch_size (the batch "
                "size its LR is for)"
            )
        cfg.auto_scale_lr.enable = True
    # --resume PATH resumes from PATH; --resume alone from the work dir's latest checkpoint.
    if args.resume == "auto":
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        _check_checkpoint(args.resume, "--resume")
        cfg.resume = True
        cfg.load_from = args.resume


def _check_checkpoint(path: str, argument: str) -> None:
    if "://" not in path and not osp.isfile(path):
        raise FileNotFoundError(f"{_PROG}: {argument} checkpoint file {path!r} not found")


def _build_runner(cfg: Any, framework: str) -> Any:
    from mmengine.runner import Runner

    if "runner_type" in cfg:
        return _framework_module(framework, "registry").RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


# ---------------------------------------------------------------------------------------------
# Commands.


def train(args: argparse.Namespace, framework: str | None = None) -> None:
    """mmdet's / mmseg's ``tools/train.py``."""
    _prepare_imports()
    cfg, framework = load_config(args, framework)
    if framework == "mmdet":
        # mmdet's train.py: fewer recompilations when a config uses torch.compile.
        from mmdet.utils import setup_cache_size_limit_of_dynamo

        setup_cache_size_limit_of_dynamo()
    _apply_train_options(cfg, args)
    runner = _build_runner(cfg, framework)
    with allow_mmengine_checkpoints():
        runner.train()


def test(args: argparse.Namespace, framework: str | None = None) -> dict[str, Any]:
    """mmdet's / mmseg's ``tools/test.py``.

    Returns:
        The metrics of the test evaluator.
    """
    _prepare_imports()
    _check_checkpoint(args.checkpoint, "the")
    cfg, framework = load_config(args, framework)
    cfg.load_from = args.checkpoint
    if args.out is not None and framework == "mmseg":
        cfg.test_evaluator["output_dir"] = args.out
        cfg.test_evaluator["keep_results"] = True
    if args.out is not None and framework == "mmdet" and not args.out.endswith((".pkl", ".pickle")):
        raise ValueError(f"--out: mmdet dumps its predictions to a .pkl file; got {args.out!r}")
    runner = _build_runner(cfg, framework)
    if args.out is not None and framework == "mmdet":
        from mmdet.evaluation import DumpDetResults

        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    with allow_mmengine_checkpoints():
        return runner.test()


def synthetic(args: argparse.Namespace) -> None:
    """Write norm_det's synthetic data under ``args.root`` (see :mod:`norm_det.mm.synthetic`)."""
    from norm_det.mm.synthetic import write_synthetic_cityscapes, write_synthetic_coco

    counts = dict(num_train=args.num_train, num_val=args.num_val, seed=args.seed)
    if args.layout == "coco":
        root = write_synthetic_coco(args.root, size=args.size, **counts)
    else:
        root = write_synthetic_cityscapes(args.root, height=args.size, **counts)
    print(f"{_PROG} synthetic: wrote {args.layout} data under {root}")


def main(argv: Sequence[str] | None = None, framework: str | None = None) -> int:
    """Run ``python -m norm_det.mm``; ``framework`` forces mmdet or mmseg.

    Returns:
        The exit status (0).
    """
    prog = _PROG if framework is None else f"{_PROG}.{framework[2:]}"
    args = build_parser(prog).parse_args(argv)
    # As the tools: torch.distributed.launch passes the rank as an argument, mmengine reads it
    # from the environment.
    if args.command != "synthetic" and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    if args.command == "train":
        train(args, framework)
    elif args.command == "test":
        test(args, framework)
    else:
        synthetic(args)
    return 0
