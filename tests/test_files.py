"""Weight files read by their real format: which are refused, which load arrays-only, no code runs.

Every malicious payload would create a marker file when unpickled; the tests assert it never
exists, with and without ``allow_pickle``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import stat
import struct
import zipfile

import numpy as np
import pytest
import torch

from norm_det.files import (
    Placeholder,
    WeightFileError,
    atomic_save,
    new_file_mode,
    read_weight_file,
    remove_stale_temporaries,
    sniff,
)


class RunsCode:
    """Unpickling this calls ``open(marker, "w")``: the payload of a malicious weight file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


STATE = {"conv.weight": torch.arange(6.0).reshape(2, 3), "conv.bias": torch.zeros(2)}


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "a weight file ran code"


def _evil_torch_zip(path, marker) -> None:
    torch.save({"state_dict": STATE, "meta": RunsCode(str(marker))}, path)


def test_a_torch_zip_loads_whatever_its_name(tmp_path, marker):
    for name in ("model.pth", "model.pkl", "model.bin", "weights"):
        torch.save(STATE, tmp_path / name)
        assert sniff(tmp_path / name) == "torch-zip"
        loaded = read_weight_file(tmp_path / name)
        assert torch.equal(loaded["conv.weight"], STATE["conv.weight"])


def test_a_torch_zip_named_pkl_runs_no_code_even_with_allow_pickle(tmp_path, marker):
    path = tmp_path / "evil.pkl"
    _evil_torch_zip(path, marker)
    with pytest.raises(WeightFileError, match=r"evil\.pkl.*holds Python objects"):
        read_weight_file(path)
    loaded = read_weight_file(path, allow_pickle=True)  # tensors; the object a placeholder
    assert torch.equal(loaded["state_dict"]["conv.weight"], STATE["conv.weight"])
    assert isinstance(loaded["meta"], Placeholder)


def test_a_legacy_torch_file_loads_tensors_only(tmp_path, marker):
    path = tmp_path / "legacy.pth"
    torch.save(STATE, path, _use_new_zipfile_serialization=False)
    assert sniff(path) == "torch-legacy"
    assert torch.equal(read_weight_file(path)["conv.bias"], STATE["conv.bias"])
    evil = tmp_path / "legacy_evil.pth"
    torch.save({"x": RunsCode(str(marker))}, evil, _use_new_zipfile_serialization=False)
    with pytest.raises(WeightFileError, match=r"legacy_evil\.pth.*holds Python objects"):
        read_weight_file(evil)
    assert isinstance(read_weight_file(evil, allow_pickle=True)["x"], Placeholder)


def test_a_real_pickle_needs_the_opt_in_and_builds_arrays_only(tmp_path, marker):
    arrays = {"conv1_w": np.ones((2, 3), dtype=np.float32)}
    for name in ("R-50.pkl", "R-50.pth"):  # a pickle under a torch name is still a pickle
        with open(tmp_path / name, "wb") as file:
            pickle.dump(arrays, file, protocol=2)
        assert sniff(tmp_path / name) == "pickle"
        with pytest.raises(WeightFileError, match=r"is a pickle.*--allow-pickle"):
            read_weight_file(tmp_path / name)
        assert read_weight_file(tmp_path / name, allow_pickle=True)["conv1_w"].shape == (2, 3)
    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as file:
        pickle.dump({"blobs": RunsCode(str(marker))}, file)
    with pytest.raises(WeightFileError, match=r"refusing to build (builtins|io)\.open"):
        read_weight_file(evil, allow_pickle=True)


