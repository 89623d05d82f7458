"""`ipl adapt` end to end on tiny models (`--smoke`): run dir, mappers, NADA, interrupt and resume."""

import json
import os
import signal

import pytest
import torch
from PIL import Image

from ipltool.figures import GAP, MARGIN, grid_layout, label_width
from ipltool.models.stylegan2 import load_generator
from ipltool.train import stage2_run
from ipltool.train.run import RunDir


def _adapt(run_cli, tmp_path, *args, out="runs"):
    code, stdout, err = run_cli("--device", "cpu", "adapt", *args, "--out", str(tmp_path / out), "--json")
    assert code == 0, err
    return json.loads(stdout), err


def _weights(run_dir):
    return torch.load(RunDir.open(run_dir).generator_path, weights_only=True)["g_ema"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_smoke_run_writes_everything_the_run_dir_promises(run_cli, tmp_path):
    result, err = _adapt(run_cli, tmp_path, "--domain", "disney", "--smoke")
    run = RunDir.open(result["run_dir"])
    assert "plumbing check" not in err and "run directory" not in err  # --json silences status lines (shown in test_progress)
    config = run.read_config()
    assert config["run"]["stage"] == "adapt" and config["run"]["smoke"] is True and config["target"] == "disney"
    assert config["adapt"]["auto_layer_k"] == 5 and config["adapt"]["steps"] == 3
    # generator.pt: {"g_ema": ...} that loads strictly into the architecture it came from
    ckpt = torch.load(run.generator_path, weights_only=True)
    assert "g_ema" in ckpt
    generator = load_generator(run.generator_path)
    assert generator.size == 32
    # samples every sample_every (2) steps and at the end (3): a column per latent, a source and an adapted row
    assert sorted(p.name for p in run.samples_dir.iterdir()) == ["step-000002.png", "step-000003.png"]
    assert config["adapt"]["sample_size"] == 256
    with Image.open(run.samples_dir / "step-000003.png") as grid:
        assert grid.size == grid_layout(2, 4, 256, ["source", "adapted"], caption="disney · ipl · step 3", group=2).size
        assert grid.width == 2 * MARGIN + label_width(["source", "adapted"], 256) + 4 * 256 + 3 * GAP  # 32 px tiles enlarged
    log = run.read_log()
    assert [(r["stage"], r["step"]) for r in log] == [("mapper", 1), ("mapper", 2), ("mapper", 3), ("adapt", 1), ("adapt", 2), ("adapt", 3)]
    for record in log[3:]:
        assert {"loss", "directional_0", "layers", "seconds"} <= set(record)
        assert len(record["layers"]) == 5 and all(0 <= i < 8 for i in record["layers"])
    assert run.mapper_path.exists() and run.state_path.exists()
    assert not [p for p in run.path.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("kind", ["mlp", "transformer-v2"])
def test_trained_mappers_load_into_adapt_without_flags(run_cli, tmp_path, kind):
    code, out, err = run_cli(
        "--device", "cpu", "train-mapper", "--domain", "disney", "--smoke", "--mapper-kind", kind,
        "--out", str(tmp_path / "mappers"), "--json",
    )
    assert code == 0, err
    mapper_run = json.loads(out)["run_dir"]
    result, _ = _adapt(run_cli, tmp_path, "--domain", "disney", "--smoke", "--mapper", mapper_run)
    run = RunDir.open(result["run_dir"])
    assert run.mapper_path.read_bytes() == (RunDir.open(mapper_run).mapper_path).read_bytes()
    assert {r["stage"] for r in run.read_log()} == {"adapt"}  # stage 1 did not run again
    assert run.read_config()["run"]["mapper_from"].endswith("mapper.pt")


def test_a_mapper_for_other_prompts_is_refused(run_cli, tmp_path):
    code, out, err = run_cli(
        "--device", "cpu", "train-mapper", "--domain", "disney", "--smoke", "--set", 'ctx_init="a picture of a cute"',
        "--out", str(tmp_path / "mappers"), "--json",
    )
    assert code == 0, err
    code, _, err = run_cli(
        "--device", "cpu", "adapt", "--domain", "disney", "--smoke", "--mapper", json.loads(out)["mapper"],
        "--out", str(tmp_path / "runs"),
    )
    assert code == 2 and "was trained for n_ctx" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def _official_mapper(path, n_ctx_extra=0, latent_dim=None):
    """The IPL authors' mapper.pt (`{"m": ..., "m_optim": ...}`) sized for the --smoke models of `disney`."""
    from test_mappers import _trained_mlp, save_official

    from ipltool.domain import load_domain
    from ipltool.models.clip import PromptEncoder, load_clip
    from ipltool.models.stylegan2 import TINY_CONFIG

    prompts = PromptEncoder(load_clip("tiny"), load_domain("disney").ctx_init)
    save_official(path, _trained_mlp(prompts.n_ctx + n_ctx_extra, prompts.dim, latent_dim or TINY_CONFIG.style_dim))
    return prompts


def test_the_authors_mapper_file_drives_adapt(run_cli, tmp_path):
    _official_mapper(tmp_path / "ipl-mapper.pt")
    code, _, err = run_cli(
        "--device", "cpu", "adapt", "--domain", "disney", "--smoke", "--mapper", str(tmp_path / "ipl-mapper.pt"),
        "--out", str(tmp_path / "runs"),
    )
    assert code == 0, err
    flat = " ".join(err.split())
    assert "stores no ctx_init or labels; it is used with ctx_init 'a photo of a'" in flat
    assert "trained for None" not in flat  # no labels, so no note about other labels
    (run_dir,) = (tmp_path / "runs").iterdir()
    run = RunDir.open(run_dir)
    assert run.mapper_path.read_bytes() == (tmp_path / "ipl-mapper.pt").read_bytes()
    assert {r["stage"] for r in run.read_log()} == {"adapt"}  # stage 1 did not run
    assert run.generator_path.is_file()


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"n_ctx_extra": 1}, "maps to 5 context vectors of width 64; this run's ctx_init has n_ctx 4"),
        ({"latent_dim": 512}, "was trained for latent_dim = 512, this run needs 64"),
    ],
    ids=["n_ctx", "latent_dim"],
)
def test_an_authors_mapper_file_of_other_sizes_is_refused(run_cli, tmp_path, sizes, message):
    prompts = _official_mapper(tmp_path / "ipl-mapper.pt", **sizes)
    assert (prompts.n_ctx, prompts.dim) == (4, 64)  # the numbers in the messages
    code, _, err = run_cli(
        "--device", "cpu", "adapt", "--domain", "disney", "--smoke", "--mapper", str(tmp_path / "ipl-mapper.pt"),
        "--out", str(tmp_path / "runs"),
    )
    assert code == 2 and message in " ".join(err.split()) and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def _stop_at(monkeypatch, step, how):
    """Make the stage-2 loop receive Ctrl-C (`how="sigint"`) or die (`"crash"`) at `step`."""
    real_step = stage2_run.stage2_step

    def step_then_stop(state, *args, **kwargs):
        if state.step + 1 == step and how == "crash":
            raise RuntimeError("simulated kill")
        record = real_step(state, *args, **kwargs)
        if state.step == step and how == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
        return record

    monkeypatch.setattr(stage2_run, "stage2_step", step_then_stop)


