"""The model zoo: published configurations, the papers' results for them, and their weights.

``model_zoo/catalog.yaml`` names each configuration (``COCO-Detection/faster_rcnn_R_50_FPN_1x_ndpp``
is ``configs/COCO-Detection/faster_rcnn_R_50_FPN_1x_ndpp.yaml``), with the config overrides that
reproduce a paper's setting, the metrics the papers report for it, and its weights (a local path,
or a URL with its sha256) when they exist. As in detectron2::

    from norm_det import model_zoo

    model = model_zoo.get("COCO-Detection/faster_rcnn_R_50_FPN_1x_ndpp", trained=False)
    cfg = model_zoo.get_config("Cityscapes-SemanticSegmentation/deeplabv3_R_50_ndpp")

Nothing is downloaded: weights are read from the path the catalog gives, or from the cache
folder (``$NORM_DET_CACHE``, default ``~/.cache/norm_det``) under ``model_zoo/<file name of the
URL>``; a missing or altered file is an error that says where to put which file.
``model_zoo/README.md`` is :func:`render_readme` of the catalog.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The repository next to the (editable) package.
REPOSITORY = Path(__file__).resolve().parents[1]
CATALOG_FILE = REPOSITORY / "model_zoo" / "catalog.yaml"
CONFIGS_DIR = REPOSITORY / "configs"
FRAMEWORKS = ("norm_det", "detectron2", "mmdet", "mmseg")

__all__ = [
    "CatalogEntry",
    "get",
    "get_config",
    "get_config_file",
    "get_weights_file",
    "list_models",
    "load_catalog",
    "render_readme",
]


@dataclass(frozen=True)
class CatalogEntry:
    """One configuration of the catalog (see ``model_zoo/catalog.yaml``)."""

    name: str
    config: str
    framework: str = "norm_det"
    task: str = ""
    dataset: str = ""
    scheme: str = ""
    opts: tuple[str, ...] = ()
    reported: tuple[dict[str, Any], ...] = ()
    weights: dict[str, str] | None = None
    notes: str = ""


@dataclass(frozen=True)
class Catalog:
    """The parsed catalog: papers, their tables, the configurations, and paper rows without one."""

    papers: dict[str, dict[str, str]]
    tables: dict[str, dict[str, str]]
    models: dict[str, CatalogEntry]
    without_config: tuple[dict[str, Any], ...] = field(default=())


def _catalog_path(catalog_file: str | os.PathLike | None) -> Path:
    return Path(catalog_file or os.environ.get("NORM_DET_MODEL_ZOO_CATALOG") or CATALOG_FILE)


def load_catalog(catalog_file: str | os.PathLike | None = None) -> Catalog:
    """Parse the catalog (default ``model_zoo/catalog.yaml``, or ``$NORM_DET_MODEL_ZOO_CATALOG``).

    Raises:
        FileNotFoundError: no catalog file.
        ValueError: an entry without a config file or with an unknown field, framework or table.
    """
    path = _catalog_path(catalog_file)
    if not path.is_file():
        raise FileNotFoundError(f"model zoo catalog '{path}' does not exist")
    return _parse_catalog(path, path.read_text())


@functools.lru_cache(maxsize=8)
def _parse_catalog(path: Path, text: str) -> Catalog:
    # Cached per content: get() and friends read the catalog on every call.
    data = yaml.safe_load(text) or {}
    papers = dict(data.get("papers") or {})
    tables = dict(data.get("tables") or {})
    known = {f.name for f in CatalogEntry.__dataclass_fields__.values()} - {"name"}
    models: dict[str, CatalogEntry] = {}
    for name, fields in (data.get("models") or {}).items():
        fields = dict(fields or {})
        unknown = sorted(set(fields) - known)
        if unknown or not fields.get("config"):
            problem = f"unknown fields {unknown}" if unknown else "no 'config'"
            raise ValueError(f"'{path}': model {name!r} has {problem}; fields: {sorted(known)}")
        if fields.get("framework", "norm_det") not in FRAMEWORKS:
            raise ValueError(
                f"'{path}': model {name!r} has framework {fields['framework']!r}; "
                f"expected one of {FRAMEWORKS}"
            )
        fields["opts"] = tuple(str(v) for v in fields.get("opts") or ())
        fields["reported"] = tuple(fields.get("reported") or ())
        models[name] = CatalogEntry(name=name, **fields)
    without_config = tuple(data.get("without_config") or ())
    for item in [r for e in models.values() for r in e.reported] + list(without_config):
        if item.get("table") not in tables:
            raise ValueError(
                f"'{path}': a reported result names table {item.get('table')!r}, which "
                f"'tables' does not define (defined: {', '.join(tables)})"
            )
    return Catalog(papers, tables, models, without_config)


def list_models(catalog_file: str | os.PathLike | None = None) -> list[str]:
    """Names of the catalog's configurations."""
    return list(load_catalog(catalog_file).models)


