"""The model registry and how a domain's generator is found."""

import pytest
import torch

from ipltool import hub
from ipltool.errors import UnknownNameError, UsageError
from ipltool.models.stylegan2 import TINY_CONFIG, GeneratorConfig, build_generator, generator_checkpoint


def test_registry_entries():
    names = {e.name for e in hub.list_models("generator")}
    assert {"tiny", "stylegan2-ffhq-1024", "stylegan2-afhqdog-512"} <= names
    ffhq = hub.get_model("stylegan2-ffhq-1024")
    assert ffhq.generator_config() == GeneratorConfig(1024)
    assert "bae494ef77e32a9cd1792a81a3c167692a0e64f6bcd8b06592ff42917e2ed46e" in ffhq.sha256
    with pytest.raises(UnknownNameError, match="unknown model 'nope'"):
        hub.get_model("nope")


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("IPL_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"
    assert hub.local_path("stylegan2-ffhq-1024") == tmp_path / "c" / "stylegan2-ffhq-config-f.pt"


def test_generator_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("IPL_CACHE", str(tmp_path))
    tiny = hub.load_generator_by_name("tiny")
    assert tiny.size == 32 and not any(p.requires_grad for p in tiny.parameters())
    assert float(tiny.conv1.noise.weight) == pytest.approx(0.1)
    with pytest.raises(UsageError, match="not in the cache") as info:
        hub.load_generator_by_name("stylegan2-ffhq-1024")
    assert "stylegan2-ffhq-config-f.pt" in info.value.message and "ipl fetch stylegan2-ffhq-1024" in info.value.hint
    # A registry name whose file was put in the cache loads with the registry's architecture.
    mini = hub.ModelEntry(name="mini", kind="generator", description="", file="mini.pt", arch=TINY_CONFIG.to_dict())
    entries = {**hub._registry(), "mini": mini}
    monkeypatch.setattr(hub, "_registry", lambda: entries)
    g = build_generator(TINY_CONFIG, seed=4)
    torch.save(generator_checkpoint(g), tmp_path / "mini.pt")
    loaded = hub.load_generator_by_name("mini")
    assert torch.equal(loaded.input.input, g.input.input)
    path = tmp_path / "other.pt"
    torch.save({"g_ema": g.state_dict()}, path)
    assert torch.equal(hub.load_generator_by_name(str(path)).input.input, g.input.input)
    with pytest.raises(UsageError, match="not found"):
        hub.load_generator_by_name(str(tmp_path / "missing.pt"))
