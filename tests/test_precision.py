"""`--precision fp32|bf16|fp16`: validation, autocast where it belongs, fp32 losses and EMA, fp16 loss scaling, resume."""

import json
import math
import os
import signal

import pytest
import torch

from ipltool import precision as precision_module
from ipltool import registry
from ipltool.domain import parse_domain
from ipltool.errors import UsageError
from ipltool.precision import FP32, Precision
from ipltool.train import losses, stage2_run
from ipltool.train.run import RunDir
from ipltool.train.stage1 import train_mapper
from ipltool.train.stage2 import clip_terms, stage2_step, start_stage2

DOMAIN = """
name = "t"
source = "photo"
target = "disney"
generator = "tiny"
[mapper]
batch = 2
[adapt]
batch = 2
auto_layer_k = 3
auto_layer_batch = 2
n_sample = 4
"""


def _steps(stage2_models, precision=None, steps=2, seed=2):
    """Seeded stage-2 steps; `precision=None` calls `start_stage2` the way code written before the option does."""
    source, clip, prompts, mapper = stage2_models
    domain = parse_domain(DOMAIN, "t.toml")
    torch.manual_seed(seed)
    state = start_stage2(source, domain) if precision is None else start_stage2(source, domain, precision)
    terms = clip_terms([(clip, 1.0)], domain)
    records = [stage2_step(state, source, terms, domain, mapper, prompts) for _ in range(steps)]
    return state, records


def _watch_losses(monkeypatch, *names):
    """Record, for every call of the named loss functions, the dtypes of their tensors and whether autocast was on."""
    calls = []
    for name in names:
        real = getattr(losses, name)

        def watched(*args, _real=real, _name=name, **kwargs):
            out = _real(*args, **kwargs)
            dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
            calls.append((_name, dtypes | {out.dtype}, torch.is_autocast_enabled("cpu")))
            return out

        monkeypatch.setattr(losses, name, watched)
    return calls


def _watch_forward_dtypes(*modules):
    """Forward hooks that collect the output dtype of each module; returns (dtypes, handles)."""
    seen = set()
    handles = [m.register_forward_hook(lambda mod, args, out: seen.add(out.dtype)) for m in modules]
    return seen, handles


# ----------------------------------------------------------------------------
# The precision module


def test_names_are_checked_and_normalised():
    assert precision_module.check_precision(None) == "fp32"
    assert precision_module.check_precision(" BF16 ") == "bf16"
    with pytest.raises(UsageError, match="invalid precision 'fp8'") as err:
        precision_module.check_precision("fp8")
    assert "fp32, bf16, fp16, auto" in err.value.hint
    assert precision_module.check_precision(" Auto ") == "auto"


def test_fp32_is_no_autocast_and_no_scaling_while_reduced_precisions_autocast():
    fp32 = Precision.of("fp32", "cpu")
    assert fp32 == FP32 and not fp32.reduced and fp32.dtype == torch.float32
    with fp32.autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert not fp32.scaler().is_enabled()
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        prec = Precision.of(name, torch.device("cpu"))
        with prec.autocast():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
            assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == dtype
        assert prec.scaler().is_enabled() == (name == "fp16")  # bf16 needs no loss scaling


def test_combinations_that_cannot_work_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(UsageError, match="does not support bf16") as err:
        Precision.of("bf16", torch.device("cuda"))
    assert "fp16" in err.value.hint
    assert Precision.of("fp32", torch.device("cuda")).name == "fp32"  # fp32 needs nothing of the device
    monkeypatch.setattr(torch.amp.autocast_mode, "is_autocast_available", lambda device_type: False)
    with pytest.raises(UsageError, match="no autocast for mps"):
        Precision.of("fp16", torch.device("mps"))


