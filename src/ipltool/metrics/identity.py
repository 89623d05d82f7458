"""Face embeddings for the identity similarity metric (docs/metrics.md §7).

Two backbones:

- `dlib` (default, offline): the ResNet face descriptor shipped by PyPI's
  `face_recognition_models` (128-d), with dlib's HOG detector and the 5-point landmark
  model. StyleGAN faces are aligned but stylised targets often defeat the detector; then a
  fixed central box (where the detector puts an FFHQ-aligned face) stands in, and the
  fallback is reported per image.
- `arcface`: IR-SE50 ArcFace (TreB1eN/InsightFace_Pytorch, the `model_ir_se50.pth` of
  pSp and StyleGAN-NADA's ID loss), 512-d, with NADA's preprocessing: pool to 256, crop
  rows 35:223 and columns 32:220, pool to 112, input in [-1, 1].

Both return L2-normalised embeddings, so cosine similarity is a dot product.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ipltool.metrics.base import (
    RANDOM_TEST,
    Extractor,
    MetricUnavailable,
    import_or_unavailable,
    load_state_dict_file,
    load_strict,
    make_key,
    seeded,
    weights_file,
    weights_info,
    weights_tag,
)
from ipltool.models.encoders.irse import BackboneConfig, make_body, make_input_layer

BACKBONES = ("dlib", "arcface")
HUB_NAME = "ir-se50"
_SHIPPED_PACKAGE = "face_recognition_models"
DLIB_DESCRIPTOR = "models/dlib_face_recognition_resnet_model_v1.dat"
DLIB_LANDMARKS = "models/shape_predictor_5_face_landmarks.dat"
# Where dlib's detector boxes an FFHQ-aligned face, as fractions of the picture
# (left, top, right, bottom): measured on faces aligned by `invert.align` (detector boxes
# between 0.18-0.26, 0.25-0.38, 0.77-0.79 and 0.82-0.92). Used when no face is found.
FALLBACK_BOX = (0.22, 0.32, 0.78, 0.88)
ARCFACE_CROP = (35, 223, 32, 220)  # rows, columns of the 256 px picture (pSp / NADA)


# ----------------------------------------------------------------------------
# ArcFace


class ArcFace(nn.Module):
    """IR-SE ArcFace: `input_layer`, `body`, `output_layer`, then L2 normalisation.

    `output_layer` = BatchNorm2d(C), Dropout, Flatten, Linear(C * 7 * 7, embed_dim),
    BatchNorm1d(embed_dim) (keys `output_layer.0.*`, `output_layer.3.*`, `output_layer.4.*`),
    as the reference `Backbone(input_size=112, num_layers=50, mode="ir_se")`. Dropout is
    inactive in eval mode.

    Args:
        config: the IR-SE backbone (IR-SE50 by default; tests use a few-channel copy).
        embed_dim: embedding size (512).
        drop_ratio: dropout rate of the reference (0.6); irrelevant in eval mode.
    """

    def __init__(self, config: BackboneConfig = BackboneConfig(), embed_dim: int = 512, drop_ratio: float = 0.6):
        super().__init__()
        self.config = config
        width = config.widths[-1]
        side = 112 // config.downsampling  # 7
        self.input_layer = make_input_layer(config)
        self.body = make_body(config)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.Dropout(drop_ratio),
            nn.Flatten(),
            nn.Linear(width * side * side, embed_dim),
            nn.BatchNorm1d(embed_dim, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) in [-1, 1] -> (B, embed_dim) unit vectors."""
        return F.normalize(self.output_layer(self.body(self.input_layer(x))), dim=1)


