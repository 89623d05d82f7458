"""bf16 follows fp32: training losses at reduced but non-tiny widths, and the CPU layout bf16 runs in.

The full-size check (config-f, ViT-B/32, 20 steps at 64 and 256 px) is
`benchmarks/bf16_parity.py`; these tests guard the same property at widths a test can
afford: a 64 px StyleGAN2 with 128 channels per layer and a 4-layer ViT-B/32-shaped
CLIP of width 256 (224 px input, 32 px patches, 50 positions).
"""

import copy
import json
import math

import pytest
import torch

from ipltool import registry
from ipltool.domain import parse_domain
from ipltool.models.clip import PromptEncoder, load_clip
from ipltool.models.stylegan2 import GeneratorConfig, build_generator
from ipltool.precision import Precision
from ipltool.train.stage1 import train_mapper
from ipltool.train.stage2 import clip_terms, stage2_step, start_stage2

CLIP_NAME = "ipl-test-vit-mid"
CLIP_CONFIG = {
    "embed_dim": 256,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 4, "width": 256, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}
GENERATOR = GeneratorConfig(size=64, channel_max=128)
DOMAIN = """
name = "parity"
source = "photo"
target = "disney"
generator = "tiny"
[mapper]
batch = 8
[adapt]
batch = 2
auto_layer_k = 6
auto_layer_iters = 1
auto_layer_batch = 4
"""
STEPS = 6
TOLERANCE = 0.01


@pytest.fixture(scope="module")
def mid_models(tmp_path_factory):
    """(source generator, CLIP): random weights, widths between the tiny test models and the real ones."""
    import open_clip

    path = tmp_path_factory.mktemp("clip") / f"{CLIP_NAME}.json"
    path.write_text(json.dumps(CLIP_CONFIG))
    open_clip.add_model_config(path)
    clip = load_clip(CLIP_NAME, None, seed=0)
    source = build_generator(GENERATOR, seed=0, noise_strength=0.1).eval().requires_grad_(False)
    return source, clip


def _losses(models, case: str, precision: str) -> list[float]:
    """The per-step losses of STEPS steps of `case` from seed 0, as the benchmark runs them."""
    source, clip = models
    domain = parse_domain(DOMAIN, "parity.toml").with_overrides({"mapper.steps": STEPS, "adapt.steps": STEPS})
    amp = Precision.of(precision, "cpu")
    prompts = PromptEncoder(clip, domain.ctx_init)
    torch.manual_seed(0)
    mapper = registry.build_mapper("mlp", prompts.n_ctx, prompts.dim, source.style_dim)
    losses = []
    if case == "stage1":
        train_mapper(mapper, source, prompts, domain, chunk=8, on_step=lambda step, terms: losses.append(terms["loss"]), precision=amp)
    else:
        state = start_stage2(source, domain, amp)
        terms = clip_terms([(clip, 1.0)], domain)
        losses = [stage2_step(state, source, terms, domain, mapper, prompts)["loss"] for _ in range(STEPS)]
    return losses


@pytest.mark.parametrize("case", ["stage1", "stage2"])
def test_bf16_losses_are_finite_and_within_one_percent_of_fp32(mid_models, case):
    fp32 = _losses(mid_models, case, "fp32")
    bf16 = _losses(mid_models, case, "bf16")
    assert len(bf16) == len(fp32) == STEPS
    assert all(math.isfinite(x) for x in fp32 + bf16), f"{case}: fp32 {fp32}, bf16 {bf16}"
    assert bf16 != fp32  # bf16 really ran in bf16
    worst = max(abs(b - f) / abs(f) for f, b in zip(fp32, bf16))
    assert worst <= TOLERANCE, f"{case}: bf16 {bf16} against fp32 {fp32} (worst {worst:.2%})"


