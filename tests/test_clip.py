"""CLIP wrapper, preprocessing and the learned-prompt encoder, on the tiny random CLIP."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from ipltool.errors import CheckpointError, IplError, UnknownNameError, UsageError
from ipltool.models.clip import (
    CLIP_MEAN,
    CLIP_STD,
    TINY_MODEL,
    Clip,
    PromptEncoder,
    load_clip,
    normalize_model_name,
)

MEAN = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def clip() -> Clip:
    return load_clip("tiny")


# ----------------------------------------------------------------------------
# Loading


def test_normalize_model_name():
    assert normalize_model_name("ViT-B/32") == "ViT-B-32"
    assert normalize_model_name("ViT-B-16") == "ViT-B-16"
    assert normalize_model_name("tiny") == TINY_MODEL
    assert normalize_model_name("ipl-tiny") == TINY_MODEL
    assert normalize_model_name("hf-hub:org/repo") == "hf-hub:org/repo"


def test_tiny_attributes(clip):
    assert clip.name == TINY_MODEL
    assert (clip.image_size, clip.embed_dim, clip.text_width) == (32, 32, 64)
    assert clip.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    assert not clip.model.training


def test_clip_is_frozen(clip):
    assert all(not p.requires_grad for p in clip.model.parameters())
    assert all(p.dtype == torch.float32 for p in clip.model.parameters())


def test_load_tiny_is_deterministic_and_keeps_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b = load_clip("tiny"), load_clip("ipl-tiny")
    assert torch.equal(torch.rand(3), expected_next)
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    other = load_clip("tiny", seed=1)
    assert not torch.equal(a.model.token_embedding.weight, other.model.token_embedding.weight)


def test_openai_format_file_loads(tmp_path):
    # OpenAI ships fp16 weights and open_clip's loader rounds through fp16, so do the same.
    source = load_clip("tiny")
    state = {k: v.half() if v.is_floating_point() else v for k, v in source.model.state_dict().items()}
    source.model.load_state_dict({k: v.float() for k, v in state.items()})
    clip = Clip(source.model, source.name)  # re-read logit_scale after the rounding
    state.update(input_resolution=clip.image_size, context_length=77, vocab_size=49408)
    path = tmp_path / "tiny-openai.pt"
    torch.save(state, path)

    loaded = load_clip("tiny", pretrained=str(path))
    texts = ["a photo of a dog", "anime painting"]
    torch.testing.assert_close(loaded.encode_text(texts), clip.encode_text(texts), rtol=0, atol=1e-6)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded.encode_image(x), clip.encode_image(x), rtol=0, atol=1e-6)
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert loaded.logit_scale == pytest.approx(clip.logit_scale)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_openai_format_detection(clip, tmp_path):
    from ipltool.models.clip import _is_openai_file

    scripted = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(scripted))
    plain = tmp_path / "plain.pt"
    torch.save({"context_length": 77, "weight": torch.zeros(2)}, plain)
    tensors = tmp_path / "ints-as-tensors.pt"
    torch.save({k: torch.tensor(77) for k in ("input_resolution", "context_length", "vocab_size")}, tensors)
    assert _is_openai_file(scripted)
    assert not _is_openai_file(plain)
    assert _is_openai_file(tensors)


def test_open_clip_format_file_loads(clip, tmp_path):
    path = tmp_path / "tiny-open-clip.pt"
    torch.save(clip.model.state_dict(), path)
    loaded = load_clip("ipl-tiny", pretrained=str(path))
    torch.testing.assert_close(loaded.encode_text(["a cat"]), clip.encode_text(["a cat"]), rtol=0, atol=0)


def test_file_of_wrong_architecture(tmp_path):
    path = tmp_path / "junk.pt"
    torch.save({"token_embedding.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError, match="cannot load CLIP weights"):
        load_clip("tiny", pretrained=str(path))


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="not found") as info:
        load_clip("ViT-B/32", pretrained=str(tmp_path / "ViT-B-32.pt"))
    assert "ipl fetch" in info.value.hint


def test_unknown_names():
    with pytest.raises(UnknownNameError, match="architecture"):
        load_clip("ViT-Q-99")
    with pytest.raises(UnknownNameError, match="not-a-tag") as info:
        load_clip("ViT-B-32", pretrained="not-a-tag")
    assert "openai" in info.value.hint


def test_openai_weights_come_from_the_cache_never_from_open_clip(monkeypatch, tmp_path):
    import open_clip

    from ipltool import hub

    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("open_clip was asked to download"))
    with pytest.raises(UsageError, match="not in the cache") as info:  # the tests run offline
        load_clip("ViT-B/32", pretrained="openai")
    assert "ipl fetch clip-vit-b32" in info.value.hint and "--import clip-vit-b32" in info.value.hint
    # Once the file is in the cache it is loaded from there, as a file.
    seen = []
    monkeypatch.setattr(hub, "ensure", lambda name: seen.append(name) or tmp_path / "ViT-B-32.pt")
    with pytest.raises(UsageError, match="CLIP weights file not found: .*ViT-B-32.pt"):
        load_clip("ViT-B/32", pretrained="openai")
    assert seen == ["clip-vit-b32"]


def test_tag_download_failure_is_wrapped(monkeypatch):
    import open_clip

    calls = {}

    def no_network(name, pretrained=None, **kwargs):
        calls.update(kwargs, name=name, pretrained=pretrained)
        raise RuntimeError("Failed to download weights for tag 'laion2b_s34b_b79k': no network\nmore detail")

    monkeypatch.delenv("IPL_OFFLINE")
    monkeypatch.setattr(open_clip, "create_model", no_network)
    with pytest.raises(IplError, match="no network") as info:
        load_clip("ViT-B/32", pretrained="laion2b_s34b_b79k")
    assert "\n" not in info.value.message
    assert calls["name"] == "ViT-B-32" and calls["pretrained"] == "laion2b_s34b_b79k"


def test_offline_refuses_open_clip_tags(monkeypatch):
    import open_clip

    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("network touched"))
    with pytest.raises(UsageError, match="downloads are off"):
        load_clip("ViT-B/32", pretrained="laion2b_s34b_b79k")


# ----------------------------------------------------------------------------
# Preprocessing


def test_preprocess_at_clip_size_is_plain_normalisation(clip):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    expected = ((x + 1) / 2 - MEAN) / STD
    out = clip.preprocess(x)
    assert out.shape == (2, 3, 32, 32)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("shape, top, left, resized", [((64, 48), 5, 0, (42, 32)), ((48, 64), 0, 5, (32, 42))])
def test_preprocess_resizes_shorter_side_and_crops(clip, shape, top, left, resized):
    x = torch.rand(2, 3, *shape) * 2 - 1
    y = F.interpolate((x + 1) / 2, size=resized, mode="bicubic", align_corners=False, antialias=False)
    y = y[:, :, top : top + 32, left : left + 32]
    expected = (y - MEAN) / STD
    out = clip.preprocess(x)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(64, 48), (45, 33), (33, 80), (128, 128)])
@pytest.mark.parametrize("antialias", [False, True])
def test_preprocess_matches_torchvision(clip, shape, antialias):
    tvf = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    x = torch.rand(1, 3, *shape) * 2 - 1
    y = tvf.resize((x + 1) / 2, 32, interpolation=InterpolationMode.BICUBIC, antialias=antialias)
    y = tvf.normalize(tvf.center_crop(y, 32), CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(clip.preprocess(x, antialias=antialias), y, rtol=0, atol=1e-6)


def test_preprocess_and_encode_image_are_differentiable(clip):
    x = (torch.rand(2, 3, 40, 56) * 2 - 1).requires_grad_()
    features = clip.encode_image(x)
    assert features.shape == (2, clip.embed_dim)
    features.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_encode_text_shape(clip):
    assert clip.tokenize(["a", "b c"]).shape == (2, 77)
    assert clip.encode_text(["a photo of a dog", "a sketch"]).shape == (2, clip.embed_dim)


# ----------------------------------------------------------------------------
# Learned prompts


def test_text_features_skip_the_padding_without_changing(clip):
    texts = ["a photo of a dog.", "disney", "a rather long sentence about an oil painting with thick strokes"]
    full = clip.model.encode_text(clip.tokenize(texts))  # open_clip's own 77-position pass
    torch.testing.assert_close(clip.encode_text(texts), full, rtol=1e-5, atol=1e-5)
    one = clip.encode_text(texts[1])  # a shorter batch runs fewer positions, same features
    torch.testing.assert_close(one[0], full[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ctx_init, n_ctx", [("a photo of a", 4), ("a cartoon of", 3)])
@pytest.mark.parametrize("label", ["dog", "anime painting"])
def test_prompt_invariant(clip, ctx_init, n_ctx, label):
    encoder = PromptEncoder(clip, ctx_init)
    assert encoder.n_ctx == n_ctx == encoder.word_count
    ctx = encoder.ctx_embedding()
    assert ctx.shape == (n_ctx, clip.text_width)
    P = ctx.expand(3, -1, -1)
    expected = clip.encode_text([f"{ctx_init} {label}"]).expand(3, -1)
    torch.testing.assert_close(encoder.encode(P, label), expected, rtol=0, atol=1e-5)


def test_prompt_invariant_when_words_and_tokens_differ(clip):
    encoder = PromptEncoder(clip, "a zxqvbnm of a")  # a rare word splits into several BPE tokens
    assert encoder.word_count == 4 and encoder.n_ctx > 4
    P = encoder.ctx_embedding()[None]
    expected = clip.encode_text(["a zxqvbnm of a cat"])
    torch.testing.assert_close(encoder.encode(P, ["cat"]), expected, rtol=0, atol=1e-5)


def test_batched_encode_equals_per_sample(clip):
    encoder = PromptEncoder(clip)
    torch.manual_seed(0)
    P = torch.randn(3, encoder.n_ctx, encoder.dim) * 0.02
    labels = ["photo", "anime painting", "photo"]
    batched = encoder.encode(P, labels)
    single = torch.cat([encoder.encode(P[i : i + 1], labels[i]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    assert not torch.allclose(batched[0], batched[2])  # different P, same label


def test_gradients_reach_prompts_only(clip):
    encoder = PromptEncoder(clip)
    P = encoder.ctx_embedding()[None].repeat(2, 1, 1) + 0.01 * torch.randn(2, encoder.n_ctx, encoder.dim)
    P.requires_grad_()
    encoder.encode(P, "sketch").square().sum().backward()
    assert P.grad is not None and P.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in clip.model.parameters())


def test_prompt_encoder_errors(clip):
    encoder = PromptEncoder(clip)
    P = encoder.ctx_embedding()[None].repeat(2, 1, 1)
    with pytest.raises(UsageError, match="labels"):
        encoder.encode(P, ["a", "b", "c"])
    with pytest.raises(UsageError, match="shape"):
        encoder.encode(P[:, :2], "a")


def test_custom_text_clip_is_refused(clip):
    import open_clip

    model = open_clip.CustomTextCLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
    ).eval()
    wrapped = Clip(model, TINY_MODEL)
    assert wrapped.embed_dim == 32
    with pytest.raises(UsageError, match="CustomTextCLIP"):
        PromptEncoder(wrapped)


# ----------------------------------------------------------------------------
# Under autocast: weights cast once


def _plain_prompt_features(clip: Clip, encoder: PromptEncoder, P: torch.Tensor, label: str) -> torch.Tensor:
    """`PromptEncoder.encode` written out on the open_clip model itself, autocast casting every weight per call."""
    from ipltool.models.clip import text_tower

    model = clip.model
    text = encoder._label_tokens(label).expand(P.shape[0], -1)
    x = model.token_embedding(text)
    x = torch.cat([x[:, :1], P.to(x.dtype), x[:, 1 + encoder.n_ctx :]], dim=1)
    return text_tower(model, x, text)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_cast_weights_and_gives_the_plain_results_bit_for_bit(dtype):
    clip = load_clip("tiny")  # its own copy: the kept weights are state of the object
    encoder = PromptEncoder(clip)
    torch.manual_seed(0)
    images = torch.rand(2, 3, 40, 56) * 2 - 1
    P = encoder.ctx_embedding()[None].repeat(2, 1, 1) + 0.01 * torch.randn(2, encoder.n_ctx, encoder.dim)

    clip.encode_image(images)
    assert clip._lowered is None  # fp32 runs on the model as it is

    def features(through_wrapper: bool):
        x, p = images.clone().requires_grad_(), P.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            if through_wrapper:
                out = (clip.encode_image(x), clip.encode_text(["a sketch", "disney"]), encoder.encode(p, "sketch"))
            else:
                ids = clip.tokenize(["a sketch", "disney"])
                from ipltool.models.clip import text_tower

                out = (
                    clip.model.encode_image(clip.preprocess(x)),
                    text_tower(clip.model, clip.model.token_embedding(ids), ids),
                    _plain_prompt_features(clip, encoder, p, "sketch"),
                )
        sum(o.float().square().sum() for o in out).backward()
        return [o.detach() for o in out] + [x.grad, p.grad]

    plain = features(through_wrapper=False)
    kept = features(through_wrapper=True)
    for a, b in zip(plain, kept):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert kept[0].dtype == dtype  # autocast did run

    weights = clip._lowered[1]
    assert all(t.dtype == dtype for t in weights.values())
    assert any(name.endswith("attn.in_proj_weight") for name in weights) and not any("ln_" in name for name in weights)
    matrices = sum(p.numel() for n, p in clip.model.named_parameters() if p.dim() >= 2 and "embedding" not in n)
    assert sum(t.numel() for t in weights.values()) > 0.8 * matrices  # nearly every matrix, cast once
    features(through_wrapper=True)
    assert clip._lowered[1] is weights  # kept across calls, not cast again

    with torch.no_grad():
        clip.model.visual.conv1.weight.mul_(1.5)  # a changed weight is cast again
    changed = features(through_wrapper=True)
    assert clip._lowered[1] is not weights and not torch.equal(changed[0], kept[0])



def _two_head_clip() -> Clip:
    """The tiny CLIP with two attention heads: torch's fused attention path needs an even count."""
    import open_clip

    load_clip("tiny")  # registers the tiny config, whose tokenizer this one uses
    torch.manual_seed(0)
    net = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=32, layers=1, width=64, head_width=32, patch_size=8),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
        quick_gelu=True,
    ).eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return Clip(net, TINY_MODEL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kept_cast_weights_without_gradients_never_take_the_fused_attention(dtype, monkeypatch):
    # torch's fused self-attention runs when the weights are in the input's dtype and no
    # gradient is needed; on CPUs it copies the projections through batched products
    # (bf16 image encoding 2x slower), so the kept weights must not lead into it.
    clip = _two_head_clip()
    images = torch.rand(2, 3, 40, 56) * 2 - 1
    fused = []
    native = torch._native_multi_head_attention

    def spy(*args, **kwargs):
        fused.append(args[0].shape)
        return native(*args, **kwargs)

    monkeypatch.setattr(torch, "_native_multi_head_attention", spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        plain = clip.model.encode_image(clip.preprocess(images))
        kept = clip.encode_image(images)
        kept_text = clip.encode_text(["a sketch"])
    assert clip._lowered is not None and not fused
    assert torch.equal(plain, kept) and torch.isfinite(kept_text).all()