def _entry(name: str, catalog_file: str | os.PathLike | None) -> CatalogEntry:
    models = load_catalog(catalog_file).models
    key = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if key in models:
        return models[key]
    close = difflib.get_close_matches(key, list(models), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"the model zoo has no configuration {name!r}{hint}")


def get_config_file(name: str, catalog_file: str | os.PathLike | None = None) -> str:
    """The path of the config file of catalog entry ``name``.

    Raises:
        ValueError: an unknown name (with the closest ones).
        FileNotFoundError: the catalog names a config file that does not exist.
    """
    entry = _entry(name, catalog_file)
    path = CONFIGS_DIR / entry.config
    if not path.is_file():
        raise FileNotFoundError(f"model zoo entry {name!r}: config file '{path}' does not exist")
    return str(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where weights given by URL are looked for: ``$NORM_DET_CACHE/model_zoo``."""
    root = os.environ.get("NORM_DET_CACHE") or Path.home() / ".cache" / "norm_det"
    return Path(root) / "model_zoo"


def get_weights_file(name: str, catalog_file: str | os.PathLike | None = None) -> Path:
    """The local file of entry ``name``'s weights, its sha256 checked when the catalog gives one.

    Raises:
        FileNotFoundError: the catalog has no weights for ``name``, or they are not on this
            machine (the message names the URL and where to put the file).
        ValueError: the file's sha256 differs from the catalog's.
    """
    catalog_path = _catalog_path(catalog_file)
    entry = _entry(name, catalog_file)
    if not entry.weights:
        raise FileNotFoundError(
            f"the model zoo lists no weights for {name!r} (none are published yet); train them "
            f"with: python tools/train_net.py --config-file {get_config_file(name, catalog_file)}"
            + (f" {' '.join(entry.opts)}" if entry.opts else "")
            + ", or use trained=False"
        )
    url = entry.weights.get("url")
    if entry.weights.get("path"):
        path = Path(entry.weights["path"])
        path = path if path.is_absolute() else catalog_path.parent / path
        where = f"'{path}'"
    elif url:
        path = cache_dir() / url.rsplit("/", 1)[-1]
        where = f"'{path}' (download {url} there; norm_det does not download)"
    else:
        raise ValueError(f"model zoo entry {name!r}: weights need a 'path' or a 'url'")
    if not path.is_file():
        raise FileNotFoundError(
            f"weights of {name!r} are not available offline: expected at {where}"
        )
    expected = entry.weights.get("sha256")
    if expected and _sha256(path) != expected.lower():
        raise ValueError(
            f"weights of {name!r} at '{path}' have sha256 {_sha256(path)}, but the catalog "
            f"expects {expected}: the file is damaged or another one"
        )
    return path


def get_config(name: str, trained: bool = False, catalog_file: str | os.PathLike | None = None):
    """The config of entry ``name`` with its overrides (and its weights as ``MODEL.WEIGHTS``
    when ``trained``).

    A norm_det config is norm_det's ``CfgNode``; a detectron2 one is detectron2's (with
    :func:`~norm_det.integrations.detectron2.add_normdet_config`); an mmdet / mmseg one is
    mmengine's ``Config``.
    """
    entry = _entry(name, catalog_file)
    path = get_config_file(name, catalog_file)
    weights = str(get_weights_file(name, catalog_file)) if trained else None
    if entry.framework == "norm_det":
        from norm_det.config import get_cfg

        cfg = get_cfg()
        cfg.merge_from_file(path)
        cfg.merge_from_list(list(entry.opts))
    elif entry.framework == "detectron2":
        from detectron2.config import get_cfg as get_detectron2_cfg

        from norm_det.integrations.detectron2 import add_normdet_config

        cfg = get_detectron2_cfg()
        add_normdet_config(cfg)
        cfg.merge_from_file(path)
        cfg.merge_from_list(list(entry.opts))
    else:
        from mmengine.config import Config

        cfg = Config.fromfile(path)
        if weights:
            cfg.load_from = weights
        return cfg
    if weights:
        cfg.MODEL.WEIGHTS = weights
    return cfg


def get(
    name: str,
    trained: bool = False,
    device: str | None = None,
    catalog_file: str | os.PathLike | None = None,
):
    """Build the model of entry ``name``; with ``trained``, load its weights.

    Args:
        name: a catalog name (``list_models()``).
        trained: load the catalog's weights (else the model has its initialization, or the
            pretrained backbone its config names).
        device: overrides ``MODEL.DEVICE``.

    Raises:
        ValueError: an unknown name, or an mmdet / mmseg entry (build those with their
            framework from :func:`get_config_file`).
        FileNotFoundError: ``trained`` but the weights are not on this machine.
    """
    entry = _entry(name, catalog_file)
    if entry.framework in ("mmdet", "mmseg"):
        raise ValueError(
            f"model zoo entry {name!r} is an {entry.framework} config; build it with "
            f"{entry.framework} (e.g. mmdet.apis.init_detector(get_config_file({name!r}))) "
            "after importing norm_det.integrations.mmdet"
        )
    cfg = get_config(name, trained=trained, catalog_file=catalog_file)
    if device is not None:
        cfg.MODEL.DEVICE = device
    if entry.framework == "detectron2":
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.modeling import build_model as build_detectron2_model

        model = build_detectron2_model(cfg)
        if trained:
            DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        return model.eval() if trained else model
    from norm_det.engine.checkpointer import Checkpointer
    from norm_det.modeling import build_model

    model = build_model(cfg)
    if trained:
        Checkpointer(model, cache_dir()).load(cfg.MODEL.WEIGHTS, full=False)
        model.eval()
    return model


# ---------------------------------------------------------------------------------------------
# model_zoo/README.md


_README_INTRO = """\
# Model zoo

