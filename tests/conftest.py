"""Test-wide settings: deterministic torch, isolated logging, a private dataset folder."""

import logging
import os

import pytest
import torch

os.environ.setdefault("NORM_DET_DATASETS", os.path.join(os.path.dirname(__file__), ".datasets"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per pytest-xdist worker (and per process it starts): OpenMP workers of
    # several processes that share the cores spin against each other (20-30x slower).
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_name] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _isolated_norm_det_logger():
    """Undo ``norm_det.engine.setup_logger`` (which stops propagation) after a test that ran it,
    so later tests still see norm_det's records through ``caplog``."""
    logger = logging.getLogger("norm_det")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    for handler in list(logger.handlers):
        if handler not in handlers:
            logger.removeHandler(handler)
            handler.close()
    logger.propagate, logger.level = propagate, level
