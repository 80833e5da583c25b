"""Image classification end to end (issue 16): tiny random ViT and MobileNetV2 made from transformers' config classes
(as optimum's own tests do), exported by optimum, built like a user would; image data plumbing (media.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgecompress.cli import main
from edgecompress.errors import DataError
from edgecompress.media import MediaSet, builtin, load_data

REPO = Path(__file__).resolve().parents[1]
TARGETS = sorted(p.stem for p in (REPO / "targets").glob("*.toml"))


def _save_vit(path: Path) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=10, id2label={i: f"class{i}" for i in range(10)},
                    label2id={f"class{i}": i for i in range(10)})
    ViTForImageClassification(cfg).eval().save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_vit(tmp_path_factory.mktemp("vit-dir"))


@pytest.fixture(scope="session")
def tiny_mobilenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification, MobileNetV2ImageProcessor

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mobilenet-dir")
    MobileNetV2ForImageClassification(MobileNetV2Config(image_size=32, depth_multiplier=0.25, num_labels=10)
                                      ).eval().save_pretrained(path)
    MobileNetV2ImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}
                              ).save_pretrained(path)
    return path


def _build(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["build", *args])
    return result.exit_code, result.output


# --- data: directories, list files, built-in images ---------------------------------------------------------------
def _images(d: Path, n: int) -> list[Path]:
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = d / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def test_image_dir_and_list_file(tmp_path: Path) -> None:
    files = _images(tmp_path / "imgs" / "sub", 3)
    (tmp_path / "imgs" / "notes.md").write_text("not an image")
    data = load_data(tmp_path / "imgs", "image-classification", "evaluation")
    assert isinstance(data, MediaSet) and [f.name for f in data.files] == ["img0.png", "img1.png", "img2.png"]
    listing = tmp_path / "imgs" / "list.txt"
    listing.write_text("# comment\nsub/img2.png\t7\n" + f"{files[0]}\tclass3\n")
    listed = load_data(listing, "image-classification", "calibration")
    assert isinstance(listed, MediaSet)
    assert [f.name for f in listed.files] == ["img2.png", "img0.png"] and listed.labels == ("7", "class3")
    # the key is the files' content: the same image under another name hashes the same bytes
    assert listed.texts[1].split()[0] == data.texts[0].split()[0]


@pytest.mark.parametrize("setup, needle", [
    (lambda d: d.mkdir(), "holds no image files"),
    (lambda d: (d.mkdir(), (d / "a.txt").write_text("x.jsonl\n")), "is not a image file"),
    (lambda d: (d.mkdir(), (d / "a.jsonl").write_text('{"text": "hi"}\n')), "neither a directory of images"),
    (lambda d: (d.mkdir(), (d / "a.txt").write_text("missing.png\n")), "file not found"),
])
def test_bad_image_data_is_one_line(tmp_path: Path, setup, needle: str) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path / "data"
    setup(d)
    target = next((p for p in sorted(d.iterdir()) if p.is_file()), d) if d.exists() else d
    with pytest.raises(DataError, match=needle):
        load_data(target, "image-classification", "evaluation")


def test_builtin_images_ship_in_both_splits() -> None:
    cal, ev = builtin("image", "calibration"), builtin("image", "evaluation")
    assert len(cal.files) >= 8 and len(ev.files) >= 8
    assert not {t.split()[0] for t in cal.texts} & {t.split()[0] for t in ev.texts}  # disjoint


# --- builds ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_vit_dir_builds_without_task_for_pi5(tiny_vit: Path, tmp_path: Path) -> None:
    """The issue's first complaint: a ViT saved with save_pretrained was refused ("has no tokenizer files")."""
    out = tmp_path / "vit-pi5"
    code, output = _build(str(tiny_vit), "--target", "raspberry-pi-5", "--out", str(out))
    assert code in (0, 3), output
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["task"] == "image-classification" and m["recipe"]["name"] == "int8-static"
    assert (out / "preprocessor_config.json").is_file()  # the image processor travels with the bundle
    metrics = m["fidelity"]["metrics"]
    assert {"top1_agreement", "top5_agreement", "kl_mean"} <= set(metrics)
    assert 0.0 <= metrics["top1_agreement"] <= 1.0 and metrics["kl_mean"] >= 0.0
    report = m["recipe"]["passes"][0]["report"]
    assert report["preset"]["family"] == "transformer"
    # the ViT preset: only Linear MatMuls quantized; LayerNorm, Softmax, GELU and the residual Adds stay float
    q = onnx.load(str(out / "model.onnx"))
    dq_inputs = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    for n in q.graph.node:
        if n.op_type in ("LayerNormalization", "Softmax", "Add", "Erf"):
            assert not set(n.input) & dq_inputs, n.name
    assert m["kernels"]["integer_matmul_flops_share"] > 0
    html = (out / "report.html").read_text()
    assert "Example images: FP32 vs compressed predictions" in html and "data:image/jpeg;base64," in html


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_tiny_vit_builds_on_every_target(tiny_vit: Path, tmp_path: Path, target: str) -> None:
    out = tmp_path / target
    code, output = _build(str(tiny_vit), "--target", target, "--out", str(out))
    assert code in (0, 3), output
    m = json.loads((out / "manifest.json").read_text())
    assert m["fidelity"]["metrics"]["top1_agreement"] >= 0.5  # a real fidelity figure, not a placeholder
    assert m["kernels"]["workload"]["height"] == 32  # the size the processor makes, not 224