The catalog of published configurations is `model_zoo/catalog.yaml`; this file is rendered from
it (`python -c "from norm_det import model_zoo; print(model_zoo.render_readme())"`) and a test
checks that the two agree. Each configuration is a config file under `configs/` plus the
overrides (`opts`) that give the paper's setting; the tables below list the metrics the papers
report for it, next to the config that reproduces it. Numbers are copied from the paper texts in
`/work/shared/papers/` (file named per paper); rows the papers report for methods norm_det does
not implement are listed without a config.

```python
from norm_det import model_zoo

model = model_zoo.get("COCO-Detection/faster_rcnn_R_50_FPN_1x_ndpp", trained=False)
cfg = model_zoo.get_config("Cityscapes-SemanticSegmentation/deeplabv3_R_50_ndpp")
path = model_zoo.get_config_file("PascalVOC-Detection/ssd300_vgg16_pws_bs8")
```

`get(name, trained=True)` loads the catalog's weights: a local path, or a URL whose file must
already be in `$NORM_DET_CACHE/model_zoo/` (default `~/.cache/norm_det/model_zoo/`); norm_det
never downloads, and checks the sha256 the catalog gives. **No weights are published yet**, so
`trained=True` fails with an error that says how to train them.
"""


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _config_cell(entry: CatalogEntry) -> str:
    text = f"[`{entry.name}`](../configs/{entry.config})"
    if entry.opts:
        text += " `" + " ".join(entry.opts) + "`"
    return text


def _weights_cell(entry: CatalogEntry) -> str:
    if not entry.weights:
        return "—"
    return entry.weights.get("url") or entry.weights.get("path") or "—"


def _render_table(catalog: Catalog, table: str) -> list[str]:
    rows: list[tuple[str, str, dict[str, Any], str]] = []
    for entry in catalog.models.values():
        for item in entry.reported:
            if item["table"] == table:
                rows.append(
                    (item["row"], _config_cell(entry), item["values"], _weights_cell(entry))
                )
    for item in catalog.without_config:
        if item["table"] == table:
            rows.append((item["row"], f"— ({item.get('why', 'no config')})", item["values"], "—"))
    columns: list[str] = []
    for _, _, values, _ in rows:
        columns += [c for c in values if c not in columns]
    spec = catalog.tables[table]
    lines = [f"### {spec['caption']}", ""]
    if spec.get("note"):
        lines += [spec["note"], ""]
    lines.append("| paper row | configuration | " + " | ".join(columns) + " | weights |")
    lines.append("|---" * (len(columns) + 3) + "|")
    for label, config, values, weights in rows:
        cells = " | ".join(_cell(values.get(c)) for c in columns)
        lines.append(f"| {label} | {config} | {cells} | {weights} |")
    return [*lines, ""]


def render_readme(catalog_file: str | os.PathLike | None = None) -> str:
    """``model_zoo/README.md``: the catalog as tables, per paper table, then every entry."""
    catalog = load_catalog(catalog_file)
    lines = [_README_INTRO]
    for paper_key, paper in catalog.papers.items():
        lines += [f"## {paper['title']}", "", f"Source: `{paper['file']}`.", ""]
        for table, spec in catalog.tables.items():
            if spec["paper"] == paper_key:
                lines += _render_table(catalog, table)
    lines += [
        "## All configurations",
        "",
        "| name | framework | task | dataset | scheme | notes | weights |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in catalog.models.values():
        lines.append(
            f"| {_config_cell(entry)} | {entry.framework} | {entry.task} | {entry.dataset} | "
            f"{entry.scheme} | {entry.notes or '—'} | {_weights_cell(entry)} |"
        )
    return "\n".join(lines) + "\n"
