"""Compute the requested metrics of each `ipl eval` input, reusing cached features.

Features are cached per input, per extractor and per side (source / target) in
`<run>/eval-cache/` (runs) or `<report>/cache/` (checkpoints, folders). A cache file holds
the rows of samples 0..n-1; a later evaluation that needs more samples renders only the
missing ones, and one that adds a metric computes only that metric's features.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ipltool import console
from ipltool.atomic import atomic_torch_save
from ipltool.checkpoints import read_feature_cache
from ipltool.distributed import all_gather, barrier, block, report_failure, world
from ipltool.errors import CheckpointError, UsageError
from ipltool.images import find_images
from ipltool.metrics import MetricUnavailable, build_extractor, formulas
from ipltool.metrics.catalog import METRICS
from ipltool.metrics.sampling import EvalInput, folder_input

#: Samples per metric under `--smoke` (the defaults are in `TABLE`).
SMOKE_N = 16


#: The `ipl eval` flag that gives each extractor's weights file (named in errors about the file).
WEIGHTS_FLAGS = {"inception": "--inception-weights", "sifid": "--sifid-weights", "edges": "--hed-weights", "identity": "--id-weights", "clip": "--clip-weights"}


@dataclass
class Settings:
    """What every input is evaluated with (the report's `settings`)."""

    metrics: list[str]
    n: int | None = None  # None: DEFAULT_N per metric
    seed: int = 0
    truncation: float = 0.7
    batch: int = 8
    smoke: bool = False
    reference: Path | None = None  # real target-domain images for FID / KID
    sifid_refs: list[Path] = field(default_factory=list)
    sifid_layer: int = 64
    scs_edge: str = "hed"
    id_backbone: str = "dlib"
    clip_models: list[str] | None = None  # None: each input's domain's CLIP models
    weights: dict[str, Path] = field(default_factory=dict)  # extractor name -> file
    allow_download: bool = False  # metric networks come from the cache unless this is set

    def count(self, metric: str) -> int:
        """Samples metric `metric` uses."""
        if self.n is not None:
            return self.n
        return SMOKE_N if self.smoke else TABLE[metric].default_n


@dataclass
class Need:
    """Features one metric wants from one input: extractor (by cache key) and side, n rows."""

    extractor: str  # a key into Evaluator.extractor_specs
    side: str  # "target" or "source"
    n: int


#: The reason of a metric whose value came out NaN or infinite (reported as null; the exit code is 1).
NONFINITE_REASON = "not a finite number"


def _finite(value) -> bool:
    """False for a NaN or infinite number; True for finite numbers, None and anything else."""
    try:
        return value is None or isinstance(value, (str, bool)) or math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:80]


