"""Run mmdet / mmseg configs with norm_det: ``python -m norm_det.mm train|test CONFIG [...]``.

The OpenMMLab tools' commands, made to run where only mmcv-lite is installed and on torch >= 2.6
(see :mod:`norm_det.mm.cli`)::

    python -m norm_det.mm train configs/mmdet/mask-rcnn_r50_fpn_ndpp-all_1x_coco.py --work-dir W
    python -m norm_det.mm test configs/mmdet/mask-rcnn_r50_fpn_ndpp-all_1x_coco.py W/iter_N.pth

Importing this package imports neither mmdet nor mmseg; the commands do, after installing
norm_det's ``mmcv.ops`` bridge.
"""

from norm_det.mm.checkpoint import allow_mmengine_checkpoints, mmengine_checkpoint_globals

__all__ = ["allow_mmengine_checkpoints", "main", "mmengine_checkpoint_globals"]


def main(argv: list[str] | None = None, framework: str | None = None) -> int:
    """``python -m norm_det.mm`` (see :func:`norm_det.mm.cli.main`)."""
    from norm_det.mm.cli import main as run

    return run(argv, framework)
