"""Stage 2 (generator adaptation) on tiny random stage2_models."""

import pytest
import torch

from ipltool.domain import parse_domain
from ipltool.models.stylegan2 import TINY_CONFIG, build_generator
from ipltool.train import losses
from ipltool.train.stage2 import (
    choose_layers,
    clip_terms,
    make_optimizer,
    stage2_step,
    start_stage2,
    text_directions,
    train_only,
    update_ema,
)

DOMAIN = """
name = "t"
source = "photo"
target = "disney"
generator = "tiny"
[adapt]
batch = 2
auto_layer_k = 3
auto_layer_batch = 2
n_sample = 4
"""


def _domain(extra=""):
    return parse_domain(DOMAIN + extra, "t.toml")


def _run(stage2_models, domain, steps=2, seed=2, method_mapper=True):
    source, clip, prompts, mapper = stage2_models
    torch.manual_seed(seed)
    state = start_stage2(source, domain)
    terms = clip_terms([(clip, 1.0)], domain)
    records = [
        stage2_step(state, source, terms, domain, mapper if method_mapper else None, prompts if method_mapper else None)
        for _ in range(steps)
    ]
    return state, records


def test_only_chosen_layers_change_and_mapping_input_never(stage2_models):
    source, *_ = stage2_models
    domain = _domain()
    state, records = _run(stage2_models, domain, steps=1)
    chosen = records[0]["layers"]
    assert len(chosen) == 3 and all(0 <= i < source.n_latent for i in chosen)
    trained_prefixes = {
        ("conv1." if i == 0 else "to_rgb1." if i == 1 else f"convs.{i - 2}.") for i in chosen
    }
    before, after = source.state_dict(), state.trainable.state_dict()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        in_chosen = any(key.startswith(p) for p in trained_prefixes)
        if key.startswith(("style.", "input.", "noises.")) or not in_chosen:
            assert not changed, key
    # Every chosen layer's modulated weight moved.
    for prefix in trained_prefixes:
        assert not torch.equal(before[prefix + "conv.weight"], after[prefix + "conv.weight"]), prefix


def test_layer_choice_scores_match_a_hand_recomputation(stage2_models):
    source, clip, _, _ = stage2_models
    domain = _domain()
    terms = clip_terms([(clip, 1.0)], domain)
    trainable = build_generator(TINY_CONFIG, seed=0)
    torch.manual_seed(5)
    got = choose_layers(source, trainable, terms, k=3, iters=1, batch=2)

    torch.manual_seed(5)
    z = torch.randn(2, TINY_CONFIG.style_dim)
    w0 = source.mapping(z).detach().unsqueeze(1).repeat(1, source.n_latent, 1)
    w = w0.clone().requires_grad_(True)
    images, _ = trainable([w], input_is_latent=True)  # random noise drawn by the generator itself
    f = clip.encode_image(images)
    t = clip.encode_text(["disney"])
    cos = (f / f.norm(dim=1, keepdim=True)) @ (t / t.norm(dim=1, keepdim=True)).t()
    loss = (1 - clip.logit_scale * cos / 100).mean()
    loss.backward()
    moved = (0.01 * w.grad).abs().mean(-1).mean(0)
    assert got == torch.topk(moved, 3).indices.tolist()


def test_style_index_to_layer_mapping_in_train_only(stage2_models):
    source, *_ = stage2_models
    g = build_generator(TINY_CONFIG, seed=0)
    train_only(g, [0, 1, 4])
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("convs") else "") for n, p in g.named_parameters() if p.requires_grad}
    assert trainable == {"conv1", "to_rgb1", "convs.2"}
    train_only(g, None)
    trainable = {n.split(".")[0] for n, p in g.named_parameters() if p.requires_grad}
    assert trainable == {"input", "conv1", "convs"}


def test_ema_formula():
    a = build_generator(TINY_CONFIG, seed=1)
    b = build_generator(TINY_CONFIG, seed=2)
    ema_before = {k: v.clone() for k, v in a.state_dict().items()}
    update_ema(a, b, 0.99)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, ema_before[key] * 0.99 + b.state_dict()[key] * (1 - 0.99))


def test_optimizer_uses_the_stylegan2_ratio():
    g = build_generator(TINY_CONFIG, seed=0)
    opt = make_optimizer(g, 0.002)
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(0.002 * 0.8)
    assert group["betas"] == (0.0, pytest.approx(0.99**0.8))


def test_per_sample_directions_use_first_model_prompts(stage2_models):
    source, clip, prompts, mapper = stage2_models
    domain = _domain()
    term = clip_terms([(clip, 1.0)], domain)[0]
    w = source.mapping(torch.randn(2, TINY_CONFIG.style_dim))
    P = mapper(w)
    u_s, u_t = prompts.encode(P, "photo"), prompts.encode(P, "disney")
    D = text_directions(term, (u_s, u_t))
    a0 = clip.encode_text(["a photo of a"])[0]  # quirk: bare ctx_init, no label
    s = (u_s + a0) / (u_s + a0).norm(dim=1, keepdim=True)
    t = (u_t + a0) / (u_t + a0).norm(dim=1, keepdim=True)
    torch.testing.assert_close(D, (t - s) / (t - s).norm(dim=1, keepdim=True))


