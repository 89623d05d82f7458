"""The metric formulas: pure functions from features to numbers (docs/metrics.md §1-9).

Inputs are tensors or arrays of features from `ipltool.metrics` extractors; everything is
computed in float64. IS, FID and KID call torch-fidelity's own functions, so the numbers
are torch-fidelity's; the rest is written here. Too few samples is a `UsageError` (the
user can ask for more); inconsistent shapes are a `ValueError` (a caller's bug).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ipltool.errors import UsageError
from ipltool.metrics.base import import_or_unavailable

ZERO_DIRECTION = 1e-6  # below this norm an embedding difference of unit vectors has no direction


def _fidelity(module: str):
    return import_or_unavailable(f"torch_fidelity.{module}", "IS/FID/KID", 'pip install "ipltool[eval]" (torch-fidelity)')


def _matrix(x, what: str) -> torch.Tensor:
    """A (N, D) float64 CPU tensor."""
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().cpu().double()
    if x.ndim != 2:
        raise ValueError(f"{what} must be a (N, D) matrix, got shape {tuple(x.shape)}")
    return x


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# ----------------------------------------------------------------------------
# Inception Score, FID, KID (torch-fidelity)


def inception_score(logits, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """Inception Score of classifier logits (Salimans et al. 2016), torch-fidelity's `isc_features_to_metric`.

    Steps: 1. shuffle the rows with `np.random.RandomState(seed)`; 2. cut them into
    `splits` consecutive chunks; 3. per chunk k, with p(y|x) = softmax(logits) and
    p_k(y) its chunk mean, `IS_k = exp(mean_i KL(p(y|x_i) || p_k))`; 4. mean and population
    std of the IS_k. Range [1, #classes].

    Args:
        logits: (N, C) logits ("logits_unbiased" of the inception extractor).
        splits: number of chunks (10; RSSA used 5), clipped to N as KID's subset size is
            (torch-fidelity would average empty chunks into NaN); record `min(splits, N)`.
        seed: shuffle seed (torch-fidelity's default 2020).

    Returns:
        (mean, std).

    Raises:
        UsageError: no pictures, or splits < 1.
    """
    logits = _matrix(logits, "logits")
    if splits < 1 or len(logits) < 1:
        raise UsageError(f"the Inception Score needs at least one picture and one split, got {len(logits)} and {splits}")
    splits = min(splits, len(logits))
    out = _fidelity("metric_isc").isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=seed)
    return out["inception_score_mean"], out["inception_score_std"]


def fid(feats1, feats2) -> float:
    """Fréchet Inception Distance, via torch-fidelity's `fid_features_to_statistics` and `fid_statistics_to_metric`.

    `FID = ||mu1 - mu2||^2 + Tr S1 + Tr S2 - 2 sum_j sqrt(lambda_j(S1 S2))`, mu and S the
    mean and (N-1)-normalised covariance of each set; the square roots are taken of the
    complex eigenvalues of S1 S2 and their real parts summed.

    Args:
        feats1, feats2: (N1, D) and (N2, D) features ("2048" of the inception extractor).

    Returns:
        FID (biased for small N: always report N).

    Raises:
        UsageError: a set has fewer than 2 rows.
        ValueError: the feature sizes differ.
    """
    f1, f2 = _matrix(feats1, "feats1"), _matrix(feats2, "feats2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature sizes differ: {f1.shape[1]} and {f2.shape[1]}")
    if min(len(f1), len(f2)) < 2:
        raise UsageError(f"FID needs at least 2 pictures per set for a covariance, got {len(f1)} and {len(f2)}")
    metric = _fidelity("metric_fid")
    stats1, stats2 = metric.fid_features_to_statistics(f1), metric.fid_features_to_statistics(f2)
    return metric.fid_statistics_to_metric(stats1, stats2, verbose=False)["frechet_inception_distance"]


def kid(feats1, feats2, subsets: int = 100, subset_size: int = 1000, seed: int = 2020) -> tuple[float, float]:
    """Kernel Inception Distance, torch-fidelity's `kid_features_to_metric`.

    For each of `subsets` draws, m rows of each set without replacement, polynomial kernel
    `k(a, b) = (a.b / D + 1)^3`, unbiased MMD^2 =
    `[sum_{i!=j} k(x_i,x_j) + sum_{i!=j} k(y_i,y_j)] / (m(m-1)) - 2 sum_{i,j} k(x_i,y_j) / m^2`.
    Slightly negative values are valid.

    Args:
        feats1, feats2: (N1, D) and (N2, D) features.
        subsets: number of draws (100).
        subset_size: m (1000), clipped to min(subset_size, N1, N2).
        seed: the draws' seed (2020).

    Returns:
        (mean, std) over the draws.

    Raises:
        UsageError: m < 2 after clipping.
        ValueError: the feature sizes differ.
    """
    f1, f2 = _matrix(feats1, "feats1"), _matrix(feats2, "feats2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature sizes differ: {f1.shape[1]} and {f2.shape[1]}")
    m = min(subset_size, len(f1), len(f2))
    if m < 2 or subsets < 1:
        raise UsageError(f"KID needs subsets of at least 2 pictures per set, got {len(f1)} and {len(f2)} pictures (subset size {subset_size})")
    out = _fidelity("metric_kid").kid_features_to_metric(f1, f2, kid_subsets=subsets, kid_subset_size=m, rng_seed=seed, verbose=False)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


# ----------------------------------------------------------------------------
# SIFID


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between two Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    `||mu1 - mu2||^2 + Tr sigma1 + Tr sigma2 - 2 sum_j Re sqrt(lambda_j(sigma1 sigma2))`:
    the eigenvalue form of `Tr (sigma1 sigma2)^(1/2)`, as torch-fidelity (no scipy).

    Args:
        mu1, mu2: (C,) means.
        sigma1, sigma2: (C, C) covariances.

    Returns:
        The distance (0 for identical Gaussians, up to rounding).

    Raises:
        ValueError: the shapes do not fit together.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    c = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (c,) or mu2.shape != (c,) or sigma1.shape != (c, c) or sigma2.shape != (c, c):
        raise ValueError(f"expected means (C,) and covariances (C, C), got {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    diff = mu1 - mu2
    tr_covmean = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)).real.sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _stats_rows(stats, what: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mu, sigma) of one image or of a batch -> a list of per-image (mu (C,), sigma (C, C))."""
    mu, sigma = (np.asarray(torch.as_tensor(s).detach().cpu().double()) for s in stats)
    if mu.ndim == 1:
        mu, sigma = mu[None], sigma[None]
    if mu.ndim != 2 or sigma.ndim != 3 or len(mu) != len(sigma):
        raise ValueError(f"{what}: expected mu (C,) or (N, C) and sigma (C, C) or (N, C, C), got {mu.shape} and {sigma.shape}")
    return list(zip(mu, sigma))


def sifid(stats_gen, stats_refs: Sequence) -> tuple[float, float]:
    """Single-image FID of generated pictures against one or more reference pictures.

    `SIFID(g) = mean_r FD(stats(g), stats(r))` with FD = `frechet_distance` of the per-image
    feature statistics; report the mean and population std over the generated pictures.

    Args:
        stats_gen: (mu (N, C), sigma (N, C, C)) of N generated pictures (the sifid extractor's output).
        stats_refs: a list of (mu, sigma) per reference picture, each (C,)/(C, C) or a
            batch (M, C)/(M, C, C) whose rows all count as references.

    Returns:
        (mean, std) over the generated pictures.

    Raises:
        UsageError: no generated or no reference picture.
    """
    gens = _stats_rows(stats_gen, "stats_gen")
    refs = [row for stats in stats_refs for row in _stats_rows(stats, "stats_refs")]
    if not gens or not refs:
        raise UsageError(f"SIFID needs generated and reference pictures, got {len(gens)} and {len(refs)}")
    scores = np.array([np.mean([frechet_distance(mg, sg, mr, sr) for mr, sr in refs]) for mg, sg in gens])
    return float(scores.mean()), float(scores.std())


# ----------------------------------------------------------------------------
# SCS, ID


def scs(edges_source, edges_target) -> float:
    """Structural consistency score (RSSA): soft Dice of paired edge maps, averaged over pairs.

    `SCS_i = 2 sum_p s(p) t(p) / sum_p (s(p)^2 + t(p)^2)`; the ratio does not depend on the
    maps' scale, so uint8 maps can be passed as they are. Two empty maps count as identical (1).

    Args:
        edges_source, edges_target: (N, H, W) edge maps of x_s and x_t, same shape.

    Returns:
        Mean SCS in [0, 1] (1: identical edges, 0: disjoint).

    Raises:
        ValueError: the shapes differ, or no pairs.
    """
    s = torch.as_tensor(edges_source).detach().cpu().double()
    t = torch.as_tensor(edges_target).detach().cpu().double()
    if s.shape != t.shape or s.ndim < 2 or len(s) == 0:
        raise ValueError(f"SCS needs paired edge maps of one shape, got {tuple(s.shape)} and {tuple(t.shape)}")
    s, t = s.reshape(len(s), -1), t.reshape(len(t), -1)
    numerator = 2 * (s * t).sum(dim=1)
    denominator = (s * s + t * t).sum(dim=1)
    pairs = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), torch.ones_like(denominator))
    return float(pairs.mean())


