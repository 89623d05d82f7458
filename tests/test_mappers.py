"""The IPL latent mappers: shapes, parameter counts, the forward pass by hand, options."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from ipltool.errors import CheckpointError, UsageError
from ipltool.models.layers import EqualLinear
from ipltool.models.mappers import (
    MLPMapper,
    TransformerMapperV2,
    build_mlp_mapper,
    build_transformer_v2_mapper,
    load_mapper,
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


# ----------------------------------------------------------------------------
# Foreign mapper files: the IPL authors' mapper.pt and bare state dicts


def _trained_mlp(n_ctx: int = N_CTX, dim: int = DIM, latent_dim: int = LATENT) -> MLPMapper:
    torch.manual_seed(1)
    mapper = MLPMapper(n_ctx, dim, latent_dim)
    with torch.no_grad():
        for layer in mapper.mapping[1:]:
            layer.bias.normal_()  # zero biases would hide a layer loaded into the wrong slot
    return mapper.eval()


def save_official(path, mapper: MLPMapper, optimizer: bool = True) -> None:
    """Save `mapper` as the authors' train.py does: `{"m": SingleMapper.state_dict(), "m_optim": ...}`."""
    state = {f"mapping.{key}": value for key, value in mapper.state_dict().items()}  # SingleMapper.mapping
    assert sorted(state) == sorted(f"mapping.mapping.{i}.{p}" for i in range(1, 5) for p in ("weight", "bias"))
    ckpt = {"m": state}
    if optimizer:
        adam = torch.optim.Adam(mapper.parameters(), lr=0.005)
        mapper(torch.randn(2, mapper.latent_dim)).sum().backward()
        adam.step()  # moments in the state, as after training; the weights moved too
        ckpt["m"] = {f"mapping.{key}": value for key, value in mapper.state_dict().items()}
        ckpt["m_optim"] = adam.state_dict()
    torch.save(ckpt, path)


def _one_line(err: pytest.ExceptionInfo, *parts: str) -> None:
    message = err.value.message
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message


@pytest.mark.parametrize("optimizer", [True, False], ids=["with-m_optim", "m-only"])
def test_the_authors_mapper_file_loads_with_identical_outputs(tmp_path, optimizer):
    mapper = _trained_mlp()
    save_official(tmp_path / "mapper.pt", mapper, optimizer)
    loaded, ckpt = load_mapper(tmp_path / "mapper.pt", dim=DIM)
    w = torch.randn(5, LATENT)
    assert torch.equal(loaded(w), mapper(w))
    assert isinstance(loaded, MLPMapper) and not loaded.training
    assert ckpt["format"] == "ipl-official" and ckpt["kind"] == "mlp"
    assert ckpt["init_args"] == {"n_ctx": N_CTX, "dim": DIM, "latent_dim": LATENT}
    assert all(ckpt[key] is None for key in ("ctx_init", "source", "target", "clip", "optimizer"))
    # n_ctx alone splits the outputs too
    loaded, ckpt = load_mapper(tmp_path / "mapper.pt", n_ctx=N_CTX)
    assert ckpt["init_args"]["dim"] == DIM and torch.equal(loaded(w), mapper(w))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {f"mapping.{k}": v for k, v in sd.items()},  # SingleMapper's, without "m"
        lambda sd: sd,  # MLPMapper's own keys
        lambda sd: {"m": sd},
    ],
    ids=["prefixed", "bare", "bare-under-m"],
)
def test_bare_mlp_state_dicts_load(tmp_path, wrap):
    mapper = _trained_mlp()
    torch.save(wrap(mapper.state_dict()), tmp_path / "sd.pt")
    loaded, ckpt = load_mapper(tmp_path / "sd.pt", n_ctx=N_CTX, dim=DIM)
    w = torch.randn(3, LATENT)
    assert ckpt["kind"] == "mlp" and torch.equal(loaded(w), mapper(w))


@pytest.mark.parametrize("prefixed", [False, True], ids=["bare", "singlemapper-m"])
def test_a_transformer_v2_state_dict_loads_with_inferred_sizes(tmp_path, prefixed):
    torch.manual_seed(2)
    mapper = TransformerMapperV2(N_CTX, DIM, LATENT).eval()
    state = mapper.state_dict()
    torch.save({"m": {f"mapping.{k}": v for k, v in state.items()}} if prefixed else state, tmp_path / "t.pt")
    loaded, ckpt = load_mapper(tmp_path / "t.pt", dim=DIM)
    assert isinstance(loaded, TransformerMapperV2)
    assert ckpt["format"] == "state-dict" and ckpt["kind"] == "transformer-v2"
    assert ckpt["init_args"] == {"n_ctx": N_CTX, "dim": DIM, "latent_dim": LATENT, "nhead": 4, "per_sample": False}
    w = torch.randn(6, LATENT)
    assert torch.equal(loaded(w), mapper(w))


@pytest.mark.parametrize(
    "sizes, expected, message",
    [
        ((N_CTX + 1, DIM), {"n_ctx": N_CTX, "dim": DIM}, f"maps to {N_CTX + 1} context vectors of width {DIM}; this run's ctx_init has n_ctx {N_CTX}"),
        ((N_CTX, 5), {"n_ctx": N_CTX, "dim": DIM}, f"has {N_CTX * 5} outputs, not a multiple of this run's prompt width {DIM}"),
        ((N_CTX, 5), {"n_ctx": 3}, f"has {N_CTX * 5} outputs, not a multiple of this run's n_ctx 3"),
        ((N_CTX, DIM), {}, f"{N_CTX * DIM} outputs (n_ctx x dim), which a file without init_args cannot split"),
    ],
    ids=["n_ctx", "dim", "n_ctx-only", "neither"],
)
def test_an_official_file_of_other_sizes_is_refused_in_one_line(tmp_path, sizes, expected, message):
    save_official(tmp_path / "mapper.pt", _trained_mlp(*sizes))
    with pytest.raises(CheckpointError) as err:
        load_mapper(tmp_path / "mapper.pt", **expected)
    _one_line(err, "mapper.pt", message)
    assert err.value.hint


def test_the_n_ctx_refusal_explains_words_against_tokens(tmp_path):
    save_official(tmp_path / "mapper.pt", _trained_mlp(N_CTX + 1, DIM))
    with pytest.raises(CheckpointError) as err:
        load_mapper(tmp_path / "mapper.pt", n_ctx=N_CTX, dim=DIM)
    assert "words of ctx_init" in err.value.hint and "BPE tokens" in err.value.hint


def _official_state(**edits) -> dict:
    state = {f"mapping.{k}": v.clone() for k, v in _trained_mlp().state_dict().items()}
    for key, value in edits.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


@pytest.mark.parametrize(
    "ckpt, message",
    [
        ({"weights": torch.zeros(3)}, "is not a mapper file ipltool reads (it holds weights); accepted: ipltool's mapper.pt"),
        ({"m": {"layer.weight": torch.zeros(2, 2)}}, "is not a mapper file ipltool reads"),
        ({"g_ema": {"style.1.weight": torch.zeros(2, 2)}, "args": 1}, "(it holds g_ema, args)"),
        ({}, "(it holds nothing)"),
        ({"m": [torch.zeros(2)]}, "the mapper state dict ('m') is a list, not a dict of tensors"),
        ({"m": {"mapping.mapping.4.weight": "w"}}, "entry 'mapping.mapping.4.weight' is a str, not a tensor"),
        ({"m": _official_state(**{"mapping.mapping.1.weight": None})}, "'mlp' mapper: mapping.1.weight is missing"),
        ({"m": _official_state(**{"mapping.mapping.4.weight": torch.zeros(N_CTX * DIM)})}, "mapping.4.weight is of shape [32], not an (out, in) matrix"),
        ({"m": _official_state(**{"mapping.mapping.2.weight": torch.zeros(LATENT, 7)})}, "does not fit a 'mlp' mapper: 1 wrong shape (first: mapping.2.weight is [32, 7], expected [32, 32])"),
        ({"m": _official_state(**{"mapping.mapping.5.weight": torch.zeros(1)})}, "does not fit a 'mlp' mapper: 1 unexpected (first: mapping.5.weight)"),
        ({"m": _official_state(**{"mapping.mapping.1.bias": torch.full((LATENT,), math.nan)})}, "non-finite weights (NaN or inf), first in m.mapping.mapping.1.bias"),
        ({"m": _official_state(**{"mapping.mapping.1.weight": torch.zeros(LATENT, 4096)})}, "inferred latent_dim = 4096 is outside the range"),
    ],
    ids=[
        "tensor", "unknown-keys", "generator", "empty", "m-list", "m-str", "missing-layer", "vector-layer",
        "wrong-shape", "extra-key", "nan", "huge-latent",
    ],
)
def test_garbage_layouts_are_refused_in_one_line(tmp_path, ckpt, message):
    torch.save(ckpt, tmp_path / "mapper.pt")
    with pytest.raises(CheckpointError) as err:
        load_mapper(tmp_path / "mapper.pt", n_ctx=N_CTX, dim=DIM)
    _one_line(err, "mapper.pt", message)


def test_a_transformer_state_dict_no_default_nhead_divides_is_refused(tmp_path):
    mapper = TransformerMapperV2(N_CTX, DIM, latent_dim=30, nhead=3)
    torch.save(mapper.state_dict(), tmp_path / "t.pt")
    with pytest.raises(CheckpointError) as err:
        load_mapper(tmp_path / "t.pt", dim=DIM)
    _one_line(err, "t.pt", "latent_dim 30 needs the nhead it was trained with", "the default 4 does not divide 30")


def test_ipltool_mapper_files_say_their_format(tmp_path):
    from ipltool import registry

    mapper = registry.build_mapper("mlp", N_CTX, DIM, LATENT)
    torch.save({"kind": "mlp", "init_args": dict(mapper.init_args), "state_dict": mapper.state_dict()}, tmp_path / "m.pt")
    _, ckpt = load_mapper(tmp_path / "m.pt", n_ctx=N_CTX + 1)  # sizes come from init_args, not the caller
    assert ckpt["format"] == "ipltool" and ckpt["init_args"]["n_ctx"] == N_CTX