class Evaluator:
    """Builds extractors once, caches features, and turns them into metric values.

    Args:
        settings: see `Settings`.
        device: where networks run.
        progress: `progress(label, done, total)` called as batches finish.
    """

    def __init__(self, settings: Settings, device: torch.device, progress: Callable[[str, int, int], None] | None = None):
        self.settings = settings
        self.device = device
        self.progress = progress or (lambda label, done, total: None)
        self._extractors: dict[str, object] = {}
        self._unavailable: dict[str, tuple[str, str | None]] = {}

    # -- extractors ----------------------------------------------------------------

    def _spec(self, name: str) -> tuple[str, dict]:
        s = self.settings
        if name == "sifid":
            return "sifid", {"layer": s.sifid_layer}
        if name == "edges":
            return "edges", {"mode": s.scs_edge}
        if name == "identity":
            return "identity", {"backbone": s.id_backbone}
        if name.startswith("clip:"):
            model, _, pretrained = name[5:].partition("|")
            return "clip", {"model": model, "pretrained": pretrained or None}
        return name, {}

    def extractor(self, name: str):
        """The extractor `name` (built on first use), or raise MetricUnavailable (remembered)."""
        if name in self._unavailable:
            raise MetricUnavailable(*self._unavailable[name])
        if name not in self._extractors:
            kind, settings = self._spec(name)
            # Metric weights never download as a side effect (docs/metrics.md §10): without
            # --allow-download a missing file is reported with its `ipl fetch` line.
            previous = console.options.offline
            console.options.offline = previous or not self.settings.allow_download
            try:
                self._extractors[name] = build_extractor(
                    kind, self.device, smoke=self.settings.smoke, weights=self.settings.weights.get(kind), **settings
                )
            except MetricUnavailable as err:
                self._unavailable[name] = (err.message, err.hint)
                raise
            except CheckpointError as err:
                # A bad weights file spoils the metric for every input: stop with one line naming
                # the flag, not a CheckpointError, which `ipl eval` reads as "skip this input".
                flag = WEIGHTS_FLAGS.get(kind) if self.settings.weights.get(kind) else None
                raise UsageError(f"{flag}: {err.message}" if flag else err.message, hint=err.hint) from None
            finally:
                console.options.offline = previous
        return self._extractors[name]

    # -- feature cache -----------------------------------------------------------------

    def _cache_path(self, item: EvalInput, extractor, side: str) -> Path:
        s = self.settings
        key = f"{item.fingerprint}|{extractor.key}|{side}|seed={s.seed}|psi={s.truncation}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return item.cache_dir / f"{_slug(extractor.key)}-{side}-{digest}.pt"

    def features(self, item: EvalInput, needs: list[Need], batch: int | None = None) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
        """Features of `item` for every need (first `n` rows each), rendering only what no cache holds."""
        batch = batch or self.settings.batch
        loaded: dict[tuple[str, str], dict] = {}
        paths: dict[tuple[str, str], Path] = {}
        wanted: dict[tuple[str, str], int] = {}
        for need in needs:
            key = (need.extractor, need.side)
            wanted[key] = max(wanted.get(key, 0), need.n)
        for key in wanted:
            extractor = self.extractor(key[0])
            paths[key] = self._cache_path(item, extractor, key[1])
            # Read weights-only and checked; a damaged, foreign or planted cache is recomputed, never trusted.
            cached = read_feature_cache(paths[key]) if paths[key].is_file() else None
            loaded[key] = cached or {"n": 0, "features": {}}
        missing = {key: (loaded[key]["n"], n) for key, n in wanted.items() if loaded[key]["n"] < n}
        if missing:
            start = min(have for have, _ in missing.values())
            stop = max(n for _, n in missing.values())
            # Under torchrun each rank renders one contiguous block of sample indices; the blocks
            # are gathered in rank order, so every rank holds the rows a single process makes.
            # Blocks are whole batches, so every batch is the one a single process renders (the
            # same numbers, not only the same within rounding).
            w = world()
            lo, hi = block(stop - start, batch, w)
            mine = (start + lo, start + hi)
            new: dict[tuple[str, str], list[dict]] = {key: [] for key in missing}
            batches = item.batches(mine[0], mine[1], batch, self.settings.truncation, self.settings.seed, self.device) if mine[0] < mine[1] else ()
            try:
                self._render_features(item, batches, missing, mine, new)
            except BaseException:
                report_failure(f"samples {mine[0]}..{mine[1] - 1} of {item.name}")
                raise
            if w.distributed:
                new = {key: [part for parts in all_gather(new[key]) for part in parts] for key in missing}
            for key, parts in new.items():
                merged = loaded[key]["features"]
                for name in parts[0] if parts else ():
                    rows = torch.cat([p[name] for p in parts])
                    merged[name] = torch.cat([merged[name], rows]) if name in merged else rows
                loaded[key] = {"n": wanted[key], "features": merged}
                if w.main:  # one writer of the shared cache
                    paths[key].parent.mkdir(parents=True, exist_ok=True)
                    atomic_torch_save(loaded[key], paths[key])
            # The next call reads these caches to decide what is missing: every rank must read them
            # after rank 0 wrote them, or the ranks decide differently and their gathers go astray.
            barrier()
        return {key: {name: rows[: wanted[key]] for name, rows in value["features"].items()} for key, value in loaded.items()}

    def _render_features(self, item: EvalInput, batches, missing: dict, mine: tuple[int, int], new: dict) -> None:
        """Features of the samples `mine` (this rank's block) for every missing need, appended to `new`."""
        position = mine[0]
        for images_by_side in batches:
            size = images_by_side["target"].shape[0]
            for key, (have, n) in missing.items():
                lo, hi = max(have, position), min(n, position + size)
                if lo < hi:
                    images = images_by_side[key[1]][lo - position : hi - position].to(self.device)
                    new[key].append(self.extractor(key[0])(images))
            position += size
            self.progress(item.name, position - mine[0], mine[1] - mine[0])

    def reference_features(self, extractor_name: str, files: list[Path], cache_dir: Path) -> dict[str, torch.Tensor]:
        """Features of reference pictures (FID/KID set, SIFID references), cached like an input."""
        item = folder_input(files[0].parent, files, cache_dir)
        # SIFID works at native resolution: one picture per batch, never resized to a neighbour's size.
        batch = 1 if extractor_name == "sifid" else None
        return self.features(item, [Need(extractor_name, "target", len(files))], batch=batch)[(extractor_name, "target")]

    # -- metrics -------------------------------------------------------------------------

    def clip_names(self, item: EvalInput) -> list[str]:
        """Extractor names of the CLIP models that score `item`."""
        if self.settings.clip_models:
            return [f"clip:{m}" for m in self.settings.clip_models]
        if item.domain is not None:
            return [f"clip:{c.model}|{c.pretrained or ''}" for c in item.domain.clip]
        return ["clip:ViT-B/32|openai"]

    def evaluate(self, item: EvalInput, report_dir: Path) -> dict:
        """Every requested metric of one input: {"metrics": {key: value|None}, "reasons": {...}, "meta": {...}}."""
        values: dict[str, float | None] = {}
        reasons: dict[str, str] = {}
        meta: dict[str, object] = {"n": {}, "seed": self.settings.seed, "truncation": self.settings.truncation, "extractors": {}}
        for metric in self.settings.metrics:
            n = self.settings.count(metric)
            if item.available is not None:
                n = min(n, item.available)
            try:
                result = self._metric(metric, item, n, report_dir, meta)
            except MetricUnavailable as err:
                result = {key: None for key in TABLE[metric].keys}
                for key in TABLE[metric].keys:
                    reasons[key] = err.message + (f" ({err.hint})" if err.hint else "")
            for key, value in result.items():
                if isinstance(value, tuple):  # (value, reason)
                    value, reasons[key] = value
                if not _finite(value):  # never a NaN in the report: a null with the reason, and `ipl eval` exits 1
                    value, reasons[key] = None, f"{NONFINITE_REASON} ({value}): the features of this input hold NaN or inf values"
                values[key] = value
            meta["n"][metric] = n
        for name, extractor in self._extractors.items():
            meta["extractors"][name] = {"key": extractor.key, "weights": extractor.weights, **getattr(extractor, "info", {})}
        meta["weights"] = "random-test" if self.settings.smoke else "real"
        return {"metrics": values, "reasons": reasons, "meta": meta}

    def _metric(self, metric: str, item: EvalInput, n: int, report_dir: Path, meta: dict) -> dict:
        if metric not in TABLE:
            raise UsageError(f"unknown metric {metric!r}", hint=f"metrics: {', '.join(METRICS)}")
        return TABLE[metric].compute(self, item, n, report_dir, meta)


