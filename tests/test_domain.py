"""Domain files: schema, defaults, error messages, lookup order, overrides."""

import sys
from pathlib import Path

import pytest

from ipltool.domain import (
    Domain,
    builtin_domain_dir,
    discover_domains,
    find_domain,
    load_domain,
    load_domain_file,
    parse_domain,
)
from ipltool.errors import DomainError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PAPER_DOMAINS = {
    "disney": ("photo", "disney", "stylegan2-ffhq-1024"),
    "anime-painting": ("photo", "anime painting", "stylegan2-ffhq-1024"),
    "wall-painting": ("photo", "wall painting", "stylegan2-ffhq-1024"),
    "ukiyo-e": ("photo", "ukiyo-e", "stylegan2-ffhq-1024"),
    "pixar-character": ("photo", "pixar character", "stylegan2-ffhq-1024"),
    "tolkien-elf": ("human", "tolkien elf", "stylegan2-ffhq-1024"),
    "werewolf": ("photo", "werewolf", "stylegan2-ffhq-1024"),
    "dog-cartoon": ("photo", "cartoon", "stylegan2-afhqdog-512"),
    "dog-pointillism": ("photo", "pointillism", "stylegan2-afhqdog-512"),
    "dog-cubism": ("photo", "cubism", "stylegan2-afhqdog-512"),
}

MINIMAL = 'name = "{name}"\nsource = "photo"\ntarget = "{target}"\ngenerator = "tiny"\n'


def test_builtin_paper_domains_carry_the_reference_settings():
    for name, (source, target, generator) in PAPER_DOMAINS.items():
        d = load_domain(name)
        assert (d.source, d.target, d.generator) == (source, target, generator), name
        assert d.ctx_init == "a photo of a"
        assert [(c.model, c.pretrained, c.weight) for c in d.clip] == [("ViT-B/32", "openai", 1.0)]
        assert (d.mapper.kind, d.mapper.steps, d.mapper.batch, d.mapper.lr, d.mapper.seed) == ("mlp", 300, 32, 0.05, 3)
        assert (d.adapt.steps, d.adapt.batch, d.adapt.lr, d.adapt.ema, d.adapt.seed) == (300, 2, 0.002, 0.99, 2)
        assert (d.adapt.auto_layer_iters, d.adapt.auto_layer_batch, d.adapt.n_sample, d.adapt.truncation) == (1, 8, 35, 0.7)
        assert (d.loss.lambda_l, d.loss.lambda_src, d.loss.lambda_direction) == (1.0, 0.0, 1.0)
        assert d.adapt.auto_layer_k == (12 if generator.endswith("1024") else 10)
        assert d.prompts.custom == []


def test_disney_custom_has_about_fifty_distinct_prompts():
    d = load_domain("disney-custom")
    assert (d.source, d.target) == ("photo", "disney")
    assert 45 <= len(d.prompts.custom) <= 60
    assert len(set(d.prompts.custom)) == len(d.prompts.custom)
    assert all("{}" not in p and "disney" in p.lower() for p in d.prompts.custom)
    assert d.loss.lambda_custom == 0.2


def test_defaults_fill_a_minimal_file_and_derive_layer_k():
    d = parse_domain(MINIMAL.format(name="x", target="sketch"), "x.toml")
    assert d.adapt.auto_layer_k is None
    assert d.adapt.layer_k(18) == 12 and d.adapt.layer_k(16) == 10
    assert d.resolved().adapt.auto_layer_k == 5  # tiny generator: 32 px, n_latent 8
    assert d.mapper.lr == 0.05 and d.loss.lambda_custom == 0.2


@pytest.mark.parametrize(
    "text,needle",
    [
        ('name = "x"\nsource = "photo\n', "invalid TOML"),
        (MINIMAL.format(name="x", target="a") + "[adapt]\nsteps = 3\nstepz = 4\n", "unknown key 'adapt.stepz'"),
        (MINIMAL.format(name="x", target="a") + "[adapt]\nsteps = \"many\"\n", "key 'adapt.steps'"),
        ('name = "x"\nsource = "photo"\ngenerator = "tiny"\n', "missing required key 'target'"),
        (MINIMAL.format(name="x", target="a") + "colour = 3\n", "unknown key 'colour'"),
        (MINIMAL.format(name="x", target="a").replace('"tiny"', '"stylegan9"'), "unknown generator 'stylegan9'"),
        (MINIMAL.format(name="x", target="a") + "[[clip]]\nmodel = \"ViT-B/32\"\nweight = -1\n", "key 'clip.0.weight'"),
    ],
)
def test_broken_files_give_one_line_naming_file_and_key(tmp_path, text, needle):
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(DomainError) as info:
        load_domain_file(path)
    message = info.value.message
    assert needle in message
    assert str(path) in message
    assert "\n" not in message


