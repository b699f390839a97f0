"""Loading configs: defaults, YAML files with ``_BASE_``, ``KEY VALUE`` overrides.

Every key must already exist in :mod:`norm_det.config.defaults`: a misspelt key fails with a
``ValueError`` that names the closest valid key, instead of silently training the default; a
detectron2 or mmdet/mmseg config fails with a :class:`~norm_det.config.foreign.ForeignConfigError`
naming the tool that runs it. A
config file may be a path or a bare file name (``mask_rcnn_ndpp.yaml``) looked up recursively
under the repository's ``configs/`` folder.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from fvcore.common.config import BASE_KEY
from fvcore.common.config import CfgNode as _FvcoreCfgNode

from norm_det.config.foreign import ForeignConfigError, foreign_config_hint

__all__ = ["CONFIGS_DIR", "CfgNode", "find_config_file", "get_cfg", "load_config"]

# The repository's configs/ folder (the package is installed in editable mode next to it).
CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
# The files whose _BASE_ chain is being loaded, outermost first (fvcore loads bases recursively).
_LOADING: ContextVar[tuple[str, ...]] = ContextVar("_LOADING", default=())


class CfgNode(_FvcoreCfgNode):
    """fvcore's ``CfgNode`` whose merges reject unknown keys with a helpful ``ValueError``.

    ``merge_from_file`` also accepts a bare config name (see :func:`find_config_file`).
    """

    def merge_from_file(self, cfg_filename: str | os.PathLike, allow_unsafe: bool = False) -> None:
        path = find_config_file(cfg_filename)
        hint = foreign_config_hint(path)
        if hint is not None:
            raise ForeignConfigError(hint)
        loaded = self.load_yaml_with_base(str(path), allow_unsafe=allow_unsafe)
        if not isinstance(loaded, dict):
            raise ValueError(f"config file '{path}' holds {type(loaded).__name__}, not a mapping")
        _check_known_keys(self, loaded, source=f"config file '{path}'")
        self.merge_from_other_cfg(type(self)(loaded))

    @classmethod
    def load_yaml_with_base(cls, filename: str, allow_unsafe: bool = False) -> dict[str, Any]:
        """fvcore's loader, refusing a ``_BASE_`` chain that comes back to a file already in it.

        Raises:
            ValueError: a file is its own base, directly or through others; the message lists
                the chain (``_BASE_ cycle: a.yaml -> b.yaml -> a.yaml``).
        """
        chain = _LOADING.get()
        path = os.path.normpath(os.fspath(filename))
        if any(os.path.realpath(p) == os.path.realpath(path) for p in chain):
            raise ValueError(
                f"{BASE_KEY} cycle: {' -> '.join((*chain, path))}; config file '{chain[-1]}' "
                f"inherits from '{path}', which is already in its {BASE_KEY} chain"
            )
        token = _LOADING.set((*chain, path))
        try:
            return super().load_yaml_with_base(filename, allow_unsafe=allow_unsafe)
        finally:
            _LOADING.reset(token)

    def merge_from_list(self, cfg_list: Sequence[str]) -> None:
        if len(cfg_list) % 2:
            raise ValueError(
                f"config overrides must come as KEY VALUE pairs; got {len(cfg_list)} items: "
                f"{list(cfg_list)}"
            )
        for full_key in cfg_list[0::2]:
            if full_key == BASE_KEY:
                raise ValueError(f"{BASE_KEY} may only appear in config files, not as an override")
            node: Any = self
            parts = full_key.split(".")
            for depth, part in enumerate(parts):
                if not (isinstance(node, CfgNode) and part in node):
                    _raise_unknown_key(
                        self, full_key, ".".join(parts[:depth]), "the command-line overrides"
                    )
                node = node[part]
        super().merge_from_list(list(cfg_list))


def _all_keys(node: CfgNode, prefix: str = "") -> Iterator[str]:
    for key, value in node.items():
        full_key = f"{prefix}{key}"
        yield full_key
        if isinstance(value, CfgNode):
            yield from _all_keys(value, full_key + ".")


def _raise_unknown_key(root: CfgNode, full_key: str, parent: str, source: str) -> None:
    known = list(_all_keys(root))
    close = difflib.get_close_matches(full_key, known, n=3, cutoff=0.5)
    if not close:
        # Compare the last component alone: a correct key under the wrong section.
        leaf = full_key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in known}
        close = [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=3, cutoff=0.6)]
    hint = f"did you mean {close[0]!r}?" if close else "no similar key exists"
    where = f" (section {parent!r} has no such key)" if parent else ""
    others = f" Other close keys: {', '.join(close[1:])}." if len(close) > 1 else ""
    raise ValueError(
        f"unknown config key {full_key!r} in {source}{where}; {hint}{others} "
        "Every key must be declared in norm_det/config/defaults.py."
    )


def _check_known_keys(
    node: CfgNode, loaded: Mapping[str, Any], source: str, prefix: str = "", root=None
) -> None:
    """Raise for the first key of ``loaded`` that ``node`` does not declare."""
    root = node if root is None else root
    for key, value in loaded.items():
        full_key = f"{prefix}{key}"
        if key not in node:
            if node.is_new_allowed():
                continue
            _raise_unknown_key(root, full_key, prefix.rstrip("."), source)
        if isinstance(value, Mapping) and isinstance(node[key], CfgNode):
            _check_known_keys(node[key], value, source, full_key + ".", root)


def _yaml_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.y*ml") if p.suffix in (".yaml", ".yml"))


def find_config_file(name: str | os.PathLike, configs_dir: str | os.PathLike | None = None) -> Path:
    """The config file ``name`` refers to.

    ``name`` is tried as a path (relative to the working directory, the repository root, then
    ``configs_dir``); a bare file name (no directory part; ``.yaml`` appended when it has no
    suffix) is then searched recursively under ``configs_dir`` (default: the repository's
    ``configs/``).

    Raises:
        FileNotFoundError: nothing matches; the message lists the closest config names.
        ValueError: a bare name matches several files; the message lists them.
    """
    configs_root = Path(configs_dir) if configs_dir is not None else CONFIGS_DIR
    path = Path(name).expanduser()
    for candidate in (path, configs_root.parent / path, configs_root / path):
        if candidate.is_file():
            return candidate
    file_name = path.name if path.suffix else path.name + ".yaml"
    available = _yaml_files(configs_root) if configs_root.is_dir() else []
    # Only a bare name is searched for: a path that does not exist is not silently replaced.
    matches = [p for p in available if p.name == file_name] if path.name == str(name) else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        listed = ", ".join(str(p.relative_to(configs_root)) for p in matches)
        raise ValueError(
            f"config name '{name}' is ambiguous: {len(matches)} files under '{configs_root}' are "
            f"called {file_name} ({listed}); pass one of them as a path"
        )
    relative = [str(p.relative_to(configs_root)) for p in available]
    by_name = {p.name: rel for p, rel in zip(available, relative)}
    near = difflib.get_close_matches(str(name), relative, n=5, cutoff=0.4)
    near += [
        by_name[m]
        for m in difflib.get_close_matches(file_name, list(by_name), n=5, cutoff=0.4)
        if by_name[m] not in near
    ]
    hint = (
        "; near matches: " + ", ".join(near[:5])
        if near
        else f"; there are {len(available)} config files there"
    )
    raise FileNotFoundError(
        f"config file '{name}' not found (tried it as a path, and as a name under "
        f"'{configs_root}'){hint}"
    )


def get_cfg() -> CfgNode:
    """A fresh, mutable copy of the default config."""
    from norm_det.config.defaults import _C

    return _as_cfg_node(_C)


def _as_cfg_node(node: _FvcoreCfgNode) -> CfgNode:
    """A deep copy of ``node`` as :class:`CfgNode`, keeping each section's ``new_allowed``."""
    converted = CfgNode(new_allowed=node.is_new_allowed())
    for key, value in node.items():
        converted[key] = (
            _as_cfg_node(value) if isinstance(value, _FvcoreCfgNode) else copy.deepcopy(value)
        )
    return converted


def load_config(config_file: str | os.PathLike | None = None, opts: Sequence[str] = ()) -> CfgNode:
    """Defaults, then ``config_file`` (with its ``_BASE_`` chain), then ``KEY VALUE`` ``opts``."""
    cfg = get_cfg()
    if config_file:
        cfg.merge_from_file(config_file)
    if opts:
        cfg.merge_from_list(list(opts))
    return cfg