def _paired(a, b, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _matrix(a, what), _matrix(b, what)
    if a.shape != b.shape or len(a) == 0:
        raise ValueError(f"{what}: expected two (N, D) matrices of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def id_similarity(emb_source, emb_target) -> float:
    """Identity similarity: `mean_i cos(f(x_s,i), f(x_t,i))` of paired face embeddings.

    Args:
        emb_source, emb_target: (N, d) embeddings (normalised or not).

    Returns:
        Mean cosine in [-1, 1]; higher keeps identity better.
    """
    s, t = _paired(emb_source, emb_target, "id_similarity")
    return float((_unit_rows(s) * _unit_rows(t)).sum(dim=1).mean())


# ----------------------------------------------------------------------------
# CLIP


def _text_vector(text, dim: int) -> torch.Tensor:
    text = torch.as_tensor(text).detach().cpu().double().reshape(-1)
    if text.numel() != dim:
        raise ValueError(f"text embedding has {text.numel()} values, image embeddings have {dim}")
    return text


def clip_score(emb_target, text_target) -> float:
    """CLIP score: `mean_i cos(E_I(x_t,i), E_T(T_target))`.

    Raw cosine (not x100 or x2.5; the report says which scale it uses).

    Args:
        emb_target: (N, D) image embeddings of the adapted pictures.
        text_target: (D,) or (1, D) target text embedding (`target_text_embedding`).

    Returns:
        Mean cosine in [-1, 1].
    """
    emb = _matrix(emb_target, "emb_target")
    text = _text_vector(text_target, emb.shape[1])
    return float((_unit_rows(emb) @ (text / text.norm().clamp_min(1e-12))).mean())


def clip_directional(emb_source, emb_target, text_source, text_target) -> float | None:
    """Directional CLIP score: `mean_i cos(E_I(x_t,i) - E_I(x_s,i), E_T(T_target) - E_T(T_source))`.

    Pairs whose image embeddings (normalised first) differ by less than `ZERO_DIRECTION`
    have no direction and are left out of the mean.

    Args:
        emb_source, emb_target: (N, D) paired image embeddings of x_s and x_t.
        text_source, text_target: (D,) text embeddings of the source and target labels.

    Returns:
        Mean cosine in [-1, 1], or None when it is undefined: the text direction is zero,
        or every pair is identical. Never NaN.
    """
    s, t = _paired(emb_source, emb_target, "clip_directional")
    image_dir = _unit_rows(t) - _unit_rows(s)
    ts, tt = _text_vector(text_source, s.shape[1]), _text_vector(text_target, s.shape[1])
    text_dir = tt / tt.norm().clamp_min(1e-12) - ts / ts.norm().clamp_min(1e-12)
    norms = image_dir.norm(dim=1)
    keep = norms > ZERO_DIRECTION
    if text_dir.norm() <= ZERO_DIRECTION or not bool(keep.any()):
        return None
    cos = (image_dir[keep] / norms[keep, None]) @ (text_dir / text_dir.norm())
    return float(cos.mean())


def clip_diversity(emb) -> float:
    """CLIP diversity: `1 - mean_{i<j} cos(E_I(x_i), E_I(x_j))` over all pairs.

    Computed without the N x N matrix: with unit rows e_i, `sum_{i<j} e_i.e_j =
    (||sum_i e_i||^2 - N) / 2`. Mode collapse gives 0.

    Args:
        emb: (N, D) image embeddings, N >= 2.

    Returns:
        Diversity in [0, 2].

    Raises:
        UsageError: fewer than 2 pictures.
    """
    e = _unit_rows(_matrix(emb, "emb"))
    n = len(e)
    if n < 2:
        raise UsageError(f"CLIP diversity needs at least 2 pictures, got {n}")
    pair_sum = (e.sum(dim=0).pow(2).sum() - (e * e).sum()) / 2
    return float(1 - pair_sum / (n * (n - 1) / 2))