# ----------------------------------------------------------------------------
# The metrics: what each needs and how it is computed (docs/metrics.md)
#
# Each function returns {output key: value}; a value may be a (value, reason) pair, e.g.
# (None, "why it has no value"). Features come from `Evaluator.features`, cached.

#: A value that needs source/adapted pairs, for an input without them.
UNPAIRED = (None, "needs source/adapted pairs (a run or a checkpoint, not a folder)")
NO_REFERENCE = (None, "no --reference folder of real target-domain images")


def _inception(ev: Evaluator, item: EvalInput, n: int, report_dir: Path, source: bool) -> tuple[dict, torch.Tensor | None]:
    """Inception features of the adapted images (and, with `source`, of the source images), and of --reference."""
    needs = [Need("inception", "target", n)] + ([Need("inception", "source", n)] if source else [])
    feats = ev.features(item, needs)
    reference = None
    if ev.settings.reference is not None:
        reference = ev.reference_features("inception", find_images(ev.settings.reference), report_dir / "cache")["2048"]
    return feats, reference


def inception_score(ev: Evaluator, item: EvalInput, n: int, report_dir: Path, meta: dict) -> dict:
    """IS of the adapted images alone."""
    target = ev.features(item, [Need("inception", "target", n)])[("inception", "target")]
    mean, std = formulas.inception_score(target["logits_unbiased"])
    return {"is_mean": mean, "is_std": std}


def frechet_distance(ev: Evaluator, item: EvalInput, n: int, report_dir: Path, meta: dict) -> dict:
    """FID against --reference, and between source and adapted images (`fid_src_tgt`, pairs only)."""
    feats, reference = _inception(ev, item, n, report_dir, source=item.paired)
    target = feats[("inception", "target")]["2048"]
    return {
        "fid": formulas.fid(target, reference) if reference is not None else NO_REFERENCE,
        "fid_src_tgt": formulas.fid(feats[("inception", "source")]["2048"], target) if item.paired else UNPAIRED,
    }


def kernel_distance(ev: Evaluator, item: EvalInput, n: int, report_dir: Path, meta: dict) -> dict:
    """KID of the adapted images against --reference."""
    feats, reference = _inception(ev, item, n, report_dir, source=False)
    if reference is None:
        return {"kid_mean": NO_REFERENCE, "kid_std": NO_REFERENCE}
    mean, std = formulas.kid(feats[("inception", "target")]["2048"], reference)
    return {"kid_mean": mean, "kid_std": std}


def single_image_fid(ev: Evaluator, item: EvalInput, n: int, report_dir: Path, meta: dict) -> dict:
    """SIFID of the adapted images against each --sifid-ref picture."""
    refs_given = ev.settings.sifid_refs
    if not refs_given:
        reason = (None, "no --sifid-ref reference image")
        return {"sifid_mean": reason, "sifid_std": reason}
    target = ev.features(item, [Need("sifid", "target", n)])[("sifid", "target")]
    refs = ev.reference_features("sifid", refs_given, report_dir / "cache")
    mean, std = formulas.sifid((target["mu"], target["sigma"]), [(refs["mu"][i], refs["sigma"][i]) for i in range(len(refs_given))])
    return {"sifid_mean": mean, "sifid_std": std}


