"""Files in and out: weight files read by their real format, never running code; atomic writes.

Both the weight converters (:mod:`norm_det.weights`) and the training checkpointer
(:mod:`norm_det.engine.checkpointer`) read and write through this module, which imports nothing of
norm_det.

Reading (:func:`read_weight_file`). A file's format is decided by its bytes, never by its name:

========================  ==================================================================
format (``sniff``)        read as
========================  ==================================================================
``torch-zip``             ``torch.load(weights_only=True)``: tensors and plain containers. A
                          file that also holds other Python objects (mmdet's ``meta``) is
                          refused unless the caller opts in (``allow_pickle``); then those
                          objects become inert :class:`Placeholder` instances: no class of
                          the file is ever imported or called.
``torch-legacy``          the same (torch's pre-1.6 format, a pickle stream with torch's magic)
``pickle``                only with ``allow_pickle`` (Detectron's and Caffe2's ``.pkl``), through
                          an unpickler that builds NumPy arrays and containers and refuses any
                          other class, naming it
``npz`` / ``npy``         ``numpy.load(allow_pickle=False)``
``safetensors``           its JSON header and raw buffers
``empty``, ``text``, ...  refused, saying what the file is (a Git LFS pointer is named as such)
========================  ==================================================================

Every error names the file and says what is wrong with it (:class:`WeightFileError`).

Writing (:func:`atomic_write`, :func:`atomic_save`): to a temporary file in the target's
directory, flushed to disk, then renamed over the target, so a crash leaves the old file or the
complete new one; the file gets the mode the process's umask gives new files (as ``open`` does),
and :func:`remove_stale_temporaries` removes what a killed write left behind.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import types
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = [
    "Placeholder",
    "WeightFileError",
    "atomic_save",
    "atomic_write",
    "new_file_mode",
    "read_weight_file",
    "remove_stale_temporaries",
    "sniff",
]

_TEMP_SUFFIX = ".tmp"
# The 10-byte magic number torch's legacy format pickles first, after PROTO 2 and LONG1 10.
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"
_LFS_POINTER = b"version https://git-lfs"


class WeightFileError(ValueError):
    """A weight or checkpoint file that cannot be read; the message names the file and why."""


# ---------------------------------------------------------------------------------------------
# What a file is.


def sniff(path: str | os.PathLike) -> str:
    """The real format of a file, from its first bytes and (for zip archives) its member names.

    Returns:
        ``"torch-zip"``, ``"torch-legacy"``, ``"pickle"``, ``"npz"``, ``"npy"``,
        ``"safetensors"``, ``"zip"`` (another archive), ``"truncated-zip"``, ``"empty"``,
        ``"lfs-pointer"``, ``"text"`` or ``"unknown"``.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "empty"
    with open(path, "rb") as file:
        head = file.read(4096)
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "truncated-zip"
        if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            return "torch-zip"
        if names and all(name.endswith(".npy") for name in names):
            return "npz"
        return "zip"
    if head.startswith(_TORCH_LEGACY_MAGIC):
        return "torch-legacy"
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if _is_safetensors(head, size):
        return "safetensors"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO 2-5
        return "pickle"
    if head.startswith(_LFS_POINTER):
        return "lfs-pointer"
    if _is_text(head):
        return "text"
    if head[:1] in (b"(", b"}", b"]", b"c"):  # protocol 0 / 1 pickles start with an opcode
        return "pickle"
    return "unknown"


def _is_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 10:
        return False
    length = int.from_bytes(head[:8], "little")
    return 0 < length <= size - 8 and head[8:9] == b"{"


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start >= len(head) - 3  # a multi-byte character cut by the 4096 bytes
    return True


# ---------------------------------------------------------------------------------------------
# Reading.


class Placeholder:
    """What an object of a weight file becomes when norm_det does not build its class.

    ``module`` and ``name`` say what the file named; ``args`` and ``state`` keep what it passed
    (tensors, numbers, strings, other placeholders). Nothing of the named class runs.
    """

    module = ""
    name = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder for {self.module}.{self.name}>"


def _placeholder_class(module: str, name: str) -> type[Placeholder]:
    return type(name, (Placeholder,), {"module": module, "name": name})


def _tensor_globals() -> dict[str, Any]:
    """What torch's weights-only unpickler builds (tensors, storages, dtypes, containers)."""
    from torch import _weights_only_unpickler

    return dict(_weights_only_unpickler._get_allowed_globals())


