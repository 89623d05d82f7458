"""The model registry and how a domain's generator is found."""

import pytest
import torch

from ipltool import hub, paths
from ipltool.errors import UnknownNameError, UsageError
from ipltool.models.stylegan2 import TINY_CONFIG, GeneratorConfig, build_generator, generator_checkpoint, load_source_generator


def test_registry_entries():
    names = {e.name for e in hub.list_models("generator")}
    assert {"tiny", "stylegan2-ffhq-1024", "stylegan2-afhqdog-512"} <= names
    ffhq = hub.get_model("stylegan2-ffhq-1024")
    assert GeneratorConfig.of_entry(ffhq) == GeneratorConfig(1024)
    assert "bae494ef77e32a9cd1792a81a3c167692a0e64f6bcd8b06592ff42917e2ed46e" in ffhq.sha256
    with pytest.raises(UnknownNameError, match="unknown model 'nope'"):
        hub.get_model("nope")
    with pytest.raises(UnknownNameError, match="'clip-vit-b32' is a clip, not a generator"):
        GeneratorConfig.of_entry(hub.get_model("clip-vit-b32"))


def test_entries_can_be_added_and_removed():
    mini = hub.ModelEntry(name="mini", kind="generator", description="a test entry", file="mini.pt", arch=TINY_CONFIG.to_dict())
    hub.add_model(mini)
    try:
        assert hub.get_model("mini") is mini and mini in hub.list_models("generator")
        with pytest.raises(UsageError, match="already has an entry named 'mini'"):
            hub.add_model(mini)
        with pytest.raises(UsageError, match="already has an entry named 'tiny'"):
            hub.add_model(mini.model_copy(update={"name": "tiny"}))
    finally:
        assert hub.remove_model("mini") is mini
    with pytest.raises(UnknownNameError, match="unknown model 'mini'"):
        hub.remove_model("mini")
    assert hub.get_model("tiny").synthetic  # the shipped entries are untouched


def test_clip_entries_are_found_by_open_clip_name():
    assert hub.clip_entry("ViT-B-32", "openai").name == "clip-vit-b32"
    assert hub.clip_entry("ViT-B-32", "laion2b_s34b_b79k") is None


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("IPL_CACHE", str(tmp_path / "c"))
    assert paths.cache_dir() == tmp_path / "c"
    assert hub.local_path("stylegan2-ffhq-1024") == tmp_path / "c" / "stylegan2-ffhq-config-f.pt"


def test_generator_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("IPL_CACHE", str(tmp_path))
    tiny = load_source_generator("tiny")
    assert tiny.size == 32 and not any(p.requires_grad for p in tiny.parameters())
    assert float(tiny.conv1.noise.weight) == pytest.approx(0.1)
    with pytest.raises(UsageError, match="not in the cache") as info:
        load_source_generator("stylegan2-ffhq-1024")
    assert "stylegan2-ffhq-config-f.pt" in info.value.message and "ipl fetch stylegan2-ffhq-1024" in info.value.hint
    # A registry name whose file was put in the cache loads with the registry's architecture.
    mini = hub.ModelEntry(name="mini", kind="generator", description="", file="mini.pt", arch=TINY_CONFIG.to_dict())
    g = build_generator(TINY_CONFIG, seed=4)
    torch.save(generator_checkpoint(g), tmp_path / "mini.pt")
    hub.add_model(mini)
    try:
        loaded = load_source_generator("mini")
    finally:
        hub.remove_model("mini")
    assert torch.equal(loaded.input.input, g.input.input)
    path = tmp_path / "other.pt"
    torch.save({"g_ema": g.state_dict()}, path)
    assert torch.equal(load_source_generator(str(path)).input.input, g.input.input)
    with pytest.raises(UsageError, match="not found"):
        load_source_generator(str(tmp_path / "missing.pt"))
