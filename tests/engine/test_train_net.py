import logging

import pytest
import yaml

import norm_det.engine.defaults
import tools.train_net as train_net
from norm_det.engine import default_argument_parser
from tests.engine.toys import ToyTrainer


@pytest.fixture
def toy_cli(tmp_path, monkeypatch):
    """tools/train_net.py with the toy model, data and evaluator; returns a config file."""
    monkeypatch.setattr(train_net, "Trainer", ToyTrainer)
    logger = logging.getLogger("norm_det")
    handlers = list(logger.handlers)
    config = tmp_path / "toy.yaml"
    config.write_text(
        "DATASETS:\n  TEST: ['toy_val']\n"
        "SOLVER:\n  IMS_PER_BATCH: 4\n  BASE_LR: 0.05\n  MAX_ITER: 4\n  STEPS: [3]\n"
        "  WARMUP_ITERS: 1\n"
    )
    yield config
    for handler in logger.handlers[len(handlers) :]:
        logger.removeHandler(handler)
        handler.close()


def _run(*argv):
    return train_net.main(default_argument_parser().parse_args([str(a) for a in argv]))


def test_train_then_evaluate_the_weights(toy_cli, tmp_path):
    out = tmp_path / "run"
    results = _run("--config", toy_cli, "OUTPUT_DIR", out, "LOG_PERIOD", 2)
    mae = results["toy_val"]["toy"]["MAE"]

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["SOLVER"]["MAX_ITER"] == 4 and saved["LOG_PERIOD"] == 2
    assert saved["SEED"] >= 0  # SEED -1 was resolved and recorded
    assert "schedule: 4 iterations of 4 images" in (out / "log.txt").read_text()

    weights = out / "model_final.pth"
    evaluated = _run(
        "--config", toy_cli, "--eval-only", "OUTPUT_DIR", tmp_path / "ev", "MODEL.WEIGHTS", weights
    )
    assert evaluated["toy_val"]["toy"]["MAE"] == pytest.approx(mae)

    # Resuming a finished run keeps its seed, trains nothing and evaluates the same model.
    resumed = _run("--config", toy_cli, "--resume", "OUTPUT_DIR", out)
    assert resumed["toy_val"]["toy"]["MAE"] == pytest.approx(mae)
    assert yaml.safe_load((out / "config.yaml").read_text())["SEED"] == saved["SEED"]


def test_eval_only_keeps_the_recorded_seed_for_a_later_resume(toy_cli, tmp_path):
    out = tmp_path / "run"
    _run("--config", toy_cli, "OUTPUT_DIR", out)
    recorded = (out / "config.yaml").read_text()
    seed = yaml.safe_load(recorded)["SEED"]

    weights = out / "model_final.pth"
    _run("--config", toy_cli, "--eval-only", "OUTPUT_DIR", out, "MODEL.WEIGHTS", weights)
    assert (out / "config.yaml").read_text() == recorded
    assert yaml.safe_load((out / "config_eval.yaml").read_text())["SEED"] == seed

    _run("--config", toy_cli, "--resume", "OUTPUT_DIR", out)
    assert yaml.safe_load((out / "config.yaml").read_text())["SEED"] == seed


def test_unreadable_recorded_config_is_named(toy_cli, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("SEED: [1, 2\n")
    with pytest.raises(ValueError, match=r"config.yaml.*not a readable config"):
        _run("--config", toy_cli, "--resume", "OUTPUT_DIR", out)


def test_eval_only_needs_weights(toy_cli, tmp_path):
    with pytest.raises(ValueError, match="--eval-only needs weights"):
        _run("--config", toy_cli, "--eval-only", "OUTPUT_DIR", tmp_path / "ev")


def test_batch_must_split_over_processes(toy_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(norm_det.engine.defaults, "get_world_size", lambda: 3)
    with pytest.raises(ValueError, match="IMS_PER_BATCH = 4 images cannot be split evenly over 3"):
        _run("--config", toy_cli, "OUTPUT_DIR", tmp_path / "x")
