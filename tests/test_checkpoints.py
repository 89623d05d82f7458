"""`ipltool.checkpoints`: files refused before they are read, contents validated before anything is built."""

from __future__ import annotations

import copy
import math
import os
import pickle
import zipfile

import pytest
import torch

from ipltool import checkpoints, registry
from ipltool.errors import CheckpointError
from ipltool.models.mappers import load_mapper
from ipltool.models.stylegan2 import TINY_CONFIG, Generator, build_generator, generator_checkpoint, load_generator
from ipltool.train.run import capture_rng_state


@pytest.fixture(scope="module")
def tiny() -> Generator:
    return build_generator(TINY_CONFIG, seed=0, noise_strength=0.1).eval()


def _one_line(err: pytest.ExceptionInfo, *parts: str) -> None:
    message = err.value.message
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message


def _mapper_ckpt(n_ctx: int = 4, dim: int = 32, latent_dim: int = 64, kind: str = "mlp", **options) -> dict:
    mapper = registry.build_mapper(kind, n_ctx, dim, latent_dim, **options)
    return {"kind": kind, "init_args": dict(mapper.init_args), "state_dict": mapper.state_dict(), "optimizer": None}


@pytest.fixture
def no_real_build(monkeypatch):
    """Records every Generator / mapper construction with the default device at that moment."""
    devices: list[str] = []
    original_from_config = Generator.from_config.__func__
    original_build_mapper = registry.build_mapper

    def from_config(cls, config):
        devices.append(str(torch.empty(0).device))
        return original_from_config(cls, config)

    def build_mapper(*args, **kwargs):
        devices.append(str(torch.empty(0).device))
        return original_build_mapper(*args, **kwargs)

    monkeypatch.setattr(Generator, "from_config", classmethod(from_config))
    monkeypatch.setattr(registry, "build_mapper", build_mapper)
    return devices


# ----------------------------------------------------------------------------
# The file itself


def test_missing_folder_empty_and_special_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError) as err:
        checkpoints.read(tmp_path / "nope.pt", "generator checkpoint")
    _one_line(err, "generator checkpoint not found", "nope.pt")
    with pytest.raises(CheckpointError) as err:
        checkpoints.read(tmp_path, "mapper checkpoint")
    _one_line(err, "is a folder")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        checkpoints.read(tmp_path / "empty.pt", "resume state")
    _one_line(err, "empty.pt is empty (0 bytes)")
    if hasattr(os, "mkfifo"):  # a FIFO would block torch.load forever
        os.mkfifo(tmp_path / "fifo.pt")
        with pytest.raises(CheckpointError) as err:
            checkpoints.read(tmp_path / "fifo.pt")
        _one_line(err, "not a regular file")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError) as err:
        checkpoints.read(tmp_path / "list.pt", "weights file")
    _one_line(err, "holds a list, not a dict")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="cannot read"):
        checkpoints.read(tmp_path / "junk.pt")


@pytest.mark.parametrize("kind", ["pickle", "zip"])
def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, kind):
    from test_hostile_files import write_hostile

    marker = tmp_path / "MARKER"
    path = write_hostile(tmp_path / "evil.pt", kind, marker)
    with pytest.raises(CheckpointError) as err:
        checkpoints.read(path, "generator checkpoint")
    _one_line(err, "evil.pt", "refused", "GLOBAL exec")
    assert "\x1b" not in err.value.message  # torch's message carries terminal escapes
    assert not marker.exists()


def test_a_zip_bomb_is_refused_before_torch_inflates_it(tmp_path, monkeypatch):
    """A torch archive whose storage is deflated: 64 MiB of zeros in a file of about 70 kB."""
    buffer = tmp_path / "small.pt"
    torch.save({"w": torch.zeros(4)}, buffer)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                with dst.open(info.filename, "w", force_zip64=True) as out:
                    for _ in range(64):
                        out.write(bytes(1 << 20))
            else:
                dst.writestr(info.filename, src.read(info.filename))
    assert bomb.stat().st_size < 1 << 20

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load must not see a zip bomb")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(CheckpointError) as err:
        checkpoints.read(bomb, "generator checkpoint")
    _one_line(err, "bomb.pt", "zip bomb", "67.1 MB")


