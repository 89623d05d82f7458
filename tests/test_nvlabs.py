"""NVlabs pickle import: restricted unpickling, key mapping, refusal of code-running pickles.

The NVlabs side is built here from scratch: stand-in `torch_utils.persistence`, `dnnlib.util`
and `training.networks` modules, and layers that pickle the way NVlabs' persistent classes
do (`_reconstruct_persistent_obj` with the module source in `meta`). The source planted in
each record would leave a marker file (or exit) if anything ever executed it.
"""

from __future__ import annotations

import builtins
import math
import os
import pickle
import sys
import types

import pytest
import torch

from ipltool.errors import CheckpointError
from ipltool.models.stylegan2 import TINY_CONFIG, GeneratorConfig, build_generator, load_generator
from ipltool.nvlabs import (
    PersistentObject,
    UnsafePickleError,
    _match_channel_layout,
    convert_g_ema,
    import_nvlabs_generator,
    load_nvlabs_pickle,
)

try:
    import numpy as np
except ImportError:  # the numpy-scalar path is then not exercised
    np = None

NVLABS_MODULES = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util", "training", "training.networks")


# ----------------------------------------------------------------------------
# A miniature of the NVlabs code base


def _gain(value: float):
    """NVlabs computes gains with numpy, so its pickles hold numpy float64 scalars."""
    return np.float64(value) if np is not None else value


def _nvlabs_filter() -> torch.Tensor:
    """`upfirdn2d.setup_filter([1, 3, 3, 1])`: outer product, normalised to sum 1."""
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    f = torch.outer(f, f)
    return f / f.sum()


