"""Where datasets live: ``$NORM_DET_DATASETS`` (default ``./datasets``), and clear errors when
a dataset's directory or file is not there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["DATASETS_ENV", "check_files_exist", "datasets_root", "require_dir", "require_file"]

DATASETS_ENV = "NORM_DET_DATASETS"


def datasets_root() -> Path:
    """The root of all datasets: ``$NORM_DET_DATASETS``, or ``./datasets`` when unset.

    Read at every call, so a test or a script may change the variable at run time.
    """
    return Path(os.environ.get(DATASETS_ENV, "datasets")).expanduser()


def _where_hint(path: Path) -> str:
    root = datasets_root()
    return (
        f"(datasets are searched under ${DATASETS_ENV}={os.environ.get(DATASETS_ENV, '<unset>')}, "
        f"resolved to '{root.resolve()}'; set ${DATASETS_ENV} to the folder that holds your "
        "datasets, or see docs/datasets.md for the expected layout)"
    )


def require_dir(path: str | Path, what: str) -> Path:
    """``path`` as a Path if it is a directory, else a FileNotFoundError naming it and the root.

    Args:
        path: the directory a dataset needs.
        what: what it is, for the message ("COCO image folder of coco_2017_val").
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{what}: directory '{path}' not found (absolute: '{path.resolve()}') "
            f"{_where_hint(path)}"
        )
    return path


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path if it is a file, else a FileNotFoundError naming it and the root."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what}: file '{path}' not found (absolute: '{path.resolve()}') {_where_hint(path)}"
        )
    return path


def check_files_exist(records: list[dict[str, Any]], key: str, source: str) -> None:
    """Raise naming the missing or empty files ``record[key]`` and their image ids.

    A missing image cannot be skipped quietly: evaluation against the full ground truth would
    count its objects as misses. Listing each folder once keeps this fast on 100k images; an
    empty (0-byte) file, what an interrupted download or copy leaves, costs one ``stat`` per file
    to find, where decoding every image would take minutes on COCO (a file truncated mid-way is
    found when it is read, naming the file and image id).

    Args:
        records: dataset records with ``key`` and ``image_id``.
        key: which path to check ("file_name", "sem_seg_file_name").
        source: the annotation file or folder the records came from, named in the error.

    Raises:
        FileNotFoundError: files are missing.
        ValueError: files are empty.
    """
    listings: dict[str, dict[str, os.DirEntry]] = {}
    missing, empty = [], []
    for record in records:
        folder, name = os.path.split(record[key])
        if folder not in listings:
            listings[folder] = (
                {entry.name: entry for entry in os.scandir(folder)} if os.path.isdir(folder) else {}
            )
        entry = listings[folder].get(name)
        described = f"'{record[key]}' (image id {record['image_id']})"
        size = _size(entry)
        if size is None:
            missing.append(described)
        elif size == 0:
            empty.append(described)
    if missing:
        raise FileNotFoundError(f"{source}: {len(missing)} file(s) not found: {_first(missing)}")
    if empty:
        raise ValueError(
            f"{source}: {len(empty)} file(s) are empty (0 bytes; an interrupted download or "
            f"copy?): {_first(empty)}"
        )


def _size(entry: os.DirEntry | None) -> int | None:
    """The size of a listed file, None when it is not there (or a dangling link)."""
    try:
        return None if entry is None else entry.stat().st_size
    except OSError:
        return None


def _first(items: list[str], limit: int = 10) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
