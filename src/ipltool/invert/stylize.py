"""The `stylize` pipeline: read -> detect and align -> invert -> render -> write.

Photos go through in small groups: each group is read and aligned on the CPU, its faces
are inverted and rendered in batches on the device, then every photo of the group gets
its files and its manifest line. A problem with one photo (unreadable, no face, a
failing model call) is recorded in its manifest line and the run goes on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from ipltool.atomic import atomic_torch_save
from ipltool.distributed import world
from ipltool.errors import UsageError, first_line
from ipltool.images import UnreadableImage, load_rgb, to_pil, to_tensor
from ipltool.invert.inputs import Photo
from ipltool.invert.outputs import ERROR, NO_FACE, OK, UNREADABLE, ContactSheet, Layout, Manifest, encoded, png_bytes
from ipltool.invert.targets import Target
from ipltool.outdir import is_write_failure
from ipltool.precision import FP32, Precision


@dataclass
class StylizeOptions:
    """How photos are turned into faces and which extra files are written."""

    all_faces: bool = False  # every detected face, not only the largest
    align: bool = True  # False: inputs are aligned square crops already
    paste_back: bool = False
    paste_mask: str = "square"
    save_latents: bool = False
    batch: int = 4  # faces per encoder / generator call
    minmax: bool = False  # quirk of the thesis code: per-image min-max stretch of the outputs
    precision: Precision = FP32  # autocast of the encoder and the generators; outputs are float32


@dataclass
class PreparedFace:
    """One face ready for the encoder: its input tensor, its crop, and where it sits in the photo."""

    stem: str
    encoder_input: torch.Tensor  # (3, S, S) in [-1, 1], S = the encoder's input size
    crop: Image.Image  # aligned at the generator's size
    rect: list[int] | None
    quad: object | None  # (4, 2) source quad for paste-back (None without alignment)
    score: float | None = None  # the detector's confidence


@dataclass
class PreparedPhoto:
    """A photo after reading and alignment; `record` is its manifest line so far."""

    photo: Photo
    record: dict
    image: Image.Image | None = None
    faces: list[PreparedFace] = field(default_factory=list)


def _picture(image: torch.Tensor, minmax: bool) -> Image.Image:
    """A rendered (3, H, W) image as a picture; `minmax` stretches it to its own range first.

    The stretch reproduces the IPL thesis code, which saved with torchvision's
    `save_image(normalize=True)` (a **quirk**: colours then depend on each image's extremes).
    """
    if minmax:
        low, high = image.min(), image.max()
        image = (image - low) / (high - low).clamp_min(1e-8) * 2 - 1
    return to_pil(image)


def render_codes(generator, codes: torch.Tensor, batch: int, precision: Precision = FP32) -> torch.Tensor:
    """`codes` (N, n_latent, D) through `generator` with its constant noise, in batches; (N, 3, H, W) float32 on the CPU."""
    out = []
    for chunk in codes.split(batch):
        with precision.autocast():
            images, _ = generator([chunk], input_is_latent=True, randomize_noise=False)
        out.append(images.float().cpu())
    return torch.cat(out)


class Stylizer:
    """Runs photos through one encoder and renders them with the source and target generators.

    Args:
        inverter: an encoder plugin's loaded object (`invert`, `preprocess`, `decoder`,
            `input_size`, `name`).
        targets: the adapted generators (may be empty: reconstructions only).
        layout: the output folder.
        options: see `StylizeOptions`.
        device: where the models run.
        detector: a `FaceDetector`; required when `options.align`.
    """

    def __init__(self, inverter, targets: list[Target], layout: Layout, options: StylizeOptions, device: torch.device, detector=None):
        if options.align and detector is None:
            raise ValueError("alignment needs a face detector")
        self.inverter = inverter
        self.targets = targets
        self.layout = layout
        self.options = options
        self.device = device
        self.detector = detector
        w = world()
        self.manifest = Manifest(layout, part=w.rank if w.distributed else None)
        headers = ["aligned", "reconstruction", *(target.label for target in targets)]
        self.sheet = ContactSheet(layout, headers=headers, prefix=f"contact-sheet-rank{w.rank}" if w.distributed else "contact-sheet")
        self.counts: Counter[str] = Counter()
        self.faces_done = 0

    @property
    def crop_size(self) -> int:
        """Size of the saved aligned crop: the generator's."""
        return self.inverter.decoder.size

    # -- reading and aligning (CPU, per photo) --------------------------------------

    def prepare(self, photo: Photo) -> PreparedPhoto:
        """Read, detect and align one photo; problems end up in the record, never raised."""
        record = {"input": str(photo.path), "name": photo.name, "status": OK, "faces": 0, "outputs": [], "error": None}
        prepared = PreparedPhoto(photo, record)
        try:
            prepared.image = load_rgb(photo.path)
        except UnreadableImage as err:
            record.update(status=UNREADABLE, error=err.message)
            return prepared
        try:
            prepared.faces, record["faces"] = self._faces(prepared.image, photo)
        except UsageError as err:
            record.update(status=ERROR, error=err.message)
        except Exception as err:  # a bug or a library failure on this photo only
            record.update(status=ERROR, error=f"{type(err).__name__}: {err}")
        if record["status"] == OK and not prepared.faces:
            record.update(status=NO_FACE, error=f"no face found in {photo.path}")
        return prepared

    def _faces(self, image: Image.Image, photo: Photo) -> tuple[list[PreparedFace], int]:
        """The faces to process and how many the detector found."""
        from ipltool.invert.align import align_face

        size = self.inverter.input_size
        if not self.options.align:
            if image.width != image.height:
                raise UsageError(f"{photo.path} is {image.width}x{image.height}; --no-align expects square aligned faces")
            crop = image if image.width == self.crop_size else image.resize((self.crop_size,) * 2, Image.Resampling.LANCZOS)
            encoder_input = self.inverter.preprocess(to_tensor(image)[None])[0]
            return [PreparedFace(photo.name, encoder_input, crop, None, None)], 1

        found = self.detector.detect(np.asarray(image))
        chosen = found if self.options.all_faces else found[:1]  # sorted largest first
        faces = []
        for index, face in enumerate(chosen):
            # The encoders were trained on 256 px alignments; the crop is saved at the
            # generator's size, from the same landmarks (one quad, two resamplings).
            for_encoder = align_face(image, face.landmarks, output_size=size, rect=face.rect)
            crop = for_encoder if self.crop_size == size else align_face(image, face.landmarks, output_size=self.crop_size, rect=face.rect)
            faces.append(
                PreparedFace(
                    self.layout.face_stem(photo.name, index, self.options.all_faces),
                    to_tensor(for_encoder.image),
                    crop.image,
                    [int(v) for v in face.rect],
                    crop.quad_src,
                    round(float(face.score), 4),
                )
            )
        return faces, len(found)

    # -- inverting, rendering and writing (device, per group) --------------------------

    @torch.no_grad()
    def process(self, group: list[PreparedPhoto]) -> list[dict]:
        """Invert and render every face of `group`, write the files and the manifest lines."""
        faces = [face for item in group for face in item.faces]
        rendered: dict[str, torch.Tensor] = {}
        codes = None
        if faces:
            try:
                codes, rendered = self._run_models(faces)
            except (RuntimeError, ValueError) as err:  # e.g. out of memory: this group only
                message = f"{type(err).__name__}: {first_line(err)}"
                for item in group:
                    if item.faces:
                        item.record.update(status=ERROR, error=message)
                        item.faces = []
        if codes is not None:
            self._refuse_nonfinite(group, codes, rendered)
        records = []
        start = 0
        for item in group:
            count = len(item.faces)
            if item.record["status"] == OK:
                try:
                    self._write(item, codes[start : start + count], {k: v[start : start + count] for k, v in rendered.items()})
                except OSError as err:
                    if is_write_failure(err, self.layout.root):
                        raise  # a full disk or read-only folder fails every later photo too: the run stops, this photo unrecorded
                    item.record.update(status=ERROR, error=f"cannot write outputs: {err}", outputs=[])
            start += count
            self.manifest.append(item.record)
            self.counts[item.record["status"]] += 1
            records.append(item.record)
        return records

    def _refuse_nonfinite(self, group: list[PreparedPhoto], codes: torch.Tensor, rendered: dict[str, torch.Tensor]) -> None:
        """Make a photo whose W+ code or rendered picture holds NaN or inf an error (it would be written as a black picture).

        Args:
            group: the photos of `codes`, in order, `len(item.faces)` rows each.
            codes: (N, n_latent, D) W+ codes of every face of the group.
            rendered: (N, 3, H, W) pictures per label ("reconstruction" and each target's).
        """
        bad_codes = ~torch.isfinite(codes).flatten(1).all(1)
        bad = {label: ~torch.isfinite(images).flatten(1).all(1) for label, images in rendered.items()}
        sources = {target.label: f"generator {target.label!r} ({target.source})" for target in self.targets}
        sources["reconstruction"] = f"the {self.inverter.name} encoder's generator"
        start = 0
        for item in group:
            rows = slice(start, start + len(item.faces))
            start = rows.stop
            if item.record["status"] != OK or not item.faces:
                continue
            if bad_codes[rows].any():
                what = "NaN" if torch.isnan(codes[rows]).any() else "infinite"
                item.record.update(status=ERROR, error=f"the {self.inverter.name} encoder made a W+ code with {what} values; check its weights")
                continue
            for label, flags in bad.items():
                if flags[rows].any():
                    what = "NaN" if torch.isnan(rendered[label][rows]).any() else "infinite"
                    item.record.update(status=ERROR, error=f"{sources[label]} rendered {what} pixels; check its weights")
                    break

    def _run_models(self, faces: list[PreparedFace]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch, precision = self.options.batch, self.options.precision
        inputs = torch.stack([f.encoder_input for f in faces])
        codes = []
        for chunk in inputs.split(batch):
            with precision.autocast():
                code = self.inverter.invert(chunk.to(self.device))
            codes.append(code.float())  # the generators and --save-latents get float32 codes
        codes = torch.cat(codes)
        rendered = {"reconstruction": render_codes(self.inverter.decoder, codes, batch, precision)}
        for target in self.targets:
            rendered[target.label] = render_codes(target.generator, codes, batch, precision)
        return codes.cpu(), rendered

    def _write(self, item: PreparedPhoto, codes: torch.Tensor, rendered: dict[str, torch.Tensor]) -> None:
        layout, record = self.layout, item.record
        outputs = []
        for i, face in enumerate(item.faces):
            reconstruction = _picture(rendered["reconstruction"][i], self.options.minmax)
            entry = {
                "face": i + 1,
                "rect": face.rect,
                "score": face.score,
                "aligned": layout.write(layout.aligned(face.stem), png_bytes(face.crop)),
                "reconstruction": layout.write(layout.reconstruction(face.stem), png_bytes(reconstruction)),
                "stylized": {},
            }
            row = [face.crop, reconstruction]
            for target in self.targets:
                picture = _picture(rendered[target.label][i], self.options.minmax)
                entry["stylized"][target.label] = layout.write(layout.stylized(target.label, face.stem), png_bytes(picture))
                row.append(picture)
            outputs.append(entry)
            self.sheet.add(face.stem, row)
        record["outputs"] = outputs
        record["precision"] = self.options.precision.name
        if self.options.paste_back and item.image is not None:
            from ipltool.invert.align import paste_back

            record["pasted"] = {}
            suffix = item.photo.path.suffix
            for target in self.targets:
                picture = item.image
                # Largest face first, so a smaller face overlapping it ends on top.
                for i, face in enumerate(item.faces):
                    picture = paste_back(picture, rendered[target.label][i], face.quad, mask=self.options.paste_mask)
                path = layout.pasted(target.label, item.photo.name, suffix)
                record["pasted"][target.label] = layout.write(path, encoded(picture, path.suffix))
        if self.options.save_latents:
            path = layout.latents(item.photo.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(
                {
                    "w_plus": codes.clone(),
                    "encoder": self.inverter.name,
                    "precision": self.options.precision.name,  # the codes themselves are float32
                    "input": str(item.photo.path),
                    "faces": [face.rect for face in item.faces],
                },
                path,
            )
            record["latents"] = layout.relative(path)
        self.faces_done += len(item.faces)

    def finish(self) -> list[str]:
        """Write the last contact-sheet page; returns every page written by this run."""
        self.sheet.flush()
        return self.sheet.written


def groups(photos: Iterable[Photo], prepare: Callable[[Photo], PreparedPhoto], batch: int) -> Iterator[list[PreparedPhoto]]:
    """Prepared photos in groups of `batch` faces (or `batch` photos, whichever fills first)."""
    group: list[PreparedPhoto] = []
    faces = 0
    for photo in photos:
        item = prepare(photo)
        group.append(item)
        faces += len(item.faces)
        if faces >= batch or len(group) >= batch:
            yield group
            group, faces = [], 0
    if group:
        yield group