def test_bf16_on_cpu_runs_channels_last_and_returns_a_plain_image(mid_models):
    source, _ = mid_models
    seen = []
    handles = [m.register_forward_hook(lambda mod, args, out: seen.append((out.dtype, out.is_contiguous())))
               for m in source.modules() if type(m).__name__ == "StyledConv"]
    w = source.to_w_plus([source.mapping(torch.randn(2, source.style_dim))])
    noise = source.noise_list(randomize=False)
    try:
        with Precision.of("bf16", "cpu").autocast():
            image = source.synthesis(w, noise)
        assert seen and set(seen) == {(torch.bfloat16, False)}  # every activation bf16 and channels-last
        assert image.is_contiguous()  # callers get NCHW pictures
        seen.clear()
        reference = source.synthesis(w, noise)
        assert set(seen) == {(torch.float32, True)}  # fp32 keeps the reference layout
    finally:
        for handle in handles:
            handle.remove()
    assert (image.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_clip_attention_gets_sequence_first_inputs_under_autocast_only(mid_models):
    _, clip = mid_models
    attention = next(m for m in clip.model.visual.modules() if isinstance(m, torch.nn.MultiheadAttention))
    layouts = []
    attention.register_forward_hook(lambda mod, args, out: layouts.append(args[0].transpose(0, 1).is_contiguous()))
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    reference = clip.encode_image(images)
    with Precision.of("bf16", "cpu").autocast():
        reduced = clip.encode_image(images)
    # fp32 as open_clip lays it out (batch-first; the reference arithmetic); bf16 sequence-first, one matrix product
    assert layouts == [False, True]
    torch.testing.assert_close(reduced.float(), reference, atol=0.05, rtol=0.05)


def test_frozen_weights_are_prepared_once_under_autocast_and_again_when_they_change(mid_models):
    source = build_generator(GENERATOR, seed=0, noise_strength=0.1).eval().requires_grad_(False)
    conv = source.convs[0].conv
    w = source.to_w_plus([source.mapping(torch.randn(2, source.style_dim))])
    noise = source.noise_list(randomize=False)
    bf16 = Precision.of("bf16", "cpu")

    source.synthesis(w, noise)
    assert not hasattr(conv, "_prepared")  # fp32: the reference path, nothing kept
    with bf16.autocast():
        first = source.synthesis(w, noise)
        prepared = conv._prepared[2]
        again = source.synthesis(w, noise)
    assert conv._prepared[2] is prepared and prepared.dtype == torch.bfloat16 and torch.equal(first, again)

    with torch.no_grad():
        conv.weight.mul_(1.5)  # what an optimizer step or the EMA update does
    with bf16.autocast():
        changed = source.synthesis(w, noise)
    assert conv._prepared[2] is not prepared and not torch.equal(changed, first)

    # The values are those of the uncached path (a weight that needs a gradient is never kept).
    trainable = copy.deepcopy(source).requires_grad_(True)
    with bf16.autocast():
        uncached = trainable.synthesis(w, noise)
    assert torch.equal(uncached.detach(), changed)


def test_renders_without_gradients_upsample_by_phases_and_agree_with_the_transposed_convolution(mid_models, monkeypatch):
    from torch.nn import functional as F

    from ipltool.models import stylegan2

    source = mid_models[0]
    torch.manual_seed(1)
    w = source.to_w_plus([source.mapping(torch.randn(2, source.style_dim))])
    noise = source.noise_list(randomize=False)
    bf16 = Precision.of("bf16", "cpu")
    transposed = []
    native = F.conv_transpose2d

    def spy(*args, **kwargs):
        transposed.append(args[0].shape[-1])
        return native(*args, **kwargs)

    monkeypatch.setattr(stylegan2.F, "conv_transpose2d", spy)
    with torch.no_grad():
        reference = source.synthesis(w, noise)  # fp32: the reference's transposed convolutions
        assert transposed == [4, 8, 16, 32]
        transposed.clear()
        with bf16.autocast():
            by_phases = source.synthesis(w, noise)
        assert transposed == []  # every side of a 64 px generator is within PHASES_MAX_SIDE
        monkeypatch.setattr(stylegan2, "PHASES_MAX_SIDE", 8)
        with bf16.autocast():
            mixed = source.synthesis(w, noise)
        assert transposed == [16, 32]
        monkeypatch.setattr(stylegan2, "PHASES_MAX_SIDE", 0)
        with bf16.autocast():
            all_transposed = source.synthesis(w, noise)
    with bf16.autocast():
        source.synthesis(w, noise)  # a gradient may be recorded: transposed, whose backward is faster
    assert transposed == [16, 32, 4, 8, 16, 32, 4, 8, 16, 32]

    def error(out):
        return ((out.float() - reference).norm() / reference.norm()).item()

    # The phases round differently from oneDNN's transposed kernel, but no worse: bf16's own error.
    assert 0 < error(all_transposed) < 0.02
    for out in (by_phases, mixed):
        assert torch.isfinite(out).all() and error(out) < 1.5 * error(all_transposed)