@pytest.mark.parametrize("how", ["sigint", "crash"])
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(run_cli, tmp_path, monkeypatch, how):
    args = ("--domain", "disney", "--smoke", "--steps", "8", "--save-every", "3")
    whole, _ = _adapt(run_cli, tmp_path, *args, out="whole")

    with monkeypatch.context() as patch:
        _stop_at(patch, 5, how)
        code, _, err = run_cli("--device", "cpu", "adapt", *args, "--out", str(tmp_path / "cut"))
    cut_dir = next((tmp_path / "cut").iterdir())
    if how == "sigint":  # the state of the step in flight is saved, then the run says how to go on
        assert code == 130 and "stopped at step 5 of 8" in err and f"ipl adapt --resume {cut_dir}" in err.replace("\n", "")
        assert torch.load(cut_dir / "state.pt", weights_only=True)["step"] == 5
    else:  # a kill leaves the last periodic state
        assert code == 1
        assert torch.load(cut_dir / "state.pt", weights_only=True)["step"] == 3
    assert not (cut_dir / "generator.pt").exists()

    resumed, _ = _adapt(run_cli, tmp_path, "--resume", str(cut_dir))
    assert resumed["resumed_from"] == (5 if how == "sigint" else 3)
    _assert_same_weights(_weights(whole["run_dir"]), _weights(cut_dir))
    log = RunDir.open(cut_dir).read_log()
    assert [r["step"] for r in log if r["stage"] == "adapt"] == list(range(1, 9))  # each step logged once
    whole_log = RunDir.open(whole["run_dir"]).read_log()
    assert [r["loss"] for r in log] == [r["loss"] for r in whole_log]