def test_numpy_and_safetensors_files(tmp_path):
    np.savez(tmp_path / "w.npz", a=np.arange(4.0))
    assert sniff(tmp_path / "w.npz") == "npz"
    assert read_weight_file(tmp_path / "w.npz")["a"].tolist() == [0, 1, 2, 3]
    np.save(tmp_path / "w.npy", np.arange(3))
    assert read_weight_file(tmp_path / "w.npy").tolist() == [0, 1, 2]
    # safetensors: an 8-byte header length, a JSON header, the raw little-endian buffers.
    body = np.arange(6, dtype=np.float32).tobytes()
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, len(body)]}})
    (tmp_path / "w.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header.encode() + body
    )
    loaded = read_weight_file(tmp_path / "w.safetensors")
    assert torch.equal(loaded["w"], torch.arange(6.0).reshape(2, 3))
    (tmp_path / "cut.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header.encode() + body[:8]
    )
    with pytest.raises(WeightFileError, match=r"cut\.safetensors.*past the end"):
        read_weight_file(tmp_path / "cut.safetensors")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.pth", b"", r"empty\.pth.*empty \(0 bytes\)"),
        ("page.pth", b"<html><body>404 Not Found</body></html>\n", r"page\.pth.*a text file"),
        (
            "lfs.pth",
            b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n",
            r"lfs\.pth.*Git LFS pointer.*git lfs pull",
        ),
        ("noise.pth", bytes(range(256)) * 4, r"noise\.pth.*not a checkpoint in any format"),
    ],
)
def test_files_that_are_no_checkpoint_say_what_they_are(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(WeightFileError, match=message):
        read_weight_file(tmp_path / name)


def test_truncated_files_are_named_as_such(tmp_path):
    full = io.BytesIO()
    torch.save(STATE, full)
    data = full.getvalue()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    assert sniff(tmp_path / "cut.pth") == "truncated-zip"
    with pytest.raises(WeightFileError, match=r"cut\.pth.*truncated or corrupt zip"):
        read_weight_file(tmp_path / "cut.pth")
    pickled = pickle.dumps({"a": np.ones(100)}, protocol=2)
    (tmp_path / "cut.pkl").write_bytes(pickled[: len(pickled) // 2])
    with pytest.raises(WeightFileError, match=r"cut\.pkl.*truncated or corrupt"):
        read_weight_file(tmp_path / "cut.pkl", allow_pickle=True)
    legacy = io.BytesIO()
    torch.save(STATE, legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "cut_legacy.pth").write_bytes(legacy.getvalue()[:200])
    with pytest.raises(WeightFileError, match=r"cut_legacy\.pth.*truncated or corrupt"):
        read_weight_file(tmp_path / "cut_legacy.pth")


def test_another_zip_archive_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "x.pth", "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(WeightFileError, match=r"neither a torch checkpoint nor a NumPy"):
        read_weight_file(tmp_path / "x.pth")


def test_written_files_follow_the_umask_and_stale_temporaries_are_removed(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_save(STATE, tmp_path / "model.pth")
        assert new_file_mode() == 0o644
        assert stat.S_IMODE((tmp_path / "model.pth").stat().st_mode) == 0o644
    finally:
        os.umask(old)
    (tmp_path / ".model_0000010.pth.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp").write_text("not ours")
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".model_0000010.pth.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth", "notes.tmp"]


def test_only_norm_det_files_reads_weight_files():
    """The audit as a test: no other module of norm_det or tools/ unpickles or torch-loads."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readers = {
        ("torch", "load"),
        ("pickle", "load"),
        ("pickle", "loads"),
        ("np", "load"),
        ("numpy", "load"),
        ("pickle", "Unpickler"),
        ("yaml", "load"),
        ("yaml", "unsafe_load"),
    }
    found = []
    for path in [*(root / "norm_det").rglob("*.py"), *(root / "tools").glob("*.py")]:
        if path.name == "files.py" and path.parent.name == "norm_det":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            func = node.func if isinstance(node, ast.Call) else None
            named = isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            if named and (func.value.id, func.attr) in readers:
                found.append(f"{path.relative_to(root)}:{node.lineno} {func.value.id}.{func.attr}")
    assert not found, "weight files must be read through norm_det.files:\n" + "\n".join(found)