def _pairs(ev: Evaluator, item: EvalInput, n: int, extractor: str) -> tuple[dict, dict]:
    feats = ev.features(item, [Need(extractor, "source", n), Need(extractor, "target", n)])
    return feats[(extractor, "source")], feats[(extractor, "target")]


def structural_consistency(ev: Evaluator, item: EvalInput, n: int, report_dir: Path, meta: dict) -> dict:
    """SCS: edge maps of each source/adapted pair compared."""
    if not item.paired:
        return {"scs": UNPAIRED}
    src, tgt = _pairs(ev, item, n, "edges")
    return {"scs": formulas.scs(src["edges"], tgt["edges"])}


def identity_similarity(ev: Evaluator, item: EvalInput, n: int, report_dir: Path, meta: dict) -> dict:
    """ID: face-embedding similarity of each source/adapted pair (faces only)."""
    if not item.paired:
        return {"id_sim": UNPAIRED}
    src, tgt = _pairs(ev, item, n, "identity")
    meta["id_fallbacks"] = int(src["fallback"].sum() + tgt["fallback"].sum())
    return {"id_sim": formulas.id_similarity(src["emb"], tgt["emb"])}


def _clip_suffix(index: int, name: str) -> str:
    """"" for the first CLIP model, "[ViT-B/16]" for the others."""
    return "" if index == 0 else f"[{name[5:].split('|')[0]}]"


def clip_scores(ev: Evaluator, item: EvalInput, n: int, report_dir: Path, meta: dict) -> dict:
    """CLIP score against the target text and CLIP directional similarity, per CLIP model."""
    from ipltool.metrics import target_text_embedding

    out: dict = {}
    for index, name in enumerate(ev.clip_names(item)):
        suffix = _clip_suffix(index, name)
        sides = ["target", "source"] if item.paired else ["target"]
        feats = ev.features(item, [Need(name, side, n) for side in sides])
        emb_t = feats[(name, "target")]["emb"]
        if item.domain is None:
            out["clip_score" + suffix] = (None, "a folder needs --domain for its target text")
            out["clip_dir" + suffix] = (None, "a folder needs --domain for its texts")
            continue
        extractor = ev.extractor(name)
        text_t = target_text_embedding(extractor, item.domain.target)
        out["clip_score" + suffix] = formulas.clip_score(emb_t, text_t)
        if item.paired:
            text_s = target_text_embedding(extractor, item.domain.source)
            direction = formulas.clip_directional(feats[(name, "source")]["emb"], emb_t, text_s, text_t)
            out["clip_dir" + suffix] = direction if direction is not None else (None, "undefined: no change between pairs")
        else:
            out["clip_dir" + suffix] = UNPAIRED
    return out


def diversity(ev: Evaluator, item: EvalInput, n: int, report_dir: Path, meta: dict) -> dict:
    """Mean pairwise CLIP distance of the adapted images, per CLIP model."""
    out: dict = {}
    for index, name in enumerate(ev.clip_names(item)):
        emb_t = ev.features(item, [Need(name, "target", n)])[(name, "target")]["emb"]
        out["div_clip" + _clip_suffix(index, name)] = formulas.clip_diversity(emb_t)
    out["div_lpips"] = (None, "LPIPS diversity is not implemented (needs VGG weights); div_clip measures diversity")
    return out


@dataclass(frozen=True)
class Metric:
    """One `ipl eval` metric: its report keys, its default sample count, and how it is computed."""

    keys: tuple[str, ...]  # shown even when the metric is skipped
    default_n: int  # docs/metrics.md §0; one `--n` overrides them all
    compute: Callable[[Evaluator, EvalInput, int, Path, dict], dict]


TABLE: dict[str, Metric] = {
    "is": Metric(("is_mean", "is_std"), 5000, inception_score),
    "fid": Metric(("fid", "fid_src_tgt"), 5000, frechet_distance),
    "kid": Metric(("kid_mean", "kid_std"), 5000, kernel_distance),
    "sifid": Metric(("sifid_mean", "sifid_std"), 100, single_image_fid),
    "scs": Metric(("scs",), 500, structural_consistency),
    "id": Metric(("id_sim",), 1000, identity_similarity),
    "clip": Metric(("clip_score", "clip_dir"), 1000, clip_scores),
    "diversity": Metric(("div_clip", "div_lpips"), 1000, diversity),
}
assert tuple(TABLE) == METRICS, "the table and metrics.catalog list the same metrics in report order"