def test_resume_with_more_steps_extends_a_finished_run(run_cli, tmp_path):
    long, _ = _adapt(run_cli, tmp_path, "--domain", "disney", "--smoke", "--steps", "5", out="long")
    short, _ = _adapt(run_cli, tmp_path, "--domain", "disney", "--smoke", "--steps", "3", out="short")
    extended, _ = _adapt(run_cli, tmp_path, "--resume", short["run_dir"], "--steps", "5")
    assert extended["resumed_from"] == 3 and RunDir.open(short["run_dir"]).read_config()["adapt"]["steps"] == 5
    _assert_same_weights(_weights(long["run_dir"]), _weights(short["run_dir"]))
    code, _, err = run_cli("--device", "cpu", "adapt", "--resume", short["run_dir"], "--steps", "4")
    assert code == 2 and "never shortened" in err


def test_nada_baseline_with_global_loss_and_style_images(run_cli, tmp_path):
    result, _ = _adapt(run_cli, tmp_path, "--domain", "disney", "--smoke", "--method", "nada", "--set", "loss.lambda_global=0.5")
    run = RunDir.open(result["run_dir"])
    assert result["mapper"] is None and not run.mapper_path.exists()
    assert {r["stage"] for r in run.read_log()} == {"adapt"} and "global_0" in run.read_log()[0]

    style = tmp_path / "style"
    style.mkdir()
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (40, 50), colour).save(style / f"s{i}.png")
    styled, _ = _adapt(run_cli, tmp_path, "--domain", "disney", "--smoke", "--method", "nada", "--style-images", str(style))
    assert RunDir.open(styled["run_dir"]).read_config()["adapt"]["style_images"] == str(style)
    # a different target direction gives different weights
    text = _weights(run.path)
    assert any(not torch.equal(text[k], v) for k, v in _weights(styled["run_dir"]).items())


@pytest.mark.parametrize(
    "args, message",
    [
        (("--resume", "RUN", "--batch", "4"), "drop --batch"),
        (("--smoke",), "missing --domain"),
        (("--domain", "disney", "--smoke", "--style-images", "x"), "style_images is a NADA option"),
        (("--domain", "disney", "--smoke", "--layers", "9"), "only 8 W+ layers"),
        (("--domain", "disney", "--smoke", "--clip", "ViT-B/32=heavy"), "is not a number"),
        (("--domain", "disney", "--smoke", "--set", "adapt.stepz=3"), "unknown key 'adapt.stepz'"),
        (("--domain", "disney", "--smoke", "--mapper", "nowhere.pt"), "no mapper at nowhere.pt"),
        (("--domain", "disney"), "not in the cache"),
    ],
)
def test_bad_input_is_a_one_line_error(run_cli, tmp_path, args, message):
    args = tuple(str(tmp_path) if a == "RUN" else a for a in args)
    code, _, err = run_cli("--device", "cpu", "adapt", *args, "--out", str(tmp_path / "runs"))
    assert code == 2 and message in err.replace("\n", " ") and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_resume_refuses_a_train_mapper_run(run_cli, tmp_path):
    code, out, _ = run_cli("--device", "cpu", "train-mapper", "--domain", "disney", "--smoke", "--out", str(tmp_path), "--json")
    run_dir = json.loads(out)["run_dir"]
    code, _, err = run_cli("--device", "cpu", "adapt", "--resume", run_dir)
    assert code == 2 and "not an adapt run" in err and f"--mapper {run_dir}" in err.replace("\n", "")


def test_the_adapt_pipeline_is_a_library_call(tmp_path):
    # What `ipl adapt` runs, callable from Python (scripts, the web UI) without the CLI.
    from ipltool.domain import load_domain
    from ipltool.interrupt import StopRequest
    from ipltool.train.adapt import RunOptions, adapt
    from ipltool.train.run import RunDir
    from ipltool.train.setup import SMOKE_OVERRIDES

    domain = load_domain("disney").with_overrides({**SMOKE_OVERRIDES, "adapt.steps": 2}).resolved()
    stop, steps = StopRequest(), []

    def stage_progress(total, description):
        import contextlib

        @contextlib.contextmanager
        def watch():
            def on_step(step, terms):
                steps.append((description, step))
                stop.requested = description.startswith("stage 2")  # stop after stage 2's first step
            yield on_step

        return watch()

    from ipltool.errors import Interrupted

    with pytest.raises(Interrupted, match="stopped at step 1 of 2; the state is saved"):
        adapt(domain, tmp_path, RunOptions(smoke=True, stage_progress=stage_progress, stop=stop))
    (path,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert steps == [("stage 1: mapper", 1), ("stage 1: mapper", 2), ("stage 1: mapper", 3), ("stage 2: ipl", 1)]
    run = RunDir.open(path)
    resumed_domain, info = run.read()
    done = adapt(resumed_domain, options=RunOptions(smoke=info.smoke, precision=info.precision), run=run, info=info)
    assert done.run.path == path and done.run.generator_path.is_file() and done.stage2.resumed_from == 1
