"""Temporal smoothing of face landmark tracks, so that the aligned crop of a video does not jitter.

dlib places each frame's 68 landmarks independently, and a pixel of noise in the eye or
mouth corners moves, turns and scales the FFHQ face square: the aligned crop shakes from
frame to frame although the face moves smoothly. `smooth_track` filters every landmark
coordinate over time with a Gaussian-weighted local linear fit:

* zero-phase: the whole track is known before alignment starts, so each frame is fitted
  from the frames before and after it alike, and the crop does not lag behind the face;
* the local line (rather than a local mean) follows a face that moves at a steady speed
  exactly, also at the first and last frames of a track, where a plain Gaussian would
  pull the landmarks towards the inside;
* frames without a face stay without one; a gap of at most `max_gap` frames is bridged
  (the frames on both sides are fitted together), and a longer gap, or a jump of the
  face by more than `max_jump` of its size between two frames (a cut, another person),
  splits the track into pieces that are smoothed apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Default standard deviation of the temporal Gaussian, in frames.
DEFAULT_SIGMA = 2.0
#: Frames without a face that are bridged by default.
DEFAULT_MAX_GAP = 5
#: A jump larger than this fraction of the face's size between neighbouring frames splits a track.
DEFAULT_MAX_JUMP = 0.5


def face_size(landmarks: np.ndarray) -> float:
    """A face's scale in pixels: the diagonal of its landmarks' bounding box."""
    points = np.asarray(landmarks, dtype=np.float64)
    return float(np.hypot(*(points.max(axis=0) - points.min(axis=0))))


def track_pieces(track: Sequence[np.ndarray | None], max_gap: int = DEFAULT_MAX_GAP, max_jump: float = DEFAULT_MAX_JUMP) -> np.ndarray:
    """Which piece of the track each frame belongs to (-1: no face).

    A new piece starts after more than `max_gap` frames without a face, or where the face
    moves by more than `max_jump` times its size from one face frame to the next.

    Args:
        track: per frame, (68, 2) landmarks or None.
        max_gap: the longest run of faceless frames bridged within a piece.
        max_jump: see above (mean landmark displacement over the face size).

    Returns:
        (N,) int array of piece numbers, counting from 0.
    """
    pieces = np.full(len(track), -1, dtype=np.int64)
    piece, last = -1, None  # last: (frame index, landmarks) of the previous face
    for index, points in enumerate(track):
        if points is None:
            continue
        points = np.asarray(points, dtype=np.float64)
        if last is None or index - last[0] - 1 > max_gap:
            piece += 1
        else:
            jump = np.linalg.norm(points - last[1], axis=1).mean()
            if jump > max_jump * max(face_size(points), 1.0):
                piece += 1
        pieces[index] = piece
        last = (index, points)
    return pieces


def smooth_track(
    track: Sequence[np.ndarray | None],
    sigma: float = DEFAULT_SIGMA,
    max_gap: int = DEFAULT_MAX_GAP,
    max_jump: float = DEFAULT_MAX_JUMP,
) -> list[np.ndarray | None]:
    """Smooth a landmark track over time (zero-phase Gaussian local linear fit, see the module docstring).

    Steps:
      1. Split the track into pieces (`track_pieces`).
      2. For every face frame t, fit each coordinate with a line a + b (k - t) over the
         face frames k of its piece within 3 sigma, weighted by exp(-(k - t)^2 / 2 sigma^2),
         by weighted least squares; the smoothed value is a. A frame whose neighbours all
         lie on one side still gets the line's value at t (no pull inwards at the ends).
      3. A frame with a single face frame in reach keeps its landmarks (a = the mean).

    Args:
        track: per frame, (68, 2) landmarks (any (P, 2)) or None (no face).
        sigma: standard deviation in frames; 0 or less returns the track unchanged.
        max_gap, max_jump: see `track_pieces`.

    Returns:
        A new list as long as `track`: float64 (P, 2) arrays where `track` has a face, None elsewhere.
    """
    out: list[np.ndarray | None] = [None if p is None else np.array(p, dtype=np.float64) for p in track]
    if sigma <= 0 or not any(p is not None for p in out):
        return out
    pieces = track_pieces(out, max_gap, max_jump)
    frames = np.flatnonzero(pieces >= 0)
    shape = out[frames[0]].shape
    values = np.stack([out[i] for i in frames]).reshape(len(frames), -1)  # (F, P*2), face frames only
    piece_of = pieces[frames]
    radius = int(np.ceil(3 * sigma))

    s0 = np.zeros(len(frames))
    s1 = np.zeros(len(frames))
    s2 = np.zeros(len(frames))
    t0 = np.zeros_like(values)
    t1 = np.zeros_like(values)
    # Walk over neighbours by position in `frames` (never farther apart than in frames, so
    # `radius` positions reach every neighbour), weighting them by their distance in frames.
    for shift in range(-radius, radius + 1):
        lo, hi = max(0, -shift), min(len(frames), len(frames) - shift)
        if lo >= hi:
            continue
        here, there = np.arange(lo, hi), np.arange(lo, hi) + shift
        offset = (frames[there] - frames[here]).astype(np.float64)
        weight = np.exp(-0.5 * (offset / sigma) ** 2)
        weight[(np.abs(offset) > radius) | (piece_of[there] != piece_of[here])] = 0.0
        s0[here] += weight
        s1[here] += weight * offset
        s2[here] += weight * offset**2
        t0[here] += weight[:, None] * values[there]
        t1[here] += (weight * offset)[:, None] * values[there]
    determinant = s0 * s2 - s1**2
    linear = determinant > 1e-9 * np.maximum(s0, 1.0) ** 2
    mean = t0 / s0[:, None]
    fitted = (s2[:, None] * t0 - s1[:, None] * t1) / np.where(linear, determinant, 1.0)[:, None]
    smoothed = np.where(linear[:, None], fitted, mean)
    for row, index in enumerate(frames):
        out[index] = smoothed[row].reshape(shape)
    return out
