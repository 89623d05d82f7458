"""Non-finite numbers are failures, never results (issue 14, section 2).

Training stops at the first NaN/inf loss or weight with one line naming the step and the
likely cause, and leaves the last finite state; stylize makes such a photo an `error`;
eval skips such a generator and never reports a NaN as a number. All on `--smoke` models.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipltool.errors import NonFiniteError
from ipltool.models.stylegan2 import TINY_CONFIG, build_generator, generator_checkpoint
from ipltool.precision import Precision
from ipltool.train.guard import MAX_SKIPPED_STEPS, StepGuard, max_abs
from ipltool.train.run import RunDir

NAN = float("nan")


def _cli(run_cli, *args):
    return run_cli("--device", "cpu", *args)


def _run_dir(out: Path) -> RunDir:
    (path,) = list(out.iterdir())
    return RunDir.open(path)


def _poison(state_dict: dict, value: float = NAN) -> dict:
    """The floating-point tensors of `state_dict` filled with `value`, in place."""
    for tensor in state_dict.values():
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            tensor.fill_(value)
    return state_dict


def _overflowing_generator(seed: int = 7):
    """A generator whose weights are all finite but whose pictures overflow to NaN (its constant input is 3e38)."""
    generator = build_generator(TINY_CONFIG, seed=seed)
    with torch.no_grad():
        generator.input.input.fill_(3e38)
    return generator


# ----------------------------------------------------------------------------
# The guard itself


class _Scaler:
    """Stands in for an enabled fp16 GradScaler: halves its scale on a skipped step."""

    def __init__(self):
        self.scale = 65536.0

    def is_enabled(self):
        return True

    def get_scale(self):
        return self.scale


def test_the_guard_tolerates_skipped_fp16_steps_but_not_a_run_of_them():
    weights = [torch.ones(3)]
    scaler = _Scaler()
    guard = StepGuard("stage 2", lambda: weights, lr=0.002, reference_lr=0.002, precision=Precision("fp16"), scaler=scaler)
    step = 0
    for _ in range(MAX_SKIPPED_STEPS - 1):  # skipped steps (even with a NaN loss: the scaler did not apply it)
        step += 1
        scaler.scale /= 2
        guard.check(step, NAN)
    guard.check(step + 1, 0.5)  # one good step resets the count
    step += 1
    with pytest.raises(NonFiniteError, match=rf"stage 2 step {step + MAX_SKIPPED_STEPS}: the fp16 loss scaler skipped {MAX_SKIPPED_STEPS} steps in a row"):
        for _ in range(MAX_SKIPPED_STEPS):
            step += 1
            scaler.scale /= 2
            guard.check(step, 0.5)


def test_the_guard_names_the_step_and_the_likely_cause():
    weights = [torch.ones(3)]
    guard = StepGuard("stage 1", lambda: weights, lr=0.05, reference_lr=0.05, inputs={"the mapper m.pt": [torch.full((2,), NAN)]})
    with pytest.raises(NonFiniteError, match="stage 1 step 1: the loss is NaN") as err:
        guard.check(1, NAN)
    assert "the mapper m.pt holds NaN weights" in err.value.hint
    guard = StepGuard("stage 2", lambda: weights, lr=1e30, reference_lr=0.002)
    guard.saved_step = 50
    weights[0][1] = math.inf
    with pytest.raises(NonFiniteError, match="stage 2 step 51: the updated weights hold inf values") as err:
        guard.check(51, 0.3)
    assert "learning rate (--lr 1e+30" in err.value.hint and "last finite state (step 50)" in err.value.hint
    assert math.isnan(max_abs([torch.ones(4), torch.tensor([1.0, NAN])])) and max_abs([torch.tensor([-3.0, 2.0])]) == 3.0


# ----------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("command", ["adapt", "train-mapper"])
def test_an_infinite_learning_rate_is_refused_before_any_run_dir(run_cli, tmp_path, command):
    code, _, err = _cli(run_cli, command, "--domain", "disney", "--smoke", "--lr", "inf", "--out", str(tmp_path / "runs"))
    assert code == 2 and "--lr: input should be a finite number (got inf)" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_huge_learning_rate_stops_adapt_at_the_guard_and_keeps_a_finite_resumable_state(run_cli, tmp_path):
    args = ("--domain", "disney", "--smoke", "--method", "nada", "--lr", "1e30", "--steps", "6", "--save-every", "1")
    code, out, err = _cli(run_cli, "adapt", *args, "--out", str(tmp_path / "runs"))
    assert code == 1 and "error: stage 2 step " in err and "likely cause: the learning rate (--lr 1e+30" in err
    assert "adapted generator written" not in out
    run = _run_dir(tmp_path / "runs")
    assert not run.generator_path.exists()
    state = run.load_state()
    assert state["stage"] == "adapt" and 1 <= state["step"] < 6
    assert all(math.isfinite(max_abs(state[key].values())) for key in ("trainable", "ema"))
    assert [r["step"] for r in run.read_log()] == list(range(1, state["step"] + 1))  # the non-finite step is not logged
    assert all(math.isfinite(r["loss"]) for r in run.read_log())
    # The state loads and resumes; with the same learning rate the guard stops it at the same step again.
    failed_at = err.split("stage 2 step ")[1].split(":")[0]
    code, _, again = _cli(run_cli, "adapt", "--resume", str(run.path))
    assert code == 1 and f"stage 2 step {failed_at}:" in again and not run.generator_path.exists()


def test_a_huge_learning_rate_stops_train_mapper(run_cli, tmp_path):
    code, out, err = _cli(run_cli, "train-mapper", "--domain", "disney", "--smoke", "--lr", "1e30", "--out", str(tmp_path / "runs"))
    assert code == 1 and "error: stage 1 step " in err and "likely cause: the learning rate (--lr 1e+30" in err
    assert "mapper written" not in out and not _run_dir(tmp_path / "runs").mapper_path.exists()


def test_a_mapper_with_nan_weights_writes_no_generator(run_cli, tmp_path):
    code, out, err = _cli(run_cli, "train-mapper", "--domain", "disney", "--smoke", "--out", str(tmp_path / "mappers"), "--json")
    assert code == 0, err
    path = Path(json.loads(out)["mapper"])
    ckpt = torch.load(path, weights_only=True)
    _poison(ckpt["state_dict"])
    torch.save(ckpt, path)
    code, out, err = _cli(run_cli, "adapt", "--domain", "disney", "--smoke", "--mapper", str(path), "--out", str(tmp_path / "runs"))
    # Refused when loaded (the checkpoint check), or at the first step by the guard, which names the mapper.
    assert code != 0 and "Traceback" not in err and "adapted generator written" not in out
    assert "mapper" in err and ("NaN" in err or "non-finite" in err)
    assert not list((tmp_path / "runs").rglob("generator.pt"))


@pytest.mark.parametrize("command", ["adapt", "train-mapper"])
def test_resuming_from_a_nan_state_is_refused(run_cli, tmp_path, command):
    quick = ("--method", "nada") if command == "adapt" else ()  # NADA: no stage 1 to wait for
    code, _, err = _cli(run_cli, command, "--domain", "disney", "--smoke", *quick, "--steps", "2", "--out", str(tmp_path))
    assert code == 0, err
    run = _run_dir(tmp_path)
    state = run.load_state()
    _poison(state["trainable" if command == "adapt" else "mapper"])
    run.save_state(state)
    finished = run.generator_path.read_bytes() if command == "adapt" else run.mapper_path.read_bytes()
    code, out, err = _cli(run_cli, command, "--resume", str(run.path), "--steps", "4")
    assert code != 0 and "state.pt" in err and "Traceback" not in err
    assert "written" not in out
    assert (run.generator_path if command == "adapt" else run.mapper_path).read_bytes() == finished  # the result is untouched


# ----------------------------------------------------------------------------
# Stylize and eval


@pytest.mark.parametrize("kind", ["overflowing", "nan"])
def test_stylize_with_a_broken_generator_records_an_error_never_ok(run_cli, tmp_path, kind):
    photo = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo)
    generator = _overflowing_generator() if kind == "overflowing" else build_generator(TINY_CONFIG, seed=7)
    checkpoint = generator_checkpoint(generator)
    if kind == "nan":
        _poison(checkpoint["g_ema"])
    torch.save(checkpoint, tmp_path / "broken.pt")
    out = tmp_path / "out"
    code, _, err = run_cli("stylize", str(photo), "--smoke", "--no-align", "-g", str(tmp_path / "broken.pt"), "--out", str(out))
    assert code != 0 and "Traceback" not in err
    manifest = out / "manifest.jsonl"
    if kind == "nan" and not manifest.exists():
        return  # refused when loaded (the checkpoint check): nothing was rendered at all
    (record,) = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert record["status"] == "error" and "generator 'broken'" in record["error"] and "NaN pixels" in record["error"]
    assert record["outputs"] == [] and not (out / "stylized").exists()


@pytest.fixture(scope="module")
def nada_run(tmp_path_factory, ipl_at) -> Path:
    """One finished `--smoke` NADA run (no stage 1: the quickest adapt run)."""
    root = tmp_path_factory.mktemp("nada")
    args = ["--quiet", "--device", "cpu", "adapt", "--domain", "disney", "--smoke", "--method", "nada", "--steps", "1", "--out", str(root / "runs")]
    assert ipl_at(root, *args) == 0
    return next((root / "runs").iterdir())


def test_eval_skips_a_generator_that_renders_nan_and_reports_no_number_for_it(run_cli, nada_run, tmp_path):
    pytest.importorskip("torch_fidelity", reason="the eval extra is not installed")
    broken = tmp_path / "broken-run"
    shutil.copytree(nada_run, broken, ignore=shutil.ignore_patterns("eval-cache"))
    torch.save(generator_checkpoint(_overflowing_generator()), broken / "generator.pt")
    report = tmp_path / "report"
    code, _, err = run_cli("eval", str(nada_run), str(broken), "--metrics", "clip", "--n", "4", "--report", str(report))
    assert code == 1 and f"skipped {broken}: its adapted generator renders NaN pixels" in err.replace("\n", "")
    runs = json.loads((report / "metrics.json").read_text())["runs"]
    assert [r["path"] for r in runs] == [str(nada_run)]
    code, _, err = run_cli("eval", str(broken), "--metrics", "clip", "--n", "4", "--report", str(tmp_path / "alone"))
    assert code == 1 and "nothing evaluated" in err and not (tmp_path / "alone" / "metrics.json").exists()


def test_eval_reports_a_nan_metric_as_null_and_exits_1(run_cli, nada_run, tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity", reason="the eval extra is not installed")
    from ipltool.metrics import formulas

    monkeypatch.setattr(formulas, "clip_score", lambda emb, text: NAN)
    report = tmp_path / "report"
    code, _, err = run_cli("eval", str(nada_run), "--metrics", "clip", "--n", "4", "--report", str(report))
    assert code == 1 and "clip_score is not a finite number" in err
    (run,) = json.loads((report / "metrics.json").read_text())["runs"]
    assert run["metrics"]["clip_score"] is None and run["reasons"]["clip_score"].startswith("not a finite number")
    (row,) = csv.DictReader((report / "metrics.csv").open())
    (line,) = [line for line in (report / "metrics.md").read_text().splitlines() if line.startswith("| disney·nada |")]
    assert row["clip_score"] == "" and line.split("|")[2].strip().startswith("–")  # "no value", with the note
