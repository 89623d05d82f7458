"""Loss formulas of docs/method.md against independent hand computations (float64 loops)."""

import math

import pytest
import torch

from ipltool.train import losses
from ipltool.train.text import TextFeatures, imagenet_templates


def _n(v):
    return [x / math.sqrt(sum(y * y for y in v)) for x in v] if not torch.is_tensor(v) else v / v.norm()


def _cos(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


@pytest.fixture
def feats():
    g = torch.Generator().manual_seed(0)
    return lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)


def test_contrastive_loss_by_hand(feats):
    B, scale = 4, 100.0
    img = losses.unit(feats(B, 8))
    txt = losses.unit(feats(B, 8))
    logits = [[scale * float(img[i] @ txt[j]) for j in range(B)] for i in range(B)]

    def ce_rows(m):
        total = 0.0
        for i in range(B):
            total += -m[i][i] + math.log(sum(math.exp(v) for v in m[i]))
        return total / B

    transposed = [[logits[j][i] for j in range(B)] for i in range(B)]
    want = (ce_rows(logits) + ce_rows(transposed)) / 2
    assert losses.contrastive_loss(img, txt, scale).item() == pytest.approx(want, rel=1e-9)


def test_regularizers_by_hand(feats):
    t = feats(5, 6)
    anchor = feats(6)  # mean_T is not normalised; cosine must not care
    want = sum(1 - _cos(t[b], anchor) for b in range(5)) / 5
    assert losses.mean_cosine_distance(t, anchor).item() == pytest.approx(want, rel=1e-9)
    assert losses.mean_cosine_distance(t, anchor.unsqueeze(0)).item() == pytest.approx(want, rel=1e-9)


def test_stage1_total_composition(feats):
    """loss = L_con + lambda_l * (L_tgt + lambda_src * L_src + lambda_custom * L_cus)."""
    B = 3
    f_img = losses.unit(feats(B, 6))
    u_s, u_t, a_s, a_t = feats(B, 6), feats(B, 6), feats(6), feats(6)
    mean_s, mean_t, mean_c = feats(6), feats(6), feats(6)
    s = torch.stack([u_s[b] + a_s for b in range(B)])
    s = s / s.norm(dim=1, keepdim=True)
    t = torch.stack([u_t[b] + a_t for b in range(B)])
    t = t / t.norm(dim=1, keepdim=True)
    torch.testing.assert_close(losses.prompt_features(u_s, a_s), s)
    l_con = losses.contrastive_loss(f_img, s, 100.0)
    l_tgt = sum(1 - _cos(t[b], mean_t) for b in range(B)) / B
    l_src = sum(1 - _cos(s[b], mean_s) for b in range(B)) / B
    l_cus = sum(1 - _cos(t[b], mean_c) for b in range(B)) / B
    lam_l, lam_src, lam_c = 1.0, 0.5, 0.2
    want = l_con.item() + lam_l * (l_tgt + lam_src * l_src + lam_c * l_cus)
    got = l_con + lam_l * (
        losses.mean_cosine_distance(t, mean_t)
        + lam_src * losses.mean_cosine_distance(s, mean_s)
        + lam_c * losses.mean_cosine_distance(t, mean_c)
    )
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_per_sample_directions_and_directional_loss(feats):
    B = 3
    u_s, u_t, a0 = feats(B, 6), feats(B, 6), feats(6)
    s = losses.prompt_features(u_s, a0)
    t = losses.prompt_features(u_t, a0)
    D = losses.text_directions(s, t)
    f_s, f_t = feats(B, 6), feats(B, 6)
    I = losses.image_directions(f_s, f_t)
    for b in range(B):
        sb = (u_s[b] + a0) / (u_s[b] + a0).norm()
        tb = (u_t[b] + a0) / (u_t[b] + a0).norm()
        db = (tb - sb) / (tb - sb).norm()
        torch.testing.assert_close(D[b], db)
        ib = f_t[b] / f_t[b].norm() - f_s[b] / f_s[b].norm()
        torch.testing.assert_close(I[b], ib / ib.norm())
    want = sum(1 - _cos(I[b], D[b]) for b in range(B)) / B
    assert losses.directional_loss(I, D).item() == pytest.approx(want, rel=1e-9)
    # The directions differ per sample (the point of IPL) ...
    assert not torch.allclose(D[0], D[1])
    # ... and a shared (1, D) direction broadcasts (NADA).
    shared = losses.unit(feats(1, 6))
    want_shared = sum(1 - _cos(I[b], shared[0]) for b in range(B)) / B
    assert losses.directional_loss(I, shared).item() == pytest.approx(want_shared, rel=1e-9)