class _PlaceholderUnpickler(pickle.Unpickler):
    """Tensors and containers as torch builds them; every other class a :class:`Placeholder`."""

    _allowed: dict[str, Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _PlaceholderUnpickler._allowed is None:
            _PlaceholderUnpickler._allowed = _tensor_globals()
        found = _PlaceholderUnpickler._allowed.get(f"{module}.{name}")
        return found if found is not None else _placeholder_class(module, name)


_PLACEHOLDER_PICKLE = types.SimpleNamespace(
    __name__="norm_det_placeholder_pickle",
    Unpickler=_PlaceholderUnpickler,
    load=lambda file, **kwargs: _PlaceholderUnpickler(file, **kwargs).load(),
)

# What a Detectron / Caffe2 pickle may build: NumPy arrays and scalars, and plain containers.
_ARRAY_GLOBALS = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "bytearray"),
    # Protocol-2 pickles (Caffe2 / Detectron model files) spell bytes as _codecs.encode(str).
    ("_codecs", "encode"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Builds NumPy arrays and containers; refuses every other class, naming it."""

    def __init__(self, file: IO[bytes], source: str) -> None:
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ARRAY_GLOBALS:
            return super().find_class(module, name)
        raise WeightFileError(
            f"{self._source}: refusing to build {module}.{name} while reading a pickle; norm_det "
            "reads only NumPy arrays and plain containers from pickled model files"
        )


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_weight_file(path: str | os.PathLike, *, allow_pickle: bool = False) -> Any:
    """The object stored in a weight or checkpoint file, read by its real format (see above).

    Args:
        path: the file, whatever its name.
        allow_pickle: the caller trusts the file (``--allow-pickle``): read a pickle (arrays and
            containers only) and a torch file's Python objects as :class:`Placeholder` s.
            Nothing a file names is ever run, with or without it.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        WeightFileError: the file is empty, truncated, text, a pickle without ``allow_pickle``,
            a pickle naming a class other than arrays and containers, or in no known format.
    """
    path = Path(path)
    source = f"'{path}'"
    if not path.is_file():
        raise FileNotFoundError(f"{source}: file does not exist")
    kind = sniff(path)
    if kind in ("torch-zip", "torch-legacy"):
        return _read_torch(path, source, allow_pickle)
    if kind == "pickle":
        if not allow_pickle:
            raise WeightFileError(
                f"{source} is a pickle, which can run code when loaded; norm_det reads one only "
                "after you opt in because you trust the file: pass allow_pickle=True "
                "(--allow-pickle on the command line); even then only NumPy arrays and "
                "containers are built"
            )
        with open(path, "rb") as file:
            try:
                return _ArraysOnlyUnpickler(file, source).load()
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
                if isinstance(error, WeightFileError):
                    raise
                raise WeightFileError(
                    f"{source}: a pickle that cannot be read, truncated or corrupt ({error})"
                ) from None
    if kind in ("npz", "npy"):
        try:
            loaded = np.load(path, allow_pickle=False)
            return dict(loaded) if kind == "npz" else loaded
        except (ValueError, OSError) as error:
            raise WeightFileError(f"{source}: a NumPy file that cannot be read ({error})") from None
    if kind == "safetensors":
        return _read_safetensors(path, source)
    raise WeightFileError(f"{source}: {_not_weights(kind)}")


def _not_weights(kind: str) -> str:
    return {
        "empty": "the file is empty (0 bytes), not a checkpoint",
        "truncated-zip": "a truncated or corrupt zip archive (a torch checkpoint cut short by an "
        "interrupted download or write?)",
        "zip": "a zip archive that is neither a torch checkpoint nor a NumPy .npz",
        "lfs-pointer": "a Git LFS pointer, not the weights: fetch the file with `git lfs pull`",
        "text": "a text file, not a checkpoint (an error page or a config saved under this name?)",
    }.get(
        kind,
        "not a checkpoint in any format norm_det reads (torch .pth/.pt, pickle .pkl, "
        "NumPy .npz/.npy, safetensors)",
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _corrupt(source: str, error: BaseException) -> WeightFileError:
    return WeightFileError(
        f"{source}: a torch checkpoint that cannot be read, truncated or corrupt "
        f"({_first_line(error)})"
    )


def _read_torch(path: Path, source: str, allow_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "truncated" in str(error) or "Weights only load failed" not in str(error):
            raise _corrupt(source, error) from None
        if not allow_pickle:
            raise WeightFileError(
                f"{source} holds Python objects besides tensors and containers, which "
                f"torch.load(weights_only=True) refuses ({_first_line(error)}); if you trust "
                "the file, pass allow_pickle=True (--allow-pickle) to read its tensors, those "
                "objects becoming inert placeholders"
            ) from None
    except Exception as error:  # a cut-short file fails anywhere in torch's reader
        raise _corrupt(source, error) from None
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_PLACEHOLDER_PICKLE
        )
    except Exception as error:
        raise WeightFileError(
            f"{source}: its tensors cannot be read with its Python objects as placeholders "
            f"({_first_line(error)})"
        ) from None


def _read_safetensors(path: Path, source: str) -> dict[str, torch.Tensor]:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + length])
    except ValueError as error:
        raise WeightFileError(
            f"{source}: a safetensors header that is not JSON ({error})"
        ) from None
    body = data[8 + length :]
    tensors: dict[str, torch.Tensor] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            start, end = entry["data_offsets"]
            shape = list(entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise WeightFileError(f"{source}: safetensors entry {key!r} is malformed") from None
        if end > len(body) or start > end:
            raise WeightFileError(
                f"{source}: safetensors entry {key!r} reaches past the end of the file (truncated?)"
            )
        chunk = bytearray(body[start:end])
        tensors[key] = (
            torch.frombuffer(chunk, dtype=dtype).reshape(shape)
            if chunk
            else (torch.empty(shape, dtype=dtype))
        )
    return tensors


# ---------------------------------------------------------------------------------------------
# Writing.


def new_file_mode() -> int:
    """The permission bits ``open`` gives a new file under this process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    # The rename itself must reach the disk; directories cannot be opened on every OS.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temporary file, then rename it to ``path`` (see the module)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
    try:
        os.chmod(tmp_name, new_file_mode())  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that leaves either the old file or the complete new one."""
    atomic_write(path, lambda file: torch.save(obj, file))


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed :func:`atomic_write` calls left in ``directory``.

    Only names :func:`atomic_write` makes (``.<target>.<random>.tmp``) are touched; call it when
    no other process writes there (a run's rank 0 before it trains).

    Returns:
        The files removed.
    """
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for candidate in directory.glob(f".*{_TEMP_SUFFIX}"):
        if candidate.is_file():
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed
