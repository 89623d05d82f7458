"""The IPL latent mappers: shapes, parameter counts, the forward pass by hand, options."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from ipltool.errors import UsageError
from ipltool.models.layers import EqualLinear
from ipltool.models.mappers import (
    MLPMapper,
    TransformerMapperV2,
    build_mlp_mapper,
    build_transformer_v2_mapper,
)

N_CTX, DIM, LATENT = 4, 8, 32


@pytest.mark.parametrize("factory", [build_mlp_mapper, build_transformer_v2_mapper])
def test_output_shape(factory):
    mapper = factory(N_CTX, DIM, latent_dim=LATENT)
    out = mapper(torch.randn(5, LATENT))
    assert out.shape == (5, N_CTX, DIM)


def test_default_latent_dim_is_512():
    mapper = build_mlp_mapper(4, 16)
    assert mapper.init_args == {"n_ctx": 4, "dim": 16, "latent_dim": 512}
    assert mapper(torch.randn(2, 512)).shape == (2, 4, 16)


def test_mlp_parameter_count():
    mapper = build_mlp_mapper(N_CTX, DIM, latent_dim=LATENT)
    L, out = LATENT, N_CTX * DIM
    expected = 3 * (L * L + L) + (L * out + out)
    assert sum(p.numel() for p in mapper.parameters()) == expected


def test_transformer_parameter_count():
    mapper = build_transformer_v2_mapper(N_CTX, DIM, latent_dim=LATENT)
    L, ff, out = LATENT, 1024, N_CTX * DIM
    # in_proj (3L x L + 3L), out_proj, two feed-forward linears, two layer norms.
    per_layer = (3 * L * L + 3 * L) + (L * L + L) + (L * ff + ff) + (ff * L + L) + 2 * (2 * L)
    expected = 2 * per_layer + (L * L + L) + (L * out + out)
    assert sum(p.numel() for p in mapper.parameters()) == expected


def test_mlp_forward_matches_hand_computation():
    torch.manual_seed(0)
    mapper = build_mlp_mapper(2, 3, latent_dim=6)
    with torch.no_grad():
        for layer in mapper.mapping[1:]:
            layer.bias.normal_()  # non-zero biases so their lr_mul scaling is exercised
    w = torch.randn(4, 6)

    x = w / torch.sqrt((w * w).mean(dim=1, keepdim=True) + 1e-8)
    for layer in mapper.mapping[1:]:
        weight = layer.weight * (0.01 / math.sqrt(layer.weight.shape[1]))
        h = x @ weight.t() + layer.bias * 0.01
        x = torch.where(h >= 0, h, 0.2 * h) * math.sqrt(2.0)
    expected = x.reshape(4, 2, 3)

    torch.testing.assert_close(mapper(w), expected, rtol=1e-5, atol=1e-6)


def test_mlp_output_layer_is_activated():
    mapper = build_mlp_mapper(N_CTX, DIM, latent_dim=LATENT)
    last = mapper.mapping[-1]
    assert isinstance(last, EqualLinear) and last.activation == "fused_lrelu"


def test_equal_linear_init_statistics():
    torch.manual_seed(0)
    mapper = build_mlp_mapper(N_CTX, DIM, latent_dim=256)
    weight = mapper.mapping[1].weight
    assert abs(weight.std().item() - 1 / 0.01) < 2.0  # N(0, 1) / lr_mul
    assert abs(weight.mean().item()) < 1.0
    assert torch.count_nonzero(mapper.mapping[1].bias) == 0
    # At run time the effective weight has std lr_mul / sqrt(fan_in) * (1 / lr_mul).
    effective = weight * mapper.mapping[1].scale
    assert abs(effective.std().item() - 1 / math.sqrt(256)) < 0.01


def test_transformer_across_batch_vs_per_sample():
    torch.manual_seed(0)
    batch_mode = build_transformer_v2_mapper(N_CTX, DIM, latent_dim=LATENT).eval()
    per_sample = build_transformer_v2_mapper(N_CTX, DIM, latent_dim=LATENT, per_sample=True).eval()
    per_sample.load_state_dict(batch_mode.state_dict())  # same parameters in both modes

    w = torch.randn(4, LATENT)
    w_other = w.clone()
    w_other[1:] = torch.randn(3, LATENT)
    with torch.no_grad():
        # per_sample: sample 0 ignores its batch-mates, and equals its batch-of-one output.
        torch.testing.assert_close(per_sample(w)[0], per_sample(w_other)[0])
        torch.testing.assert_close(per_sample(w)[0], per_sample(w[:1])[0])
        # across the batch (the thesis quirk): sample 0 attends to the others.
        assert not torch.allclose(batch_mode(w)[0], batch_mode(w_other)[0], atol=1e-4)
        # A batch of one is the same computation in both modes.
        torch.testing.assert_close(batch_mode(w[:1]), per_sample(w[:1]))


def test_init_args_rebuild_the_mapper():
    for factory, options in ((build_mlp_mapper, {}), (build_transformer_v2_mapper, {"nhead": 2, "per_sample": True})):
        mapper = factory(N_CTX, DIM, latent_dim=LATENT, **options)
        rebuilt = factory(**mapper.init_args)
        assert rebuilt.kind == mapper.kind
        assert rebuilt.init_args == mapper.init_args
        rebuilt.load_state_dict(mapper.state_dict())
    assert MLPMapper.kind == "mlp" and TransformerMapperV2.kind == "transformer-v2"


def test_gradients_reach_the_mapper():
    mapper = build_transformer_v2_mapper(N_CTX, DIM, latent_dim=LATENT)
    mapper(torch.randn(3, LATENT)).square().sum().backward()
    assert all(p.grad is not None for p in mapper.parameters())


@pytest.mark.parametrize(
    "factory, kwargs, match",
    [
        (build_mlp_mapper, {"nhead": 4}, "unknown option"),
        (build_transformer_v2_mapper, {"heads": 4}, "unknown option"),
        (build_transformer_v2_mapper, {"nhead": 3}, "not divisible"),
        (build_transformer_v2_mapper, {"nhead": 0}, "nhead"),
        (build_transformer_v2_mapper, {"per_sample": "yes"}, "per_sample"),
        (build_mlp_mapper, {"latent_dim": 0}, "latent_dim"),
    ],
)
def test_bad_options_raise_usage_error(factory, kwargs, match):
    options = {"latent_dim": LATENT, **kwargs}
    with pytest.raises(UsageError, match=match) as info:
        factory(N_CTX, DIM, **options)
    assert info.value.message


def test_bad_option_names_the_accepted_ones():
    with pytest.raises(UsageError) as info:
        build_transformer_v2_mapper(N_CTX, DIM, latent_dim=LATENT, nheads=4)
    assert "nhead" in info.value.hint and "per_sample" in info.value.hint


def test_fused_activation_on_negative_inputs():
    # Guards the hand formula above: leaky slope 0.2 and gain sqrt(2).
    layer = EqualLinear(1, 1, lr_mul=1.0, activation="fused_lrelu")
    with torch.no_grad():
        layer.weight.fill_(1.0)
    x = torch.tensor([[-1.0], [2.0]])
    torch.testing.assert_close(layer(x), F.leaky_relu(x, 0.2) * math.sqrt(2.0))
