"""A ``_BASE_`` chain that comes back to one of its files is a ValueError naming the chain."""

import re

import pytest

from norm_det.config import load_config


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_two_files_naming_each_other(tmp_path):
    a = _write(tmp_path / "a.yaml", "_BASE_: b.yaml\nSEED: 1\n")
    b = _write(tmp_path / "b.yaml", "_BASE_: a.yaml\nSEED: 2\n")
    chain = re.escape(f"_BASE_ cycle: {a} -> {b} -> {a}")
    with pytest.raises(ValueError, match=rf"^{chain}; config file '{re.escape(str(b))}'"):
        load_config(a)


def test_a_file_naming_itself(tmp_path):
    a = _write(tmp_path / "a.yaml", "_BASE_: a.yaml\n")
    with pytest.raises(ValueError, match=re.escape(f"_BASE_ cycle: {a} -> {a};")):
        load_config(a)


def test_a_cycle_through_a_relative_path_and_a_list_of_bases(tmp_path):
    top = _write(tmp_path / "top.yaml", "_BASE_: [common.yaml, sub/mid.yaml]\n")
    common = _write(tmp_path / "common.yaml", "SEED: 3\n")
    mid = _write(tmp_path / "sub" / "mid.yaml", "_BASE_: ../top.yaml\n")
    chain = re.escape(f"_BASE_ cycle: {top} -> {mid} -> {top}")
    with pytest.raises(ValueError, match=chain) as error:
        load_config(top)
    assert str(common) not in str(error.value)  # a base already loaded is not part of the chain


def test_a_shared_base_is_no_cycle(tmp_path):
    # top -> (left, right), both -> root: root is loaded twice, never inside its own chain;
    # right (with its copy of root) is merged last, as fvcore merges a list of bases.
    _write(tmp_path / "root.yaml", "SOLVER:\n  BASE_LR: 0.5\n  MAX_ITER: 10\n")
    _write(tmp_path / "left.yaml", "_BASE_: root.yaml\nSOLVER:\n  MAX_ITER: 20\n")
    _write(tmp_path / "right.yaml", "_BASE_: root.yaml\nSEED: 7\n")
    top = _write(tmp_path / "top.yaml", "_BASE_: [left.yaml, right.yaml]\n")
    cfg = load_config(top)
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER, cfg.SEED) == (0.5, 10, 7)
