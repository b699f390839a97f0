"""tools/convert_weights.py end to end on random torchvision models (no downloads)."""

from __future__ import annotations

import pytest
import torch
import torchvision

import tools.convert_weights as convert_weights
from norm_det.modeling import build_model
from norm_det.weights import (
    output_agreement,
    pretrained_reference,
    read_checkpoint,
    warm_start,
)
from tests.modeling.tiny import tiny_batch, tiny_cfg
from tests.weights.conftest import make_resnet18, relative_error, torchvision_resnet_features


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = convert_weights.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    model = make_resnet18(seed=3)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_round_trip_through_every_format(resnet18_file, tmp_path, capsys):
    _, source = resnet18_file
    steps = [
        (source, tmp_path / "R-18.pkl", "detectron2"),
        (tmp_path / "R-18.pkl", tmp_path / "r18_mmdet.pth", "mmdet"),
        (tmp_path / "r18_mmdet.pth", tmp_path / "r18_nd.pth", "norm_det"),
        (tmp_path / "r18_nd.pth", tmp_path / "r18_tv.pth", "torchvision"),
    ]
    for src, dst, framework in steps:
        code, out, err = _run(capsys, src, dst, "--to", framework, "--allow-pickle")
        assert code == 0, err
        assert f"wrote {dst} ({framework})" in out
    original = torch.load(source, weights_only=True)
    final = torch.load(tmp_path / "r18_tv.pth", weights_only=True)
    assert list(final) == list(original)
    assert all(torch.equal(final[k], original[k]) for k in original)


def test_clear_errors(resnet18_file, tmp_path, capsys):
    _, source = resnet18_file
    assert _run(capsys, source, tmp_path / "R-18.pkl", "--to", "detectron2")[0] == 0
    code, _, err = _run(capsys, tmp_path / "R-18.pkl", tmp_path / "x.pth", "--to", "mmdet")
    assert code == 2 and "is a pickle" in err and "--allow-pickle" in err

    torch.save({"head.weight": torch.zeros(2), "head.bias": torch.zeros(2)}, tmp_path / "odd.pth")
    code, _, err = _run(capsys, tmp_path / "odd.pth", tmp_path / "x.pth", "--to", "mmdet")
    assert code == 2 and "first unmatched keys: head.weight, head.bias" in err

    code, _, err = _run(capsys, tmp_path / "missing.pth", tmp_path / "x.pth", "--to", "mmdet")
    assert code == 2 and "does not exist" in err


def test_scheme_conversion_then_fuse_for_torchvision(resnet18_file, tmp_path, capsys):
    _, source = resnet18_file
    images = torch.randn(4, 3, 64, 64)
    torch.save(images, tmp_path / "images.pt")
    code, out, err = _run(
        capsys, source, tmp_path / "pws.pth", "--to", "norm_det", "--scheme", "PWS",
        "--calibration-images", tmp_path / "images.pt",
    )  # fmt: skip
    assert code == 0, err
    assert "warm start BN -> PWS: outputs differ by" in out
    pws = read_checkpoint(tmp_path / "pws.pth")
    assert pws.scheme == "PWS" and "res2.0.conv1.conv.alpha" in pws.tensors

    code, out, err = _run(capsys, tmp_path / "pws.pth", tmp_path / "plain.pth", "--to",
                          "torchvision", "--fuse")  # fmt: skip
    assert code == 0, err
    plain = torchvision.models.resnet18().eval()
    plain.load_state_dict(torch.load(tmp_path / "plain.pth", weights_only=True))
    trained = pretrained_reference(pws)
    with torch.no_grad():
        expected, outputs = trained(images), torchvision_resnet_features(plain, images)
    assert relative_error(outputs["res5"], expected["res5"]) < 1e-5
    # The PWS warm start was calibrated on these images: closer to the BN network than zero-shot.
    bn = pretrained_reference(read_checkpoint(source))
    assert output_agreement(bn, trained, images)["relative_l2"] < 0.5

    code, _, err = _run(capsys, source, tmp_path / "nd.pth", "--to", "norm_det", "--scheme",
                        "NDPP")  # fmt: skip
    assert code == 0
    code, _, err = _run(capsys, tmp_path / "nd.pth", tmp_path / "x.pth", "--to", "torchvision",
                        "--fuse")  # fmt: skip
    assert code == 2 and "--allow-inexact" in err


def test_a_whole_model_from_its_config(tmp_path, capsys):
    cfg = tiny_cfg("FasterRCNN", "PWS")
    (tmp_path / "tiny.yaml").write_text(cfg.dump())
    model = build_model(cfg)
    images, targets = tiny_batch(1)
    model(images, targets)
    torch.save({"model": model.state_dict(), "iteration": 10}, tmp_path / "model_final.pth")
    code, out, err = _run(
        capsys, tmp_path / "model_final.pth", tmp_path / "fused.pth", "--to", "norm_det",
        "--fuse", "--config-file", tmp_path / "tiny.yaml", "--onnx", tmp_path / "model.onnx",
        "--image-size", 64, 64,
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "model.onnx").is_file() and "outputs: boxes, scores, labels" in out

    from norm_det.config import get_cfg

    fused_file = torch.load(tmp_path / "fused.pth", weights_only=True)
    fused_cfg = get_cfg()
    fused_cfg.merge_from_other_cfg(fused_cfg.load_cfg(fused_file["meta"]["config"]))
    assert fused_cfg.MODEL.RESNETS.NORM == "none"
    plain = build_model(fused_cfg).eval()
    plain.load_state_dict(fused_file["model"])
    model.eval()
    with torch.no_grad():
        expected, outputs = model(images)[0], plain(images)[0]
    torch.testing.assert_close(outputs["scores"], expected["scores"], rtol=1e-4, atol=1e-5)


def test_initialization_of_a_detector_from_a_backbone(resnet18_file, tmp_path, capsys):
    from norm_det.engine.checkpointer import Checkpointer

    _, source = resnet18_file
    cfg = tiny_cfg("FasterRCNN", "GN+WS")
    for key in ("STEM_OUT_CHANNELS", "RES2_OUT_CHANNELS", "WIDTH_PER_GROUP"):
        cfg.MODEL.RESNETS[key] = 64
    (tmp_path / "gnws.yaml").write_text(cfg.dump())
    code, out, err = _run(capsys, source, tmp_path / "init.pth", "--to", "norm_det",
                          "--config-file", tmp_path / "gnws.yaml")  # fmt: skip
    assert code == 0, err
    assert "warm-started backbone.body (GN+WS)" in out
    model = build_model(cfg).eval()
    Checkpointer(model, tmp_path).load(tmp_path / "init.pth", full=False)  # strict: every key
    bn = pretrained_reference(read_checkpoint(source))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outputs, expected = model.backbone.body(x), warm_start(bn, "GN+WS")(x)
    for name in expected:
        torch.testing.assert_close(outputs[name], expected[name], rtol=0, atol=0)
