"""Stage 1 (mapper training) on tiny random models."""

import pytest
import torch

from ipltool import registry
from ipltool.domain import parse_domain
from ipltool.models.clip import PromptEncoder, load_clip
from ipltool.models.stylegan2 import TINY_CONFIG, build_generator
from ipltool.train import losses
from ipltool.train.stage1 import Stage1State, encode_generated, stage1_loss, stage1_step, stage1_targets, train_mapper
from ipltool.train.text import TextFeatures

DOMAIN = """
name = "t"
source = "photo"
target = "anime painting"
generator = "tiny"
[loss]
lambda_src = 0.5
[prompts]
custom = ["a cute anime face", "an anime portrait with big eyes"]
[mapper]
batch = 4
steps = 2
"""


@pytest.fixture(scope="module")
def models():
    clip = load_clip("tiny")
    generator = build_generator(TINY_CONFIG, seed=0).eval().requires_grad_(False)
    prompts = PromptEncoder(clip, "a photo of a")
    return generator, clip, prompts


@pytest.fixture
def domain():
    return parse_domain(DOMAIN, "t.toml")


def _mapper(kind, prompts, seed=0):
    torch.manual_seed(seed)
    return registry.build_mapper(kind, prompts.n_ctx, prompts.dim, TINY_CONFIG.style_dim)


def test_predrawn_noise_reproduces_random_noise_rendering(models):
    generator, clip, _ = models
    for m in generator.modules():  # make the noise visible in the output
        if type(m).__name__ == "NoiseInjection":
            m.weight.data.fill_(0.3)
    try:
        z = torch.randn(5, TINY_CONFIG.style_dim)
        torch.manual_seed(7)
        want, _ = generator([z])
        torch.manual_seed(7)
        noise = generator.draw_noise(5)
        got = generator.synthesis(generator.to_w_plus([generator.mapping(z)]), noise)
        torch.testing.assert_close(got, want)
        # Chunked encoding equals one full batch.
        w = generator.mapping(z)
        full = encode_generated(generator, w, clip, noise, chunk=5)
        chunked = encode_generated(generator, w, clip, noise, chunk=2)
        torch.testing.assert_close(chunked, full)
        torch.testing.assert_close(full.norm(dim=1), torch.ones(5))
    finally:
        for m in generator.modules():
            if type(m).__name__ == "NoiseInjection":
                m.weight.data.zero_()


def test_stage1_loss_matches_an_independent_computation(models, domain):
    """With P = the token embeddings of ctx_init, u = E_T("a photo of a <label>") (the §0 invariant)."""
    generator, clip, prompts = models
    B = 3
    P = prompts.ctx_embedding().unsqueeze(0).repeat(B, 1, 1)
    f_img = losses.unit(torch.randn(B, clip.embed_dim))
    targets = stage1_targets(TextFeatures(clip), domain)
    got = stage1_loss(P, prompts, f_img, targets, domain)

    enc = lambda texts: clip.encode_text(texts).float()  # noqa: E731
    u_s = enc(["a photo of a photo"]).expand(B, -1)
    u_t = enc(["a photo of a anime painting"]).expand(B, -1)
    a_s, a_t = enc(["a photo of a photo."])[0], enc(["a photo of a anime painting."])[0]
    s = (u_s + a_s) / (u_s + a_s).norm(dim=1, keepdim=True)
    t = (u_t + a_t) / (u_t + a_t).norm(dim=1, keepdim=True)

    def template_mean(label):
        from ipltool.train.text import imagenet_templates

        f = enc([x.format(label) for x in imagenet_templates()])
        return (f / f.norm(dim=1, keepdim=True)).mean(0)

    custom = enc(domain.prompts.custom)
    mean_c = (custom / custom.norm(dim=1, keepdim=True)).mean(0)
    cos = torch.nn.functional.cosine_similarity
    logits = clip.logit_scale * f_img @ s.t()
    labels = torch.arange(B)
    l_con = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
    l_tgt = (1 - cos(t, template_mean("anime painting").expand(B, -1))).mean()
    l_src = (1 - cos(s, template_mean("photo").expand(B, -1))).mean()
    l_cus = (1 - cos(t, mean_c.expand(B, -1))).mean()
    want = l_con + 1.0 * (l_tgt + 0.5 * l_src + 0.2 * l_cus)
    assert got.total.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    assert got.terms["custom_reg"] == pytest.approx(l_cus.item(), rel=1e-5, abs=1e-6)
    assert set(got.terms) == {"loss", "contrastive", "target_reg", "source_reg", "custom_reg"}


@pytest.mark.parametrize("kind", ["mlp", "transformer-v2"])
def test_training_is_seeded_and_updates_only_the_mapper(models, domain, kind):
    generator, clip, prompts = models
    g_before = {k: v.clone() for k, v in generator.state_dict().items()}
    clip_before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    runs = []
    for _ in range(2):
        mapper = _mapper(kind, prompts)
        start = {k: v.clone() for k, v in mapper.state_dict().items()}
        torch.manual_seed(domain.mapper.seed)
        log = []
        train_mapper(mapper, generator, prompts, domain, on_step=lambda step, terms: log.append((step, terms)))
        runs.append((mapper.state_dict(), log))
    (sd1, log1), (sd2, log2) = runs
    assert [s for s, _ in log1] == [1, 2]
    assert log1 == log2  # same seed, same losses
    for key in sd1:
        assert torch.equal(sd1[key], sd2[key]), key
    assert any(not torch.equal(sd1[k], start[k]) for k in sd1)  # the mapper learned
    for k, v in generator.state_dict().items():
        assert torch.equal(v, g_before[k])
    for k, v in clip.model.state_dict().items():
        assert torch.equal(v, clip_before[k])
    assert all(p.grad is None for p in clip.model.parameters())


def test_step_consumes_random_numbers_in_reference_order(models, domain):
    """z first, then the per-layer noise: replaying those draws gives the same batch."""
    generator, clip, prompts = models
    mapper = _mapper("mlp", prompts)
    optimizer = torch.optim.Adam(mapper.parameters(), lr=0.05)
    targets = stage1_targets(TextFeatures(clip), domain)
    torch.manual_seed(11)
    terms = stage1_step(Stage1State(mapper, optimizer, targets), generator, prompts, domain.with_overrides({"mapper.batch": 4}), chunk=3)

    torch.manual_seed(11)
    z = torch.randn(4, TINY_CONFIG.style_dim)
    noise = generator.draw_noise(4)
    fresh = _mapper("mlp", prompts)
    w = generator.mapping(z)
    f_img = encode_generated(generator, w, clip, noise, chunk=4)
    again = stage1_loss(fresh(w), prompts, f_img, targets, domain)
    assert again.terms["loss"] == pytest.approx(terms["loss"], rel=1e-6)