@pytest.mark.slow
def test_mobilenet_int8_runs_conv_in_int8_and_int4_is_refused(tiny_mobilenet: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"  # ORT's quantization tools must not leave files in the user's working directory
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    imgs = tmp_path / "imgs"
    _images(imgs, 10)
    listing = tmp_path / "eval.txt"
    listing.write_text("".join(f"imgs/img{i}.png\t{i % 10}\n" for i in range(10)))
    out = tmp_path / "mnv2"
    code, output = _build(str(tiny_mobilenet), "--target", "raspberry-pi-5", "--out", str(out),
                          "--calibration", str(imgs), "--eval", str(listing))
    assert code in (0, 3), output
    m = json.loads((out / "manifest.json").read_text())
    rep = m["recipe"]["passes"][0]["report"]
    assert rep["preset"]["family"] == "conv" and rep["optimized_graph"]["int8_kernels"].get("QLinearConv", 0) > 0
    assert m["kernels"]["by_op"].get("QLinearConv", {}).get("nodes", 0) > 0  # modelled for the Pi's Arm ORT
    assert "top1_accuracy" in m["fidelity"]["metrics"]  # labels from the list file
    assert list(cwd.iterdir()) == []
    refused = tmp_path / "int4"
    code, output = _build(str(tiny_mobilenet), "--target", "raspberry-pi-5", "--recipe", "int4",
                          "--out", str(refused))
    assert code == 2 and "convolutional network" in output and not refused.exists()


@pytest.mark.slow
def test_text_file_for_an_image_model_is_refused(tiny_vit: Path, tmp_path: Path) -> None:
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "a sentence"}\n')
    out = tmp_path / "o"
    code, output = _build(str(tiny_vit), "--target", "host", "--eval", str(texts), "--out", str(out))
    assert code == 2 and "neither a directory of images" in output and not out.exists()


@pytest.mark.slow
def test_vit_without_processor_says_so(tiny_vit: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(tiny_vit, bare)
    (bare / "preprocessor_config.json").unlink()
    code, output = _build(str(bare), "--target", "host", "--out", str(tmp_path / "o"))
    assert code == 2 and "preprocessor_config.json" in output


# --- object detection -----------------------------------------------------------------------------------------------
def test_map50_scores_detections_against_the_reference() -> None:
    from edgecompress.tasks.detection import detections, map50

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 10, 6))
    boxes = rng.uniform(0.2, 0.8, (4, 10, 4)) * [1, 1, 0.3, 0.3]
    ref = detections(logits, boxes)
    assert map50(ref, ref) == pytest.approx(1.0)
    assert map50(ref, detections(logits, boxes + np.array([0.5, 0, 0, 0]))) == 0.0  # every box moved off its match
    noisy = map50(ref, detections(logits + rng.standard_normal(logits.shape), boxes))
    assert 0.0 < noisy < 1.0


@pytest.mark.slow
def test_tiny_yolos_builds_with_map_against_fp32(tmp_path: Path) -> None:
    import torch
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessor

    torch.manual_seed(0)
    src = tmp_path / "yolos-dir"
    YolosForObjectDetection(YolosConfig(image_size=[32, 32], patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64, num_detection_tokens=10,
                                        num_labels=5)).eval().save_pretrained(src)
    YolosImageProcessor(size={"height": 32, "width": 32}, do_pad=False).save_pretrained(src)
    out = tmp_path / "yolos-pi5"
    code, output = _build(str(src), "--target", "raspberry-pi-5", "--out", str(out))
    assert code in (0, 3), output
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["task"] == "object-detection"
    metrics = m["fidelity"]["metrics"]
    assert 0.0 <= metrics["map50"] <= 1.0 and metrics["box_iou_mean"] > 0.5
