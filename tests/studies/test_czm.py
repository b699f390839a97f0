"""norm_det.studies.czm: the data made in code, the small ResNet, a tiny run, the docs table."""

from __future__ import annotations

import pytest
import torch

from norm_det.schemes import get_scheme
from norm_det.studies.czm import (
    CLASSES,
    RESULTS_BEGIN,
    RESULTS_END,
    Run,
    SmallResNet,
    make_shapes_dataset,
    results_table,
    train,
    write_results,
)


def test_the_data_set_is_made_the_same_from_its_seed():
    images, labels = make_shapes_dataset(32, 16, seed=3)
    again, same_labels = make_shapes_dataset(32, 16, seed=3)
    other, _ = make_shapes_dataset(32, 16, seed=4)
    assert images.shape == (32, 3, 16, 16) and labels.shape == (32,)
    assert torch.equal(images, again) and torch.equal(labels, same_labels)
    assert not torch.equal(images, other)
    assert set(labels.tolist()) <= set(range(len(CLASSES)))


@pytest.mark.parametrize("scheme", ["BN", "CZM(zmg=0.85, noise=0.1, luma=0.0005)"])
def test_small_resnet_gives_one_score_per_class(scheme):
    model = SmallResNet(get_scheme(scheme), len(CLASSES), widths=(4, 8, 8))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, len(CLASSES))


def test_a_tiny_run_logs_every_epoch_and_fills_the_table(tmp_path):
    train_images, train_labels = make_shapes_dataset(48, 8, seed=0)
    test_images, test_labels = make_shapes_dataset(16, 8, seed=1)
    runs = [Run("BN lr=0.1", "BN", 0.1), Run("CZMIG lr=0.1", "CZM(noise=0.1)", 0.1)]
    for run in runs:
        train(
            run,
            (train_images, train_labels, test_images, test_labels),
            epochs=2,
            batch_size=16,
            weight_decay=5e-4,
            blocks_per_stage=1,
            seed=0,
        )
        assert len(run.history["test_accuracy"]) == 2
        assert all(0.0 <= a <= 100.0 for a in run.history["test_accuracy"])
        assert all(torch.isfinite(torch.tensor(v)).all() for v in run.history.values())
    table = results_table(runs, "settings line")
    assert table.splitlines()[0] == "settings line"
    assert [line.split(" | ")[0] for line in table.splitlines()[-2:]] == ["| BN", "| CZMIG"]
    doc = tmp_path / "czm.md"
    doc.write_text(f"intro\n{RESULTS_BEGIN}\nold\n{RESULTS_END}\nend\n")
    write_results(doc, table)
    assert doc.read_text() == f"intro\n{RESULTS_BEGIN}\n{table}\n{RESULTS_END}\nend\n"
    (tmp_path / "plain.md").write_text("no markers")
    with pytest.raises(ValueError, match="expected the markers"):
        write_results(tmp_path / "plain.md", table)