@pytest.fixture
def nvlabs(tmp_path):
    """Fake NVlabs modules, registered only while the `pickle_networks` callable runs."""
    marker = tmp_path / "code-ran"
    module_src = f"import os\nos.system('touch {marker}')\nopen({str(marker)!r}, 'w').close()\nraise SystemExit('code ran')\n"

    def _reconstruct_persistent_obj(meta):  # pragma: no cover - must never be called
        raise AssertionError("the NVlabs reconstruct function ran")

    class EasyDict(dict):
        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name) from None

    class Persistent(torch.nn.Module):
        """Pickles like a `persistence.persistent_class` instance."""

        def __reduce__(self):
            meta = dict(type="class", version=6, module_src=module_src, class_name=type(self).__name__, state=dict(self.__dict__))
            return (_reconstruct_persistent_obj, (meta,))

    class FullyConnectedLayer(Persistent):
        def __init__(self, weight, bias, activation="linear", lr_multiplier=1.0):
            super().__init__()
            self.activation = activation
            self.weight = torch.nn.Parameter(weight.clone())
            self.bias = torch.nn.Parameter(bias.clone())
            self.weight_gain = _gain(lr_multiplier / math.sqrt(weight.shape[1]))
            self.bias_gain = lr_multiplier

    class MappingNetwork(Persistent):
        def __init__(self, layers, w_avg, lr_multiplier, c_dim=0):
            super().__init__()
            self.z_dim = self.w_dim = layers[0][0].shape[1]
            self.c_dim = c_dim
            self.num_layers = len(layers)
            for idx, (weight, bias) in enumerate(layers):
                setattr(self, f"fc{idx}", FullyConnectedLayer(weight, bias, "lrelu", lr_multiplier))
            self.register_buffer("w_avg", w_avg.clone())

    class SynthesisLayer(Persistent):
        def __init__(self, p, resolution, up):
            super().__init__()
            self.resolution, self.up, self.use_noise, self.activation = resolution, up, True, "lrelu"
            self.conv_clamp = 256
            self.register_buffer("resample_filter", _nvlabs_filter())
            self.padding = 1
            self.act_gain = _gain(math.sqrt(2))
            self.affine = FullyConnectedLayer(p["affine.weight"], p["affine.bias"])
            self.weight = torch.nn.Parameter(p["weight"].clone())
            self.register_buffer("noise_const", p["noise_const"].clone())
            self.noise_strength = torch.nn.Parameter(p["noise_strength"].clone())
            self.bias = torch.nn.Parameter(p["bias"].clone())

    class ToRGBLayer(Persistent):
        def __init__(self, p):
            super().__init__()
            self.conv_clamp = 256
            self.affine = FullyConnectedLayer(p["affine.weight"], p["affine.bias"])
            self.weight = torch.nn.Parameter(p["weight"].clone())
            self.bias = torch.nn.Parameter(p["bias"].clone())
            self.weight_gain = _gain(1 / math.sqrt(p["weight"].shape[1]))

    class SynthesisBlock(Persistent):
        def __init__(self, p, resolution, in_channels):
            super().__init__()
            self.in_channels, self.resolution, self.architecture = in_channels, resolution, "skip"
            self.register_buffer("resample_filter", _nvlabs_filter())
            if in_channels == 0:
                self.const = torch.nn.Parameter(p["const"].clone())
            else:
                self.conv0 = SynthesisLayer(p["conv0"], resolution, up=2)
            self.conv1 = SynthesisLayer(p["conv1"], resolution, up=1)
            self.torgb = ToRGBLayer(p["torgb"])

    class SynthesisNetwork(Persistent):
        def __init__(self, blocks, w_dim):
            super().__init__()
            self.w_dim = w_dim
            self.block_resolutions = sorted(blocks)
            self.img_resolution = max(blocks)
            previous = 0
            for res in self.block_resolutions:
                block = SynthesisBlock(blocks[res], res, previous)
                previous = block.conv1.weight.shape[0]
                setattr(self, f"b{res}", block)
            self.num_ws = 2 * int(math.log2(self.img_resolution)) - 2

    class Generator(Persistent):
        def __init__(self, mapping, synthesis, c_dim=0):
            super().__init__()
            self.z_dim = self.w_dim = synthesis.w_dim
            self.c_dim = c_dim
            self.img_resolution, self.img_channels = synthesis.img_resolution, 3
            self._init_kwargs = EasyDict(mapping_kwargs=EasyDict(num_layers=mapping.num_layers), synthesis_kwargs={})
            self.synthesis = synthesis
            self.num_ws = synthesis.num_ws
            self.mapping = mapping

    class Discriminator(Persistent):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 3, 1, 1))

    def register(monkeypatch):
        mods = {name: types.ModuleType(name) for name in NVLABS_MODULES}
        for name, mod in mods.items():
            monkeypatch.setitem(sys.modules, name, mod)
        _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
        _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
        mods["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
        EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
        mods["dnnlib.util"].EasyDict = EasyDict

    def pickle_networks(path, networks: dict, protocol: int | None = None) -> None:
        """`pickle.dump` the way NVlabs' training loop does, then drop the fake modules again."""
        with pytest.MonkeyPatch.context() as mp:
            register(mp)
            with open(path, "wb") as f:
                pickle.dump(networks, f, protocol=protocol)
        assert not any(name in sys.modules for name in NVLABS_MODULES)

    return types.SimpleNamespace(
        marker=marker,
        pickle_networks=pickle_networks,
        Generator=Generator,
        MappingNetwork=MappingNetwork,
        SynthesisNetwork=SynthesisNetwork,
        Discriminator=Discriminator,
    )


def _nvlabs_params_from_ours(state: dict, config: GeneratorConfig) -> tuple[list, dict]:
    """The inverse mapping, written from the NVlabs side: our state dict -> NVlabs layer tensors."""

    def layer(prefix: str, noise: int) -> dict:
        return {
            "weight": state[f"{prefix}.conv.weight"][0],
            "affine.weight": state[f"{prefix}.conv.modulation.weight"],
            "affine.bias": state[f"{prefix}.conv.modulation.bias"],
            "bias": state[f"{prefix}.activate.bias"],
            "noise_strength": state[f"{prefix}.noise.weight"][0],  # 0-dim
            "noise_const": state[f"noises.noise_{noise}"][0, 0],
        }

    def torgb(prefix: str) -> dict:
        return {
            "weight": state[f"{prefix}.conv.weight"][0],
            "affine.weight": state[f"{prefix}.conv.modulation.weight"],
            "affine.bias": state[f"{prefix}.conv.modulation.bias"],
            "bias": state[f"{prefix}.bias"].flatten(),
        }

    mapping = [(state[f"style.{i}.weight"], state[f"style.{i}.bias"]) for i in range(1, config.n_mlp + 1)]
    blocks = {4: {"const": state["input.input"][0], "conv1": layer("conv1", 0), "torgb": torgb("to_rgb1")}}
    for k in range(1, config.log_size - 1):
        blocks[4 * 2**k] = {
            "conv0": layer(f"convs.{2 * k - 2}", 2 * k - 1),
            "conv1": layer(f"convs.{2 * k - 1}", 2 * k),
            "torgb": torgb(f"to_rgbs.{k - 1}"),
        }
    return mapping, blocks


def _random_generator(config: GeneratorConfig):
    """A seeded generator with every tensor perturbed, so no two keys share a value."""
    generator = build_generator(config, seed=0, noise_strength=0.1)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for t in generator.parameters():
            t.add_(torch.randn(t.shape, generator=gen))
    return generator


def _nvlabs_g_ema(nvlabs, generator, c_dim=0):
    state = generator.state_dict()
    config = generator.config
    mapping, blocks = _nvlabs_params_from_ours(state, config)
    w_avg = torch.randn(config.style_dim)
    return nvlabs.Generator(
        nvlabs.MappingNetwork(mapping, w_avg, config.lr_mlp, c_dim=c_dim),
        nvlabs.SynthesisNetwork(blocks, config.style_dim),
        c_dim=c_dim,
    )


@pytest.fixture
def tiny_pickle(nvlabs, tmp_path):
    """An NVlabs-style pickle of a TINY_CONFIG generator; returns (path, our generator, NVlabs G_ema)."""
    generator = _random_generator(TINY_CONFIG)
    g_ema = _nvlabs_g_ema(nvlabs, generator)
    path = tmp_path / "network-snapshot.pkl"
    networks = {"G": g_ema, "D": nvlabs.Discriminator(), "G_ema": g_ema, "training_set_kwargs": {"resolution": 32}}
    nvlabs.pickle_networks(path, networks)
    return path, generator, g_ema


# ----------------------------------------------------------------------------
# Import round trip


def test_import_round_trip(tiny_pickle, nvlabs, tmp_path):
    path, generator, g_ema = tiny_pickle
    out = tmp_path / "imported.pt"
    config = import_nvlabs_generator(path, out)

    # At 32 px the channel multiplier cannot be seen; the importer then records 2.
    assert config == GeneratorConfig(size=32, style_dim=64, n_mlp=2, channel_multiplier=2, channel_max=32, lr_mlp=0.01)
    loaded = load_generator(out)  # strict
    expected = generator.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key

    ckpt = torch.load(out, weights_only=True)
    assert torch.equal(ckpt["latent_avg"], g_ema.mapping.w_avg)
    assert ckpt["config"] == config.to_dict()

    # Same weights, same pictures.
    z = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, _ = generator.eval()(z, randomize_noise=False)
        b, _ = loaded(z, randomize_noise=False)
    assert torch.equal(a, b)

    # Nothing from the file ran, and no NVlabs module was imported.
    assert not nvlabs.marker.exists()
    assert not any(name in sys.modules for name in NVLABS_MODULES)


def test_old_pickle_protocol(nvlabs, tmp_path):
    """Protocol 2 spells bytes with `_codecs.encode` and sets with `__builtin__.set`."""
    generator = _random_generator(TINY_CONFIG)
    path = tmp_path / "proto2.pkl"
    nvlabs.pickle_networks(path, {"G_ema": _nvlabs_g_ema(nvlabs, generator)}, protocol=2)
    import_nvlabs_generator(path, tmp_path / "out.pt")
    got = load_generator(tmp_path / "out.pt").state_dict()
    assert all(torch.equal(got[k], v) for k, v in generator.state_dict().items())
    assert not nvlabs.marker.exists()


def test_stand_ins_and_mapping_facts(tiny_pickle):
    path, _, g_ema = tiny_pickle
    data = load_nvlabs_pickle(path)
    assert set(data) == {"G", "D", "G_ema", "training_set_kwargs"}
    nv = data["G_ema"]
    assert isinstance(nv, PersistentObject) and nv.class_name == "Generator"
    assert (nv.z_dim, nv.w_dim, nv.img_resolution, nv.num_ws) == (64, 64, 32, 8)
    assert nv._init_kwargs.mapping_kwargs.num_layers == 2  # dnnlib.util.EasyDict stand-in
    fc0 = nv.mapping.fc0
    assert fc0.class_name == "FullyConnectedLayer" and fc0.bias_gain == 0.01
    assert isinstance(fc0.weight_gain, float) and fc0.weight_gain == pytest.approx(0.01 / 8)
    assert not any("module_src" in str(v) for v in nv.state)

    config, state = convert_g_ema(nv)
    b4, b8 = g_ema.synthesis.b4, g_ema.synthesis.b8
    assert torch.equal(state["style.1.weight"], g_ema.mapping.fc0.weight)  # no lr rescaling
    assert torch.equal(state["style.2.bias"], g_ema.mapping.fc1.bias)
    assert torch.equal(state["input.input"], b4.const.unsqueeze(0))  # leading batch dim
    assert torch.equal(state["conv1.conv.weight"], b4.conv1.weight.unsqueeze(0))
    assert torch.equal(state["conv1.conv.modulation.bias"], b4.conv1.affine.bias)  # init-1 bias as stored
    assert torch.equal(state["conv1.activate.bias"], b4.conv1.bias)
    assert torch.equal(state["noises.noise_0"], b4.conv1.noise_const.view(1, 1, 4, 4))
    assert torch.equal(state["to_rgb1.bias"], b4.torgb.bias.view(1, 3, 1, 1))
    assert torch.equal(state["convs.0.conv.weight"], b8.conv0.weight.unsqueeze(0))  # unflipped
    assert torch.equal(state["convs.1.noise.weight"], b8.conv1.noise_strength.view(1))
    assert torch.equal(state["noises.noise_2"], b8.conv1.noise_const.view(1, 1, 8, 8))
    assert torch.equal(state["to_rgbs.0.conv.modulation.weight"], b8.torgb.affine.weight)
    assert torch.equal(state["to_rgbs.0.upsample.kernel"], 4 * _nvlabs_filter())
    assert torch.equal(state["convs.4.conv.blur.kernel"], 4 * _nvlabs_filter())


@pytest.mark.parametrize(
    "channel_base, channel_max, size, expected",
    [
        (32768, 512, 1024, (2, 512)),  # ffhq, metfaces, afhq "paper512"
        (16384, 512, 256, (1, 512)),  # "auto" config below 512 px
        (16384, 512, 512, (1, 512)),
        (32768, 512, 64, (2, 512)),
        (1024, 32, 32, (2, 32)),  # capped everywhere: multiplier unseen, 2 recorded
    ],
)
def test_channel_layout(channel_base, channel_max, size, expected):
    """NVlabs channels are min(channel_base // res, channel_max); config-f is base 32768."""
    observed = {2**i: min(channel_base // 2**i, channel_max) for i in range(2, int(math.log2(size)) + 1)}
    assert _match_channel_layout(size, observed) == expected


def test_channel_layout_without_equivalent():
    observed = {2**i: min(8192 // 2**i, 512) for i in range(2, 9)}  # 64 px gets 128 channels
    with pytest.raises(CheckpointError, match="channel layout"):
        _match_channel_layout(256, observed)


def test_conditional_generator_refused(nvlabs, tmp_path):
    g_ema = _nvlabs_g_ema(nvlabs, _random_generator(TINY_CONFIG), c_dim=10)
    path = tmp_path / "cond.pkl"
    nvlabs.pickle_networks(path, {"G_ema": g_ema})
    with pytest.raises(CheckpointError, match="conditional"):
        import_nvlabs_generator(path, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_extra_tensors_refused(nvlabs, tmp_path):
    g_ema = _nvlabs_g_ema(nvlabs, _random_generator(TINY_CONFIG))
    g_ema.synthesis.b8.register_buffer("skip_weight", torch.zeros(1))  # e.g. a resnet skip
    path = tmp_path / "extra.pkl"
    nvlabs.pickle_networks(path, {"G_ema": g_ema})
    with pytest.raises(CheckpointError, match="no place for"):
        import_nvlabs_generator(path, tmp_path / "out.pt")


# ----------------------------------------------------------------------------
# Refusals


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Eval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (builtins.eval, (self.code,))


class _EvilStorage:
    """A tensor-storage record whose embedded bytes call os.system."""

    def __init__(self, command):
        self.payload = pickle.dumps(_System(command), protocol=2)

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.payload,))


@pytest.mark.parametrize(
    "make, refused",
    [
        (lambda cmd: _System(cmd), "system"),
        (lambda cmd: {"G_ema": [_System(cmd)]}, "system"),
        (lambda cmd: _Eval(f"__import__('os').system({cmd!r})"), "builtins.eval"),
        (lambda cmd: {"G_ema": _EvilStorage(cmd)}, "system"),
    ],
)
def test_code_running_pickle_refused(tmp_path, make, refused):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(make(f"echo pwned > {marker}")))
    with pytest.raises(UnsafePickleError, match=refused) as info:
        load_nvlabs_pickle(path)
    assert info.value.exit_code == 2 and info.value.hint
    assert not marker.exists()


def test_allowed_callable_with_bad_arguments(tmp_path):
    """An allowed name cannot be steered into anything but building a tensor."""

    class Bogus:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, ("not a storage", 0, (2,), (1,), False, None))

    path = tmp_path / "bogus.pkl"
    path.write_bytes(pickle.dumps({"G_ema": Bogus()}))
    with pytest.raises(CheckpointError, match="storage"):
        load_nvlabs_pickle(path)


def test_tensor_out_of_storage_bounds(tmp_path):
    class Overreach:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (torch.zeros(4).storage(), 0, (100,), (1,), False, None))

    path = tmp_path / "overreach.pkl"
    path.write_bytes(pickle.dumps({"G_ema": Overreach()}))
    with pytest.raises(CheckpointError, match="storage of 4"):
        load_nvlabs_pickle(path)


def test_pickle_cannot_patch_allowed_classes(tmp_path):
    """BUILD on an allowed class (here: replace EasyDict.__getattr__) is refused."""
    path = tmp_path / "patch.pkl"
    path.write_bytes(b"\x80\x02cdnnlib.util\nEasyDict\nN}X\x0b\x00\x00\x00__getattr__Ns\x86b.")
    with pytest.raises(UnsafePickleError, match="modify class"):
        load_nvlabs_pickle(path)


def test_tensorflow_pickle_refused(tmp_path):
    path = tmp_path / "tf.pkl"
    path.write_bytes(b"\x80\x02cdnnlib.tflib.network\nNetwork\nq\x00)\x81q\x01.")
    with pytest.raises(CheckpointError, match="TensorFlow") as info:
        load_nvlabs_pickle(path)
    assert not isinstance(info.value, UnsafePickleError)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "missing", "not-a-dict", "no-g-ema"])
def test_unreadable_files(tiny_pickle, tmp_path, kind):
    path = tmp_path / f"{kind}.pkl"
    if kind == "truncated":
        data = tiny_pickle[0].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not-a-dict":
        path.write_bytes(pickle.dumps([1, 2, 3]))
    elif kind == "no-g-ema":
        path.write_bytes(pickle.dumps({"G": 1, "D": 2}))
    with pytest.raises(CheckpointError) as info:
        import_nvlabs_generator(path, tmp_path / "out.pt")
    assert "\n" not in info.value.message
    assert not (tmp_path / "out.pt").exists()