def test_equal_features_have_no_direction_and_no_nan(feats):
    """G_t still equal to G_s (or bf16 rounding hiding the change): that sample counts 1 and sends no gradient."""
    f_s = feats(3, 6)
    f_t = f_s.clone()
    f_t[1] = feats(6)  # only sample 1 has moved
    f_t.requires_grad_(True)
    I = losses.image_directions(f_s, f_t)
    assert torch.equal(I[0], torch.zeros(6)) and torch.equal(I[2], torch.zeros(6))
    expected = f_t[1] / f_t[1].norm() - f_s[1] / f_s[1].norm()
    assert torch.equal(I[1], losses.unit(expected))  # a moved sample: the reference formula, bit for bit
    D = losses.unit(feats(3, 6))
    loss = losses.directional_loss(I, D)
    assert loss.item() == pytest.approx((1 + (1 - _cos(I[1], D[1])) + 1) / 3, rel=1e-6)
    loss.backward()
    assert torch.isfinite(f_t.grad).all() and not f_t.grad[[0, 2]].any() and f_t.grad[1].any()


def test_nada_direction_is_mean_of_template_differences(feats):
    src = losses.unit(feats(79, 6))
    tgt = losses.unit(feats(79, 6))
    diff = sum((tgt[i] - src[i] for i in range(79)), torch.zeros(6, dtype=torch.float64)) / 79
    torch.testing.assert_close(losses.nada_direction(src, tgt)[0], diff / diff.norm())


def test_global_clip_loss_uses_logits_over_100(feats):
    img, txt = feats(4, 6), feats(6)
    want = sum(1 - 100.0 * _cos(img[b], txt) / 100 for b in range(4)) / 4
    assert losses.global_clip_loss(img, txt, 100.0).item() == pytest.approx(want, rel=1e-9)
    want50 = sum(1 - 50.0 * _cos(img[b], txt) / 100 for b in range(4)) / 4
    assert losses.global_clip_loss(img, txt, 50.0).item() == pytest.approx(want50, rel=1e-9)


def test_templates_and_text_feature_cache():
    from ipltool.models.clip import load_clip

    t = imagenet_templates()
    assert len(t) == 79 and t[0] == "a bad photo of a {}." and t[-1] == "a tattoo of the {}."
    assert all(s.count("{}") == 1 for s in t)
    clip = load_clip("tiny")
    tf = TextFeatures(clip)
    F_t = tf.templates("disney")
    assert F_t.shape == (79, clip.embed_dim)
    torch.testing.assert_close(F_t.norm(dim=1), torch.ones(79))
    raw = clip.encode_text([s.format("disney") for s in t])
    torch.testing.assert_close(F_t, raw / raw.norm(dim=1, keepdim=True))
    # mean_T is the plain row mean: its norm is below 1 (not re-normalised).
    torch.testing.assert_close(tf.template_mean("disney"), F_t.mean(0))
    assert tf.template_mean("disney").norm() < 1
    # Encoded once, then served from the cache.
    assert tf.templates("disney").data_ptr() != 0
    calls = []
    original = clip.encode_text
    clip.encode_text = lambda texts: calls.append(texts) or original(texts)
    tf.templates("disney")
    tf.sentence("a photo of a disney.")
    tf.sentence("a photo of a disney.")
    assert len(calls) == 1
    custom = ["a cute disney face", "a disney portrait"]
    raw_c = original(custom)
    torch.testing.assert_close(tf.custom_mean(custom), (raw_c / raw_c.norm(dim=1, keepdim=True)).mean(0))