def test_tensors_declaring_more_than_the_file_holds_are_refused(tmp_path):
    """A stride-0 view describes 400 MB over a 4-byte storage: refused, never materialized."""
    path = tmp_path / "views.pt"
    torch.save({"g_ema": {"style.1.weight": torch.zeros(1).expand(10**8)}}, path)
    assert path.stat().st_size < 10_000
    with pytest.raises(CheckpointError) as err:
        checkpoints.read(path)
    _one_line(err, "views.pt", "declare 400.0 MB")


# ----------------------------------------------------------------------------
# Non-finite weights


def test_non_finite_generator_weights_are_refused(tmp_path, tiny):
    ckpt = generator_checkpoint(tiny)
    ckpt["g_ema"]["conv1.conv.weight"] = ckpt["g_ema"]["conv1.conv.weight"].clone()
    ckpt["g_ema"]["conv1.conv.weight"][0, 0, 0, 0, 0] = math.nan
    torch.save(ckpt, tmp_path / "g.pt")
    with pytest.raises(CheckpointError) as err:
        load_generator(tmp_path / "g.pt")
    _one_line(err, "g.pt", "non-finite", "conv1.conv.weight")


def test_non_finite_mapper_weights_are_refused(tmp_path):
    ckpt = _mapper_ckpt()
    ckpt["state_dict"]["mapping.4.bias"] = torch.full_like(ckpt["state_dict"]["mapping.4.bias"], math.inf)
    torch.save(ckpt, tmp_path / "mapper.pt")
    with pytest.raises(CheckpointError) as err:
        load_mapper(tmp_path / "mapper.pt")
    _one_line(err, "mapper.pt", "non-finite", "mapping.4.bias")


def test_non_finite_encoder_weights_are_refused(tmp_path, tiny):
    from ipltool.models.encoders import E4E, save_checkpoint

    inv = E4E.tiny(tiny)
    save_checkpoint(tmp_path / "e4e.pt", inv.encoder, inv.decoder, None, inv.latent_avg)
    ckpt = torch.load(tmp_path / "e4e.pt", weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.startswith("encoder.") and ckpt["state_dict"][k].is_floating_point())
    ckpt["state_dict"][key] = torch.full_like(ckpt["state_dict"][key], math.nan)
    torch.save(ckpt, tmp_path / "e4e.pt")
    with pytest.raises(CheckpointError) as err:
        E4E.load(tmp_path / "e4e.pt")
    _one_line(err, "e4e.pt", "non-finite", key)


def test_non_finite_metric_weights_are_refused(tmp_path):
    from ipltool.metrics import build_extractor

    torch.save({"conv.weight": torch.tensor([1.0, math.nan])}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as err:
        build_extractor("sifid", "cpu", weights=tmp_path / "w.pth")
    _one_line(err, "w.pth", "non-finite", "conv.weight")


# ----------------------------------------------------------------------------
# Configs: validated, and compared with the weights, before anything is built


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_mlp": 10**6}, "n_mlp = 1000000 is outside the range real models use (1..16)"),
        ({"style_dim": 10**5}, "style_dim = 100000 is outside"),
        ({"size": 4096}, "size = 4096 is outside"),
        ({"size": 48}, "size = 48 is not a power of two"),
        ({"channel_max": 10**6}, "channel_max = 1000000 is outside"),
        ({"size": "32"}, "size must be an integer, not '32'"),
        ({"n_mlp": True}, "n_mlp must be an integer"),
        ({"n_mlp": 2.0}, "n_mlp must be an integer"),
        ({"lr_mlp": math.nan}, "lr_mlp must be a number"),
        ({"bogus": 1}, "unknown key(s) in its generator config: bogus"),
        ({"size": None}, "size must be an integer"),
    ],
)
def test_generator_configs_are_validated_before_building(tmp_path, tiny, no_real_build, change, message):
    ckpt = generator_checkpoint(tiny)
    ckpt["config"].update(change)
    torch.save(ckpt, tmp_path / "g.pt")
    with pytest.raises(CheckpointError) as err:
        load_generator(tmp_path / "g.pt")
    _one_line(err, "g.pt", message)
    assert no_real_build == []