def test_error_messages_point_at_the_line(tmp_path):
    path = tmp_path / "lines.toml"
    path.write_text(MINIMAL.format(name="x", target="a") + "\n[adapt]\nsteps = 3\nstepz = 4\n")
    with pytest.raises(DomainError, match=rf"{path.name}:8: unknown key 'adapt.stepz'"):
        load_domain_file(path)
    path.write_text(MINIMAL.format(name="x", target="a") + "\n[mapper]\nlr = -1.0\n")
    with pytest.raises(DomainError, match=rf"{path.name}:7: key 'mapper.lr'"):
        load_domain_file(path)
    path.write_text('name = "x"\nsource = "photo"\ntarget = "a\n')
    with pytest.raises(DomainError, match="line 3"):
        load_domain_file(path)


def test_lookup_order_path_then_user_then_builtin(tmp_path, monkeypatch):
    user_dir = tmp_path / "user-domains"
    user_dir.mkdir(exist_ok=True)
    # A user file named like a built-in shadows it.
    (user_dir / "disney.toml").write_text(MINIMAL.format(name="disney", target="user disney"))
    (user_dir / "mine.toml").write_text(MINIMAL.format(name="mine", target="my style"))
    assert find_domain("disney").origin == "user"
    assert load_domain("disney").target == "user disney"
    assert load_domain("mine").target == "my style"
    entries = [e for e in discover_domains() if e.name == "disney"]
    assert [(e.origin, e.shadowed_by) for e in entries] == [("user", None), ("builtin", "user")]
    # A path wins over every name.
    local = tmp_path / "disney.toml"
    local.write_text(MINIMAL.format(name="disney", target="path disney"))
    assert load_domain(str(local)).target == "path disney"
    assert find_domain(str(local)).origin == "path"


def test_broken_user_file_is_listed_not_fatal(tmp_path):
    user_dir = tmp_path / "user-domains"
    user_dir.mkdir(exist_ok=True)
    (user_dir / "bad.toml").write_text("name = \n")
    entries = {e.name: e for e in discover_domains()}
    assert entries["bad"].error and "invalid TOML" in entries["bad"].error
    assert entries["disney"].error is None
    with pytest.raises(DomainError, match="invalid TOML"):
        find_domain("bad")


def test_unknown_domain_lists_known_ones():
    with pytest.raises(DomainError) as info:
        find_domain("no-such-style")
    assert "unknown domain 'no-such-style'" in info.value.message
    assert "disney" in info.value.hint
    with pytest.raises(DomainError, match="no such file"):
        find_domain("missing/dir/style.toml")


def test_overrides_are_validated():
    d = load_domain("disney")
    o = d.with_overrides({"adapt.steps": 10, "mapper.lr": 0.1, "target": "pixar", "adapt.batch": None})
    assert (o.adapt.steps, o.mapper.lr, o.target, o.adapt.batch) == (10, 0.1, "pixar", 2)
    assert d.adapt.steps == 300  # the original is untouched
    with pytest.raises(DomainError, match="unknown key"):
        d.with_overrides({"adapt.stepz": 1})
    with pytest.raises(DomainError, match="adapt.steps"):
        d.with_overrides({"adapt.steps": 0})


def test_builtin_dir_is_packaged_and_round_trips_through_toml():
    files = sorted(Path(builtin_domain_dir()).glob("*.toml"))
    assert len(files) >= 11
    for f in files:
        d = load_domain_file(f)
        assert d.name == f.stem
        import tomli_w

        again = Domain.model_validate(tomllib.loads(tomli_w.dumps(d.to_toml_dict())))
        assert again == d
