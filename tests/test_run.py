"""Run directory: atomic writes, naming, config round trip, step log, resume state, RNG."""

from __future__ import annotations

import json
import os
import random
from datetime import datetime

import numpy as np
import pytest
import torch

from ipltool.errors import CheckpointError, RunConfigError, UsageError
from ipltool.train import run as run_mod
from ipltool.train.run import (
    RunDir,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    capture_rng_state,
    restore_rng_state,
)

NOW = datetime(2024, 5, 17, 13, 4, 5)


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """These tests reseed the global generators; put them back for the rest of the suite."""
    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    yield
    torch.set_rng_state(saved[0])
    random.setstate(saved[1])
    np.random.set_state(saved[2])


def _temp_files(directory):
    return [p.name for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom while pickling")


def _draw():
    return (torch.rand(5), [random.random() for _ in range(5)], random.gauss(0, 1), np.random.rand(5), np.random.randn())


def _assert_same_draws(a, b):
    assert torch.equal(a[0], b[0])
    assert a[1] == b[1] and a[2] == b[2]
    np.testing.assert_array_equal(a[3], b[3])
    assert a[4] == b[4]


# ---------------------------------------------------------------------------
# Atomic writes


def test_atomic_writes_replace_content_and_leave_no_temp(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.arange(3))
    assert _temp_files(tmp_path) == []


def test_atomic_torch_save_failing_pickle_keeps_old_file(tmp_path):
    target = tmp_path / "m.pt"
    atomic_torch_save({"w": torch.ones(2)}, target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"w": torch.zeros(2), "bad": _Unpicklable()}, target)
    assert target.read_bytes() == before
    assert _temp_files(tmp_path) == []


