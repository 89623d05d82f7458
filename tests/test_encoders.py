"""Image encoders: reference layout on the meta device (docs/inversion.md §8), tiny checkpoints,
the ReStyle loop, and the entry points."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.nn import functional as F

from ipltool import hub, registry
from ipltool.errors import CheckpointError, UsageError
from ipltool.models.encoders import (
    E4E,
    ENCODER_CLASSES,
    PLUGINS,
    PSP,
    RESTYLE_E4E,
    RESTYLE_PSP,
    BackboneConfig,
    BackboneEncoder,
    Encoder4Editing,
    EncoderPlugin,
    GradualStyleBlock,
    GradualStyleEncoder,
    ProgressiveBackboneEncoder,
    ReStyleInverter,
    encoder_arch,
    save_checkpoint,
)
from ipltool.models.stylegan2 import TINY_CONFIG, Generator, GeneratorConfig, build_generator

PYRAMID = (GradualStyleEncoder, Encoder4Editing)
FLAT = (BackboneEncoder, ProgressiveBackboneEncoder)


def _meta(cls):
    with torch.device("meta"):
        return cls()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core box OpenMP's spinning
    made single tests take seconds; restored afterwards for the rest of the suite."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def meta_encoders():
    return {cls: _meta(cls) for cls in ENCODER_CLASSES.values()}


@pytest.fixture(scope="module")
def decoder():
    return build_generator(TINY_CONFIG, seed=0, noise_strength=0.1).eval()


@pytest.fixture
def images():
    gen = torch.Generator().manual_seed(3)
    return torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1


# ----------------------------------------------------------------------------
# Reference layout, full size, on meta (§8)


@pytest.mark.parametrize(
    "cls, entries, tensors, elements",
    [
        (GradualStyleEncoder, 621, 465, 267_136_704),
        (Encoder4Editing, 621, 465, 267_136_704),
        (BackboneEncoder, 565, 409, 205_585_792),
        (ProgressiveBackboneEncoder, 565, 409, 205_585_792),
    ],
)
def test_full_size_counts(meta_encoders, cls, entries, tensors, elements):
    enc = meta_encoders[cls]
    state = enc.state_dict()
    params = list(enc.parameters())
    assert len(state) == entries
    assert len(params) == tensors
    assert sum(p.numel() for p in params) == elements
    assert len(list(enc.buffers())) == 156
    by_prefix = Counter(k.split(".")[0] for k in state)
    if cls in PYRAMID:
        assert by_prefix == {"body": 378, "styles": 232, "input_layer": 7, "latlayer1": 2, "latlayer2": 2}
    else:
        assert by_prefix == {"body": 378, "styles": 180, "input_layer": 7}


def test_pyramid_and_flat_share_key_sets(meta_encoders):
    assert meta_encoders[GradualStyleEncoder].state_dict().keys() == meta_encoders[Encoder4Editing].state_dict().keys()
    assert meta_encoders[BackboneEncoder].state_dict().keys() == meta_encoders[ProgressiveBackboneEncoder].state_dict().keys()


@pytest.mark.parametrize("cls", list(ENCODER_CLASSES.values()))
def test_full_size_spot_keys(meta_encoders, cls):
    state = meta_encoders[cls].state_dict()
    in_nc = 3 if cls in PYRAMID else 6
    expected = {
        "input_layer.0.weight": [64, in_nc, 3, 3],
        "input_layer.2.weight": [64],
        "body.0.res_layer.1.weight": [64, 64, 3, 3],
        "body.0.res_layer.5.fc1.weight": [4, 64, 1, 1],
        "body.0.res_layer.5.fc2.weight": [64, 4, 1, 1],
        "body.3.shortcut_layer.0.weight": [128, 64, 1, 1],
        "body.3.res_layer.0.weight": [64],
        "body.3.res_layer.1.weight": [128, 64, 3, 3],
        "body.3.res_layer.5.fc1.weight": [8, 128, 1, 1],
        "body.7.shortcut_layer.0.weight": [256, 128, 1, 1],
        "body.20.res_layer.1.weight": [256, 256, 3, 3],
        "body.21.shortcut_layer.0.weight": [512, 256, 1, 1],
        "body.23.res_layer.5.fc1.weight": [32, 512, 1, 1],
        "styles.0.convs.6.weight": [512, 512, 3, 3],
        "styles.17.linear.weight": [512, 512],
        "styles.17.linear.bias": [512],
    }
    if cls in PYRAMID:
        expected.update({
            "styles.3.convs.8.weight": [512, 512, 3, 3],
            "styles.7.convs.10.weight": [512, 512, 3, 3],
            "styles.17.convs.10.bias": [512],
            "latlayer1.weight": [512, 256, 1, 1],
            "latlayer1.bias": [512],
            "latlayer2.weight": [512, 128, 1, 1],
        })
    for key, shape in expected.items():
        assert list(state[key].shape) == shape, key
    assert "input_layer.1.num_batches_tracked" in state
    # shortcut convs only where the width changes
    assert sorted({int(k.split(".")[1]) for k in state if ".shortcut_layer." in k}) == [3, 7, 21]
    assert not any(k.startswith("body.0.shortcut_layer") for k in state)
    assert not any(k.startswith("styles.0.convs.8") for k in state)
    if cls in PYRAMID:
        assert not any(k.startswith("styles.3.convs.10") for k in state)
    else:
        assert not any(".convs.8." in k for k in state)
        assert not any(k.startswith("latlayer") for k in state)


def test_full_checkpoint_entry_counts(meta_encoders):
    with torch.device("meta"):
        dec = Generator(1024, 512, 8, channel_multiplier=2)
    dec_state = dec.state_dict()
    assert len(dec_state) == 171
    for cls, total in ((GradualStyleEncoder, 792), (Encoder4Editing, 792), (BackboneEncoder, 736), (ProgressiveBackboneEncoder, 736)):
        combined = {f"encoder.{k}": v for k, v in meta_encoders[cls].state_dict().items()}
        combined.update({f"decoder.{k}": v for k, v in dec_state.items()})
        assert len(combined) == total


@pytest.mark.parametrize("cls", [GradualStyleEncoder, BackboneEncoder])
def test_arch_is_read_off_the_weights(meta_encoders, cls):
    arch = encoder_arch(meta_encoders[cls].state_dict())
    assert arch["backbone"] == BackboneConfig(in_nc=3 if cls is GradualStyleEncoder else 6)
    assert (arch["n_styles"], arch["style_dim"], arch["input_size"]) == (18, 512, 256)


# ----------------------------------------------------------------------------
# Numerics of the building blocks


def test_gradual_style_block_math():
    torch.manual_seed(0)
    block = GradualStyleBlock(8, 8, 4).eval()
    assert [i for i, m in enumerate(block.convs) if isinstance(m, torch.nn.Conv2d)] == [0, 2]
    x = torch.randn(2, 8, 4, 4)
    h = x
    for conv in (block.convs[0], block.convs[2]):
        h = F.leaky_relu(F.conv2d(h, conv.weight, conv.bias, stride=2, padding=1), 0.01)
    expected = h.flatten(1) @ (block.linear.weight / math.sqrt(8)).t() + block.linear.bias
    torch.testing.assert_close(block(x), expected)


def test_psp_wiring_follows_the_pyramid(decoder, images):
    enc = PSP.tiny(decoder).encoder
    cfg = enc.backbone
    h = enc.input_layer(images)
    maps = []
    for i, unit in enumerate(enc.body):
        h = unit(h)
        if i in cfg.stage_ends:
            maps.append(h)
    _, c1, c2, c3 = maps
    assert c3.shape[-1] == 4 and c2.shape[-1] == 8 and c1.shape[-1] == 16  # input 64 / 16, 8, 4
    p2 = F.interpolate(c3, size=(8, 8), mode="bilinear", align_corners=True) + enc.latlayer1(c2)
    p1 = F.interpolate(p2, size=(16, 16), mode="bilinear", align_corners=True) + enc.latlayer2(c1)
    feats = [c3] * 3 + [p2] * 4 + [p1] * (enc.n_styles - 7)
    expected = torch.stack([enc.styles[i](f) for i, f in enumerate(feats)], dim=1)
    torch.testing.assert_close(enc(images), expected)


# ----------------------------------------------------------------------------
# Tiny models: shapes, e4e structure


@pytest.mark.parametrize("name", list(PLUGINS))
def test_tiny_forward_shapes(decoder, images, name):
    inv = PLUGINS[name].tiny(decoder)
    w = inv.invert(images)
    assert w.shape == (2, decoder.n_latent, decoder.style_dim)
    assert (inv.input_size, inv.n_latent, inv.style_dim) == (64, 8, 64)
    assert torch.isfinite(w).all()
    assert not torch.equal(w[0], w[1])  # the code depends on the photo
    with pytest.raises(UsageError, match="inverts \\(B, 3, 64, 64\\) images") as info:
        inv.invert(torch.zeros(1, 3, 32, 32))
    assert "preprocess" in info.value.hint


def test_tiny_on_a_larger_generator():
    dec = build_generator(GeneratorConfig(size=64, style_dim=32, n_mlp=1, channel_multiplier=1, channel_max=16), seed=1)
    inv = E4E.tiny(dec, input_size=32)
    assert inv.invert(torch.zeros(1, 3, 32, 32)).shape == (1, 10, 32)


def test_tiny_is_seeded_and_leaves_the_rng_alone(decoder, images):
    state = torch.random.get_rng_state()
    a = RESTYLE_E4E.tiny(decoder, seed=5).invert(images)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, RESTYLE_E4E.tiny(decoder, seed=5).invert(images))
    assert not torch.equal(a, RESTYLE_E4E.tiny(decoder, seed=6).invert(images))


@pytest.mark.parametrize("plugin", [E4E, RESTYLE_E4E])
def test_e4e_without_deltas_gives_identical_rows(decoder, images, plugin):
    inv = plugin.tiny(decoder, restyle_steps=1) if plugin.iterative else plugin.tiny(decoder)
    with torch.no_grad():
        for block in inv.encoder.styles[1:]:
            block.linear.weight.zero_()
            block.linear.bias.zero_()
    raw = inv.encoder(torch.cat([images, inv.average_image().expand(2, -1, -1, -1)], 1) if plugin.iterative else images)
    assert torch.equal(raw, raw[:, :1].expand_as(raw))
    w = inv.invert(images)
    torch.testing.assert_close(w - inv.latent_avg, raw[:, :1].expand_as(w))


def test_psp_rows_are_independent(decoder, images):
    w = PSP.tiny(decoder).encoder(images)
    assert not torch.equal(w[:, 0], w[:, 1])


def test_preprocess_resizes_only_when_needed(decoder):
    inv = PSP.tiny(decoder)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert inv.preprocess(x) is x
    big = torch.rand(2, 3, 128, 96) * 2 - 1
    assert inv.preprocess(big).shape == (2, 3, 64, 64)
    flat = torch.full((1, 3, 16, 16), 0.25)
    torch.testing.assert_close(inv.preprocess(flat), torch.full((1, 3, 64, 64), 0.25))
    with pytest.raises(UsageError):
        inv.preprocess(torch.zeros(1, 1, 64, 64))


# ----------------------------------------------------------------------------
# ReStyle loop


def _pool_up(y: torch.Tensor) -> torch.Tensor:
    # tiny decoder (32 px) is smaller than the encoder input (64 px): bilinear upsampling
    return F.interpolate(y, size=(64, 64), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("plugin", [RESTYLE_E4E, RESTYLE_PSP])
def test_restyle_one_step(decoder, images, plugin):
    inv = plugin.tiny(decoder, restyle_steps=1)
    avg_img = _pool_up(decoder([inv.latent_avg[None]], input_is_latent=True, randomize_noise=False)[0])
    expected = inv.latent_avg + inv.encoder(torch.cat([images, avg_img.expand(2, -1, -1, -1)], dim=1))
    torch.testing.assert_close(inv.invert(images), expected)


def test_restyle_steps_refine_from_the_previous_code(decoder, images):
    inv = RESTYLE_PSP.tiny(decoder, restyle_steps=3)
    w, steps = inv.invert(images, return_steps=True)
    assert len(steps) == 3 and torch.equal(w, steps[-1])
    for prev, cur in zip(steps, steps[1:]):
        recon = _pool_up(decoder([prev], input_is_latent=True, randomize_noise=False)[0])
        torch.testing.assert_close(cur, prev + inv.encoder(torch.cat([images, recon], 1)))


@pytest.mark.parametrize("extra, passes", [(False, 3), (True, 4)])
def test_restyle_pass_count_and_avg_image_cache(decoder, images, extra, passes):
    inv = RESTYLE_E4E.tiny(decoder, restyle_steps=3, extra_pass=extra)
    calls = Counter()
    inv.encoder.register_forward_hook(lambda *a: calls.update(["encoder"]))
    inv.decoder.register_forward_hook(lambda *a: calls.update(["decoder"]))
    try:
        w, steps = inv.invert(images, return_steps=True)
        assert calls["encoder"] == passes and len(steps) == passes
        # avg image once, then one decode between consecutive passes (never after the last)
        assert calls["decoder"] == 1 + passes - 1
        inv.invert(images)
        assert calls["decoder"] == 1 + 2 * (passes - 1)
    finally:
        inv.decoder._forward_hooks.clear()  # the decoder fixture is shared


def test_restyle_pool_is_the_reference_face_pool(decoder):
    inv = RESTYLE_PSP.tiny(decoder)
    y = torch.randn(1, 3, 256, 256)
    torch.testing.assert_close(inv.pool(y), y.reshape(1, 3, 64, 4, 64, 4).mean((3, 5)))


# ----------------------------------------------------------------------------
# Checkpoints


def _opts(plugin: EncoderPlugin, **extra) -> dict:
    return {"encoder_type": plugin.encoder_type, **extra}


def _save(tmp_path, inv, name="ck.pt", opts=None, latent_avg="same", **top) -> str:
    path = tmp_path / name
    save_checkpoint(path, inv.encoder, inv.decoder, opts, inv.latent_avg if latent_avg == "same" else latent_avg)
    if top:
        ckpt = torch.load(path, weights_only=True)
        ckpt.update(top)
        torch.save(ckpt, path)
    return str(path)


def _edit(path: str, fn) -> None:
    ckpt = torch.load(path, weights_only=True)
    fn(ckpt)
    torch.save(ckpt, path)


@pytest.mark.parametrize("name", list(PLUGINS))
def test_checkpoint_round_trip(tmp_path, decoder, images, name):
    plugin = PLUGINS[name]
    inv = plugin.tiny(decoder, seed=1)
    path = _save(tmp_path, inv, opts=_opts(plugin))
    assert set(k.split(".")[0] for k in torch.load(path, weights_only=True)["state_dict"]) == {"encoder", "decoder"}
    loaded = registry.load("encoders", name).load(path)
    assert type(loaded) is type(inv)
    assert torch.equal(loaded.invert(images), inv.invert(images))


def test_checkpoint_extras_are_ignored(tmp_path, decoder, images):
    inv = RESTYLE_E4E.tiny(decoder)
    path = _save(
        tmp_path, inv,
        global_step=1000, best_val_loss=0.1, optimizer={"state": {}, "param_groups": [{"lr": 1e-4}]},
        discriminator_state_dict={"w": torch.zeros(2)}, discriminator_optimizer_state_dict={},
    )
    assert torch.equal(RESTYLE_E4E.load(path).invert(images), inv.invert(images))


@pytest.mark.parametrize("shape", ["vector", "row", "full"])
def test_latent_avg_shapes(tmp_path, decoder, images, shape):
    inv = E4E.tiny(decoder)
    avg = inv.latent_avg[0]
    stored = {"vector": avg, "row": avg[None], "full": avg.expand(8, -1).clone()}[shape]
    path = _save(tmp_path, inv, latent_avg=stored)
    loaded = E4E.load(path)
    assert loaded.latent_avg.shape == (8, 64)
    assert torch.equal(loaded.invert(images), inv.invert(images))


def test_latent_avg_not_added_without_start_from_latent_avg(tmp_path, decoder, images):
    inv = PSP.tiny(decoder)
    path = _save(tmp_path, inv, opts={"start_from_latent_avg": False})  # file still has one
    loaded = PSP.load(path)
    assert loaded.latent_avg is None
    assert torch.equal(loaded.invert(images), inv.encoder(images))


@pytest.mark.parametrize(
    "plugin, opts, edit, match",
    [
        (E4E, {"encoder_type": "GradualStyleEncoder"}, None, "load it with encoder 'psp'"),
        (E4E, {"encoder_type": "ResNetProgressiveBackboneEncoder"}, None, "not supported; supported: GradualStyleEncoder"),
        (E4E, {"encoder_type": "FancyEncoder"}, None, "unknown encoder_type 'FancyEncoder'"),
        (E4E, {"input_nc": 6}, None, "takes 3 input channels, but opts input_nc is 6"),
        (E4E, {"stylegan_size": 64}, None, "means 10 styles, but the encoder has 8"),
        (PSP, {"learn_in_w": True}, None, "learn_in_w"),
        (E4E, {"ipl_input_size": 128}, None, "fit 64 px"),
        (E4E, None, lambda c: c["state_dict"].pop("encoder.styles.2.linear.bias"), "1 missing \\(first: styles.2.linear.bias\\)"),
        (PSP, None, lambda c: c["state_dict"].pop("encoder.latlayer1.weight"), "missing \\(first: latlayer1.weight"),
        (E4E, None, lambda c: c["state_dict"].update({"encoder.extra.weight": torch.zeros(1)}), "unexpected \\(first: extra.weight"),
        (E4E, None, lambda c: c["state_dict"].pop("decoder.conv1.noise.weight"), "decoder"),
        (E4E, None, lambda c: c["state_dict"].__setitem__("encoder.styles.0.linear.bias", torch.zeros(3)), r"wrong shape \(first: styles.0.linear.bias is \[3\], expected \[64\]\)"),
        (RESTYLE_PSP, None, lambda c: c.pop("latent_avg"), "no latent_avg, but ReStyle starts from it"),
        (E4E, None, lambda c: c.__setitem__("latent_avg", torch.zeros(3, 64)), "latent_avg has shape \\[3, 64\\]"),
        (E4E, None, lambda c: c.pop("opts"), "needs 'state_dict' and 'opts'"),
    ],
)
def test_checkpoint_errors(tmp_path, decoder, plugin, opts, edit, match):
    inv = plugin.tiny(decoder)
    path = _save(tmp_path, inv, opts=opts)
    if edit is not None:
        _edit(path, edit)
    with pytest.raises(CheckpointError, match=match) as info:
        plugin.load(path)
    assert "\n" not in info.value.message and str(tmp_path) in info.value.message


def test_checkpoint_missing_or_unreadable(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        PSP.load(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot read"):
        PSP.load(tmp_path / "junk.pt")


# ----------------------------------------------------------------------------
# Plugins


def test_entry_points_are_discoverable():
    assert {"e4e", "psp", "restyle-e4e", "restyle-psp"} <= set(registry.names("encoders"))
    for name, plugin in PLUGINS.items():
        loaded = registry.load("encoders", name)
        assert loaded is plugin and loaded.name == name
        assert hub.get_model(loaded.default_weights).kind == "encoder"
        assert loaded.description and "\n" not in loaded.description
    assert {p.encoder_type for p in PLUGINS.values()} == set(ENCODER_CLASSES)


def test_plugin_options(decoder):
    with pytest.raises(UsageError, match="unknown option"):
        E4E.tiny(decoder, steps=3)
    with pytest.raises(UsageError, match="positive integer"):
        RESTYLE_E4E.tiny(decoder, restyle_steps=0)
    with pytest.raises(UsageError, match="restyle-\\* encoders"):
        PSP.tiny(decoder, restyle_steps=3)
    assert isinstance(E4E.tiny(decoder, restyle_steps=5, extra_pass=False), torch.nn.Module)  # defaults pass through
    inv = RESTYLE_PSP.tiny(decoder, restyle_steps=2, extra_pass=True)
    assert isinstance(inv, ReStyleInverter) and (inv.steps, inv.extra_pass) == (2, True)