def arcface_preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 pictures -> ArcFace input, as NADA's ID loss.

    Steps: 1. map to [-1, 1]; 2. to 256 x 256: adaptive average pooling when larger (exact
    4x4 means for 1024 px StyleGAN output), bilinear when smaller; 3. crop rows 35:223,
    columns 32:220; 4. adaptive average pooling to 112 x 112.

    Args:
        images: (B, 3, H, W) uint8.

    Returns:
        (B, 3, 112, 112) float32.
    """
    x = images.float() / 127.5 - 1
    if x.shape[2] >= 256 and x.shape[3] >= 256:
        x = F.adaptive_avg_pool2d(x, (256, 256))
    else:
        x = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)
    top, bottom, left, right = ARCFACE_CROP
    return F.adaptive_avg_pool2d(x[:, :, top:bottom, left:right], (112, 112))


# ----------------------------------------------------------------------------
# dlib


def shipped_dlib_models() -> tuple[Path, Path]:
    """The dlib descriptor and 5-point landmark files of `face_recognition_models`.

    The package is located, not imported (its `__init__` imports `pkg_resources`).

    Raises:
        MetricUnavailable: the package is not installed or lacks the files.
    """
    spec = importlib.util.find_spec(_SHIPPED_PACKAGE)
    hint = 'pip install "ipltool[align]" (face_recognition_models ships the dlib face models)'
    if spec is None or not spec.submodule_search_locations:
        raise MetricUnavailable("the dlib identity backbone needs the package face_recognition_models", hint=hint)
    root = Path(list(spec.submodule_search_locations)[0])
    paths = (root / DLIB_DESCRIPTOR, root / DLIB_LANDMARKS)
    for path in paths:
        if not path.is_file():
            raise MetricUnavailable(f"{path} is missing from face_recognition_models", hint=hint)
    return paths


def fallback_rect(dlib, width: int, height: int):
    """`FALLBACK_BOX` as a dlib rectangle for a width x height picture."""
    left, top, right, bottom = FALLBACK_BOX
    return dlib.rectangle(int(round(left * width)), int(round(top * height)), int(round(right * width)) - 1, int(round(bottom * height)) - 1)


class DlibFaces:
    """dlib's HOG detector, 5-point landmarks and ResNet descriptor, run one picture at a time.

    Args:
        size: pictures are resized (antialiased) so that their longer side is `size` before
            detection and description; an FFHQ-aligned face then spans about half of it.
        upsample: detector upsampling (1, as the alignment scripts).
    """

    def __init__(self, size: int = 256, upsample: int = 1):
        self.dlib = import_or_unavailable("dlib", "the dlib identity backbone", 'pip install "ipltool[align]"')
        self.paths = shipped_dlib_models()
        self.size, self.upsample = size, upsample
        self.detector = self.dlib.get_frontal_face_detector()
        self.landmarks = self.dlib.shape_predictor(str(self.paths[1]))
        self.descriptor = self.dlib.face_recognition_model_v1(str(self.paths[0]))

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) uint8 -> embeddings (B, 128) float32 unit vectors, fallback flags (B,) bool.

        Steps per picture: 1. resize (longer side `size`); 2. detect faces and keep the one
        the detector scores highest, else use `FALLBACK_BOX`; 3. 5 landmarks in that box;
        4. the 128-d descriptor of the aligned 150 px chip; 5. L2-normalise.
        """
        images = images.cpu()
        h, w = images.shape[2:]
        scale = self.size / max(h, w)
        if scale != 1:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            images = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
            images = images.round().clamp(0, 255).to(torch.uint8)
        embeddings, fallback = [], []
        for picture in images:
            array = np.ascontiguousarray(picture.permute(1, 2, 0).numpy())
            rects, scores, _ = self.detector.run(array, self.upsample, 0.0)
            if len(rects):
                rect = rects[int(np.argmax(scores))]
            else:
                rect = fallback_rect(self.dlib, array.shape[1], array.shape[0])
            shape = self.landmarks(array, rect)
            vector = np.asarray(self.descriptor.compute_face_descriptor(array, shape), dtype=np.float64)
            embeddings.append(vector / max(np.linalg.norm(vector), 1e-12))
            fallback.append(not len(rects))
        return torch.from_numpy(np.stack(embeddings)).float(), torch.tensor(fallback, dtype=torch.bool)


# ----------------------------------------------------------------------------
# The extractor

TINY_ARCFACE = BackboneConfig(widths=(16, 16, 32, 32), units=(1, 1, 1, 1))


class IdentityExtractor(Extractor):
    """Face embeddings "emb" (N, d) float32 unit vectors and "fallback" (N,) bool.

    `fallback[i]` is True when no face was detected in picture i and the fixed central box
    was used (dlib only; ArcFace crops a fixed box anyway, so it is always False).

    Args:
        device: where ArcFace runs (dlib runs on the CPU).
        smoke: ArcFace becomes a tiny random network; dlib stays real (its files are
            shipped with a package, so smoke runs use the real model).
        weights: ArcFace weights (`model_ir_se50.pth`); None: cache entry `ir-se50`.
            Not used by dlib.
        backbone: "dlib" (default) or "arcface".
        size: working resolution of the dlib pipeline (longer side, 256).
    """

    name = "identity"

    def __init__(self, device: torch.device, smoke: bool = False, weights: str | Path | None = None, backbone: str = "dlib", size: int = 256):
        self.device = device
        self.backbone = backbone
        settings: dict = {"backbone": backbone}
        if backbone == "dlib":
            self.device = torch.device("cpu")  # dlib's Python API runs on the CPU
            self.faces: DlibFaces | None = DlibFaces(size=size)
            self.net: nn.Module | None = None
            self.weights = "real"
            descriptor, landmarks = self.faces.paths
            tag = f"{weights_tag(descriptor)}+{weights_tag(landmarks)}"
            settings["size"] = size
            self.info = {
                "backbone": "dlib_resnet",
                "weights_file": descriptor.name,
                "sha256": weights_info(descriptor)["sha256"],
                "landmarks_file": landmarks.name,
                "size": size,
                "fallback_box": list(FALLBACK_BOX),
            }
        else:
            self.faces = None
            if smoke:
                with seeded(0):
                    self.net = ArcFace(TINY_ARCFACE)
                self.weights, tag = "random-test", RANDOM_TEST
                self.info = {"backbone": "arcface_irse50 (tiny random)", "weights": RANDOM_TEST}
            else:
                path = weights_file(HUB_NAME, weights)
                self.net = ArcFace()
                load_strict(self.net, load_state_dict_file(path), path, "ArcFace IR-SE50")
                self.weights, tag = "real", weights_tag(path)
                self.info = {"backbone": "arcface_irse50", **weights_info(path)}
            self.net.to(device).eval().requires_grad_(False)
        self.key = make_key(self.name, settings, tag)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.faces is not None:
            emb, fallback = self.faces(images)
            return {"emb": emb, "fallback": fallback}
        emb = self.net(arcface_preprocess(images)).float()
        return {"emb": emb, "fallback": torch.zeros(len(emb), dtype=torch.bool)}