def test_atomic_write_failing_replace_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(run_mod.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert _temp_files(tmp_path) == []


# ---------------------------------------------------------------------------
# Creating and opening


def test_create_layout_and_never_reuses_a_dir(tmp_path):
    root = tmp_path / "runs"
    first = RunDir.create(root, "disney", {"a": 1}, now=NOW)
    second = RunDir.create(root, "disney", {"a": 2}, now=NOW)
    third = RunDir.create(root, "disney", {"a": 3}, now=NOW)
    assert first.path.name == "disney-20240517-130405"
    assert second.path.name == "disney-20240517-130405-2"
    assert third.path.name == "disney-20240517-130405-3"
    assert first.read_config() == {"a": 1} and second.read_config() == {"a": 2}
    assert first.samples_dir.is_dir()
    assert first.config_path == first.path / "config.toml"
    assert first.mapper_path.name == "mapper.pt" and first.generator_path.name == "generator.pt"
    assert first.state_path.name == "state.pt" and first.log_path.name == "log.jsonl"


def test_create_rejects_a_domain_name_that_is_not_a_name(tmp_path):
    with pytest.raises(UsageError, match="invalid domain name"):
        RunDir.create(tmp_path, "../escape", {}, now=NOW)
    assert list(tmp_path.iterdir()) == []


def test_config_round_trip_drops_none(tmp_path):
    config = {
        "name": "disney",
        "generator": "ffhq",
        "ctx_init": None,
        "clip": [{"model": "ViT-B-32", "pretrained": "openai", "weight": 1.0}],
        "adapt": {"steps": 300, "lr": 0.002, "auto_layer_k": None, "ema": True},
        "mapper": {"kind": "mlp", "options": {"depth": None}},
        "out": tmp_path / "x",
    }
    run = RunDir.create(tmp_path, "disney", config, now=NOW)
    assert run.read_config() == {
        "name": "disney",
        "generator": "ffhq",
        "clip": [{"model": "ViT-B-32", "pretrained": "openai", "weight": 1.0}],
        "adapt": {"steps": 300, "lr": 0.002, "ema": True},
        "mapper": {"kind": "mlp", "options": {}},
        "out": str(tmp_path / "x"),
    }
    assert RunDir.open(run.path).read_config() == run.read_config()


def test_open_rejects_what_is_not_a_run_dir(tmp_path):
    with pytest.raises(UsageError, match="not a run directory"):
        RunDir.open(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a run directory"):
        RunDir.open(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="not a run directory") as info:
        RunDir.open(tmp_path / "empty")
    assert "\n" not in info.value.message


# ---------------------------------------------------------------------------
# Step log


def test_log_converts_tensors_and_numpy(tmp_path):
    run = RunDir.create(tmp_path, "d", {}, now=NOW)
    run.log({"step": 1, "loss": torch.tensor(0.5), "layers": torch.tensor([1, 4]), "np": np.float32(0.25), "nan": float("nan")})
    (record,) = run.read_log()
    assert record["loss"] == 0.5 and record["layers"] == [1, 4] and record["np"] == 0.25
    assert record["nan"] != record["nan"]
    assert run.log_path.read_text().count("\n") == 1


def test_read_log_skips_partial_last_line_and_log_repairs_it(tmp_path):
    run = RunDir.create(tmp_path, "d", {}, now=NOW)
    assert run.read_log() == []
    for step in range(3):
        run.log({"step": step, "loss": 1.0 / (step + 1)})
    with open(run.log_path, "ab") as f:
        f.write(b'{"step": 3, "lo')  # killed mid-write
    assert [r["step"] for r in run.read_log()] == [0, 1, 2]
    resumed = RunDir.open(run.path)
    resumed.log({"step": 3, "loss": 0.25})
    assert [r["step"] for r in resumed.read_log()] == [0, 1, 2, 3]
    assert all(json.loads(line) for line in run.log_path.read_text().splitlines())


def test_read_log_reports_a_damaged_middle_line(tmp_path):
    run = RunDir.create(tmp_path, "d", {}, now=NOW)
    run.log_path.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(UsageError, match=r"log.jsonl:2"):
        run.read_log()


def test_truncate_log(tmp_path):
    run = RunDir.create(tmp_path, "d", {}, now=NOW)
    assert run.truncate_log(5) == 0 and not run.log_path.exists()
    run.log({"event": "start"})
    for step in range(10):
        run.log({"step": step})
    with open(run.log_path, "ab") as f:
        f.write(b'{"step": 10')
    assert run.truncate_log(after_step=6) == 3
    assert run.read_log() == [{"event": "start"}] + [{"step": s} for s in range(7)]
    assert run.log_path.read_bytes().endswith(b"\n")
    run.log({"step": 7})
    assert [r.get("step") for r in run.read_log()][-2:] == [6, 7]
    assert _temp_files(run.path) == []


def test_truncate_log_of_one_stage_keeps_the_other(tmp_path):
    run = RunDir.create(tmp_path, "d", {}, now=NOW)
    for stage in ("mapper", "adapt"):
        for step in (1, 2, 3):
            run.log({"stage": stage, "step": step})
    assert run.truncate_log(1, stage="adapt") == 2
    assert [(r["stage"], r["step"]) for r in run.read_log()] == [("mapper", 1), ("mapper", 2), ("mapper", 3), ("adapt", 1)]
    run.write_config({"adapt": {"steps": 9}})
    assert run.read_config() == {"adapt": {"steps": 9}}


# ---------------------------------------------------------------------------
# Resume state and RNG


def test_rng_capture_restore_in_memory():
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    random.gauss(0, 1)  # leaves a cached gauss in python's state
    np.random.randn()
    state = capture_rng_state()
    first = _draw()
    restore_rng_state(state)
    _assert_same_draws(first, _draw())


def test_state_round_trip_with_rng_through_disk(tmp_path):
    run = RunDir.create(tmp_path, "d", {}, now=NOW)
    assert run.load_state() is None
    torch.manual_seed(7)
    random.seed(8)
    np.random.seed(9)
    weights = {"w": torch.randn(3, 2), "b": torch.zeros(2)}
    run.save_state({"step": 42, "mapper": weights, "lr": 0.002, "kind": "mlp", "layers": [1, 4], "rng": capture_rng_state()})
    first = _draw()
    _draw()  # move every generator on

    state = torch.load(run.state_path, weights_only=True)  # readable without trusting pickles
    assert state["step"] == 42 and state["kind"] == "mlp" and state["layers"] == [1, 4]
    state = run.load_state()
    assert torch.equal(state["mapper"]["w"], weights["w"])
    restore_rng_state(state["rng"])
    _assert_same_draws(first, _draw())
    assert _temp_files(run.path) == []


def test_load_state_damaged_file_is_a_checkpoint_error(tmp_path):
    run = RunDir.create(tmp_path, "d", {}, now=NOW)
    run.state_path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        run.load_state()


def test_rng_capture_is_weights_only_loadable(tmp_path):
    state = capture_rng_state()
    assert set(state) >= {"torch", "python", "numpy"}
    assert state["torch"].dtype == torch.uint8
    atomic_torch_save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    assert loaded["python"][0] == random.getstate()[0] and len(loaded["python"][1]) == 625
    assert loaded["numpy"]["key"].shape == (624,)
    assert os.listdir(tmp_path) == ["rng.pt"]


def test_run_info_round_trips_and_read_returns_the_domain(tmp_path):
    from ipltool.domain import load_domain
    from ipltool.errors import DomainError
    from ipltool.train.run import RunDir, RunInfo, finished_runs

    domain = load_domain("disney").resolved()
    info = RunInfo(stage="adapt", smoke=True, device="cpu", precision="bf16", save_every=7, mapper_from="m.pt")
    run = RunDir.create(tmp_path, domain.name, {**domain.to_toml_dict(), "run": info.table()})
    read_domain, read_info = RunDir.open(run.path).read()
    assert read_domain == domain and read_info == info
    assert finished_runs("disney", tmp_path) == []  # no generator.pt yet
    run.generator_path.write_bytes(b"")
    assert finished_runs("disney", tmp_path) == [(run.path, info)]
    assert finished_runs("werewolf", tmp_path) == []

    # A config from before a key existed reads with that key's old default.
    config = run.read_config()
    del config["run"]["precision"]
    run.write_config(config)
    assert run.read_info().precision == "fp32"

    config["run"]["save_every"] = "often"
    run.write_config(config)
    with pytest.raises(UsageError, match=r"config.toml: invalid \[run\] table"):
        run.read_info()
    assert finished_runs("disney", tmp_path) == []  # an unreadable run is left out

    config["run"]["save_every"] = 7
    config["adapt"]["steps"] = -1
    run.write_config(config)
    with pytest.raises(RunConfigError, match="not a valid run config") as err:
        run.read()
    assert isinstance(err.value, DomainError) and "greater than or equal to 1" in err.value.reason
    assert str(run.config_path) not in err.value.reason  # the bare reason, for messages that name the file themselves