def test_seeded_runs_are_identical_and_nada_runs(stage2_models):
    domain = _domain()
    s1, r1 = _run(stage2_models, domain)
    s2, r2 = _run(stage2_models, domain)
    assert r1 == r2
    assert all(r["loss"] == r["loss"] for r in r1)  # no NaN
    for k, v in s1.ema.state_dict().items():
        assert torch.equal(v, s2.ema.state_dict()[k])
    nada = _domain().with_overrides({"adapt.method": "nada", "loss.lambda_global": 0.5})
    s3, r3 = _run(stage2_models, nada, method_mapper=False)
    assert "global_0" in r3[0] and r3[0]["loss"] > 0
    term = clip_terms([(stage2_models[1], 1.0)], nada)[0]
    assert term.nada_direction.shape == (1, stage2_models[1].embed_dim)


def test_style_mixing_draws_two_latents_like_stylegan2(stage2_models):
    import random

    from ipltool.train.stage2 import draw_latents

    torch.manual_seed(5)
    random.seed(1)
    two = draw_latents(3, 64, 1.0, "cpu")
    torch.manual_seed(5)
    expected = torch.randn(2, 3, 64)
    assert len(two) == 2 and torch.equal(two[0], expected[0]) and torch.equal(two[1], expected[1])
    state_before = random.getstate()
    torch.manual_seed(5)
    one = draw_latents(3, 64, 0.0, "cpu")
    torch.manual_seed(5)
    assert len(one) == 1 and torch.equal(one[0], torch.randn(3, 64))
    assert random.getstate() == state_before  # no mixing: Python's RNG is not touched
    record = _run(stage2_models, _domain().with_overrides({"adapt.mixing": 1.0}), steps=1)[1][0]
    assert record["loss"] == record["loss"]


def test_style_image_direction_matches_a_hand_computation(stage2_models):
    from ipltool.train.stage2 import STYLE_SOURCE_SAMPLES, style_image_direction

    source, clip = stage2_models[0], stage2_models[1]
    pictures = [torch.rand(3, 40, 50) * 2 - 1, torch.rand(3, 48, 48) * 2 - 1]
    got = style_image_direction(clip, source, pictures, torch.Generator().manual_seed(7))
    with torch.no_grad():
        style = [clip.encode_image(p[None], antialias=True).double() for p in pictures]
        style = torch.cat([f / f.norm() for f in style]).mean(0)
        z = torch.randn(STYLE_SOURCE_SAMPLES, source.style_dim, generator=torch.Generator().manual_seed(7))
        images = source([z], input_is_latent=False, noise=source.noise_list(randomize=False))[0]
        made = clip.encode_image(images).double()
        made = (made / made.norm(dim=1, keepdim=True)).mean(0)
    expected = (style - made) / (style - made).norm()
    torch.testing.assert_close(got[0].double(), expected, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    style_image_direction(clip, source, pictures, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), before)  # the training stream is untouched


