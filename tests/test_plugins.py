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
