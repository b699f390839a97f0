"""norm_det's synthetic data in the layouts of mmdet's ``CocoDataset`` and mmseg's
``CityscapesDataset``, for smoke runs of OpenMMLab configs (``configs/mmdet/synthetic``,
``configs/mmseg/synthetic``).

The COCO layout is norm_det's own (:func:`norm_det.data.synthetic.generate_synthetic_coco`);
mmdet reads it once the config names the shape classes. mmseg's Cityscapes dataset reads
``*_gtFine_labelTrainIds.png`` (train ids 0..18, 255 ignored), which Cityscapes' own scripts
derive from the label ids; :func:`write_synthetic_cityscapes` writes them next to the label ids of
:func:`norm_det.data.synthetic.generate_synthetic_cityscapes`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from norm_det.data.cityscapes import LABEL_SUFFIX, cityscapes_label_id_to_train_id
from norm_det.data.synthetic import generate_synthetic_cityscapes, generate_synthetic_coco

TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"


def write_synthetic_coco(
    root: str | Path, *, num_train: int = 8, num_val: int = 4, size: int = 128, seed: int = 0
) -> Path:
    """Synthetic shapes in COCO format under ``root``: images of ``size * 3/4 .. size`` pixels.

    Returns:
        ``root``; annotations in ``annotations/instances_{train,val}.json``, images in
        ``train/`` and ``val/``; category names :data:`norm_det.data.synthetic.SHAPE_CLASSES`.
    """
    return generate_synthetic_coco(
        root,
        num_train=num_train,
        num_val=num_val,
        min_size=max(32, size * 3 // 4),
        max_size=size,
        seed=seed,
    )


def write_synthetic_cityscapes(
    root: str | Path, *, num_train: int = 8, num_val: int = 4, height: int = 128, seed: int = 0
) -> Path:
    """Synthetic street scenes in the Cityscapes layout under ``root``, with train-id maps.

    Returns:
        ``root``, holding ``leftImg8bit/`` and ``gtFine/`` (label ids, instance ids and the
        ``*_gtFine_labelTrainIds.png`` that mmseg reads); images ``height x 2 * height``.
    """
    root = generate_synthetic_cityscapes(
        root, num_train=num_train, num_val=num_val, height=height, width=2 * height, seed=seed
    )
    lookup = np.full(256, 255, dtype=np.uint8)
    for label_id, train_id in cityscapes_label_id_to_train_id().items():
        lookup[label_id] = train_id
    for label_file in sorted((root / "gtFine").rglob(f"*{LABEL_SUFFIX}")):
        target = label_file.with_name(label_file.name.replace(LABEL_SUFFIX, TRAIN_ID_SUFFIX))
        if not target.exists():
            Image.fromarray(lookup[np.asarray(Image.open(label_file))]).save(target)
    return root