@pytest.mark.parametrize("config", ["not a table", [32]])
def test_a_config_of_the_wrong_type_is_refused(tmp_path, tiny, config):
    torch.save({**generator_checkpoint(tiny), "config": config}, tmp_path / "g.pt")
    with pytest.raises(CheckpointError) as err:
        load_generator(tmp_path / "g.pt")
    _one_line(err, "g.pt", "not a table of settings")


def test_a_config_that_does_not_describe_the_weights_is_refused_before_building(tmp_path, tiny, no_real_build):
    """A 1024 px config over tiny weights would allocate 30M parameters: refused by comparing shapes first."""
    torch.save({**generator_checkpoint(tiny), "config": {"size": 1024}}, tmp_path / "g.pt")
    with pytest.raises(CheckpointError) as err:
        load_generator(tmp_path / "g.pt")
    _one_line(err, "g.pt", "does not fit a 1024px generator", "weights are those of a 32px one")
    assert no_real_build == []


def test_tiny_and_inferred_generators_still_load(tmp_path, tiny):
    torch.save(generator_checkpoint(tiny), tmp_path / "with-config.pt")
    torch.save({"g_ema": tiny.state_dict()}, tmp_path / "inferred.pt")
    for name in ("with-config.pt", "inferred.pt"):
        loaded = load_generator(tmp_path / name)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in tiny.state_dict().items())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_ctx": 10**7}, "init_args n_ctx = 10000000 is outside the range real models use (1..256)"),
        ({"dim": 10**6}, "init_args dim = 1000000 is outside"),
        ({"latent_dim": 0}, "init_args latent_dim = 0 is outside"),
        ({"n_ctx": "4"}, "init_args n_ctx must be an integer, not '4'"),
        ({"nhead": [4]}, "init_args option nhead is a list, not a plain value"),
        ({"depth": math.inf}, "init_args option depth = inf is not finite"),
    ],
)
def test_mapper_args_are_validated_before_building(tmp_path, no_real_build, change, message):
    ckpt = _mapper_ckpt()
    ckpt["init_args"].update(change)
    torch.save(ckpt, tmp_path / "mapper.pt")
    no_real_build.clear()
    with pytest.raises(CheckpointError) as err:
        load_mapper(tmp_path / "mapper.pt")
    _one_line(err, "mapper.pt", message)
    assert no_real_build == []


