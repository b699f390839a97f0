"""Configs of detectron2 and mmdet/mmseg given to norm_det's tools name the tool that runs them."""

from __future__ import annotations

import pytest

from norm_det.config import CONFIGS_DIR, ForeignConfigError, load_config
from norm_det.config.foreign import foreign_config_hint


@pytest.mark.parametrize("path", sorted((CONFIGS_DIR / "detectron2").glob("*.yaml")), ids=str)
def test_shipped_detectron2_configs_point_to_detectron2s_tool(path):
    with pytest.raises(ForeignConfigError, match=r"detectron2 config.*tools/train_net.py"):
        load_config(path)


@pytest.mark.parametrize(
    "folder, kind", [("mmdet", "mmdet"), ("mmseg", "mmseg")], ids=["mmdet", "mmseg"]
)
def test_shipped_openmmlab_configs_point_to_the_mm_entry_point(folder, kind):
    paths = sorted((CONFIGS_DIR / folder).glob("*.py"))
    assert paths
    for path in paths:
        with pytest.raises(ForeignConfigError) as info:
            load_config(path)
        message = str(info.value)
        assert f"OpenMMLab ({kind}) config" in message, path
        assert f"python -m norm_det.mm train {path}" in message


def test_a_detectron2_yaml_is_recognized_through_its_base(tmp_path):
    # detectron2's own layout: the architecture lives in the base file only.
    (tmp_path / "Base-RCNN-FPN.yaml").write_text(
        "MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\n"
        "  BACKBONE: {NAME: build_resnet_fpn_backbone}\n"
    )
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "mask_rcnn_R_50_FPN_1x.yaml"
    child.write_text('_BASE_: "../Base-RCNN-FPN.yaml"\nMODEL:\n  RESNETS: {NORM: "NDPP"}\n')
    with pytest.raises(ForeignConfigError, match="detectron2 config"):
        load_config(child)


def test_a_lazyconfig_points_to_detectron2s_lazy_tool(tmp_path):
    path = tmp_path / "mask_rcnn_R_50_FPN_100ep_LSJ.py"
    path.write_text("from detectron2.config import LazyCall as L\nmodel = L(dict)()\n")
    with pytest.raises(ForeignConfigError, match=r"LazyConfig.*lazyconfig_train_net.py"):
        load_config(path)


def test_norm_det_configs_are_not_foreign():
    own = [p for p in CONFIGS_DIR.rglob("*.yaml") if "detectron2" not in p.parts]
    assert len(own) > 20
    assert [p for p in own if foreign_config_hint(p) is not None] == []
    # Still an ordinary ValueError for callers that catch that.
    assert issubclass(ForeignConfigError, ValueError)
