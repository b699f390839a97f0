"""The batches of an infinite training loader, from the batch a resumed run continues at.

A loader with ``set_start_iter(n)`` is asked to start at batch ``n``; from any other loader the
first ``n`` batches are drawn and dropped, so that a resumed run sees the batches an
uninterrupted one would have.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["TrainingBatches"]

# The training loop's logger: fast-forwarding is part of what it reports when it resumes.
logger = logging.getLogger("norm_det.engine.train_loop")


class TrainingBatches:
    """Batches of ``data_loader`` from batch ``start_batch`` on.

    Args:
        data_loader: an iterable yielding batches forever.
        start_batch: the number of batches an earlier run already drew.
        current_iteration: ``() -> int``, the iteration (counted from 1) errors name.
    """

    def __init__(
        self, data_loader: Iterable, start_batch: int, current_iteration: Callable[[], int]
    ) -> None:
        self.data_loader = data_loader
        self._current_iteration = current_iteration
        set_start_iter = getattr(data_loader, "set_start_iter", None)
        if set_start_iter is not None:
            set_start_iter(start_batch)
            self._iterator = iter(data_loader)
            return
        self._iterator = iter(data_loader)
        if start_batch:
            logger.info("fast-forwarding the training data by %d batches", start_batch)
        for _ in range(start_batch):
            self.next()

    def next(self) -> Any:
        """The next batch.

        Raises:
            ValueError: the loader ran out of batches (it must be infinite).
        """
        try:
            return next(self._iterator)
        except StopIteration:
            raise ValueError(
                f"the training data loader ({type(self.data_loader).__name__}) ran out of "
                f"batches at iteration {self._current_iteration()}; it must be infinite (see "
                "norm_det.data.build_detection_train_loader)"
            ) from None
