"""Map-style datasets turning records into ``(image, target)`` samples.

``image`` is a (3, H, W) float32 RGB tensor in [0, 1]; ``target`` holds, for every dataset,
``"image_id"`` (int), ``"file_name"`` (str), ``"orig_size"`` (2,) int64 = (height, width) of the
file on disk and ``"size"`` (2,) int64 = (height, width) of ``image`` after the transforms.
Predictions made on ``image`` map back to the file by the factors ``orig_size / size``.

Detection adds ``"boxes"`` (N, 4) float32 XYXY pixels of ``image``, ``"labels"`` (N,) int64 in
1..K, ``"iscrowd"`` (N,) int64, ``"masks"`` (N, H, W) uint8 when the dataset has masks and
``"difficult"`` (N,) int64 for VOC. Semantic segmentation adds ``"sem_seg"`` (H, W) int64 train
ids with ``ignore_label`` 255 and ``"sem_seg_file_name"``.

An index may be an int or a pair ``(index, seed)``: the seed drives the random transforms, so the
training loader reproduces the same augmentation for the same position in its sample stream.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from norm_det.data.image_io import read_image, read_label_png
from norm_det.data.masks import segmentation_to_mask

__all__ = ["DetectionDataset", "SemSegDataset"]

Record = dict[str, Any]
Key = int | tuple[int, int]


class _RecordDataset(Dataset):
    """Shared behaviour: records, metadata, the (index, seed) keys, aspect-ratio groups."""

    def __init__(self, records: list[Record], metadata: dict[str, Any], transforms: Any) -> None:
        self.metadata = dict(metadata)
        self.records = records
        self.transforms = transforms
        if not self.records:
            raise ValueError(f"dataset '{self.metadata.get('name', '')}' has no images")

    def __len__(self) -> int:
        return len(self.records)

    def aspect_ratio_groups(self) -> list[int]:
        """Per image: 0 when wider than tall, 1 otherwise (0 for all when sizes are unknown).

        Batching images of one group wastes less padding.
        """
        return [0 if r.get("width", 1) > r.get("height", 0) else 1 for r in self.records]

    def _record_and_rng(self, key: Key) -> tuple[Record, np.random.Generator]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        return self.records[int(index)], np.random.default_rng(seed)

    def _apply(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return sample if self.transforms is None else self.transforms(sample, rng)

    @staticmethod
    def _common_target(record: Record, orig: tuple[int, int], image: torch.Tensor) -> dict:
        return {
            "image_id": int(record["image_id"]),
            "file_name": record["file_name"],
            "orig_size": torch.tensor(orig, dtype=torch.int64),
            "size": torch.tensor(image.shape[-2:], dtype=torch.int64),
        }


class DetectionDataset(_RecordDataset):
    """Instance detection / segmentation over records of :mod:`norm_det.data.coco` or ``voc``.

    Args:
        records: dicts with ``file_name``, ``height``, ``width``, ``image_id``, ``annotations``.
        metadata: the dataset's metadata (``thing_classes``, ...).
        transforms: ``(sample, rng) -> sample`` (see :mod:`norm_det.data.transforms`) or None.
        drop_crowd: leave ``iscrowd`` annotations out of the targets (training, as detectron2).
        drop_difficult: leave VOC ``difficult`` objects out of the targets (training).
        filter_empty: leave out images with no annotation left (training).
        with_masks: decode instance masks; None means "when every annotation has a
            segmentation".
    """

    def __init__(
        self,
        records: list[Record],
        metadata: dict[str, Any],
        *,
        transforms: Any = None,
        drop_crowd: bool = False,
        drop_difficult: bool = False,
        filter_empty: bool = False,
        with_masks: bool | None = None,
    ) -> None:
        kept = []
        for record in records:
            annotations = [
                a
                for a in record["annotations"]
                if not (drop_crowd and a.get("iscrowd", 0))
                and not (drop_difficult and a.get("difficult", 0))
            ]
            if annotations or not filter_empty:
                kept.append({**record, "annotations": annotations})
        name = metadata.get("name", "")
        if records and not kept:
            raise ValueError(
                f"dataset '{name}': none of its {len(records)} images has an annotation left "
                "after leaving out crowd/difficult objects (DATALOADER.FILTER_EMPTY_ANNOTATIONS)"
            )
        super().__init__(kept, metadata, transforms)
        all_annotations = [a for r in self.records for a in r["annotations"]]
        without = [
            (r, a) for r in self.records for a in r["annotations"] if "segmentation" not in a
        ]
        if with_masks is None:
            with_masks = bool(all_annotations) and not without
        elif with_masks and without:
            record, ann = without[0]
            raise ValueError(
                f"dataset '{name}': masks were asked for (MODEL.MASK_ON) but {len(without)} "
                f"annotations have no segmentation, e.g. annotation id {ann.get('id')} of "
                f"category {ann['category_id']} in '{record['file_name']}' (image id "
                f"{record['image_id']})"
            )
        self.with_masks = with_masks
        self.with_difficult = any("difficult" in a for a in all_annotations) or (
            metadata.get("evaluator_type") == "voc"
        )

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, dict[str, Any]]:
        record, rng = self._record_and_rng(key)
        height, width = record["height"], record["width"]
        image = read_image(
            record["file_name"], image_id=record["image_id"], expected_size=(height, width)
        )
        anns = record["annotations"]
        sample: dict[str, Any] = {
            "image": image,
            "boxes": torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            "iscrowd": torch.tensor([a.get("iscrowd", 0) for a in anns], dtype=torch.int64),
        }
        if self.with_difficult:
            sample["difficult"] = torch.tensor(
                [a.get("difficult", 0) for a in anns], dtype=torch.int64
            )
        if self.with_masks:
            masks = [
                segmentation_to_mask(
                    a["segmentation"],
                    height,
                    width,
                    where=f"annotation id {a.get('id')} of image id {record['image_id']} "
                    f"('{record['file_name']}')",
                )
                for a in anns
            ]
            sample["masks"] = (
                torch.from_numpy(np.stack(masks))
                if masks
                else torch.zeros((0, height, width), dtype=torch.uint8)
            )
        sample = self._apply(sample, rng)
        image = sample.pop("image")
        target = self._common_target(record, (height, width), image)
        target.update(sample)
        return image.to(torch.float32) / 255.0, target


class SemSegDataset(_RecordDataset):
    """Semantic segmentation over records with ``file_name`` and ``sem_seg_file_name``.

    Label files are mapped to train ids by ``metadata["label_id_to_train_id"]`` when present
    (Cityscapes), otherwise read as train ids. A value the mapping does not know (or, without a
    mapping, a value that is neither a class index nor ``ignore_label``) is an error naming the
    file and the values: training on it would silently learn a wrong class.

    Args:
        records: dicts with ``file_name``, ``sem_seg_file_name``, ``image_id``.
        metadata: with ``stuff_classes``, ``ignore_label``, optional ``label_id_to_train_id``.
        transforms: ``(sample, rng) -> sample`` or None.
    """

    def __init__(
        self, records: list[Record], metadata: dict[str, Any], *, transforms: Any = None
    ) -> None:
        super().__init__(records, metadata, transforms)
        ignore = int(metadata.get("ignore_label", 255))
        mapping = metadata.get("label_id_to_train_id")
        if mapping is None:
            mapping = {i: i for i in range(len(metadata["stuff_classes"]))}
            mapping[ignore] = ignore
        size = max(max(mapping) + 1, 256)
        # -1 marks values outside the label set, found in one vectorized lookup.
        self._lut = np.full(size, -1, dtype=np.int64)
        for label_id, train_id in mapping.items():
            self._lut[int(label_id)] = int(train_id)

    def map_labels(self, labels: np.ndarray, source: str) -> np.ndarray:
        """(H, W) label ids of file ``source`` -> train ids, or ValueError on unknown ids."""
        if labels.size and (labels.min() < 0 or labels.max() >= self._lut.size):
            unknown = np.unique(labels[(labels < 0) | (labels >= self._lut.size)])
        else:
            mapped = self._lut[labels]
            if not (mapped < 0).any():
                return mapped
            unknown = np.unique(labels[mapped < 0])
        known = sorted(int(k) for k in np.flatnonzero(self._lut >= 0))
        raise ValueError(
            f"label file '{source}' has ids {unknown.tolist()[:20]} outside the label set of "
            f"dataset '{self.metadata.get('name', '')}' (known ids: {known})"
        )

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, dict[str, Any]]:
        record, rng = self._record_and_rng(key)
        image = read_image(record["file_name"], image_id=record["image_id"])
        labels = read_label_png(record["sem_seg_file_name"], image_id=record["image_id"])
        if labels.shape != tuple(image.shape[-2:]):
            raise ValueError(
                f"label file '{record['sem_seg_file_name']}' is {labels.shape[0]}x"
                f"{labels.shape[1]} (HxW) but its image '{record['file_name']}' is "
                f"{image.shape[-2]}x{image.shape[-1]}"
            )
        sem_seg = torch.from_numpy(self.map_labels(labels, record["sem_seg_file_name"]))
        orig = (int(image.shape[-2]), int(image.shape[-1]))
        sample = self._apply({"image": image, "sem_seg": sem_seg}, rng)
        image = sample["image"]
        target = self._common_target(record, orig, image)
        target["sem_seg"] = sample["sem_seg"]
        target["sem_seg_file_name"] = record["sem_seg_file_name"]
        return image.to(torch.float32) / 255.0, target