def test_mapper_args_that_do_not_describe_the_weights_are_refused_on_the_meta_device(tmp_path, no_real_build):
    """In range, but 256 x 4096 outputs over weights for 4 x 32: only a meta-device build happens."""
    ckpt = _mapper_ckpt()
    ckpt["init_args"].update(n_ctx=256, dim=4096, latent_dim=1024)
    torch.save(ckpt, tmp_path / "mapper.pt")
    no_real_build.clear()
    with pytest.raises(CheckpointError) as err:
        load_mapper(tmp_path / "mapper.pt")
    _one_line(err, "mapper.pt", "does not fit a 'mlp' mapper", "wrong shape")
    assert no_real_build == ["meta"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.__setitem__("kind", 5), "its 'kind' is 5, not a mapper name"),
        (lambda c: c.__setitem__("kind", "nope"), "unknown kind"),
        (lambda c: c.pop("init_args"), "init_args is a NoneType"),
        (lambda c: c["init_args"].pop("dim"), "init_args has no dim"),
        (lambda c: c["init_args"].update(nhead=4), "init_args do not build a 'mlp' mapper (mapper 'mlp' got unknown option(s): nhead)"),
        (lambda c: c["state_dict"].__setitem__("mapping.1.weight", [1.0]), "entry 'mapping.1.weight' is a list, not a tensor"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_mapper_checkpoints_with_wrong_keys_or_types(tmp_path, edit, message):
    ckpt = _mapper_ckpt()
    edit(ckpt)
    torch.save(ckpt, tmp_path / "mapper.pt")
    with pytest.raises(CheckpointError) as err:
        load_mapper(tmp_path / "mapper.pt")
    _one_line(err, "mapper.pt", message)


def test_valid_mappers_still_load(tmp_path):
    for kind, options in (("mlp", {}), ("transformer-v2", {"nhead": 2, "per_sample": True})):
        ckpt = _mapper_ckpt(kind=kind, **options)
        torch.save(ckpt, tmp_path / f"{kind}.pt")
        mapper, loaded = load_mapper(tmp_path / f"{kind}.pt")
        assert mapper.init_args == ckpt["init_args"] and loaded["kind"] == kind


# ----------------------------------------------------------------------------
# Resume states


@pytest.fixture
def stage2_like(tiny):
    """A live stage-2-like run (trainable, EMA, Adam after one step, fixed z) and the state it saves."""
    trainable = copy.deepcopy(tiny).train().requires_grad_(True)
    ema = copy.deepcopy(tiny)
    optimizer = torch.optim.Adam(trainable.parameters(), lr=1e-3)
    sum(p.sum() for p in trainable.parameters()).backward()
    optimizer.step()
    fixed_z = torch.randn(4, TINY_CONFIG.style_dim)
    saved = {
        "stage": "adapt", "step": 3, "trainable": trainable.state_dict(), "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(), "fixed_z": fixed_z, "rng": capture_rng_state(),
    }
    spec = {
        "stage": "adapt", "modules": {"trainable": trainable, "ema": ema}, "optimizers": {"optimizer": optimizer},
        "tensors": {"fixed_z": fixed_z},
    }
    return copy.deepcopy(saved), spec


def _exp_avg_of_first(saved):
    return saved["optimizer"]["state"][0]["exp_avg"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("ema"), "missing: ema"),
        (lambda s: s.pop("rng"), "missing: rng"),
        (lambda s: s.__setitem__("step", "3"), "step is a str, not an integer"),
        (lambda s: s.__setitem__("step", -4), "step -4 is out of range (0..10)"),
        (lambda s: s.__setitem__("step", 11), "step 11 is out of range (0..10)"),
        (lambda s: s.__setitem__("stage", "mapper"), "holds a 'mapper' state, not 'adapt'"),
        (lambda s: s.__setitem__("trainable", [1, 2]), "trainable state dict is a list"),
        (lambda s: s["ema"].__setitem__("conv1.conv.weight", torch.zeros(2)), "wrong shape (first: conv1.conv.weight is [2]"),
        (lambda s: s["ema"].pop("conv1.conv.weight"), "1 missing (first: conv1.conv.weight)"),
        (lambda s: s["ema"].__setitem__("extra", torch.zeros(2)), "1 unexpected (first: extra)"),
        (lambda s: s.__setitem__("fixed_z", torch.zeros(5, 3)), "fixed_z is a [5, 3] torch.float32 tensor, expected [4, 64]"),
        (lambda s: s["fixed_z"].fill_(math.nan), "non-finite weights (NaN or inf), first in fixed_z"),
        (lambda s: s["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(7, 7)), "exp_avg of parameter 0 has shape [7, 7]"),
        (lambda s: s["optimizer"]["param_groups"].append({"params": []}), "has 2 parameter group(s), the optimizer has 1"),
        (lambda s: s["optimizer"]["state"].__setitem__(999, {}), "state for parameter 999, which no group lists"),
        (lambda s: s["rng"].__setitem__("torch", torch.zeros(3, dtype=torch.uint8)), "rng torch must be a uint8 tensor"),
        (lambda s: s["rng"]["python"].__setitem__(1, [0] * 10), "rng python must be"),
        (lambda s: s["rng"].__setitem__("evil", 1), "unknown entries: evil"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_planted_or_foreign_states_are_refused(tmp_path, stage2_like, edit, message):
    saved, spec = stage2_like
    edit(saved)
    with pytest.raises(CheckpointError) as err:
        checkpoints.validate_state(saved, tmp_path / "state.pt", max_step=10, **spec)
    _one_line(err, "state.pt", message)
    assert "delete it" in err.value.hint or "earlier checkpoint" in err.value.hint


def test_a_valid_state_passes_and_the_stage_says_whose_it_is(tmp_path, stage2_like):
    saved, spec = stage2_like
    assert checkpoints.validate_state(saved, tmp_path / "state.pt", max_step=10, **spec) is saved
    assert checkpoints.state_stage(saved, "state.pt") == "adapt"
    for foreign in ({"step": 1}, {"stage": 3}, {"stage": "other"}, [1]):
        with pytest.raises(CheckpointError, match="not an ipltool resume state"):
            checkpoints.state_stage(foreign, "state.pt")


def test_scaler_states_are_checked(tmp_path, stage2_like):
    saved, spec = stage2_like
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    saved["scalers"] = {"step": {**scaler.state_dict(), "scale": -1.0}}
    with pytest.raises(CheckpointError, match="scalers.step scale must be positive"):
        checkpoints.validate_state(saved, tmp_path / "state.pt", scalers={"step": scaler}, **spec)
    saved["scalers"] = {"other": scaler.state_dict()}
    with pytest.raises(CheckpointError, match="scalers must be a table of step"):
        checkpoints.validate_state(saved, tmp_path / "state.pt", scalers={"step": scaler}, **spec)


# ----------------------------------------------------------------------------
# Feature caches and torch-fidelity


def test_feature_caches_that_cannot_be_trusted_read_as_none(tmp_path):
    good = {"n": 2, "features": {"2048": torch.zeros(3, 4)}}
    torch.save(good, tmp_path / "c.pt")
    assert checkpoints.read_feature_cache(tmp_path / "c.pt")["n"] == 2
    too_few_rows, wrong_type, no_features, not_a_tensor = (
        {"n": 5, "features": {"2048": torch.zeros(3, 4)}}, {"n": "2", "features": {}}, {"n": 2, "features": {}}, {"n": 1, "features": {"x": [1]}}
    )
    for bad in (too_few_rows, wrong_type, no_features, not_a_tensor):
        torch.save(bad, tmp_path / "c.pt")
        assert checkpoints.read_feature_cache(tmp_path / "c.pt") is None
    (tmp_path / "c.pt").write_bytes(pickle.dumps({"n": 1}, protocol=2))
    assert checkpoints.read_feature_cache(tmp_path / "c.pt") is None


def test_torch_fidelity_never_unpickles_a_user_weights_file(tmp_path):
    """`calculate_metrics(**fidelity_kwargs)` builds our registered class, which reads the file itself."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from ipltool.metrics.inception import VerifiedInceptionV3, register_verified
    from test_hostile_files import write_hostile

    marker = tmp_path / "MARKER"
    name = register_verified()
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    assert cls is VerifiedInceptionV3 and issubclass(cls, FeatureExtractorInceptionV3)
    for kind in ("pickle", "zip"):
        path = write_hostile(tmp_path / f"{kind}.pth", kind, marker)
        with pytest.raises(CheckpointError, match="refused"):
            cls(name, ["2048"], feature_extractor_weights_path=str(path))
    assert not marker.exists()


def test_an_eof_error_is_reported_as_a_bug_not_as_a_ctrl_c(run_cli, monkeypatch):
    """click turns an EOFError escaping a command into "Abort" (exit 130, as Ctrl-C); ipl says what it was."""
    from ipltool import hub

    def truncated(*args, **kwargs):
        raise EOFError("Ran out of input")

    monkeypatch.setattr(hub, "import_file", truncated)
    code, _, err = run_cli("fetch", "--import", "inception-fid", "x.pth")
    assert code == 1 and "unexpected EOFError: Ran out of input" in err and "aborted" not in err