def test_sample_grid_never_draws_from_the_training_stream(stage2_models, tmp_path):
    from PIL import Image

    from ipltool.figures import grid_layout
    from ipltool.train.samples import SampleGrid

    source = stage2_models[0]
    torch.manual_seed(0)
    before = torch.get_rng_state()
    grid = SampleGrid(source, torch.randn(5, source.style_dim, generator=torch.Generator().manual_seed(1)), 0.7, seed=2, chunk=2)
    path = grid.write(tmp_path / "g.png", source)
    assert torch.equal(torch.get_rng_state(), before)
    # 5 latents -> 5 columns over a source row and an adapted row, 256 px tiles by default
    with Image.open(path) as image:
        assert image.size == grid_layout(2, 5, 256, ["source", "adapted"], group=2).size
    again = SampleGrid(source, torch.randn(5, source.style_dim, generator=torch.Generator().manual_seed(1)), 0.7, seed=2)
    torch.testing.assert_close(grid.source_images, again.source_images)  # chunking changes nothing
    # truncation 0.7 around the mean latent
    z = torch.randn(5, source.style_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        w = source.mapping(z)
    torch.testing.assert_close(grid.w_plus[:, 0], grid.mean_w + 0.7 * (w - grid.mean_w))


def test_nada_global_term_aims_at_a_target_and_the_layer_choice_at_the_bare_label(stage2_models):
    # StyleGAN-NADA's CLIPLoss.forward encodes f"a {target}" for its global term, while
    # its determine_opt_layers encodes the bare target class.
    source, clip, _, _ = stage2_models
    domain = _domain('[loss]\nlambda_global = 1.0\n').with_overrides({"adapt.method": "nada"})
    (term,) = clip_terms([(clip, 1.0)], domain)
    assert torch.equal(term.nada_global, clip.encode_text(["a disney"])[0].float())
    assert torch.equal(term.target_label, clip.encode_text(["disney"])[0].float())

    seen = []
    real = losses.global_clip_loss
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(losses, "global_clip_loss", lambda f, text, scale: seen.append(text) or real(f, text, scale))
        _run(stage2_models, domain, steps=1, method_mapper=False)
    # The layer choice's call comes first, then the step's global term.
    assert [torch.equal(t, term.target_label) for t in seen] == [True, False]
    assert torch.equal(seen[-1], term.nada_global)


def test_ambiguous_compares_the_kth_and_next_score_against_the_margin(monkeypatch):
    from ipltool.train import stage2

    monkeypatch.setattr(stage2, "LAYER_CHOICE_MARGIN", 0.02)
    scores = torch.tensor([0.5, 1.0, 0.985, 2.0])  # 2nd and 3rd largest 1.5 % apart
    assert stage2.ambiguous(scores, 2)
    assert not stage2.ambiguous(scores, 1)  # 2.0 against 1.0
    assert not stage2.ambiguous(scores, 3)  # 0.985 against 0.5
    assert not stage2.ambiguous(scores, 4)  # all chosen
    monkeypatch.setattr(stage2, "LAYER_CHOICE_MARGIN", 0.01)
    assert not stage2.ambiguous(scores, 2)


def _choice(stage2_models, precision, seed=5):
    """The layers `choose_layers` picks from `seed`, the precisions its score passes ran in, and the next random draw."""
    from ipltool.train import stage2

    source, clip, _, _ = stage2_models
    terms = clip_terms([(clip, 1.0)], _domain())
    trainable = build_generator(TINY_CONFIG, seed=0)
    passes = []
    real = stage2.layer_scores

    def spy(source, trainable, terms, z, noises, precision=stage2.FP32, scaler=None, chunk=None):
        passes.append((precision.name, z.clone(), [n.clone() for n in noises[0]], chunk))
        return real(source, trainable, terms, z, noises, precision, scaler, chunk)

    stage2.layer_scores = spy
    try:
        torch.manual_seed(seed)
        chosen = choose_layers(source, trainable, terms, k=3, iters=1, batch=2, precision=precision)
    finally:
        stage2.layer_scores = real
    return chosen, passes, torch.randn(4)


def test_reduced_precision_confirms_an_ambiguous_layer_choice_in_fp32(stage2_models, monkeypatch):
    from ipltool.precision import FP32, Precision
    from ipltool.train import stage2

    bf16 = Precision.of("bf16", "cpu")
    reference, passes, after_fp32 = _choice(stage2_models, FP32)
    assert [p[0] for p in passes] == ["fp32"]  # fp32 decides alone, whatever the margin
    monkeypatch.setattr(stage2, "LAYER_CHOICE_MARGIN", 0.0)  # nothing is ambiguous
    _, passes, after_clear = _choice(stage2_models, bf16)
    assert [p[0] for p in passes] == ["bf16"]
    monkeypatch.setattr(stage2, "LAYER_CHOICE_MARGIN", 10.0)  # everything is
    confirmed, passes, after_confirmed = _choice(stage2_models, bf16)
    assert [(p[0], p[3]) for p in passes] == [("bf16", None), ("fp32", 1)]  # fp32 in halves of the batch of 2
    # The confirmation sees the same z and noise, picks what fp32 picks, and leaves the
    # random stream where fp32 leaves it (the step's later draws stay those of fp32).
    assert torch.equal(passes[0][1], passes[1][1]) and all(torch.equal(a, b) for a, b in zip(passes[0][2], passes[1][2]))
    assert confirmed == reference
    assert torch.equal(after_confirmed, after_fp32) and torch.equal(after_clear, after_fp32)


def test_layer_scores_in_chunks_are_the_whole_batch_scores(stage2_models):
    from ipltool.train.stage2 import layer_scores

    source, clip, _, _ = stage2_models
    terms = clip_terms([(clip, 1.0)], _domain())
    trainable = build_generator(TINY_CONFIG, seed=0)
    torch.manual_seed(3)
    z = torch.randn(4, TINY_CONFIG.style_dim)
    noises = [trainable.draw_noise(4) for _ in range(2)]  # two SGD steps
    whole = layer_scores(source, trainable, terms, z, noises)
    for chunk in (1, 3):  # 3: parts of unequal size
        torch.testing.assert_close(layer_scores(source, trainable, terms, z, noises, chunk=chunk), whole, rtol=1e-5, atol=1e-9)