def _cpu_with(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


def test_auto_is_bf16_where_the_hardware_has_it_natively_and_fp32_elsewhere(monkeypatch):
    for avx512_bf16, amx, expected in ((True, False, "bf16"), (False, True, "bf16"), (True, True, "bf16"), (False, False, "fp32")):
        _cpu_with(monkeypatch, avx512_bf16, amx)
        assert Precision.of("auto", "cpu").name == expected
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert Precision.of("auto", "cpu").name == "fp32"  # a torch without the probes: no claim of native bf16
    for capability, expected in (((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, c=capability: c)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        assert precision_module.native_precision("cuda:0") == expected
    assert precision_module.native_precision("mps") == "fp32"


def test_auto_on_the_command_line_stores_what_it_resolved_to_and_resumes_in_it(run_cli, tmp_path, monkeypatch):
    _cpu_with(monkeypatch, True, False)
    result = _cli_json(run_cli, "adapt", "--domain", "disney", "--smoke", "--precision", "auto", "--out", str(tmp_path / "a"))
    assert result["precision"] == "bf16"
    assert RunDir.open(result["run_dir"]).read_config()["run"]["precision"] == "bf16"
    # auto on a resume continues in the run's precision, even on a machine where auto means fp32.
    _cpu_with(monkeypatch, False, False)
    assert _cli_json(run_cli, "adapt", "--resume", result["run_dir"], "--precision", "auto", "--steps", "4")["precision"] == "bf16"
    assert _cli_json(run_cli, "train-mapper", "--domain", "disney", "--smoke", "--precision", "auto", "--out", str(tmp_path / "m"))["precision"] == "fp32"


# ----------------------------------------------------------------------------
# Training steps


def test_fp32_is_bitwise_the_path_without_the_option(stage2_models):
    s1, r1 = _steps(stage2_models)
    s2, r2 = _steps(stage2_models, Precision.of("fp32", "cpu"))
    assert r1 == r2
    for a, b in ((s1.trainable, s2.trainable), (s1.ema, s2.ema)):
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), key
    source, clip, prompts, _ = stage2_models
    domain = parse_domain(DOMAIN, "t.toml").with_overrides({"mapper.steps": 2})
    mappers = []
    for extra in ({}, {"precision": FP32}):
        torch.manual_seed(3)
        mapper = registry.build_mapper("mlp", prompts.n_ctx, prompts.dim, source.style_dim)
        train_mapper(mapper, source, prompts, domain, **extra)
        mappers.append(mapper.state_dict())
    for key, value in mappers[0].items():
        assert torch.equal(value, mappers[1][key]), key


def test_bf16_stage2_runs_the_networks_in_bf16_and_keeps_losses_weights_and_ema_fp32(stage2_models, monkeypatch):
    source, clip, _, _ = stage2_models
    calls = _watch_losses(monkeypatch, "directional_loss", "global_clip_loss")
    conv_dtypes, handles = _watch_forward_dtypes(source.convs[0].conv)
    clip_dtypes = []
    more = [clip.model.visual.transformer.resblocks[0].mlp.c_fc.register_forward_hook(lambda mod, args, out: clip_dtypes.append(out.dtype))]
    try:
        state, records = _steps(stage2_models, Precision.of("bf16", "cpu"))
    finally:
        for handle in handles + more:
            handle.remove()
    # The networks ran in bf16 (G_t and G_ema are copied from G_s after the hook, so they carry it too),
    # except CLIP's encoding of the step's G_s and G_t images, whose difference is the image direction.
    assert conv_dtypes == {torch.bfloat16}
    assert clip_dtypes == [torch.bfloat16, torch.float32, torch.float32] * 2  # per step: layer choice, then x_s and x_t
    # Every loss (the layer choice's global loss and the directional loss) in fp32, outside autocast.
    assert {name for name, _, _ in calls} == {"directional_loss", "global_clip_loss"}
    assert all(dtypes == {torch.float32} and not autocast for _, dtypes, autocast in calls)
    assert all(math.isfinite(r["loss"]) for r in records)
    for net in (state.trainable, state.ema):
        assert all(v.dtype == torch.float32 for v in net.state_dict().values())
    assert all(s["exp_avg"].dtype == torch.float32 for s in state.optimizer.state.values())
    assert not state.scaler.is_enabled() and not state.layer_scaler.is_enabled()


def test_bf16_stage1_autocasts_the_mapper_and_text_tower_but_not_the_loss(stage2_models, monkeypatch):
    source, _, prompts, _ = stage2_models
    calls = _watch_losses(monkeypatch, "contrastive_loss", "mean_cosine_distance")
    torch.manual_seed(3)
    mapper = registry.build_mapper("mlp", prompts.n_ctx, prompts.dim, source.style_dim)
    mapper_dtypes, handles = _watch_forward_dtypes(mapper)
    text_dtypes, more = _watch_forward_dtypes(prompts.clip.model.transformer.resblocks[0].mlp.c_fc)
    terms = []
    try:
        domain = parse_domain(DOMAIN, "t.toml").with_overrides({"mapper.steps": 2})
        train_mapper(mapper, source, prompts, domain, on_step=lambda step, t: terms.append(t), precision=Precision.of("bf16", "cpu"))
    finally:
        for handle in handles + more:
            handle.remove()
    # The fixed text features are encoded once in fp32; the learned prompts go through in bf16.
    assert mapper_dtypes == {torch.bfloat16} and text_dtypes == {torch.float32, torch.bfloat16}
    assert calls and all(dtypes == {torch.float32} and not autocast for _, dtypes, autocast in calls)
    assert all(math.isfinite(t["loss"]) for t in terms)
    assert all(p.dtype == torch.float32 for p in mapper.parameters())


def test_fp16_steps_scale_the_losses_and_the_scalers_survive_save_and_restore(stage2_models, tmp_path):
    state, records = _steps(stage2_models, Precision.of("fp16", "cpu"), steps=3)
    assert state.scaler.is_enabled() and state.layer_scaler.is_enabled()
    used = state.scaler.state_dict()
    assert used["_growth_tracker"] > 0 or used["scale"] < 2.0**16  # it scaled (and maybe backed off)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert all(v.dtype == torch.float32 for v in state.ema.state_dict().values())
    # Make the scales differ from a fresh scaler's, then round-trip through state.pt.
    state.scaler.load_state_dict({**state.scaler.state_dict(), "scale": 512.0, "_growth_tracker": 7})
    run = RunDir.create(tmp_path, "t", {"run": {"stage": "adapt"}})
    stage2_run._save(run, state)
    saved = torch.load(run.state_path, weights_only=True)
    assert saved["scalers"]["step"]["scale"] == 512.0 and "layer_choice" in saved["scalers"]
    fresh = start_stage2(stage2_models[0], parse_domain(DOMAIN, "t.toml"), Precision.of("fp16", "cpu"))
    assert stage2_run._restore(run, fresh)
    assert fresh.scaler.state_dict() == state.scaler.state_dict()
    assert fresh.layer_scaler.state_dict() == state.layer_scaler.state_dict()
    # A state saved without scalers (fp32, or before --precision existed) still loads.
    del saved["scalers"]
    run.save_state(saved)
    older = start_stage2(stage2_models[0], parse_domain(DOMAIN, "t.toml"), Precision.of("fp16", "cpu"))
    assert stage2_run._restore(run, older) and older.scaler.get_scale() == 2.0**16


# ----------------------------------------------------------------------------
# The commands


@pytest.mark.parametrize(
    "command", [("train-mapper", "--domain", "disney", "--smoke"), ("adapt", "--domain", "disney", "--smoke"), ("stylize", "x.jpg", "--smoke")]
)
def test_an_unknown_precision_is_a_one_line_error(run_cli, tmp_path, command):
    code, _, err = run_cli("--device", "cpu", *command, "--precision", "fp8", "--out", str(tmp_path / "out"))
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0] == "error: invalid precision 'fp8'" and lines[1:] == ["hint: use fp32, bf16, fp16, auto"]
    assert not (tmp_path / "out").exists()


def _cli_json(run_cli, *args):
    code, out, err = run_cli("--device", "cpu", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_train_mapper_and_adapt_in_bf16(run_cli, tmp_path):
    mapper = _cli_json(run_cli, "train-mapper", "--domain", "disney", "--smoke", "--precision", "bf16", "--out", str(tmp_path / "m"))
    adapted = _cli_json(run_cli, "adapt", "--domain", "disney", "--smoke", "--precision", "bf16", "--out", str(tmp_path / "a"))
    for result, stages in ((mapper, {"mapper"}), (adapted, {"mapper", "adapt"})):
        assert result["precision"] == "bf16"
        run = RunDir.open(result["run_dir"])
        assert run.read_config()["run"]["precision"] == "bf16"
        log = run.read_log()
        assert {r["stage"] for r in log} == stages and all(math.isfinite(r["loss"]) for r in log)
    weights = torch.load(RunDir.open(adapted["run_dir"]).generator_path, weights_only=True)["g_ema"]
    assert all(v.dtype == torch.float32 for v in weights.values())
    fp32 = _cli_json(run_cli, "adapt", "--domain", "disney", "--smoke", "--out", str(tmp_path / "f"))
    assert RunDir.open(fp32["run_dir"]).read_config()["run"]["precision"] == "fp32"
    assert [r["loss"] for r in RunDir.open(fp32["run_dir"]).read_log()] != [r["loss"] for r in log]


def test_fp16_adapt_resumes_exactly_with_its_scalers(run_cli, tmp_path, monkeypatch):
    args = ("adapt", "--domain", "disney", "--smoke", "--precision", "fp16", "--steps", "5")
    whole = _cli_json(run_cli, *args, "--out", str(tmp_path / "whole"))
    real_step = stage2_run.stage2_step

    def step_then_stop(state, *a, **k):
        record = real_step(state, *a, **k)
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return record

    with monkeypatch.context() as patch:
        patch.setattr(stage2_run, "stage2_step", step_then_stop)
        code, _, err = run_cli("--device", "cpu", *args, "--out", str(tmp_path / "cut"))
    assert code == 130, err
    cut = next((tmp_path / "cut").iterdir())
    saved = torch.load(cut / "state.pt", weights_only=True)
    assert saved["step"] == 2 and set(saved["scalers"]) == {"step", "layer_choice"}

    resumed = _cli_json(run_cli, "adapt", "--resume", str(cut))
    assert resumed["resumed_from"] == 2 and resumed["precision"] == "fp16"
    a = torch.load(RunDir.open(whole["run_dir"]).generator_path, weights_only=True)["g_ema"]
    b = torch.load(RunDir.open(cut).generator_path, weights_only=True)["g_ema"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in RunDir.open(cut).read_log()] == [r["loss"] for r in RunDir.open(whole["run_dir"]).read_log()]


def test_resume_refuses_another_precision_and_old_runs_are_fp32(run_cli, tmp_path):
    run_dir = _cli_json(run_cli, "adapt", "--domain", "disney", "--smoke", "--precision", "bf16", "--out", str(tmp_path))["run_dir"]
    code, _, err = run_cli("--device", "cpu", "adapt", "--resume", run_dir, "--precision", "fp16")
    assert code == 2 and "runs in bf16; --resume cannot switch it to fp16" in err.replace("\n", " ") and "Traceback" not in err
    # The same precision may be repeated; it changes nothing.
    assert _cli_json(run_cli, "adapt", "--resume", run_dir, "--precision", "bf16", "--steps", "4")["precision"] == "bf16"
    # A run made before --precision existed has no key: it is an fp32 run.
    run = RunDir.open(run_dir)
    config = run.read_config()
    del config["run"]["precision"]
    run.write_config(config)
    code, _, err = run_cli("--device", "cpu", "adapt", "--resume", run_dir, "--precision", "bf16")
    assert code == 2 and "runs in fp32" in err
    assert _cli_json(run_cli, "adapt", "--resume", run_dir, "--steps", "5")["precision"] == "fp32"


def test_stylize_in_bf16(run_cli, tmp_path):
    pytest.importorskip("dlib", reason="the align extra (dlib-bin) is not installed")
    skdata = pytest.importorskip("skimage.data", reason="scikit-image (dev extra) ships the test photo")
    from PIL import Image

    photo = tmp_path / "astronaut.jpg"
    Image.fromarray(skdata.astronaut()).save(photo, quality=95)
    latents = {}
    for name in ("fp32", "bf16"):
        out = tmp_path / name
        summary = _cli_json(run_cli, "stylize", str(photo), "--domain", "disney", "--smoke", "--save-latents",
                            "--precision", name, "--out", str(out))
        assert summary["counts"]["ok"] == 1 and summary["precision"] == name
        record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
        assert record["precision"] == name
        assert (out / record["outputs"][0]["stylized"]["disney"]).is_file()
        saved = torch.load(out / "latents" / "astronaut.pt", weights_only=True)
        assert saved["w_plus"].dtype == torch.float32 and saved["precision"] == name
        latents[name] = saved["w_plus"]
    assert not torch.equal(latents["fp32"], latents["bf16"])  # the encoder really ran under autocast
    torch.testing.assert_close(latents["bf16"], latents["fp32"], atol=0.1, rtol=0.1)


def test_bf16_activations_stay_bf16_between_layers():
    """Noise injection and the fused activation add float32 parameters; they must not
    turn a bf16 activation back into float32 (which would cost memory and bandwidth)."""
    from ipltool.models.stylegan2 import Generator

    torch.manual_seed(0)
    g = Generator(32, 64, 2, channel_multiplier=1)
    seen = []
    for module in g.modules():
        if type(module).__name__ == "StyledConv":
            module.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    with Precision.of("bf16", "cpu").autocast():
        g.synthesis(g.to_w_plus([g.mapping(torch.randn(2, 64))]), g.noise_list(randomize=False))
    assert seen and set(seen) == {torch.bfloat16}
