"""StyleGAN2 generator: rosinality key layout, checkpoints, truncation, W+."""

import math

import pytest
import torch

from ipltool.errors import CheckpointError, UsageError
from ipltool.models.stylegan2 import (
    TINY_CONFIG,
    Generator,
    build_generator,
    GeneratorConfig,
    config_from_state_dict,
    generator_checkpoint,
    load_generator,
)


def _rosinality_keys(size: int, channel_multiplier: int = 2, n_mlp: int = 8, style_dim: int = 512) -> dict:
    """Expected state-dict names and shapes, written out from the layout rules of
    rosinality/stylegan2-pytorch model.py (not from our module)."""
    ch = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
          256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    keys = {}
    for i in range(1, n_mlp + 1):
        keys[f"style.{i}.weight"] = (style_dim, style_dim)
        keys[f"style.{i}.bias"] = (style_dim,)
    keys["input.input"] = (1, ch[4], 4, 4)

    def styled(prefix, cin, cout, up):
        keys[f"{prefix}.conv.weight"] = (1, cout, cin, 3, 3)
        keys[f"{prefix}.conv.modulation.weight"] = (cin, style_dim)
        keys[f"{prefix}.conv.modulation.bias"] = (cin,)
        if up:
            keys[f"{prefix}.conv.blur.kernel"] = (4, 4)
        keys[f"{prefix}.noise.weight"] = (1,)
        keys[f"{prefix}.activate.bias"] = (cout,)

    def to_rgb(prefix, cin, up):
        keys[f"{prefix}.bias"] = (1, 3, 1, 1)
        if up:
            keys[f"{prefix}.upsample.kernel"] = (4, 4)
        keys[f"{prefix}.conv.weight"] = (1, 3, cin, 1, 1)
        keys[f"{prefix}.conv.modulation.weight"] = (cin, style_dim)
        keys[f"{prefix}.conv.modulation.bias"] = (cin,)

    styled("conv1", ch[4], ch[4], False)
    to_rgb("to_rgb1", ch[4], False)
    log_size = int(math.log2(size))
    cin = ch[4]
    for level, i in enumerate(range(3, log_size + 1)):
        cout = ch[2**i]
        styled(f"convs.{2 * level}", cin, cout, True)
        styled(f"convs.{2 * level + 1}", cout, cout, False)
        to_rgb(f"to_rgbs.{level}", cout, True)
        cin = cout
    for layer in range((log_size - 2) * 2 + 1):
        res = 2 ** ((layer + 5) // 2)
        keys[f"noises.noise_{layer}"] = (1, 1, res, res)
    return keys


@pytest.mark.slow
def test_config_f_1024_has_the_official_keys_and_shapes():
    g = Generator(1024, 512, 8, channel_multiplier=2)
    state = g.state_dict()
    expected = _rosinality_keys(1024)
    assert len(state) == len(expected) == 171
    assert list(state) == list(expected) or set(state) == set(expected)
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    # Spot checks of well-known entries of stylegan2-ffhq-config-f.pt.
    assert tuple(state["convs.15.conv.weight"].shape) == (1, 32, 32, 3, 3)
    assert tuple(state["to_rgbs.7.conv.weight"].shape) == (1, 3, 32, 1, 1)
    assert tuple(state["noises.noise_16"].shape) == (1, 1, 1024, 1024)
    assert g.n_latent == 18 and g.num_layers == 17
    # The blur kernels are the normalised [1,3,3,1] outer product times 4 (upsampling gain).
    k = torch.tensor([1.0, 3, 3, 1])
    torch.testing.assert_close(state["convs.0.conv.blur.kernel"], torch.outer(k, k) / 64 * 4)


@pytest.mark.parametrize("size,cm", [(32, 2), (64, 1), (256, 2)])
def test_smaller_configs_match_layout(size, cm):
    g = Generator(size, 512, 8, channel_multiplier=cm)
    expected = _rosinality_keys(size, cm)
    assert {k: tuple(v.shape) for k, v in g.state_dict().items()} == expected
    assert g.n_latent == 2 * int(math.log2(size)) - 2


def test_bad_sizes_are_rejected():
    for size in (16, 48, 2048):
        with pytest.raises(UsageError, match="power of two"):
            Generator(size)
    with pytest.raises(UsageError, match="multiplier"):
        Generator(64, channel_multiplier=3)


def _tiny(seed=0):
    torch.manual_seed(seed)
    return Generator.from_config(TINY_CONFIG).eval()


def test_output_shape_and_const_noise_is_deterministic():
    g = _tiny()
    z = torch.randn(3, TINY_CONFIG.style_dim)
    a, _ = g([z], randomize_noise=False)
    b, _ = g([z], randomize_noise=False)
    assert a.shape == (3, 3, 32, 32)
    torch.testing.assert_close(a, b)
    # Random noise differs between calls once the noise strengths are non-zero.
    for m in g.modules():
        if type(m).__name__ == "NoiseInjection":
            m.weight.data.fill_(0.5)
    c, _ = g([z])
    d, _ = g([z])
    assert not torch.allclose(c, d)


def test_w_and_w_plus_inputs_agree():
    g = _tiny()
    z = torch.randn(2, TINY_CONFIG.style_dim)
    w = g.mapping(z)
    from_z, latents = g([z], randomize_noise=False, return_latents=True)
    from_w, _ = g([w], input_is_latent=True, randomize_noise=False)
    w_plus = w.unsqueeze(1).repeat(1, g.n_latent, 1)
    from_wp, _ = g(w_plus, input_is_latent=True, randomize_noise=False)
    torch.testing.assert_close(from_z, from_w)
    torch.testing.assert_close(from_z, from_wp)
    assert latents.shape == (2, g.n_latent, TINY_CONFIG.style_dim)
    # A W+ code whose entries differ changes the picture.
    w_plus2 = w_plus.clone()
    w_plus2[:, -1] = g.mapping(torch.randn(2, TINY_CONFIG.style_dim))
    other, _ = g(w_plus2, input_is_latent=True, randomize_noise=False)
    assert not torch.allclose(other, from_wp)
    with pytest.raises(UsageError, match="style vectors"):
        g(w_plus[:, :3], input_is_latent=True)


def test_truncation_pulls_towards_the_mean_latent():
    g = _tiny()
    mean = g.mean_latent(256, generator=torch.Generator().manual_seed(1))
    assert mean.shape == (1, TINY_CONFIG.style_dim)
    z = torch.randn(2, TINY_CONFIG.style_dim)
    w = g.mapping(z)
    psi = 0.7
    got, lat = g([z], truncation=psi, truncation_latent=mean, randomize_noise=False, return_latents=True)
    torch.testing.assert_close(lat[:, 0], mean + psi * (w - mean))
    at_mean, _ = g([z], truncation=0.0, truncation_latent=mean, randomize_noise=False)
    mean_image, _ = g([mean.expand(2, -1)], input_is_latent=True, randomize_noise=False)
    torch.testing.assert_close(at_mean, mean_image)
    with pytest.raises(UsageError, match="truncation_latent"):
        g([z], truncation=0.5)


def test_style_mixing_switches_at_the_inject_index():
    g = _tiny()
    z1, z2 = torch.randn(1, TINY_CONFIG.style_dim), torch.randn(1, TINY_CONFIG.style_dim)
    _, lat = g([z1, z2], inject_index=3, return_latents=True, randomize_noise=False)
    torch.testing.assert_close(lat[0, :3], g.mapping(z1).expand(3, -1))
    torch.testing.assert_close(lat[0, 3:], g.mapping(z2).expand(g.n_latent - 3, -1))


def test_checkpoint_round_trip_strict(tmp_path):
    g = _tiny(seed=3)
    path = tmp_path / "g.pt"
    torch.save(generator_checkpoint(g), path)
    loaded = load_generator(path)
    assert loaded.config == TINY_CONFIG
    z = torch.randn(2, TINY_CONFIG.style_dim)
    torch.testing.assert_close(loaded([z], randomize_noise=False)[0], g([z], randomize_noise=False)[0])
    # A bare {"g_ema": state_dict}, as the reference code writes, loads by inferring the architecture
    # (at 32 px the channel multiplier cannot be seen, and does not matter).
    bare = tmp_path / "bare.pt"
    torch.save({"g_ema": g.state_dict()}, bare)
    inferred = load_generator(bare)
    assert (inferred.size, inferred.style_dim, inferred.n_latent) == (32, TINY_CONFIG.style_dim, g.n_latent)
    torch.testing.assert_close(inferred([z], randomize_noise=False)[0], g([z], randomize_noise=False)[0])


def test_config_inference_for_released_layouts():
    for config in (GeneratorConfig(256), GeneratorConfig(64, channel_multiplier=1), GeneratorConfig(128, style_dim=256, n_mlp=4)):
        assert config_from_state_dict(Generator.from_config(config).state_dict()) == config


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    g = _tiny()
    missing = tmp_path / "missing.pt"
    with pytest.raises(CheckpointError, match="not found"):
        load_generator(missing)
    no_key = tmp_path / "no_key.pt"
    torch.save({"g": g.state_dict()}, no_key)
    with pytest.raises(CheckpointError, match="no 'g_ema' entry"):
        load_generator(no_key)
    wrong = tmp_path / "wrong.pt"
    torch.save({"g_ema": g.state_dict()}, wrong)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_generator(wrong, config=GeneratorConfig(64, style_dim=64, n_mlp=2, channel_multiplier=1, channel_max=32))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_generator(garbage)


def test_style_index_to_layer_mapping():
    g = _tiny()
    assert g.layer_for_style_index(0) is g.conv1
    assert g.layer_for_style_index(1) is g.to_rgb1
    for i in range(2, g.n_latent):
        assert g.layer_for_style_index(i) is g.convs[i - 2]
    with pytest.raises(IndexError):
        g.layer_for_style_index(g.n_latent)


def test_tiny_generator_is_seeded_and_leaves_the_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = build_generator(TINY_CONFIG, seed=0), build_generator(TINY_CONFIG, seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = build_generator(TINY_CONFIG, seed=1)
    assert not torch.equal(a.state_dict()["input.input"], c.state_dict()["input.input"])


@pytest.mark.parametrize("upsample, demodulate, k", [(False, True, 3), (True, True, 3), (False, False, 1)])
def test_modulated_conv_equals_the_per_sample_weight_formula(upsample, demodulate, k):
    """Our input/output scaling must give rosinality's per-sample modulated weights, grouped conv and all."""
    import torch.nn.functional as F

    from ipltool.models.stylegan2 import ModulatedConv2d

    torch.manual_seed(0)
    conv = ModulatedConv2d(6, 5, k, 16, demodulate=demodulate, upsample=upsample).double()
    x, style = torch.randn(3, 6, 8, 8, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    # Reference: one weight per sample, demodulated, run as a grouped convolution.
    s = conv.modulation(style).view(3, 1, 6, 1, 1)
    weight = conv.scale * conv.weight * s
    if demodulate:
        weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(3, 5, 1, 1, 1)
    if upsample:
        grouped = weight.transpose(1, 2).reshape(3 * 6, 5, k, k)
        expected = F.conv_transpose2d(x.reshape(1, 18, 8, 8), grouped, stride=2, groups=3)
        expected = conv.blur(expected.view(3, 5, *expected.shape[2:]))
    else:
        expected = F.conv2d(x.reshape(1, 18, 8, 8), weight.reshape(15, 6, k, k), padding=k // 2, groups=3).view(3, 5, 8, 8)
    torch.testing.assert_close(conv(x, style), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("height, width", [(1, 1), (4, 4), (5, 3)])
def test_upsampling_by_phases_is_the_transposed_convolution(height, width, channels_last):
    from torch.nn import functional as F

    from ipltool.models.stylegan2 import upsampling_conv_by_phases

    torch.manual_seed(0)
    x = torch.randn(2, 6, height, width, dtype=torch.float64)
    weight = torch.randn(5, 6, 3, 3, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    reference = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)
    phases = upsampling_conv_by_phases(x, weight)
    assert phases.shape == reference.shape == (2, 5, 2 * height + 1, 2 * width + 1)
    torch.testing.assert_close(phases, reference, rtol=0, atol=1e-12)
    assert phases.is_contiguous(memory_format=torch.channels_last if channels_last and height * width > 1 else torch.contiguous_format)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_renders_without_autograd_work_in_place_and_give_the_same_images(precision):
    """Without autograd the noise, bias and activation go into the convolution's output in place: same values bit for bit."""
    from ipltool.precision import Precision

    amp = Precision.of(precision, "cpu")
    generator = build_generator(GeneratorConfig(size=32, channel_multiplier=1, channel_max=64), seed=0, noise_strength=0.1).eval()
    generator.requires_grad_(False)
    w = generator.to_w_plus([generator.mapping(torch.randn(3, generator.style_dim, generator=torch.Generator().manual_seed(1)))])
    renders = []
    for grad in (True, False):
        torch.manual_seed(7)  # the noise is drawn inside: the same draws in both paths
        with torch.set_grad_enabled(grad), amp.autocast():
            renders.append(generator.synthesis(w.requires_grad_(grad)).detach())
    assert torch.equal(renders[0], renders[1])


def test_in_place_activation_is_the_activation_written_into_its_input(monkeypatch):
    from ipltool.kernels import fused_act

    x = torch.randn(2, 5, 4, 4)
    bias = torch.randn(5)
    expected = fused_act.fused_leaky_relu(x, bias)
    y = x.clone()
    out = fused_act.fused_leaky_relu_(y, bias)
    assert out.data_ptr() == y.data_ptr() and torch.equal(out, expected)
    # Where the compiled kernel would run, its one out-of-place pass is used instead.
    calls = []
    monkeypatch.setattr(fused_act, "resolve_impl", lambda impl, x: "cuda")
    monkeypatch.setattr(fused_act, "fused_leaky_relu", lambda *args: calls.append(args) or args[0] * 2)
    z = x.clone()
    assert torch.equal(fused_act.fused_leaky_relu_(z, bias), x * 2) and torch.equal(z, x) and len(calls) == 1
