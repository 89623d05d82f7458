"""Entry-point plugins: built-ins and the example third-party package in plugins/."""

import json

import pytest
import torch

from ipltool import registry
from ipltool.domain import find_domain, load_domain
from ipltool.errors import DomainError, UnknownNameError

EXAMPLE = "ipl-example-plugin"


@pytest.fixture
def with_example(monkeypatch):
    monkeypatch.setenv("IPL_PLUGINS", EXAMPLE)


def test_builtin_mappers_register_through_the_entry_point_group():
    mappers = {p.name: p for p in registry.plugins("mappers")}
    assert {"mlp", "transformer-v2"} <= set(mappers)
    assert mappers["mlp"].builtin and mappers["mlp"].dist == "ipltool"
    assert "linear" not in mappers  # third parties are off under IPL_PLUGINS=""


def test_example_plugin_mapper_through_entry_points(with_example):
    assert "linear" in registry.names("mappers")
    mapper = registry.build_mapper("linear", n_ctx=4, dim=16, latent_dim=32)
    out = mapper(torch.randn(3, 32))
    assert out.shape == (3, 4, 16)
    assert type(mapper).__module__ == "ipl_example_plugin.mapper"
    assert mapper.init_args == {"n_ctx": 4, "dim": 16, "latent_dim": 32, "lr_mul": 0.01}


def test_example_plugin_domain_pack(with_example):
    entry = find_domain("pencil-sketch")
    assert entry.origin == "plugin" and EXAMPLE in entry.provider
    d = load_domain("pencil-sketch")
    assert d.target == "pencil sketch" and d.mapper.kind == "linear"
    assert load_domain("zombie").target == "zombie"


def test_plugins_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("IPL_PLUGINS", "")
    with pytest.raises(DomainError, match="unknown domain 'zombie'"):
        find_domain("zombie")
    monkeypatch.delenv("IPL_PLUGINS")  # unset: every installed plugin loads
    assert find_domain("zombie").origin == "plugin"


def test_user_dir_shadows_plugin_domains(with_example, tmp_path):
    user = tmp_path / "user-domains"
    user.mkdir(exist_ok=True)
    (user / "zombie.toml").write_text('name = "zombie"\nsource = "photo"\ntarget = "my zombie"\ngenerator = "tiny"\n')
    assert load_domain("zombie").target == "my zombie"


def test_unknown_names_list_what_is_installed(with_example):
    with pytest.raises(UnknownNameError) as info:
        registry.build_mapper("resnet-mapper", n_ctx=4, dim=8, latent_dim=8)
    # The message says what is wrong (and the closest name), the hint lists what is installed.
    assert info.value.message == "unknown mapper 'resnet-mapper'"
    assert info.value.hint.startswith("installed: mlp, transformer-v2, linear;")
    with pytest.raises(UnknownNameError) as info:
        registry.load("encoders", "e5e")
    assert info.value.message == "unknown encoder 'e5e' — did you mean 'e4e'?"
    assert info.value.hint.startswith("installed: e4e, psp, restyle-e4e, restyle-psp;")


def test_plugins_command_lists_both(run_cli, with_example):
    code, out, _ = run_cli("plugins", "--json")
    assert code == 0
    rows = {(r["kind"], r["name"]): r for r in json.loads(out)}
    assert rows[("mappers", "mlp")]["builtin"] is True
    assert rows[("mappers", "linear")]["distribution"] == EXAMPLE
    assert rows[("domains", "example-pack")]["builtin"] is False


def test_broken_plugin_is_reported(monkeypatch):
    from importlib import metadata

    fake = metadata.EntryPoint(name="broken", value="no_such_module_xyz:factory", group="ipltool.mappers")
    real = metadata.entry_points

    def entry_points(group=None, **kw):
        found = list(real(group=group, **kw))
        return found + [fake] if group == "ipltool.mappers" else found

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    monkeypatch.delenv("IPL_PLUGINS")
    from ipltool.errors import PluginError

    with pytest.raises(PluginError, match="mapper plugin 'broken' .* failed to load: ModuleNotFoundError"):
        registry.load("mappers", "broken")


# Objects for the contract tests below, loaded through fake entry points.
NOT_A_FACTORY = 42


class NoLoad:
    """An encoder plugin object without load()."""

    default_weights = None


class LoadOnly:
    """An encoder plugin object with load() but no tiny()."""

    def load(self, path, device="cpu", **options):
        return path


NO_LOAD, LOAD_ONLY = NoLoad(), LoadOnly()


def _fake_entry_points(monkeypatch, group: str, name: str, target: str):
    from importlib import metadata

    fake = metadata.EntryPoint(name=name, value=f"test_plugins:{target}", group=group)
    real = metadata.entry_points

    def entry_points(group_=None, **kw):
        group_ = kw.pop("group", group_)
        found = list(real(group=group_, **kw))
        return found + [fake] if group_ == group else found

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    monkeypatch.delenv("IPL_PLUGINS")


def test_a_mapper_plugin_that_is_not_callable_is_refused_when_it_loads(monkeypatch):
    from ipltool.errors import PluginError

    _fake_entry_points(monkeypatch, "ipltool.mappers", "number", "NOT_A_FACTORY")
    with pytest.raises(PluginError, match=r"mapper plugin 'number' .*\(test_plugins:NOT_A_FACTORY\) is not callable: .*MapperFactory"):
        registry.load("mappers", "number")


def test_an_encoder_plugin_without_load_is_refused_naming_the_method(monkeypatch):
    from ipltool.errors import PluginError

    _fake_entry_points(monkeypatch, "ipltool.encoders", "noload", "NO_LOAD")
    with pytest.raises(PluginError, match=r"encoder plugin 'noload' .* has no load\(\) method: .*EncoderLoader"):
        registry.load("encoders", "noload")


def test_an_optional_method_is_asked_for_by_what_needs_it(monkeypatch, run_cli, tmp_path):
    _fake_entry_points(monkeypatch, "ipltool.encoders", "loadonly", "LOAD_ONLY")
    obj = registry.load("encoders", "loadonly")  # load() is all the contract requires
    assert registry.optional_method("encoders", "loadonly", obj, "load", "stylizing") == obj.load
    photo = tmp_path / "face.png"
    from PIL import Image

    Image.new("RGB", (64, 64), "gray").save(photo)
    code, out, err = run_cli("stylize", str(photo), "--smoke", "--no-align", "--encoder", "loadonly", "--out", str(tmp_path / "out"))
    assert code != 0
    assert "encoder plugin 'loadonly'" in err and "has no tiny() method, which --smoke needs" in err
